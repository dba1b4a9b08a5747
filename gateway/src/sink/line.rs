//! InfluxDB line protocol, written by hand (CONTRACT §4), ms precision.
//!
//! Escaping per the line protocol reference: measurement escapes `,` and space; tag keys,
//! tag values and field keys escape `,`, `=` and space; string field values escape `"` and
//! `\`. A backslash is escaped too wherever it could be read as an escape. Newlines
//! cannot appear in names or tags: they are replaced by a space.
//!
//! This is the hot path of ingest (one line per reading): names without anything to escape
//! (every calwatch id) are copied as they are; integral floats print as integers, other
//! floats in their shortest round-trip form by `zmij` (`1e+21` for large magnitudes, which
//! InfluxDB and VictoriaMetrics read), integers by `itoa` (both are serde_json's, so no new
//! crate).

/// Appends points to one line-protocol buffer.
#[derive(Debug, Default, Clone)]
pub struct LineBuffer {
    buf: String,
    lines: usize,
}

/// Bytes that may need escaping somewhere (a superset of every context's specials).
const MAY_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    t[b',' as usize] = true;
    t[b'=' as usize] = true;
    t[b' ' as usize] = true;
    t[b'\\' as usize] = true;
    t[b'\n' as usize] = true;
    t[b'\r' as usize] = true;
    t
};

fn escape_into(out: &mut String, s: &str, specials: &[char]) {
    if !s.bytes().any(|b| MAY_ESCAPE[usize::from(b)]) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\n' | '\r' => out.push(' '),
            '\\' => out.push_str("\\\\"),
            c if specials.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
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
        escape_into(&mut self.buf, measurement, &[',', ' ']);
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

const KEY: &[char] = &[',', '=', ' '];

/// `key=value,key=value` with keys and values escaped, for [`Point::tags`]: the tags of a
/// series, made once and written with every point of it.
pub fn tag_set(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (key, value) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        if !out.is_empty() {
            out.push(',');
        }
        escape_into(&mut out, key, KEY);
        out.push('=');
        escape_into(&mut out, value, KEY);
    }
    out
}

impl Point<'_> {
    /// Adds a tag; tags must come before fields. Empty values are skipped (not allowed).
    pub fn tag(self, key: &str, value: &str) -> Self {
        debug_assert_eq!(self.fields, 0, "tags go before fields");
        if !value.is_empty() {
            self.buf.buf.push(',');
            escape_into(&mut self.buf.buf, key, KEY);
            self.buf.buf.push('=');
            escape_into(&mut self.buf.buf, value, KEY);
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
        escape_into(&mut self.buf.buf, key, KEY);
        self.buf.buf.push('=');
        self.fields += 1;
    }

    /// A float field; non-finite values cannot be stored and are skipped.
    pub fn float(mut self, key: &str, value: f64) -> Self {
        if value.is_finite() {
            self.field_key(key);
            // Integral values (counters, most set points) print as integers: no `.0`, and
            // faster; without an `i` suffix they are still floats to the store.
            let int = value as i64;
            if int as f64 == value && int.unsigned_abs() < 1_000_000_000_000_000 {
                push_int(&mut self.buf.buf, int);
            } else {
                let mut b = zmij::Buffer::new();
                self.buf.buf.push_str(b.format_finite(value));
            }
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
