//! The README's configuration reference and the code agree, both ways: every key the
//! binaries accept is documented, and every documented key is accepted. The keys the code
//! accepts are read from the binaries themselves: a probe key at each table makes `check`
//! answer "unknown field `__probe__`, expected one of …", and every field that is a table
//! (or an array of tables) is probed in turn. The example configs in `config/` load.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::Path;

use calwatch_tests::{bin, run_to_end, workspace};

/// The fields `check` lists for the table at `path` (`None`: not a table of known fields).
fn probe(binary: &str, dir: &Path, path: &[String], array: bool) -> Option<Vec<String>> {
    let file = dir.join(format!("probe-{}.toml", path.join("-")));
    let text = if path.is_empty() {
        "__probe__ = 1\n".to_string()
    } else if array {
        format!("[[{}]]\n__probe__ = 1\n", path.join("."))
    } else {
        format!("[{}]\n__probe__ = 1\n", path.join("."))
    };
    std::fs::write(&file, text).unwrap();
    let (_, _, err) = run_to_end(&bin(binary), &["check", "--config", file.to_str().unwrap()]);
    // serde says `expected `a``, `expected `a` or `b``, or `expected one of `a`, `b`, …`.
    let list = err.split("unknown field `__probe__`, expected ").nth(1)?;
    let list = list.lines().next().unwrap_or("");
    let list = list.strip_prefix("one of ").unwrap_or(list);
    Some(
        list.split(", ")
            .flat_map(|f| f.split(" or "))
            .map(|f| f.trim().trim_matches('`').to_string())
            .filter(|f| !f.is_empty())
            .collect(),
    )
}

/// Every dotted key `binary` accepts (arrays of tables as `device.id`).
fn code_keys(binary: &str, dir: &Path) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut todo: Vec<Vec<String>> = vec![Vec::new()];
    while let Some(path) = todo.pop() {
        let fields = probe(binary, dir, &path, false)
            .or_else(|| probe(binary, dir, &path, true))
            .unwrap_or_else(|| panic!("{binary}: table {path:?} lists no fields"));
        for f in fields {
            let mut child = path.clone();
            child.push(f);
            if probe(binary, dir, &child, false).is_some()
                || probe(binary, dir, &child, true).is_some()
            {
                todo.push(child);
            } else {
                keys.insert(child.join("."));
            }
        }
    }
    keys
}

/// The keys in the first column of the table under `heading` in the README.
fn readme_keys(heading: &str) -> BTreeSet<String> {
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let section = readme
        .split(&format!("\n## {heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let section = section.split("\n## ").next().unwrap();
    let mut keys = BTreeSet::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let first = line.split('|').nth(1).unwrap();
        for k in first.split(',') {
            let k = k.trim().trim_matches('`');
            if !k.is_empty() {
                keys.insert(k.to_string());
            }
        }
    }
    assert!(!keys.is_empty(), "no keys in README section {heading:?}");
    keys
}

fn assert_same(what: &str, code: &BTreeSet<String>, readme: &BTreeSet<String>) {
    let undocumented: Vec<_> = code.difference(readme).collect();
    let unknown: Vec<_> = readme.difference(code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "{what}: accepted but not in the README: {undocumented:?}; in the README but not accepted: {unknown:?}"
    );
}

#[test]
fn config_reference_in_readme_matches_the_code() {
    let dir = std::env::temp_dir().join(format!("calwatch-config-ref-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let agent = code_keys("calwatch-agent", &dir);
    assert!(
        agent.contains("mqtt.url") && agent.contains("device.interval_ms"),
        "{agent:?}"
    );
    assert_same("agent.toml", &agent, &readme_keys("agent.toml reference"));
    let gateway = code_keys("calwatch-gateway", &dir);
    assert!(
        gateway.contains("checks.drift.lambda") && gateway.contains("sink.kind"),
        "{gateway:?}"
    );
    assert_same(
        "gateway.toml",
        &gateway,
        &readme_keys("gateway.toml reference"),
    );
    std::fs::remove_dir_all(&dir).unwrap();

    // And the examples load.
    for (binary, file) in [
        ("calwatch-agent", "config/agent.toml"),
        ("calwatch-gateway", "config/gateway.toml"),
    ] {
        let (code, out, err) = run_to_end(
            &bin(binary),
            &[
                "check",
                "--config",
                workspace().join(file).to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "{file}: {out}{err}");
    }
}
