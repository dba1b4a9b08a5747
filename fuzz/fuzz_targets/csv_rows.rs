//! CSV import rows (`devices.csv`, `verifications.csv`) as the API and the CLI parse them:
//! never a panic, and a refusal always names the file (and the line, when a row is at fault).
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::csv_rows(data));
