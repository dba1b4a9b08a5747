//! InfluxDB line protocol, written by hand (CONTRACT §4), ms precision.
//!
//! Escaping per the line protocol reference: measurement escapes `,` and space; tag keys,
//! tag values and field keys escape `,`, `=` and space; everywhere a backslash is escaped
//! as `\\`. String field values escape `"` and `\` only and keep every other character,
//! newlines included (a quoted string may span lines).
//!
//! Some characters cannot be carried in a name (measurement, tag key or value, field key)
//! at all, escaped or not, and are written as an (escaped) space instead: newline, carriage
//! return and tab (whitespace to the parser), NUL in a measurement, a `#` that begins a
//! measurement (the line would be a comment) and a backslash that ends a name (parsers
//! reject a name ending in one). Tested against InfluxData's own parser
//! (`influxdb-line-protocol`) by the round-trip property test below.
//!
//! This is the hot path of ingest (one line per reading): names without anything to escape
//! (every calwatch id) are copied as they are; integral floats print as integers (still
//! floats to the store: only a trailing `i` makes an integer), other floats in their
//! shortest round-trip form by `zmij` (`1e+21` for large magnitudes, which InfluxDB and
//! VictoriaMetrics read), integers by `itoa` (both are serde_json's, so no new crate).

/// Appends points to one line-protocol buffer.
#[derive(Debug, Default, Clone)]
pub struct LineBuffer {
    buf: String,
    lines: usize,
}

/// Bytes that may need escaping or blanking somewhere (a superset of every context's).
const MAY_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    t[b',' as usize] = true;
    t[b'=' as usize] = true;
    t[b' ' as usize] = true;
    t[b'\\' as usize] = true;
    t[b'\n' as usize] = true;
    t[b'\r' as usize] = true;
    t[b'\t' as usize] = true;
    t[0] = true;
    t
};

/// How the names of one place in a line are written.
struct Name {
    /// Escaped with a backslash (besides the backslash itself).
    escaped: &'static [char],
    /// Cannot be carried there at all: written as a space.
    blanked: &'static [char],
}

const MEASUREMENT: Name = Name {
    escaped: &[',', ' '],
    blanked: &['\n', '\r', '\t', '\0'],
};

const KEY: Name = Name {
    escaped: &[',', '=', ' '],
    blanked: &['\n', '\r', '\t'],
};

fn escape_into(out: &mut String, s: &str, name: &Name) {
    if !s.bytes().any(|b| MAY_ESCAPE[usize::from(b)]) {
        out.push_str(s);
        return;
    }
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        // A name may not end in a backslash, escaped or not.
        let last = chars.peek().is_none();
        let c = if name.blanked.contains(&c) || (c == '\\' && last) {
            ' '
        } else {
            c
        };
        if c == '\\' {
            out.push_str("\\\\");
        } else {
            if name.escaped.contains(&c) {
                out.push('\\');
            }
            out.push(c);
        }
    }
}

/// One point being written: measurement, then tags, then fields, then the time.
pub struct Point<'a> {
    buf: &'a mut LineBuffer,
    start: usize,
    fields: usize,
}

impl LineBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a point of `measurement`.
    pub fn point(&mut self, measurement: &str) -> Point<'_> {
        let start = self.buf.len();
        // A line that begins with `#` is a comment.
        let measurement = match measurement.strip_prefix('#') {
            Some(rest) => {
                self.buf.push_str("\\ ");
                rest
            }
            None => measurement,
        };
        escape_into(&mut self.buf, measurement, &MEASUREMENT);
        Point {
            buf: self,
            start,
            fields: 0,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.buf
    }

    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn lines(&self) -> usize {
        self.lines
    }

    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }

    /// Empties the buffer, keeping its allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.lines = 0;
    }

    /// Moves the buffered text out, leaving the buffer empty.
    pub fn take(&mut self) -> String {
        self.lines = 0;
        std::mem::take(&mut self.buf)
    }

    /// Appends another buffer's points.
    pub fn extend(&mut self, other: &LineBuffer) {
        self.buf.push_str(&other.buf);
        self.lines += other.lines;
    }
}

/// `key=value,key=value` with keys and values escaped, for [`Point::tags`]: the tags of a
/// series, made once and written with every point of it.
#[cfg(test)]
pub(crate) fn tag_set(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (key, value) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        if !out.is_empty() {
            out.push(',');
        }
        escape_into(&mut out, key, &KEY);
        out.push('=');
        escape_into(&mut out, value, &KEY);
    }
    out
}

