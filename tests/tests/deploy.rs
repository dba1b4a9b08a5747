//! The deployment files are real: the systemd units pass `systemd-analyze verify` (with
//! their ExecStart pointed at the binaries just built), and the example configs in
//! `config/` load with the binaries' own `check` commands.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use calwatch_tests::{bin, run_to_end, tool, workspace};

#[test]
fn deploy_systemd_units_verify() {
    if !tool("systemd-analyze", &["--version"], "systemd") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("calwatch-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut units = Vec::new();
    for name in ["calwatch-agent", "calwatch-gateway"] {
        let text =
            std::fs::read_to_string(workspace().join(format!("deploy/systemd/{name}.service")))
                .unwrap();
        let installed = format!("/usr/local/bin/{name}");
        assert!(text.contains(&installed), "{name}.service runs {installed}");
        for hardening in [
            "NoNewPrivileges=true",
            "ProtectSystem=strict",
            "ProtectHome=true",
            "StateDirectory=calwatch",
            "User=calwatch",
        ] {
            assert!(text.contains(hardening), "{name}.service lacks {hardening}");
        }
        let unit = dir.join(format!("{name}.service"));
        std::fs::write(&unit, text.replace(&installed, bin(name).to_str().unwrap())).unwrap();
        units.push(unit);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Outside a booted systemd (containers, CI) verify may complain about the manager
    // itself; what matters is nothing about our units.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("calwatch")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn deploy_example_configs_load() {
    let (code, out, err) = run_to_end(
        &bin("calwatch-agent"),
        &[
            "check",
            "--config",
            workspace().join("config/agent.toml").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let mut profiles = Vec::new();
    for profile in std::fs::read_dir(workspace().join("config/profiles")).unwrap() {
        profiles.push(profile.unwrap().path());
    }
    assert!(
        profiles.len() >= 3,
        "config/profiles holds the shipped maps"
    );
    let mut args = vec!["check".to_string()];
    for p in &profiles {
        args.push("--profile".into());
        args.push(p.to_str().unwrap().into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run_to_end(&bin("calwatch-agent"), &args);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches(": ok (").count(), profiles.len(), "{out}");
    // And a broken profile is refused with its file and line.
    let bad =
        std::env::temp_dir().join(format!("calwatch-bad-profile-{}.toml", std::process::id()));
    std::fs::write(&bad, "kind = \"scale\"\nmodel = \"x\"\n\n[[value]]\nname = \"gross_kg\"\ntable = \"holding\"\naddress = 70000\ntype = \"u16\"\n").unwrap();
    let (code, _, err) = run_to_end(
        &bin("calwatch-agent"),
        &["check", "--profile", bad.to_str().unwrap()],
    );
    std::fs::remove_file(&bad).unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(bad.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    let (code, out, err) = run_to_end(
        &bin("calwatch-gateway"),
        &[
            "check",
            "--config",
            workspace().join("config/gateway.toml").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
}
