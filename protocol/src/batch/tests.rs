#![allow(clippy::unwrap_used)]

use super::*;
use crate::json::decode_unbounded;

/// The example of CONTRACT §1, verbatim.
const CONTRACT_EXAMPLE: &str = r#"{
  "v": 1,
  "agent": "station-17",
  "sent": 1764421200123,
  "readings": [
    {"device": "HS-DSP-0042", "seq": 184467, "ts": 1764421199870,
     "values": {"sale_l": 35.02, "encoder_sale_l": 35.02, "sale_id": 99812,
                "totalizer_l": 1834455.2, "k_factor": 100.12, "event_counter": 12}}
  ]
}"#;

const CONTRACT_EXAMPLE_COMPACT: &str = concat!(
    r#"{"v":1,"agent":"station-17","sent":1764421200123,"readings":["#,
    r#"{"device":"HS-DSP-0042","seq":184467,"ts":1764421199870,"#,
    r#""values":{"sale_l":35.02,"encoder_sale_l":35.02,"sale_id":99812,"#,
    r#""totalizer_l":1834455.2,"k_factor":100.12,"event_counter":12}}]}"#
);

fn id(s: &str) -> Id {
    Id::new(s).unwrap()
}

fn contract_batch() -> ReadingBatch {
    let n = |name: &str, x: f64| (id(name), Value::Number(x));
    ReadingBatch {
        agent: id("station-17"),
        sent: 1_764_421_200_123,
        readings: vec![Reading {
            device: id("HS-DSP-0042"),
            seq: 184_467,
            ts: 1_764_421_199_870,
            values: vec![
                n("sale_l", 35.02),
                n("encoder_sale_l", 35.02),
                n("sale_id", 99812.0),
                n("totalizer_l", 1_834_455.2),
                n("k_factor", 100.12),
                n("event_counter", 12.0),
            ],
        }],
    }
}