impl Point<'_> {
    /// Adds a tag; tags must come before fields. Empty values are skipped (not allowed).
    pub fn tag(self, key: &str, value: &str) -> Self {
        debug_assert_eq!(self.fields, 0, "tags go before fields");
        if !value.is_empty() {
            self.buf.buf.push(',');
            escape_into(&mut self.buf.buf, key, &KEY);
            self.buf.buf.push('=');
            escape_into(&mut self.buf.buf, value, &KEY);
        }
        self
    }

    /// Adds tags whose keys and values never need escaping (ids `[A-Za-z0-9._-]`, kinds,
    /// states), copied as they are: no tag string is kept in memory per series, and writing
    /// them costs one copy each.
    pub fn plain_tags<const N: usize>(self, pairs: [(&str, &str); N]) -> Self {
        debug_assert_eq!(self.fields, 0, "tags go before fields");
        let b = &mut self.buf.buf;
        for (key, value) in pairs {
            debug_assert!(
                !key.contains([',', '=', ' ', '"', '\\'])
                    && !value.contains([',', '=', ' ', '"', '\\']),
                "{key}={value} needs escaping"
            );
            b.push(',');
            b.push_str(key);
            b.push('=');
            b.push_str(value);
        }
        self
    }

    /// Adds tags already escaped, made by [`tag_set`].
    pub fn tags(self, escaped: &str) -> Self {
        debug_assert_eq!(self.fields, 0, "tags go before fields");
        if !escaped.is_empty() {
            self.buf.buf.push(',');
            self.buf.buf.push_str(escaped);
        }
        self
    }

    fn field_key(&mut self, key: &str) {
        self.buf.buf.push(if self.fields == 0 { ' ' } else { ',' });
        escape_into(&mut self.buf.buf, key, &KEY);
        self.buf.buf.push('=');
        self.fields += 1;
    }

    /// A reading's value as a field. Value names are ids (`[A-Za-z0-9._-]`, checked when the
    /// batch was decoded), so the name is copied as it is; so is `text`, a number's own
    /// plain-decimal text from the payload (`35.02`, `-7`: valid line protocol floats, and
    /// the same number), else the number is formatted.
    pub fn value(
        mut self,
        name: &str,
        value: calwatch_protocol::Value,
        text: Option<&str>,
    ) -> Self {
        debug_assert!(calwatch_protocol::is_valid_id(name), "{name}");
        match value {
            calwatch_protocol::Value::Number(x) if x.is_finite() => {
                self.id_key(name);
                match text {
                    Some(text) => self.buf.buf.push_str(text),
                    None => push_number(&mut self.buf.buf, x),
                }
            }
            calwatch_protocol::Value::Number(_) => {}
            calwatch_protocol::Value::Bool(b) => {
                self.id_key(name);
                self.buf.buf.push_str(if b { "true" } else { "false" });
            }
        }
        self
    }

    fn id_key(&mut self, key: &str) {
        self.buf.buf.push(if self.fields == 0 { ' ' } else { ',' });
        self.buf.buf.push_str(key);
        self.buf.buf.push('=');
        self.fields += 1;
    }

    /// A float field; non-finite values cannot be stored and are skipped.
    pub fn float(mut self, key: &str, value: f64) -> Self {
        if value.is_finite() {
            self.field_key(key);
            push_number(&mut self.buf.buf, value);
        }
        self
    }

    pub fn int(mut self, key: &str, value: i64) -> Self {
        self.field_key(key);
        push_int(&mut self.buf.buf, value);
        self.buf.buf.push('i');
        self
    }

    pub fn bool(mut self, key: &str, value: bool) -> Self {
        self.field_key(key);
        self.buf.buf.push_str(if value { "true" } else { "false" });
        self
    }

    pub fn string(mut self, key: &str, value: &str) -> Self {
        self.field_key(key);
        self.buf.buf.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                self.buf.buf.push('\\');
            }
            self.buf.buf.push(c);
        }
        self.buf.buf.push('"');
        self
    }

    /// Ends the point at `ts_ms`. A point without fields is not valid line protocol and
    /// is discarded; returns whether it was kept.
    pub fn finish(self, ts_ms: i64) -> bool {
        if self.fields == 0 {
            self.buf.buf.truncate(self.start);
            return false;
        }
        self.buf.buf.push(' ');
        push_int(&mut self.buf.buf, ts_ms);
        self.buf.buf.push('\n');
        self.buf.lines += 1;
        true
    }
}

/// Appends a finite float. Integral values (counters, most set points) print as integers: no
/// `.0`, and faster; without an `i` suffix they are still floats to the store.
fn push_number(out: &mut String, value: f64) {
    let int = value as i64;
    if int as f64 == value && int.unsigned_abs() < 1_000_000_000_000_000 {
        push_int(out, int);
    } else {
        let mut b = zmij::Buffer::new();
        out.push_str(b.format_finite(value));
    }
}

