#![allow(clippy::unwrap_used)]

use super::super::assert_decoders_agree as agree;
use super::*;

fn one_reading(reading: &str) -> String {
    format!(r#"{{"v":1,"agent":"a","sent":0,"readings":[{{{reading}}}]}}"#)
}

fn with_value(value: &str) -> String {
    one_reading(&format!(
        r#""device":"d","seq":1,"ts":5,"values":{{"x":{value}}}"#
    ))
}

#[test]
fn payloads_as_agents_write_them_take_the_fast_path() {
    let compact = concat!(
        r#"{"v":1,"agent":"station-17","sent":1764421200123,"readings":["#,
        r#"{"device":"HS-DSP-0042","seq":184467,"ts":1764421199870,"#,
        r#""values":{"sale_l":35.02,"encoder_sale_l":35.02,"sale_id":99812,"#,
        r#""totalizer_l":1834455.2,"k_factor":100.12,"event_counter":12,"stable":true}}]}"#
    );
    assert!(agree(compact.as_bytes()));
    let mut d = BatchDecoder::new();
    let view = d.decode(compact.as_bytes()).unwrap();
    assert_eq!(view.agent, "station-17");
    assert_eq!(view.len(), 1);
    let r = view.get(0).unwrap();
    assert_eq!(
        (r.device, r.seq, r.ts),
        ("HS-DSP-0042", 184_467, 1_764_421_199_870)
    );
    assert_eq!(r.values.len(), 7);
    assert_eq!(r.values.get("k_factor"), Some(Value::Number(100.12)));
    assert_eq!(r.values.get("stable"), Some(Value::Bool(true)));
    assert_eq!(r.values.get("absent"), None);
    // Whitespace anywhere JSON allows it, and fields in any order.
    let spaced = " {\n\t\"readings\" : [ { \"values\" : { \"a\" : -1.5e-3 , \"b\" : false } ,\r\n\"ts\" : -7 , \"seq\" : 3 , \"device\" : \"d\" } ] , \"sent\" : 9 , \"agent\" : \"a\" , \"v\" : 1 } \n";
    assert!(agree(spaced.as_bytes()));
    assert!(agree(br#"{"v":1,"agent":"a","sent":0,"readings":[]}"#));
    assert!(agree(
        one_reading(r#""device":"d","seq":1,"ts":0,"values":{}"#).as_bytes()
    ));
}

#[test]
fn numbers_decode_exactly_as_serde_reads_them() {
    for x in [
        "0",
        "-0",
        "-0.0",
        "0.0",
        "1",
        "-1",
        "123456789012345",
        "1234567890123456",
        "123456789012345678",
        "1234567890123456789",
        "12345678901234567890123",
        "9007199254740993",
        "0.1",
        "0.30000000000000004",
        "1e0",
        "1E+2",
        "1e-2",
        "-2.5E-300",
        "1e308",
        "1.7976931348623157e308",
        "4.9e-324",
        "2.4e-324",
        "1e-400",
        "1e400",
        "1e99999",
        "1e-99999",
        "17.000000000000001",
        "35.02",
        "1834455.2",
        "1.5e-3",
        "123e20",
        "1e22",
        "1e23",
        "1E22",
        "1e-22",
        "1e-23",
        "0.000000000000001",
        "1234567890.12345",
        "123456789012345.5",
        "9007199254740993.0",
        "-0e5",
        "1.0000000000000002",
        "0.1e1",
        "3.14159265358979",
        "2.225073858507201e-308",
        "5e-324",
        "0.9",
        "230.0",
        "99999999999999.99",
        "1e0000000000001",
        "1e-0000000000001",
        "12.5e+0",
        "0.30000000000000004e1",
    ] {
        agree(with_value(x).as_bytes());
    }
    // Not JSON numbers: both refuse.
    for x in [
        "01",
        "-",
        "1.",
        ".5",
        "+1",
        "1e",
        "1e+",
        "0x10",
        "NaN",
        "Infinity",
        "-Infinity",
        "--1",
        "1.2.3",
        "tru",
        "nul",
        "null",
        "\"1\"",
        "[1]",
        "{}",
        "truex",
    ] {
        assert!(!agree(with_value(x).as_bytes()), "{x}");
    }
    // Integer fields: floats, -0 and overflow are refused by serde, so not taken by the scanner.
    for (field, x) in [
        ("ts", "-0"),
        ("ts", "1.0"),
        ("ts", "1e3"),
        ("ts", "9223372036854775807"),
        ("ts", "9223372036854775808"),
        ("ts", "-9223372036854775808"),
        ("seq", "0"),
        ("seq", "-1"),
        ("seq", "18446744073709551615"),
        ("seq", "18446744073709551616"),
        ("seq", "1.5"),
        ("ts", "01"),
    ] {
        let body = r#""device":"d","seq":1,"ts":5,"values":{}"#.replace(
            &format!(r#""{field}":{}"#, if field == "ts" { "5" } else { "1" }),
            &format!(r#""{field}":{x}"#),
        );
        assert!(!agree(one_reading(&body).as_bytes()), "{field}: {x}");
    }
    for v in ["1.0", "-1", "2", "01", "\"1\"", "-0"] {
        let b = format!(r#"{{"v":{v},"agent":"a","sent":0,"readings":[]}}"#);
        assert!(!agree(b.as_bytes()), "v: {v}");
    }
}

#[test]
fn anything_unusual_goes_to_serde_and_gets_its_answer() {
    for body in [
        // Escapes in ids and names (valid once unescaped, or not).
        r#""device":"\u0064","seq":1,"ts":0,"values":{}"#,
        r#""device":"d","seq":1,"ts":0,"values":{"\u0078":1}"#,
        r#""device":"d\"","seq":1,"ts":0,"values":{}"#,
        r#""device":"d\n","seq":1,"ts":0,"values":{}"#,
        // Unknown fields, nested.
        r#""device":"d","seq":1,"ts":0,"values":{},"extra":{"a":[1,{"b":null}]}"#,
        // Duplicates.
        r#""device":"d","device":"e","seq":1,"ts":0,"values":{}"#,
        r#""device":"d","seq":1,"ts":0,"values":{"x":1,"x":2}"#,
        r#""device":"d","seq":1,"ts":0,"values":{},"values":{}"#,
        // Missing fields, bad ids, bad values.
        r#""seq":1,"ts":0,"values":{}"#,
        r#""device":"d","ts":0,"values":{}"#,
        r#""device":"d","seq":1,"values":{}"#,
        r#""device":"d","seq":1,"ts":0"#,
        r#""device":"","seq":1,"ts":0,"values":{}"#,
        r#""device":"a b","seq":1,"ts":0,"values":{}"#,
        r#""device":"ä","seq":1,"ts":0,"values":{}"#,
        r#""device":"d","seq":1,"ts":0,"values":{"":1}"#,
        r#""device":"d","seq":1,"ts":0,"values":{"x":null}"#,
        r#""device":"d","seq":1,"ts":0,"values":[]"#,
        r#""device":7,"seq":1,"ts":0,"values":{}"#,
        // Trailing commas, missing colons.
        r#""device":"d","seq":1,"ts":0,"values":{"x":1,}"#,
        r#""device":"d","seq":1,"ts":0,"values":{},"#,
        r#""device":"d","seq":1,"ts":0,"values":{"x"1}"#,
    ] {
        assert!(!agree(one_reading(body).as_bytes()), "{body}");
    }
    let long = "x".repeat(64);
    assert!(agree(
        one_reading(&format!(
            r#""device":"{long}","seq":1,"ts":0,"values":{{"{long}":1}}"#
        ))
        .as_bytes()
    ));
    let too_long = "x".repeat(65);
    assert!(!agree(
        one_reading(&format!(
            r#""device":"{too_long}","seq":1,"ts":0,"values":{{}}"#
        ))
        .as_bytes()
    ));
    // Long names alike at both ends are told apart; the same long name twice is not.
    let (a, b) = ("abcdefgh_x_stuvwxyz", "abcdefgh_y_stuvwxyz");
    assert!(agree(
        one_reading(&format!(
            r#""device":"d","seq":1,"ts":0,"values":{{"{a}":1,"{b}":2}}"#
        ))
        .as_bytes()
    ));
    assert!(!agree(
        one_reading(&format!(
            r#""device":"d","seq":1,"ts":0,"values":{{"{a}":1,"x":0,"{a}":2}}"#
        ))
        .as_bytes()
    ));
    assert!(!agree(
        one_reading(r#""device":"d","seq":1,"ts":0,"values":{"ab":1,"x":0,"ab":2}"#).as_bytes()
    ));
    // Many values: beyond the pairwise duplicate check, serde decides.
    let many: Vec<String> = (0..40).map(|i| format!(r#""v{i}":{i}"#)).collect();
    let body = format!(
        r#""device":"d","seq":1,"ts":0,"values":{{{}}}"#,
        many.join(",")
    );
    assert!(!agree(one_reading(&body).as_bytes()));
    for top in [
        r#"{"v":1,"agent":"a","sent":0,"readings":[]} x"#,
        r#"{"v":1,"agent":"a","sent":0,"readings":[]}}"#,
        r#"{"v":1,"agent":"a","sent":0,"readings":[],"more":1}"#,
        r#"{"v":1,"agent":"a","sent":0,"readings":[,]}"#,
        r#"{"v":1,"agent":"a","sent":0}"#,
        r#"{"agent":"a","sent":0,"readings":[]}"#,
        r#"{"v":1,"v":1,"agent":"a","sent":0,"readings":[]}"#,
        r#"{"v":1,"agent":"a","sent":0,"readings":[]"#,
        r#"[]"#,
        "",
        "\u{feff}{}",
    ] {
        assert!(!agree(top.as_bytes()), "{top}");
    }
    // Invalid UTF-8 inside a string, and a payload over the size limit.
    let mut bad = one_reading(r#""device":"d","seq":1,"ts":0,"values":{}"#).into_bytes();
    let at = bad.iter().position(|&b| b == b'd').unwrap();
    bad[at] = 0xff;
    assert!(!agree(&bad));
    let big = format!(
        "{}{}",
        " ".repeat(crate::MAX_BATCH_BYTES),
        r#"{"v":1,"agent":"a","sent":0,"readings":[]}"#
    );
    assert!(!agree(big.as_bytes()));
}

#[test]
fn plain_decimal_numbers_keep_their_text() {
    let mut d = BatchDecoder::new();
    let b = with_value("35.020,\"b\":true,\"c\":1e3,\"d\":-7,\"e\":0.1234567890123456789012345");
    let view = d.decode(b.as_bytes()).unwrap();
    let r = view.get(0).unwrap();
    let texts: Vec<_> = r.values.iter_with_text().map(|(n, _, t)| (n, t)).collect();
    assert_eq!(
        texts,
        [
            ("x", Some("35.020")),
            ("b", None),
            ("c", None),
            ("d", Some("-7")),
            ("e", None)
        ]
    );
    // Decoded by serde: no text.
    let owned = view.to_owned().unwrap();
    assert!(owned.readings[0]
        .view()
        .values
        .iter_with_text()
        .all(|(_, _, t)| t.is_none()));
}

#[test]
fn the_reading_limit_holds_on_the_fast_path() {
    // 10,000 readings do not fit in MAX_BATCH_BYTES, so the scanner is asked directly.
    let reading = r#"{"device":"d","seq":1,"ts":0,"values":{}}"#;
    for (n, fast) in [
        (crate::MAX_READINGS, true),
        (crate::MAX_READINGS + 1, false),
    ] {
        let b = format!(
            r#"{{"v":1,"agent":"a","sent":0,"readings":[{}]}}"#,
            vec![reading; n].join(",")
        );
        let (mut readings, mut values) = (Vec::new(), Vec::new());
        let raw = super::scan::parse(b.as_bytes(), &mut readings, &mut values);
        assert_eq!(raw.is_some(), fast, "{n} readings");
        if fast {
            assert_eq!(readings.len(), n);
        }
    }
}

#[test]
fn buffers_are_reused_and_views_from_both_paths_read_alike() {
    let mut d = BatchDecoder::new();
    let fast = one_reading(r#""device":"d","seq":2,"ts":9,"values":{"a":1,"b":true}"#);
    let slow = one_reading(r#""device":"\u0064","seq":2,"ts":9,"values":{"a":1,"b":true},"x":0"#);
    let a = d.decode(fast.as_bytes()).unwrap().to_owned().unwrap();
    let b = d.decode(slow.as_bytes()).unwrap().to_owned().unwrap();
    assert_eq!(a, b);
    let view = d.decode(fast.as_bytes()).unwrap();
    let r = view.readings().next().unwrap();
    assert_eq!(
        r.values.iter().collect::<Vec<_>>(),
        [("a", Value::Number(1.0)), ("b", Value::Bool(true))]
    );
    assert_eq!(
        format!("{:?}", r.values),
        r#"{"a": Number(1.0), "b": Bool(true)}"#
    );
    assert_eq!(d.paths(), (2, 1));
    assert!(d.decode(b"{").is_err());
    assert_eq!(
        d.paths(),
        (2, 1),
        "a rejected payload counts on neither path"
    );
}

proptest::proptest! {
    #[test]
    fn decimal_numbers_decode_as_serde_reads_them(
        negative in proptest::bool::ANY,
        int in "(0|[1-9][0-9]{0,20})",
        frac in proptest::option::of("[0-9]{1,20}"),
        exp in proptest::option::of(("[eE]", "[+-]?", "[0-9]{1,4}")),
    ) {
        let mut x = String::new();
        if negative {
            x.push('-');
        }
        x.push_str(&int);
        if let Some(f) = frac {
            x.push('.');
            x.push_str(&f);
        }
        if let Some((e, sign, digits)) = exp {
            x.push_str(&e);
            x.push_str(&sign);
            x.push_str(&digits);
        }
        agree(with_value(&x).as_bytes());
    }
}