/// A batch with one reading whose body is `reading` (a JSON object's inside).
fn one_reading(reading: &str) -> String {
    format!(r#"{{"v":1,"agent":"a","sent":0,"readings":[{{{reading}}}]}}"#)
}

fn rejected(json: &str) -> DecodeError {
    match ReadingBatch::decode(json.as_bytes()) {
        Ok(b) => panic!("accepted {json}: {b:?}"),
        Err(e) => e,
    }
}

fn assert_rejected(json: &str, reason: RejectReason, field: Option<&str>) -> DecodeError {
    let e = rejected(json);
    assert_eq!(
        (e.reason, e.field.as_deref()),
        (reason, field),
        "{json}\n -> {e}"
    );
    e
}

#[test]
fn contract_example_decodes() {
    let batch = ReadingBatch::decode(CONTRACT_EXAMPLE.as_bytes()).unwrap();
    assert_eq!(batch, contract_batch());
    let r = &batch.readings[0];
    assert_eq!(r.number("sale_l"), Some(35.02));
    assert_eq!(r.value("sale_id"), Some(Value::Number(99812.0)));
    assert_eq!(r.number("nope"), None);
}

#[test]
fn contract_example_encodes_compactly() {
    let bytes = contract_batch().encode().unwrap();
    assert_eq!(
        std::str::from_utf8(&bytes).unwrap(),
        CONTRACT_EXAMPLE_COMPACT
    );
    assert_eq!(ReadingBatch::decode(&bytes).unwrap(), contract_batch());
}

#[test]
fn integral_numbers_have_no_fraction() {
    let batch = ReadingBatch {
        agent: id("a"),
        sent: -5,
        readings: vec![Reading {
            device: id("d"),
            seq: 1,
            ts: 0,
            values: vec![
                (id("int"), Value::Number(99812.0)),
                (id("neg"), Value::Number(-3.0)),
                (id("zero"), Value::Number(0.0)),
                (id("negzero"), Value::Number(-0.0)),
                (id("big"), Value::Number(9_007_199_254_740_991.0)),
                (id("huge"), Value::Number(1e300)),
                (id("frac"), Value::Number(0.5)),
                (id("stable"), Value::Bool(true)),
            ],
        }],
    };
    let bytes = batch.encode().unwrap();
    let json = std::str::from_utf8(&bytes).unwrap();
    assert!(json.contains(r#""int":99812,"#), "{json}");
    assert!(json.contains(r#""neg":-3,"#), "{json}");
    assert!(json.contains(r#""zero":0,"#), "{json}");
    assert!(json.contains(r#""big":9007199254740991,"#), "{json}");
    assert!(json.contains(r#""frac":0.5,"#), "{json}");
    assert!(json.contains(r#""stable":true"#), "{json}");
    assert!(!json.contains("99812.0"), "{json}");
    let back = ReadingBatch::decode(&bytes).unwrap();
    assert_eq!(back, batch);
    // -0.0 keeps its sign through the wire.
    assert!(back.readings[0]
        .number("negzero")
        .unwrap()
        .is_sign_negative());
}

#[test]
fn accessors_pick_by_type() {
    let r = Reading {
        device: id("d"),
        seq: 1,
        ts: 0,
        values: vec![
            (id("gross_kg"), Value::Number(12.5)),
            (id("stable"), Value::Bool(true)),
        ],
    };
    assert_eq!(r.number("gross_kg"), Some(12.5));
    assert_eq!(r.flag("gross_kg"), None);
    assert_eq!(r.flag("stable"), Some(true));
    assert_eq!(r.number("stable"), None);
    assert_eq!(r.value("zero"), None);
}

#[test]
fn empty_readings_are_accepted() {
    let b = ReadingBatch::decode(br#"{"v":1,"agent":"a","sent":7,"readings":[]}"#).unwrap();
    assert!(b.readings.is_empty());
    assert_eq!(b.sent, 7);
}

#[test]
fn unknown_fields_are_ignored() {
    let json = r#"{"v":1,"future":{"deep":[1,{"x":null}]},"agent":"a","sent":1,
        "readings":[{"device":"d","quality":"good","seq":1,"ts":2,"values":{"x":true},
                     "extra":[1e400]}]}"#;
    let b = ReadingBatch::decode(json.as_bytes()).unwrap();
    assert_eq!(b.readings[0].flag("x"), Some(true));
}

#[test]
fn field_order_does_not_matter() {
    let json =
        r#"{"readings":[{"values":{},"ts":2,"seq":3,"device":"d"}],"sent":1,"agent":"a","v":1}"#;
    let b = ReadingBatch::decode(json.as_bytes()).unwrap();
    assert_eq!(b.readings[0].seq, 3);
}

#[test]
fn large_integers_are_read_as_numbers() {
    let b = ReadingBatch::decode(
        one_reading(r#""device":"d","seq":18446744073709551615,"ts":-1,"values":{"n":18446744073709551615,"m":-9223372036854775808}"#)
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(b.readings[0].seq, u64::MAX);
    assert_eq!(b.readings[0].number("n"), Some(u64::MAX as f64));
    assert_eq!(b.readings[0].number("m"), Some(i64::MIN as f64));
}

// ---- one rejection per reason, with the field path ----

#[test]
fn reject_too_large() {
    let mut json = one_reading(r#""device":"d","seq":1,"ts":0,"values":{}"#).into_bytes();
    json.extend(std::iter::repeat_n(b' ', MAX_BATCH_BYTES));
    let e = ReadingBatch::decode(&json).unwrap_err();
    assert_eq!((e.reason, e.field), (RejectReason::TooLarge, None));
    // Exactly at the limit is fine.
    json.truncate(MAX_BATCH_BYTES);
    assert!(ReadingBatch::decode(&json).is_ok());
}

#[test]
fn reject_syntax() {
    for json in [
        "",
        "{",
        r#"{"v":1,"agent":"a""#,
        r#"{"v":1,"agent":"a",}"#,
        r#"{"v":1,"agent":"a","sent":0,"readings":[]} x"#,
        "nope",
    ] {
        let e = assert_rejected(json, RejectReason::Syntax, None);
        assert!(e.detail.contains("line"), "{e}");
    }
    let e = ReadingBatch::decode(b"{\"v\":1,\"agent\":\"a\xff\",\"sent\":0,\"readings\":[]}")
        .unwrap_err();
    assert_eq!(
        (e.reason, e.field),
        (RejectReason::Syntax, None),
        "{}",
        e.detail
    );
    // Syntax wins over an earlier semantic problem: the payload is not JSON at all.
    assert_rejected(
        r#"{"v":1,"agent":"a b","sent":0,"readings":[}"#,
        RejectReason::Syntax,
        None,
    );
}

#[test]
fn reject_malformed() {
    let cases = [
        (r#"[1,2]"#.to_owned(), None),
        (r#""batch""#.to_owned(), None),
        (r#"{"v":1,"sent":0,"readings":[]}"#.to_owned(), Some("agent")),
        (r#"{"v":1,"agent":"a","sent":"0","readings":[]}"#.to_owned(), Some("sent")),
        (r#"{"v":1,"agent":"a","sent":1.5,"readings":[]}"#.to_owned(), Some("sent")),
        (r#"{"v":1,"agent":"a","sent":0,"readings":{}}"#.to_owned(), Some("readings")),
        (r#"{"v":1,"agent":"a","sent":0}"#.to_owned(), Some("readings")),
        (r#"{"v":1,"agent":"a","agent":"b","sent":0,"readings":[]}"#.to_owned(), Some("agent")),
        (r#"{"v":1,"agent":5,"sent":0,"readings":[]}"#.to_owned(), Some("agent")),
        (one_reading(r#""seq":1,"ts":0,"values":{}"#), Some("readings[0].device")),
        (one_reading(r#""device":"d","ts":0,"values":{}"#), Some("readings[0].seq")),
        (one_reading(r#""device":"d","seq":1,"values":{}"#), Some("readings[0].ts")),
        (one_reading(r#""device":"d","seq":1,"ts":0"#), Some("readings[0].values")),
        (one_reading(r#""device":"d","seq":1,"ts":1e3,"values":{}"#), Some("readings[0].ts")),
        (one_reading(r#""device":"d","seq":1.0,"ts":0,"values":{}"#), Some("readings[0].seq")),
        (one_reading(r#""device":"d","seq":1,"ts":0,"values":[]"#), Some("readings[0].values")),
        (one_reading(r#""device":"d","seq":1,"ts":0,"values":{"sale_l":"35.02"}"#), Some("readings[0].values.sale_l")),
        (one_reading(r#""device":"d","seq":1,"ts":0,"values":{"sale_l":null}"#), Some("readings[0].values.sale_l")),
        (one_reading(r#""device":"d","seq":1,"ts":0,"values":{"sale_l":[1]}"#), Some("readings[0].values.sale_l")),
        (one_reading(r#""device":"d","seq":1,"ts":0,"values":{"sale_l":{"x":1}}"#), Some("readings[0].values.sale_l")),
        (r#"{"v":1,"agent":"a","sent":0,"readings":[{"device":"d","seq":1,"ts":0,"values":{}},7]}"#.to_owned(), Some("readings[1]")),
    ];
    for (json, field) in cases {
        assert_rejected(&json, RejectReason::Malformed, field);
    }
}

#[test]
fn malformed_names_the_value_in_display() {
    let e = rejected(&one_reading(
        r#""device":"d","seq":1,"ts":0,"values":{"ok":1,"sale_l":"x"}"#,
    ));
    let shown = e.to_string();
    assert!(
        shown.starts_with("readings[0].values.sale_l: invalid type"),
        "{shown}"
    );
    assert!(!shown.contains("line"), "{shown}");
}

#[test]
fn reject_unknown_version() {
    for json in [
        r#"{"v":2,"agent":"a","sent":0,"readings":[]}"#,
        r#"{"agent":"a","sent":0,"readings":[]}"#,
        r#"{"v":"1","agent":"a","sent":0,"readings":[]}"#,
        r#"{"v":1.0,"agent":"a","sent":0,"readings":[]}"#,
        r#"{"v":0,"agent":"a","sent":0,"readings":[]}"#,
        r#"{"v":-1,"agent":"a","sent":0,"readings":[]}"#,
        r#"{"v":null,"agent":"a","sent":0,"readings":[]}"#,
        // A future version need not fit v1 at all.
        r#"{"agent":{"name":"a b"},"readings":"elsewhere","v":2}"#,
        r#"{"v":1,"v":2,"agent":"a","sent":0,"readings":[]}"#,
        "{}",
    ] {
        let e = assert_rejected(json, RejectReason::UnknownVersion, Some("v"));
        assert!(e.detail.contains("v1"), "{e}");
    }
}

#[test]
fn reject_too_many_readings() {
    let reading = r#"{"device":"d","seq":1,"ts":0,"values":{}}"#;
    let mut json = String::from(r#"{"v":1,"agent":"a","sent":0,"readings":["#);
    for i in 0..=MAX_READINGS {
        if i > 0 {
            json.push(',');
        }
        json.push_str(reading);
    }
    json.push_str("]}");
    // Within the byte limit the reading limit cannot be reached (a reading is >= 42 bytes),
    // so exercise the count check without the size check.
    let e = decode_unbounded::<ReadingBatch>(json.as_bytes()).unwrap_err();
    assert_eq!(
        (e.reason, e.field.as_deref()),
        (RejectReason::TooManyReadings, Some("readings")),
        "{e}"
    );
    assert_eq!(
        ReadingBatch::decode(json.as_bytes()).unwrap_err().reason,
        RejectReason::TooLarge
    );
    // Exactly the limit is fine.
    let at_limit = json.replacen(&format!(",{reading}"), "", 1);
    let b = decode_unbounded::<ReadingBatch>(at_limit.as_bytes()).unwrap();
    assert_eq!(b.readings.len(), MAX_READINGS);
}

#[test]
fn reject_invalid_id() {
    let cases = [
        (
            r#"{"v":1,"agent":"a b","sent":0,"readings":[]}"#.to_owned(),
            "agent".to_owned(),
        ),
        (
            r#"{"v":1,"agent":"","sent":0,"readings":[]}"#.to_owned(),
            "agent".to_owned(),
        ),
        (
            one_reading(&format!(
                r#""device":"{}","seq":1,"ts":0,"values":{{}}"#,
                "x".repeat(65)
            )),
            "readings[0].device".to_owned(),
        ),
        (
            one_reading(r#""device":"d","seq":1,"ts":0,"values":{"ok":1,"bad/name":2}"#),
            r#"readings[0].values."bad/name""#.to_owned(),
        ),
    ];
    for (json, field) in cases {
        let e = assert_rejected(&json, RejectReason::InvalidId, Some(&field));
        assert!(e.detail.contains("is not a valid id"), "{e}");
    }
}

#[test]
fn reject_non_finite() {
    for number in ["1e400", "-1e400", "1.7976931348623159e308"] {
        let json = one_reading(&format!(
            r#""device":"d","seq":1,"ts":0,"values":{{"tare_kg":0,"gross_kg":{number}}}"#
        ));
        let e = assert_rejected(
            &json,
            RejectReason::NonFinite,
            Some("readings[0].values.gross_kg"),
        );
        assert!(
            e.to_string().starts_with("readings[0].values.gross_kg: "),
            "{e}"
        );
    }
    // A non-finite f64 from a deserializer other than serde_json's parser.
    for x in [f64::NAN, f64::INFINITY] {
        let de: serde::de::value::F64Deserializer<serde::de::value::Error> =
            serde::de::IntoDeserializer::into_deserializer(x);
        let e = Value::deserialize(de).unwrap_err();
        assert!(e.to_string().contains("not a finite number"), "{e}");
    }
}

#[test]
fn out_of_range_numbers_elsewhere() {
    assert_rejected(
        r#"{"v":1,"agent":"a","sent":1e400,"readings":[]}"#,
        RejectReason::Malformed,
        Some("sent"),
    );
    assert_rejected(
        &one_reading(r#""device":"d","seq":1e400,"ts":0,"values":{}"#),
        RejectReason::Malformed,
        Some("readings[0].seq"),
    );
    assert_rejected(
        r#"{"v":1e400,"agent":"a","sent":0,"readings":[]}"#,
        RejectReason::UnknownVersion,
        Some("v"),
    );
}

#[test]
fn deep_nesting_is_rejected_not_overflowed() {
    let deep = "[".repeat(200_000);
    assert_rejected(&deep, RejectReason::Syntax, None);
    let closed = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_rejected(&closed, RejectReason::Malformed, None);
    // Ignored fields may nest deeply: they are skipped without recursion.
    let ignored = format!(
        r#"{{"v":1,"agent":"a","sent":0,"readings":[],"x":{}{}}}"#,
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    assert!(ReadingBatch::decode(ignored.as_bytes()).is_ok());
    let values = one_reading(&format!(
        r#""device":"d","seq":1,"ts":0,"values":{{"x":{}{}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    ));
    assert_rejected(
        &values,
        RejectReason::Malformed,
        Some("readings[0].values.x"),
    );
}

#[test]
fn reject_bad_seq() {
    let ok = r#"{"device":"d","seq":1,"ts":0,"values":{}}"#;
    for seq in ["0", "-1", "-9223372036854775808"] {
        let json = format!(
            r#"{{"v":1,"agent":"a","sent":0,"readings":[{ok},{{"device":"d","seq":{seq},"ts":0,"values":{{}}}}]}}"#
        );
        assert_rejected(&json, RejectReason::BadSeq, Some("readings[1].seq"));
    }
}

#[test]
fn reject_duplicate_value() {
    assert_rejected(
        &one_reading(r#""device":"d","seq":1,"ts":0,"values":{"sale_l":1,"k":2,"sale_l":1}"#),
        RejectReason::DuplicateValue,
        Some("readings[0].values.sale_l"),
    );
    // Many values take the sorting path.
    let mut values: Vec<String> = (0..100).map(|i| format!(r#""v{i}":{i}"#)).collect();
    values.push(r#""v42":true"#.to_owned());
    let json = one_reading(&format!(
        r#""device":"d","seq":1,"ts":0,"values":{{{}}}"#,
        values.join(",")
    ));
    assert_rejected(
        &json,
        RejectReason::DuplicateValue,
        Some("readings[0].values.v42"),
    );
}

#[test]
fn every_reason_is_reachable_by_decode_or_encode() {
    // Guards against a reason added to the enum but never produced.
    let produced = [
        rejected(&"x".repeat(MAX_BATCH_BYTES + 1)).reason,
        rejected("{").reason,
        rejected("[]").reason,
        rejected("{}").reason,
        ReadingBatch {
            agent: id("a"),
            sent: 0,
            readings: vec![
                Reading {
                    device: id("d"),
                    seq: 1,
                    ts: 0,
                    values: vec![]
                };
                MAX_READINGS + 1
            ],
        }
        .encode()
        .unwrap_err()
        .reason,
        rejected(r#"{"v":1,"agent":"-+-","sent":0,"readings":[]}"#).reason,
        rejected(&one_reading(
            r#""device":"d","seq":1,"ts":0,"values":{"x":1e999}"#,
        ))
        .reason,
        rejected(&one_reading(r#""device":"d","seq":0,"ts":0,"values":{}"#)).reason,
        rejected(&one_reading(
            r#""device":"d","seq":1,"ts":0,"values":{"x":1,"x":1}"#,
        ))
        .reason,
    ];
    assert_eq!(produced.as_slice(), RejectReason::ALL.as_slice());
}

// ---- encoding refuses what decoding would reject ----

fn with_values(values: Vec<(Id, Value)>) -> ReadingBatch {
    ReadingBatch {
        agent: id("a"),
        sent: 0,
        readings: vec![
            Reading {
                device: id("d"),
                seq: 1,
                ts: 0,
                values: vec![],
            },
            Reading {
                device: id("d"),
                seq: 2,
                ts: 0,
                values,
            },
        ],
    }
}

#[test]
fn encode_rejects_non_finite() {
    for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let e = with_values(vec![(id("gross_kg"), Value::Number(x))])
            .encode()
            .unwrap_err();
        assert_eq!(e.reason, RejectReason::NonFinite);
        assert_eq!(e.field.as_deref(), Some("readings[1].values.gross_kg"));
        assert!(e
            .to_string()
            .starts_with("readings[1].values.gross_kg: not a finite number"));
    }
}

#[test]
fn encode_rejects_seq_zero() {
    let mut b = with_values(vec![]);
    b.readings[1].seq = 0;
    let e = b.encode().unwrap_err();
    assert_eq!(
        (e.reason, e.field.as_deref()),
        (RejectReason::BadSeq, Some("readings[1].seq"))
    );
}

#[test]
fn encode_rejects_duplicate_value() {
    let e = with_values(vec![
        (id("x"), Value::Bool(true)),
        (id("x"), Value::Number(1.0)),
    ])
    .encode()
    .unwrap_err();
    assert_eq!(
        (e.reason, e.field.as_deref()),
        (RejectReason::DuplicateValue, Some("readings[1].values.x"))
    );
}

#[test]
fn encode_rejects_too_many_readings() {
    let mut b = with_values(vec![]);
    b.readings = vec![b.readings[0].clone(); MAX_READINGS + 1];
    let e = b.encode().unwrap_err();
    assert_eq!(
        (e.reason, e.field.as_deref()),
        (RejectReason::TooManyReadings, Some("readings"))
    );
    // At the count limit, small readings already exceed the byte limit: that is what stops it.
    b.readings.truncate(MAX_READINGS);
    assert_eq!(b.encode().unwrap_err().reason, RejectReason::TooLarge);
}

#[test]
fn encode_rejects_too_large() {
    let values = (0..40)
        .map(|i| {
            (
                id(&format!("value_{i:02}_{}", "n".repeat(50))),
                Value::Number(0.1),
            )
        })
        .collect();
    let mut b = with_values(values);
    b.readings = vec![b.readings[1].clone(); 200];
    let e = b.encode().unwrap_err();
    assert_eq!((e.reason, e.field), (RejectReason::TooLarge, None));
}

#[test]
fn serialize_refuses_non_finite_too() {
    assert!(serde_json::to_string(&Value::Number(f64::NAN)).is_err());
    assert_eq!(serde_json::to_string(&Value::Number(2.0)).unwrap(), "2");
    assert_eq!(serde_json::to_string(&Value::Bool(false)).unwrap(), "false");
}