/// Appends the decimal digits of `v` (what `{v}` would write, without `fmt`).
fn push_int(out: &mut String, v: i64) {
    let mut b = itoa::Buffer::new();
    out.push_str(b.format(v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_types() {
        let mut b = LineBuffer::new();
        assert!(b
            .point("my reading,x")
            .tag("dev ice", "a=b,c d")
            .tag("empty", "")
            .float("gross kg", 1.5)
            .int("seq", 7)
            .bool("stable", true)
            .string("msg", "say \"hi\" \\ there\nnext")
            .float("nan", f64::NAN)
            .finish(1_764_421_199_870));
        assert_eq!(
            b.as_str(),
            "my\\ reading\\,x,dev\\ ice=a\\=b\\,c\\ d gross\\ kg=1.5,seq=7i,stable=true,msg=\"say \\\"hi\\\" \\\\ there\nnext\" 1764421199870\n"
        );
        assert!(!b.point("m").tag("t", "v").finish(1));
        assert_eq!(b.lines(), 1);
        let whole = b.take();
        assert!(whole.ends_with("1764421199870\n"));
        assert!(b.is_empty());
        b.point("m")
            .tags(&tag_set(&[("a b", "c,d"), ("e", ""), ("f", "g")]))
            .int("x", 1)
            .finish(2);
        assert_eq!(b.as_str(), "m,a\\ b=c\\,d,f=g x=1i 2\n");
    }

    #[test]
    fn floats_print_without_exponent_loss() {
        let mut b = LineBuffer::new();
        b.point("m")
            .float("a", 1e21)
            .float("b", 0.1)
            .float("c", -3.0)
            .finish(0);
        assert_eq!(b.as_str(), "m a=1e+21,b=0.1,c=-3 0\n");
        b.clear();
        b.point("m")
            .float("a", 2070.0)
            .float("b", -0.0)
            .float("c", 1e15)
            .float("d", 10000.001)
            .float("e", 1e-7)
            .finish(0);
        assert_eq!(
            b.as_str(),
            "m a=2070,b=0,c=1000000000000000.0,d=10000.001,e=1e-7 0\n"
        );
    }

    #[test]
    fn integers_by_hand() {
        let mut b = LineBuffer::new();
        for v in [0, 7, -7, 1_764_421_199_870, i64::MIN, i64::MAX] {
            b.clear();
            b.point("m").int("v", v).finish(v);
            assert_eq!(b.as_str(), format!("m v={v}i {v}\n"));
        }
    }
}

/// Round trip through InfluxData's own parser (`influxdb-line-protocol`, the IOx one) as an
/// oracle: whatever [`LineBuffer`] writes must parse back to the point that was written.
#[cfg(test)]
mod oracle {
    use super::*;
    use influxdb_line_protocol::{parse_lines, FieldValue};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Value {
        Float(f64),
        Int(i64),
        Bool(bool),
        Str(String),
    }

    #[derive(Debug, Clone)]
    struct Sample {
        measurement: String,
        tags: Vec<(String, String)>,
        fields: Vec<(String, Value)>,
        ts: i64,
    }

    /// Non-empty strings, heavy in what line protocol treats specially.
    fn text(min: usize) -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            ',', ' ', '=', '"', '\\', '\n', '\r', '\t', '#', '_', '\0', '😀', 'é', 'i', '1', '.',
        ]);
        prop::collection::vec(prop_oneof![special, any::<char>()], min..10)
            .prop_map(String::from_iter)
    }

    fn float() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>().prop_filter("finite", |v| v.is_finite()),
            any::<i32>().prop_map(f64::from),
            any::<i64>().prop_map(|v| v as f64),
            (-1e6..1e6f64),
            prop::sample::select(vec![
                0.0,
                -0.0,
                1e15,
                1e18,
                -1e18,
                1e21,
                1e-7,
                f64::MIN_POSITIVE,
                f64::MAX,
                f64::MIN
            ]),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            float().prop_map(Value::Float),
            any::<i64>().prop_map(Value::Int),
            any::<bool>().prop_map(Value::Bool),
            text(0).prop_map(Value::Str),
        ]
    }

    fn sample() -> impl Strategy<Value = Sample> {
        (
            text(1),
            prop::collection::vec((text(1), text(1)), 0..=4),
            prop::collection::vec((text(1), value()), 1..=5),
            any::<i64>(),
        )
            .prop_map(|(measurement, tags, fields, ts)| Sample {
                measurement,
                tags,
                fields,
                ts,
            })
    }

    /// What a name reads back as: the characters line protocol cannot carry in a name
    /// become a space (the writer's rule, see the module doc).
    fn name(s: &str, measurement: bool) -> String {
        let mut out: String = s
            .chars()
            .map(|c| match c {
                '\n' | '\r' | '\t' => ' ',
                '\0' if measurement => ' ',
                c => c,
            })
            .collect();
        if measurement && out.starts_with('#') {
            out.replace_range(..1, " ");
        }
        if out.ends_with('\\') {
            out.pop();
            out.push(' ');
        }
        out
    }

    fn write(buf: &mut LineBuffer, s: &Sample) {
        let mut p = buf.point(&s.measurement);
        for (k, v) in &s.tags {
            p = p.tag(k, v);
        }
        for (k, v) in &s.fields {
            p = match v {
                Value::Float(f) => p.float(k, *f),
                Value::Int(i) => p.int(k, *i),
                Value::Bool(b) => p.bool(k, *b),
                Value::Str(t) => p.string(k, t),
            };
        }
        assert!(p.finish(s.ts));
    }

    /// Parses `text` and compares it with the points written.
    fn check(text: &str, samples: &[Sample]) -> Result<(), TestCaseError> {
        let parsed: Vec<_> = parse_lines(text).collect();
        prop_assert_eq!(parsed.len(), samples.len(), "lines of {:?}", text);
        for (line, s) in parsed.into_iter().zip(samples) {
            let line = match line {
                Ok(line) => line,
                Err(e) => return Err(TestCaseError::fail(format!("{e} in {text:?}"))),
            };
            prop_assert_eq!(
                line.series.measurement.as_str(),
                name(&s.measurement, true),
                "in {:?}",
                text
            );
            let tags: Vec<(String, String)> = line
                .series
                .tag_set
                .iter()
                .flatten()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let want: Vec<(String, String)> = s
                .tags
                .iter()
                .map(|(k, v)| (name(k, false), name(v, false)))
                .collect();
            prop_assert_eq!(tags, want, "in {:?}", text);
            prop_assert_eq!(line.field_set.len(), s.fields.len(), "in {:?}", text);
            for ((key, got), (k, v)) in line.field_set.iter().zip(&s.fields) {
                prop_assert_eq!(key.as_str(), name(k, false), "in {:?}", text);
                let same = match (got, v) {
                    // `==`: -0.0 is written as `0`.
                    (FieldValue::F64(g), Value::Float(f)) => g == f,
                    (FieldValue::I64(g), Value::Int(i)) => g == i,
                    (FieldValue::Boolean(g), Value::Bool(b)) => g == b,
                    (FieldValue::String(g), Value::Str(t)) => g.as_str() == t,
                    _ => false,
                };
                prop_assert!(same, "{:?} read back as {:?} in {:?}", v, got, text);
            }
            prop_assert_eq!(line.timestamp, Some(s.ts), "in {:?}", text);
        }
        Ok(())
    }

    /// What the oracle found wrong in earlier versions of the writer.
    #[test]
    fn regressions() {
        let cases: &[(&str, &str, &str)] = &[
            // A trailing backslash: `\\` is read back, then rejected as ending in one.
            ("m", "k\\", "v\\"),
            // A newline became an unescaped space, which ends the measurement or key.
            ("a\nb", "k\nk", "v\nv"),
            // A tab is whitespace to the parser and cannot be escaped.
            ("a\tb", "k\tk", "v\tv"),
            // A leading `#` makes the line a comment.
            ("#m", "k", "v"),
            // NUL cannot be in a measurement.
            ("a\0b", "k\0", "v\0"),
        ];
        let mut failed = Vec::new();
        for (i, (m, k, v)) in cases.iter().enumerate() {
            let s = Sample {
                measurement: m.to_string(),
                tags: vec![(k.to_string(), v.to_string())],
                fields: vec![(k.to_string(), Value::Str(format!("{v}\n\"")))],
                ts: 1,
            };
            let mut buf = LineBuffer::new();
            write(&mut buf, &s);
            if let Err(e) = check(buf.as_str(), &[s]) {
                failed.push(format!("case {i}: {e}"));
            }
        }
        assert!(failed.is_empty(), "{failed:#?}");
    }

    proptest! {
        #[test]
        fn written_points_parse_back(samples in prop::collection::vec(sample(), 1..=3)) {
            let mut buf = LineBuffer::new();
            for s in &samples {
                write(&mut buf, s);
            }
            check(buf.as_str(), &samples)?;
        }
    }
}
