//! The deployment files are real: the systemd units pass `systemd-analyze verify` (with
//! their ExecStart pointed at the binaries just built), and the example configs in
//! `config/` load with the binaries' own `check` commands.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use calwatch_tests::{bin, run_to_end, workspace};

#[test]
fn deploy_systemd_units_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze not installed");
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
    for profile in std::fs::read_dir(workspace().join("config/profiles")).unwrap() {
        let p = profile.unwrap().path();
        let (code, _, err) = run_to_end(
            &bin("calwatch-agent"),
            &[
                "simulate",
                "--profile",
                p.to_str().unwrap(),
                "--listen",
                "127.0.0.1:1",
                "--count",
                "1",
            ],
        );
        // Port 1 is privileged or taken: the profile was parsed (exit 1 = cannot listen), not rejected (2).
        assert_ne!(code, 2, "{}: {err}", p.display());
    }
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
