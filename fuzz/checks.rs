//! What each fuzz target checks, one function per target. Shared by the targets in
//! `fuzz/fuzz_targets/` (libFuzzer, nightly) and by `tests/tests/fuzz_corpus.rs`, which
//! runs every committed corpus file and crash reproducer through the same checks on
//! stable, as regression tests of the normal suite.

use std::path::Path;
use std::sync::OnceLock;

use calwatch_agent::config::AgentConfig;
use calwatch_agent::plan::RequestPlan;
use calwatch_agent::poll::decode_results;
use calwatch_agent::profile::{Profile, ValueDef};
use calwatch_gateway::bench::{
    certificate_from_json, device_from_json, parse_device_rows, parse_verification_rows, Zone,
};
use calwatch_gateway::config::GatewayConfig;
use calwatch_protocol::{assert_decoders_agree, AgentStatus, AlertEvent, ReadingBatch};

/// A target's check: panics when the property does not hold for the input.
pub(crate) type Check = fn(&[u8]);

/// The targets, by name (the directory names under `fuzz/corpus/`).
pub(crate) const TARGETS: [(&str, Check); 6] = [
    ("api_json", api_json),
    ("batch_decode", batch_decode),
    ("config_toml", config_toml),
    ("csv_rows", csv_rows),
    ("modbus_decode", modbus_decode),
    ("payloads", payloads),
];

/// The readings batch decoder: the fast path (`BatchDecoder`) and the serde path
/// (`ReadingBatch::decode`) accept the same batches with the same values, bit for bit, and
/// give the same errors; neither panics. An accepted batch re-encodes and decodes equal.
pub(crate) fn batch_decode(data: &[u8]) {
    assert_decoders_agree(data);
    if let Ok(batch) = ReadingBatch::decode(data) {
        let bytes = batch.encode().expect("an accepted batch encodes");
        // Re-encoded numbers may be longer than their input text ("1E3" → "1000.0").
        if bytes.len() <= calwatch_protocol::MAX_BATCH_BYTES {
            let again = ReadingBatch::decode(&bytes).expect("an encoded batch decodes");
            assert_eq!(again, batch);
        }
    }
}

/// The other MQTT payloads the gateway reads: an agent's status and an alert event. Neither
/// decoder panics; what decodes re-encodes to something that decodes equal.
pub(crate) fn payloads(data: &[u8]) {
    if let Ok(s) = AgentStatus::decode(data) {
        let again = AgentStatus::decode(&s.encode()).expect("an encoded status decodes");
        assert_eq!(again, s);
    }
    if let Ok(e) = AlertEvent::decode(data) {
        let again = AlertEvent::decode(&e.encode()).expect("an encoded alert event decodes");
        assert_eq!(again, e);
    }
}

/// The zones certificate dates are read in by the targets: the default, and one with
/// daylight saving time (days of 23 and 25 hours).
fn zones() -> &'static [Zone; 2] {
    static ZONES: OnceLock<[Zone; 2]> = OnceLock::new();
    ZONES.get_or_init(|| {
        [
            Zone::utc(),
            Zone::named("Europe/Berlin").expect("a bundled zone"),
        ]
    })
}

/// CSV import rows (`devices.csv`, `verifications.csv`) as the API and the CLI parse them:
/// never a panic, and a refusal always names the file.
pub(crate) fn csv_rows(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.csv");
    let [utc, dst] = zones();
    for result in [
        parse_device_rows(file, text).map(|r| r.len()),
        parse_verification_rows(file, text, utc).map(|r| r.len()),
        parse_verification_rows(file, text, dst).map(|r| r.len()),
    ] {
        if let Err(e) = result {
            assert!(e.to_string().starts_with("fuzz.csv"), "{e}");
        }
    }
}

