#![allow(clippy::unwrap_used)]

use super::*;
use crate::error::RejectReason;

/// The example of CONTRACT §1, verbatim.
const CONTRACT_EXAMPLE: &str = r#"{"v":1, "id":"a-000173", "device":"HS-DSP-0042", "owner":"sinopec-hs-17", "site":"station-17",
 "kind":"cheating_suspected", "severity":"critical", "state":"active",
 "raised":1764421199870, "updated":1764421199870, "resolved":null, "ack_by":null,
 "count":5, "message":"5 sales with display/encoder deviation beyond 0.6%",
 "evidence":{"last_deviation_pct":0.91}}"#;

const CONTRACT_EXAMPLE_COMPACT: &str = concat!(
    r#"{"v":1,"id":"a-000173","device":"HS-DSP-0042","owner":"sinopec-hs-17","site":"station-17","#,
    r#""kind":"cheating_suspected","severity":"critical","state":"active","#,
    r#""raised":1764421199870,"updated":1764421199870,"resolved":null,"ack_by":null,"#,
    r#""count":5,"message":"5 sales with display/encoder deviation beyond 0.6%","#,
    r#""evidence":{"last_deviation_pct":0.91}}"#
);

fn id(s: &str) -> Id {
    Id::new(s).unwrap()
}

fn contract_event() -> AlertEvent {
    let mut evidence = Map::new();
    evidence.insert("last_deviation_pct".into(), JsonValue::from(0.91));
    AlertEvent {
        id: "a-000173".into(),
        device: id("HS-DSP-0042"),
        owner: id("sinopec-hs-17"),
        site: id("station-17"),
        kind: AlertKind::CheatingSuspected,
        severity: Severity::Critical,
        state: AlertState::Active,
        raised: 1_764_421_199_870,
        updated: 1_764_421_199_870,
        resolved: None,
        ack_by: None,
        count: 5,
        message: "5 sales with display/encoder deviation beyond 0.6%".into(),
        evidence,
    }
}

#[test]
fn contract_example_decodes() {
    assert_eq!(
        AlertEvent::decode(CONTRACT_EXAMPLE.as_bytes()).unwrap(),
        contract_event()
    );
}

#[test]
fn contract_example_encodes_compactly() {
    let bytes = contract_event().encode();
    assert_eq!(
        std::str::from_utf8(&bytes).unwrap(),
        CONTRACT_EXAMPLE_COMPACT
    );
}

#[test]
fn resolved_event_round_trips() {
    let mut e = contract_event();
    e.state = AlertState::Resolved;
    e.resolved = Some(1_764_421_299_000);
    e.ack_by = Some("inspector.li".into());
    e.severity = Severity::Warning;
    e.evidence
        .insert("agent".into(), JsonValue::from("station-17"));
    e.evidence.insert("n".into(), JsonValue::from(3));
    let bytes = e.encode();
    let json = std::str::from_utf8(&bytes).unwrap();
    assert!(
        json.contains(r#""resolved":1764421299000,"ack_by":"inspector.li""#),
        "{json}"
    );
    assert_eq!(AlertEvent::decode(&bytes).unwrap(), e);
}

#[test]
fn optional_fields_default_when_missing() {
    let json = r#"{"v":1,"id":"a-1","device":"d","owner":"o","site":"s","kind":"offline",
        "severity":"info","state":"active","raised":1,"updated":2,"count":1,"message":"m",
        "escalated_to":"someone"}"#;
    let e = AlertEvent::decode(json.as_bytes()).unwrap();
    assert_eq!((e.resolved, e.ack_by, e.evidence.len()), (None, None, 0));
    assert_eq!(e.kind, AlertKind::Offline);
}

#[test]
fn wire_names_agree_with_serde() {
    for kind in AlertKind::ALL {
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.as_str()));
        assert_eq!(kind.as_str().parse::<AlertKind>().unwrap(), kind);
        assert_eq!(kind.to_string(), kind.as_str());
    }
    for s in SEVERITIES {
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        assert_eq!(s.as_str().parse::<Severity>().unwrap(), s);
    }
    for s in ALERT_STATES {
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        assert_eq!(s.as_str().parse::<AlertState>().unwrap(), s);
    }
    assert!(Severity::Info < Severity::Warning && Severity::Warning < Severity::Critical);
}

#[test]
fn all_contract_kinds_are_listed() {
    let names: Vec<_> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        names.join(", "),
        "due_soon, overdue, unverified, failed_verification, seal_broken, param_changed, \
         out_of_tolerance, drift, cheating_suspected, totalizer_mismatch, counter_rollback, offline"
    );
}

#[test]
fn unknown_names_are_refused_with_the_choices() {
    let e = "tampered".parse::<AlertKind>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "\"tampered\" is not an alert kind; expected one of due_soon, overdue, unverified, \
         failed_verification, seal_broken, param_changed, out_of_tolerance, drift, \
         cheating_suspected, totalizer_mismatch, counter_rollback, offline"
    );
    let e = "Critical".parse::<Severity>().unwrap_err();
    assert!(e.to_string().contains("info, warning, critical"), "{e}");
    assert!("open".parse::<AlertState>().is_err());
}

#[test]
fn deep_evidence_is_malformed_with_a_short_path() {
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let e = AlertEvent::decode(CONTRACT_EXAMPLE.replace("0.91", &deep).as_bytes()).unwrap_err();
    assert_eq!(e.reason, RejectReason::Malformed);
    let field = e.field.unwrap();
    assert!(
        field.starts_with("evidence.last_deviation_pct[0][0]"),
        "{field}"
    );
    assert!(field.len() < 210, "{field}");
}

#[test]
fn rejections_name_the_field() {
    let with = |field: &str, value: &str| {
        let mut v: serde_json::Value = serde_json::from_str(CONTRACT_EXAMPLE).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        serde_json::to_string(&v).unwrap()
    };
    let cases = [
        (
            with("kind", r#""tampered""#),
            RejectReason::Malformed,
            Some("kind"),
        ),
        (with("count", "-1"), RejectReason::Malformed, Some("count")),
        (
            with("raised", "1.5"),
            RejectReason::Malformed,
            Some("raised"),
        ),
        (
            with("resolved", r#""never""#),
            RejectReason::Malformed,
            Some("resolved"),
        ),
        (
            with("owner", r#""sinopec hs""#),
            RejectReason::InvalidId,
            Some("owner"),
        ),
        (with("v", "3"), RejectReason::UnknownVersion, Some("v")),
        (
            CONTRACT_EXAMPLE.replace("0.91", "9e999"),
            RejectReason::NonFinite,
            Some("evidence.last_deviation_pct"),
        ),
        (
            CONTRACT_EXAMPLE.replace(r#""site":"station-17","#, ""),
            RejectReason::Malformed,
            Some("site"),
        ),
        (
            CONTRACT_EXAMPLE.replace('}', ""),
            RejectReason::Syntax,
            None,
        ),
    ];
    for (json, reason, field) in cases {
        let e = AlertEvent::decode(json.as_bytes()).unwrap_err();
        assert_eq!(
            (e.reason, e.field.as_deref()),
            (reason, field),
            "{json}: {e}"
        );
    }
}
