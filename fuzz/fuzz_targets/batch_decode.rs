//! The readings batch decoder: the fast path (`BatchDecoder`) and the serde path
//! (`ReadingBatch::decode`) accept the same batches with the same values, bit for bit, and
//! give the same errors; neither panics. An accepted batch re-encodes and decodes equal.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::batch_decode(data));
