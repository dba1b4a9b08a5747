//! Configuration files: `gateway.toml`, `agent.toml` and a register-map profile, parsed and
//! validated from arbitrary text. Never a panic; an error names the file.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config_toml(data));
