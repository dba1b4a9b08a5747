//! The other MQTT payloads the gateway reads: an agent's status and an alert event. Neither
//! decoder panics; what decodes re-encodes to something that decodes equal.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::payloads(data));
