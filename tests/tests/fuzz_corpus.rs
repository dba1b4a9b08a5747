//! The fuzz corpora as regression tests (issue #19): every file under `fuzz/corpus/<target>/`
//! and `fuzz/regressions/<target>/` (crash reproducers, if any) goes through the same check
//! as the libFuzzer target of that name (`fuzz/checks.rs`), on the stable toolchain.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "../../fuzz/checks.rs"]
mod checks;

#[test]
fn fuzz_corpora_and_reproducers_pass_their_checks() {
    let root = calwatch_tests::workspace().join("fuzz");
    let mut ran = 0;
    for (name, check) in checks::TARGETS {
        let mut files = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let r = std::panic::catch_unwind(|| check(&data));
                assert!(r.is_ok(), "{name}: {} fails its check", path.display());
                files += 1;
            }
        }
        assert!(files > 0, "{name}: no corpus under fuzz/corpus/{name}");
        ran += files;
    }
    eprintln!("fuzz corpora: {ran} inputs");
}