/// Configuration files: `gateway.toml`, `agent.toml` or a register-map profile (the first
/// byte chooses), parsed and validated from arbitrary text. Never a panic; a gateway config
/// or profile error names the file.
pub(crate) fn config_toml(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    // A directory with nothing in it: files the text names (secrets, profiles) are missing.
    let path = Path::new("/nonexistent-calwatch-fuzz/file.toml");
    match which % 3 {
        0 => {
            if let Err(e) = GatewayConfig::parse(path, text) {
                assert!(
                    e.to_string().starts_with("/nonexistent-calwatch-fuzz/"),
                    "{e}"
                );
            }
        }
        // An agent config's error may name a profile file it names instead.
        1 => {
            if let Err(e) = AgentConfig::parse(path, text) {
                assert!(!e.message.is_empty());
            }
        }
        _ => {
            if let Err(e) = Profile::parse(path, text) {
                assert!(
                    e.to_string().starts_with("/nonexistent-calwatch-fuzz/"),
                    "{e}"
                );
            }
        }
    }
}

const PROFILES: [&str; 4] = [
    include_str!("../config/profiles/sdm630.toml"),
    include_str!("../config/profiles/ft112.toml"),
    include_str!("../config/profiles/dispenser-fcc.toml"),
    include_str!("../config/profiles/test-all-types.toml"),
];

fn plans() -> &'static Vec<(Vec<ValueDef>, RequestPlan)> {
    static PLANS: OnceLock<Vec<(Vec<ValueDef>, RequestPlan)>> = OnceLock::new();
    PLANS.get_or_init(|| {
        PROFILES
            .iter()
            .map(|text| {
                let p = Profile::parse(Path::new("profile.toml"), text).expect("shipped profile");
                let refs: Vec<&ValueDef> = p.values.iter().collect();
                let plan = RequestPlan::new(&refs, 8);
                (p.values.clone(), plan)
            })
            .collect()
    })
}

/// Modbus response decoding in the agent: the register-map profiles we ship (the first byte
/// chooses), planned into reads, and what a device answered (any number of registers, any
/// contents) decoded into values. A short or missing answer is an error, never a panic; a
/// complete one always decodes.
pub(crate) fn modbus_decode(data: &[u8]) {
    let Some((&which, mut rest)) = data.split_first() else {
        return;
    };
    let (values, plan) = &plans()[usize::from(which) % PROFILES.len()];
    // Each read's answer: a length byte (255: a full answer), then registers.
    let mut results = Vec::new();
    for read in &plan.reads {
        let Some((&n, tail)) = rest.split_first() else {
            break;
        };
        rest = tail;
        let want = usize::from(read.count);
        let n = if n == 255 {
            want
        } else {
            usize::from(n).min(want + 2)
        };
        let mut regs = Vec::with_capacity(n);
        for _ in 0..n {
            let (w, tail) = match rest {
                [a, b, tail @ ..] => (u16::from_be_bytes([*a, *b]), tail),
                _ => (0, rest),
            };
            rest = tail;
            regs.push(w);
        }
        results.push(regs);
    }
    let complete = results.len() == plan.reads.len()
        && results
            .iter()
            .zip(&plan.reads)
            .all(|(r, read)| r.len() >= usize::from(read.count));
    match decode_results(plan, values, &results) {
        Ok(decoded) => assert_eq!(decoded.len(), values.len()),
        Err(e) => assert!(!complete, "a complete answer refused: {e}"),
    }
}

/// The API's JSON bodies: `POST /api/devices` and `POST /api/devices/{id}/verifications`
/// parsed and validated as the gateway does (what does not need the registry). Never a
/// panic; a refusal names the source.
pub(crate) fn api_json(data: &[u8]) {
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return;
    };
    let source = Path::new("request body");
    if let Err(e) = device_from_json(source, &obj) {
        assert!(e.to_string().starts_with("request body"), "{e}");
    }
    let device = obj.get("id").and_then(|v| v.as_str()).unwrap_or("D-1");
    for zone in zones() {
        if let Err(e) = certificate_from_json(source, device, &obj, zone) {
            assert!(e.to_string().starts_with("request body"), "{e}");
        }
    }
}
