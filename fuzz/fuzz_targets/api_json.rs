//! The API's JSON bodies: `POST /api/devices` and `POST /api/devices/{id}/verifications`
//! bodies parsed and validated as the gateway does (what does not need the registry).
//! Never a panic; a refusal names the source.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::api_json(data));
