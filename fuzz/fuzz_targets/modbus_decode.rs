//! Modbus response decoding in the agent: the register-map profiles we ship, planned into
//! reads, and what a device answered (any number of registers, any contents) decoded into
//! values. A short or missing answer is an error, never a panic.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::modbus_decode(data));
