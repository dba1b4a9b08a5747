//! The Grafana part of deploy/: the provisioned datasource and the dashboards.
//!
//! `grafana_dashboards_are_consistent` checks the files alone: every dashboard parses, uids
//! are unique, panel ids are unique per dashboard, every panel, target, variable and
//! annotation uses the provisioned datasource, every `$var` of a query is a template variable
//! or a Grafana built-in, and every template variable is used.
//!
//! `grafana_every_dashboard_query_runs_on_influxdb_1x` (needs tests/run) writes a small
//! synthetic fleet in the schema of CONTRACT.md §4 into a database of its own, then runs every
//! query of every dashboard (panel targets, variable queries, annotations) against InfluxDB 1.x
//! the way Grafana sends it, with the template variables set as Grafana sets them: "All", a
//! multi-selection of every value, and one instrument at a time. No query may fail; every
//! query must return rows for "All", for the multi-selection and for at least one single
//! instrument.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use calwatch_tests::{workspace, Services};
use serde_json::Value;

/// The uid of the datasource provisioned by deploy/grafana/provisioning/datasources/calwatch.yaml.
const DS_UID: &str = "calwatch-influx";
const DASHBOARDS: [&str; 3] = [
    "bureau-overview.json",
    "instrument-detail.json",
    "filling-station.json",
];
const PANEL_TYPES: [&str; 5] = ["timeseries", "stat", "table", "bargauge", "state-timeline"];
/// Grafana's global variables that an InfluxQL query may use.
const BUILTINS: [&str; 13] = [
    "timeFilter",
    "__timeFilter",
    "__interval",
    "__interval_ms",
    "__rate_interval",
    "__range",
    "__range_s",
    "__range_ms",
    "__from",
    "__to",
    "__dashboard",
    "__org",
    "__user",
];

fn grafana_dir() -> PathBuf {
    workspace().join("deploy/grafana")
}

// ------------------------------------------------------------------ reading the dashboards

/// A template-variable reference in a text: `$name`, `${name}`, `${name:format}`, `[[name]]`
/// or `[[name:format]]`; `start..end` is the reference's byte range.
#[derive(Debug)]
struct VarRef {
    start: usize,
    end: usize,
    name: String,
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn var_refs(s: &str) -> Vec<VarRef> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        // All delimiters are ASCII, so every slice below starts and ends on a char boundary.
        let braced = |open: usize, close: &str| -> Option<(usize, String)> {
            let rest = &s[open..];
            let len = rest.find(close)?;
            let name = rest[..len].split(':').next().unwrap_or_default();
            is_ident(name).then(|| (open + len + close.len(), name.to_string()))
        };
        let found = if b[i] == b'$' && b.get(i + 1) == Some(&b'{') {
            braced(i + 2, "}")
        } else if b[i] == b'$' {
            let n = b[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                .count();
            (n > 0).then(|| (i + 1 + n, s[i + 1..i + 1 + n].to_string()))
        } else if b[i..].starts_with(b"[[") {
            braced(i + 2, "]]")
        } else {
            None
        };
        match found {
            Some((end, name)) => {
                out.push(VarRef {
                    start: i,
                    end,
                    name,
                });
                i = end;
            }
            None => i += 1,
        }
    }
    out
}

/// Where a query lives, for messages: "filling-station.json panel 5 \"...\" target B".
#[derive(Clone, Debug)]
struct Query {
    place: String,
    text: String,
    /// For a variable's query: the variable (which its own query cannot use).
    own_var: Option<String>,
}

/// A template variable: its name, whether it offers "All" (and with which value), its query.
#[derive(Clone, Debug)]
struct Variable {
    name: String,
    all_value: Option<String>,
}

struct Dashboard {
    file: String,
    json: Value,
    /// Panel targets, variable queries and annotation queries.
    queries: Vec<Query>,
    variables: Vec<Variable>,
    /// Everything wrong with the file (empty when it is fine).
    problems: Vec<String>,
}

fn ds_uid(v: &Value) -> Option<&str> {
    v.get("datasource")?.get("uid")?.as_str()
}

fn all_panels(panels: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in panels.as_array().into_iter().flatten() {
        out.push(p);
        if let Some(nested) = p.get("panels") {
            out.extend(all_panels(nested));
        }
    }
    out
}

fn load(file: &str) -> Dashboard {
    let path = grafana_dir().join("dashboards").join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let json: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut d = Dashboard {
        file: file.to_string(),
        json,
        queries: Vec::new(),
        variables: Vec::new(),
        problems: Vec::new(),
    };
    let json = d.json.clone();
    let mut problem = |s: String| d.problems.push(s);

    for key in ["uid", "title", "description"] {
        if json[key].as_str().is_none_or(str::is_empty) {
            problem(format!("{file}: no {key}"));
        }
    }
    match json["schemaVersion"].as_u64() {
        Some(v) if (36..=41).contains(&v) => {}
        other => problem(format!(
            "{file}: schemaVersion {other:?}, expected about 39"
        )),
    }

    // Template variables.
    for (i, v) in json["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let place = format!("{file} variable {i} ${name}");
        if !is_ident(&name) {
            problem(format!("{place}: bad name"));
        }
        if v["type"] != "query" {
            problem(format!("{place}: type {}, expected query", v["type"]));
        }
        if ds_uid(v) != Some(DS_UID) {
            problem(format!("{place}: datasource {}", v["datasource"]));
        }
        // Grafana stores a variable query as a string, or (newer) as {"query": "..."}.
        let text = v["query"]
            .as_str()
            .or_else(|| v["query"]["query"].as_str())
            .unwrap_or_default();
        if !text.starts_with("SHOW TAG VALUES FROM ") || !text.contains(" WITH KEY = ") {
            problem(format!("{place}: not a SHOW TAG VALUES query: {text}"));
        }
        // Grafana resolves chained variables in order: a variable uses only earlier ones.
        for r in var_refs(text) {
            if r.name != name && !d.variables.iter().any(|v| v.name == r.name) {
                problem(format!("{place}: uses ${} before it is defined", r.name));
            }
        }
        d.queries.push(Query {
            place,
            text: text.to_string(),
            own_var: Some(name.clone()),
        });
        let all_value = (v["includeAll"] == true)
            .then(|| v["allValue"].as_str().map(String::from).unwrap_or_default());
        d.variables.push(Variable { name, all_value });
    }

    // Annotations: the query is in `target` (Grafana 9+) or, in older files, on the entry itself.
    for (i, a) in json["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let place = format!(
            "{file} annotation {i} {:?}",
            a["name"].as_str().unwrap_or("")
        );
        if ds_uid(a) != Some(DS_UID) {
            problem(format!("{place}: datasource {}", a["datasource"]));
        }
        if a.get("target").is_some() && ds_uid(&a["target"]).is_some_and(|u| u != DS_UID) {
            problem(format!(
                "{place}: target datasource {}",
                a["target"]["datasource"]
            ));
        }
        match a["target"]["query"].as_str().or(a["query"].as_str()) {
            Some(text) => d.queries.push(Query {
                place,
                text: text.to_string(),
                own_var: None,
            }),
            None => problem(format!("{place}: no query")),
        }
    }

    // Panels.
    let mut ids = BTreeSet::new();
    let mut rects: Vec<(u64, [u64; 4], String)> = Vec::new();
    for p in all_panels(&json["panels"]) {
        let id = p["id"].as_u64();
        let title = p["title"].as_str().unwrap_or_default();
        let place = format!("{file} panel {} {title:?}", id.unwrap_or(0));
        match id {
            Some(id) if ids.insert(id) => {}
            Some(_) => problem(format!("{place}: duplicate panel id")),
            None => problem(format!("{place}: no id")),
        }
        let ptype = p["type"].as_str().unwrap_or_default();
        if !PANEL_TYPES.contains(&ptype) {
            problem(format!("{place}: panel type {ptype:?}"));
        }
        if title.is_empty() || p["description"].as_str().is_none_or(str::is_empty) {
            problem(format!("{place}: needs a title and a description"));
        }
        if ds_uid(p) != Some(DS_UID) {
            problem(format!("{place}: datasource {}", p["datasource"]));
        }
        let g = &p["gridPos"];
        let (h, w, x, y) = (
            g["h"].as_u64(),
            g["w"].as_u64(),
            g["x"].as_u64(),
            g["y"].as_u64(),
        );
        match (h, w, x, y) {
            (Some(h), Some(w), Some(x), Some(y)) if h > 0 && w > 0 && x + w <= 24 => {
                for (other, [ox, oy, ow, oh], _) in &rects {
                    if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                        problem(format!("{place}: overlaps panel {other}"));
                    }
                }
                rects.push((id.unwrap_or(0), [x, y, w, h], title.to_string()));
            }
            _ => problem(format!("{place}: bad gridPos {g}")),
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problem(format!("{place}: no targets"));
        }
        let mut refids = BTreeSet::new();
        for t in &targets {
            let refid = t["refId"].as_str().unwrap_or_default();
            let tplace = format!("{place} target {refid}");
            if !refids.insert(refid.to_string()) {
                problem(format!("{tplace}: duplicate refId"));
            }
            if ds_uid(t) != Some(DS_UID) {
                problem(format!("{tplace}: datasource {}", t["datasource"]));
            }
            if t["rawQuery"] != true {
                problem(format!("{tplace}: rawQuery must be true"));
            }
            if !matches!(t["resultFormat"].as_str(), Some("time_series" | "table")) {
                problem(format!("{tplace}: resultFormat {}", t["resultFormat"]));
            }
            // Aliases may use Grafana's series patterns besides variables.
            let alias = t["alias"].as_str().unwrap_or_default();
            for r in var_refs(alias) {
                let pattern = r.name.starts_with("tag_")
                    || ["col", "m", "measurement"].contains(&r.name.as_str());
                if !pattern && !d.variables.iter().any(|v| v.name == r.name) {
                    problem(format!("{tplace}: alias uses undefined ${}", r.name));
                }
            }
            match t["query"].as_str() {
                Some(text) if text.starts_with("SELECT ") => d.queries.push(Query {
                    place: tplace,
                    text: text.to_string(),
                    own_var: None,
                }),
                other => problem(format!("{tplace}: query {other:?}")),
            }
        }
        for r in var_refs(title) {
            if !d.variables.iter().any(|v| v.name == r.name) {
                problem(format!("{place}: title uses undefined ${}", r.name));
            }
        }
    }
    if ids.is_empty() {
        problem(format!("{file}: no panels"));
    }

    // Variable references of the queries.
    let mut used = BTreeSet::new();
    for q in &d.queries {
        for r in var_refs(&q.text) {
            if q.own_var.as_deref() == Some(r.name.as_str()) {
                d.problems
                    .push(format!("{}: a variable cannot use itself", q.place));
            } else if d.variables.iter().any(|v| v.name == r.name) {
                used.insert(r.name.clone());
            } else if !BUILTINS.contains(&r.name.as_str()) {
                d.problems.push(format!(
                    "{}: ${} is neither a template variable nor a Grafana built-in: {}",
                    q.place, r.name, q.text
                ));
            }
        }
        let uses_time = q.text.contains("$timeFilter") || q.text.contains("$__timeFilter");
        if q.text.starts_with("SELECT ") && !uses_time {
            d.problems
                .push(format!("{}: no $timeFilter: {}", q.place, q.text));
        }
    }
    for v in &d.variables {
        if !used.contains(&v.name) {
            d.problems.push(format!(
                "{file}: template variable ${} is not used by any query",
                v.name
            ));
        }
    }
    let mut names = BTreeSet::new();
    for v in &d.variables {
        if !names.insert(v.name.clone()) {
            d.problems.push(format!(
                "{file}: template variable ${} defined twice",
                v.name
            ));
        }
    }
    d
}

#[test]
fn grafana_dashboards_are_consistent() {
    let ds = std::fs::read_to_string(grafana_dir().join("provisioning/datasources/calwatch.yaml"))
        .unwrap();
    // A minimal reading of the YAML: the uids of the provisioned datasources (comments aside).
    let uids: Vec<&str> = ds
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("uid:"))
        .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect();
    assert_eq!(
        uids,
        [DS_UID],
        "the datasource the dashboards use is the one provisioned"
    );
    for needle in [
        "apiVersion: 1",
        "type: influxdb",
        "url: ${CALWATCH_INFLUX_URL}",
        "database: calwatch",
        "version: InfluxQL",
    ] {
        assert!(
            ds.lines().any(|l| l.trim() == needle),
            "datasources/calwatch.yaml lacks {needle:?}"
        );
    }
    let provider =
        std::fs::read_to_string(grafana_dir().join("provisioning/dashboards/calwatch.yaml"))
            .unwrap();
    for needle in [
        "apiVersion: 1",
        "type: file",
        "folder: calwatch",
        "path: /var/lib/grafana/dashboards/calwatch",
    ] {
        assert!(
            provider.lines().any(|l| l.trim() == needle),
            "dashboards/calwatch.yaml lacks {needle:?}"
        );
    }

    let mut problems = Vec::new();
    let mut uids = BTreeMap::new();
    let mut titles = BTreeSet::new();
    let mut queries = 0;
    for file in DASHBOARDS {
        let d = load(file);
        problems.extend(d.problems.iter().cloned());
        queries += d.queries.len();
        let uid = d.json["uid"].as_str().unwrap_or_default().to_string();
        if let Some(other) = uids.insert(uid.clone(), d.file.clone()) {
            problems.push(format!("{file}: uid {uid} also used by {other}"));
        }
        if !titles.insert(d.json["title"].as_str().unwrap_or_default().to_string()) {
            problems.push(format!("{file}: title used twice"));
        }
    }
    // The directory holds exactly the dashboards checked here.
    let mut on_disk: Vec<String> = std::fs::read_dir(grafana_dir().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = DASHBOARDS.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "dashboards in deploy/grafana/dashboards");
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    eprintln!("checked {} dashboards, {queries} queries", DASHBOARDS.len());
}

#[test]
fn grafana_var_refs_find_every_syntax() {
    let refs = var_refs(
        "WHERE \"owner\" =~ /^$owner$/ AND x =~ /^${site:regex}$/ AND [[kind]] $__interval $ $1x",
    );
    let names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["owner", "site", "kind", "__interval", "1x"]);
    let s = "a ${site:regex} b";
    let r = &var_refs(s)[0];
    assert_eq!(&s[r.start..r.end], "${site:regex}");
}

// ------------------------------------------------------------------ the synthetic fleet

struct Device {
    id: &'static str,
    kind: &'static str,
    owner: &'static str,
    site: &'static str,
    /// The verification state for the first and the second half of the hour.
    vstate: [&'static str; 2],
    /// Days to due (none: no certificate).
    days_to_due: Option<f64>,
}

const FLEET: [Device; 6] = [
    Device {
        id: "HS-DSP-0042",
        kind: "dispenser",
        owner: "sinopec-hs-17",
        site: "station-17",
        vstate: ["valid", "valid"],
        days_to_due: Some(210.0),
    },
    Device {
        id: "HS-DSP-0043",
        kind: "dispenser",
        owner: "sinopec-hs-17",
        site: "station-17",
        vstate: ["due_soon", "due_soon"],
        days_to_due: Some(12.0),
    },
    Device {
        id: "HS-SCL-0001",
        kind: "scale",
        owner: "market-3",
        site: "east-market",
        vstate: ["valid", "due_soon"],
        days_to_due: Some(30.5),
    },
    Device {
        id: "HS-SCL-0002",
        kind: "scale",
        owner: "market-3",
        site: "east-market",
        vstate: ["unverified", "unverified"],
        days_to_due: None,
    },
    Device {
        id: "HS-MTR-0007",
        kind: "energy_meter",
        owner: "factory-9",
        site: "plant-1",
        vstate: ["overdue", "overdue"],
        days_to_due: Some(-4.0),
    },
    Device {
        id: "HS-MTR-0008",
        kind: "energy_meter",
        owner: "factory-9",
        site: "plant-1",
        vstate: ["failed", "failed"],
        days_to_due: Some(200.0),
    },
];

const MINUTE: i64 = 60_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn tags(d: &Device, vstate: &str) -> String {
    format!(
        "device={},kind={},owner={},site={},vstate={vstate}",
        d.id, d.kind, d.owner, d.site
    )
}

/// Line protocol (ms precision) for the last hour of a small fleet: readings every 10 s,
/// device_status and coverage every minute, alert transitions.
fn synthetic_fleet(now: i64) -> String {
    let mut lines = Vec::new();
    let start = now - 55 * MINUTE;
    // Readings: 330 per device, every 10 s.
    for (n, d) in FLEET.iter().enumerate() {
        let mut totalizer = 1_834_000.0 + n as f64 * 1000.0;
        let (mut sale_id, mut sale, mut encoder) = (99_800_i64, 0.0_f64, 0.0_f64);
        let mut energy = 10_000.0 + n as f64;
        for i in 0..330_i64 {
            let ts = start + i * 10_000;
            let vstate = d.vstate[usize::from(i >= 165)];
            let fields = match d.kind {
                "dispenser" => {
                    // A sale completes every minute.
                    if i % 6 == 5 {
                        sale_id += 1;
                        encoder = 20.0 + (i % 37) as f64;
                        // HS-DSP-0042: every 3rd sale shows 1% more than the encoder measured,
                        // and its totalizer sometimes advances by more than the sale.
                        let cheat = d.id == "HS-DSP-0042" && sale_id % 3 == 0;
                        sale = if cheat { encoder * 1.01 } else { encoder };
                        totalizer += encoder;
                        if d.id == "HS-DSP-0042" && sale_id % 7 == 0 {
                            totalizer += 4.0;
                        }
                    }
                    format!(
                        "sale_l={sale:.3},encoder_sale_l={encoder:.3},sale_id={sale_id},totalizer_l={totalizer:.3},k_factor=100.12,event_counter=12"
                    )
                }
                "scale" => {
                    let gross = if i % 4 == 0 {
                        0.0
                    } else {
                        1.0 + (i % 9) as f64 * 0.25
                    };
                    format!(
                        "gross_kg={gross},net_kg={gross},tare_kg=0,stable={},zero={},overload={},event_counter=7",
                        i % 3 != 0,
                        gross == 0.0,
                        i == 100
                    )
                }
                _ => {
                    energy += 0.064;
                    format!(
                        "energy_kwh={energy:.3},power_w={},voltage_v=230.1,current_a=10.2,power_factor=0.98,event_counter=3",
                        2300 + i % 50
                    )
                }
            };
            lines.push(format!(
                "reading,{} {fields},seq={}i {ts}",
                tags(d, vstate),
                i + 1
            ));
        }
    }
    // device_status and coverage every minute.
    for m in 0..55_i64 {
        let ts = start + m * MINUTE;
        for (n, d) in FLEET.iter().enumerate() {
            let vstate = d.vstate[usize::from(m >= 27)];
            let drift = if d.kind == "energy_meter" {
                0.02 * m as f64
            } else {
                0.1 * n as f64
            };
            let days = d
                .days_to_due
                .map(|x| format!("days_to_due={:.3},", x - m as f64 / 1440.0))
                .unwrap_or_default();
            lines.push(format!(
                "device_status,{} {days}r_ewma={drift:.4},cusum_pos={:.4},cusum_neg=0,last_seen_s=5,gaps={}i {ts}",
                tags(d, vstate),
                drift * 2.0,
                n % 2
            ));
        }
        let mut groups: BTreeMap<(&str, &str, &str), (i64, i64)> = BTreeMap::new();
        for d in &FLEET {
            let g = groups.entry((d.owner, d.site, d.kind)).or_default();
            g.0 += 1;
            g.1 += i64::from(matches!(
                d.vstate[usize::from(m >= 27)],
                "valid" | "due_soon"
            ));
        }
        for ((owner, site, kind), (in_use, verified)) in groups {
            lines.push(format!(
                "coverage,owner={owner},site={site},kind={kind} in_use={in_use}i,verified={verified}i,coverage_pct={:.2} {ts}",
                100.0 * verified as f64 / in_use as f64
            ));
        }
    }
    // Alert transitions: (minutes ago, device, kind, severity, state, count, message).
    let alerts: [(i64, &str, &str, &str, &str, i64, &str); 11] = [
        (
            50,
            "HS-SCL-0002",
            "unverified",
            "critical",
            "active",
            1,
            "in use without a verification certificate",
        ),
        (
            50,
            "HS-MTR-0007",
            "overdue",
            "critical",
            "active",
            1,
            "verification expired 4 days ago",
        ),
        (
            45,
            "HS-MTR-0008",
            "failed_verification",
            "critical",
            "active",
            1,
            "newest certificate failed",
        ),
        (
            40,
            "HS-DSP-0042",
            "cheating_suspected",
            "critical",
            "active",
            5,
            "5 sales with display/encoder deviation beyond 0.6%",
        ),
        (
            35,
            "HS-DSP-0043",
            "offline",
            "warning",
            "active",
            1,
            "no reading for 3 x interval",
        ),
        (
            32,
            "HS-DSP-0042",
            "cheating_suspected",
            "critical",
            "active",
            6,
            "6 sales with display/encoder deviation beyond 0.6%",
        ),
        (
            30,
            "HS-DSP-0043",
            "offline",
            "warning",
            "resolved",
            1,
            "readings again",
        ),
        (
            27,
            "HS-SCL-0001",
            "due_soon",
            "info",
            "active",
            1,
            "verification due in 30 days",
        ),
        (
            25,
            "HS-DSP-0042",
            "totalizer_mismatch",
            "critical",
            "active",
            1,
            "totalizer advanced 4.0 L more than the \"sales\"",
        ),
        (
            20,
            "HS-DSP-0042",
            "cheating_suspected",
            "critical",
            "acknowledged",
            6,
            "acknowledged by inspector wang",
        ),
        (
            15,
            "HS-MTR-0007",
            "drift",
            "warning",
            "active",
            1,
            "r trending to 1 in 9 days",
        ),
    ];
    for (ago, device, kind, severity, state, count, message) in alerts {
        let d = FLEET.iter().find(|d| d.id == device).unwrap();
        let message = message.replace('\\', "\\\\").replace('"', "\\\"");
        lines.push(format!(
            "alert,device={device},kind={kind},severity={severity},state={state},owner={},site={} count={count}i,message=\"{message}\" {}",
            d.owner,
            d.site,
            now - ago * MINUTE
        ));
    }
    lines.join("\n") + "\n"
}

// ------------------------------------------------------------------ running the queries

/// The values of one template-variable setting.
struct Scenario {
    name: String,
    values: BTreeMap<String, String>,
    /// Every query must return rows (else: at least one single-instrument scenario must).
    rows_required: bool,
}

/// Grafana's regex formatting of a multi-value variable: values regex-escaped, `(a|b)`.
fn regex_alternation(values: &BTreeSet<&str>) -> String {
    let escaped: Vec<String> = values
        .iter()
        .map(|v| {
            v.chars()
                .flat_map(|c| {
                    let meta = "\\.+*?()|[]{}^$/".contains(c);
                    meta.then_some('\\').into_iter().chain(std::iter::once(c))
                })
                .collect()
        })
        .collect();
    if escaped.len() == 1 {
        escaped[0].clone()
    } else {
        format!("({})", escaped.join("|"))
    }
}

fn fleet_values(var: &str) -> BTreeSet<&'static str> {
    FLEET
        .iter()
        .map(|d| match var {
            "owner" => d.owner,
            "site" => d.site,
            "kind" => d.kind,
            "device" => d.id,
            other => panic!("no synthetic values for template variable ${other}"),
        })
        .collect()
}

fn scenarios(vars: &[Variable]) -> Vec<Scenario> {
    let mut out = Vec::new();
    // "All": allValue where the variable offers one, else every value (as Grafana does).
    out.push(Scenario {
        name: "All".into(),
        values: vars
            .iter()
            .map(|v| {
                let all = match &v.all_value {
                    Some(a) if !a.is_empty() => a.clone(),
                    _ => regex_alternation(&fleet_values(&v.name)),
                };
                (v.name.clone(), all)
            })
            .collect(),
        rows_required: true,
    });
    out.push(Scenario {
        name: "every value selected".into(),
        values: vars
            .iter()
            .map(|v| (v.name.clone(), regex_alternation(&fleet_values(&v.name))))
            .collect(),
        rows_required: true,
    });
    for d in &FLEET {
        let one = |x: &'static str| regex_alternation(&BTreeSet::from([x]));
        out.push(Scenario {
            name: d.id.to_string(),
            values: vars
                .iter()
                .map(|v| {
                    let value = match v.name.as_str() {
                        "owner" => one(d.owner),
                        "site" => one(d.site),
                        "kind" => one(d.kind),
                        "device" => one(d.id),
                        other => panic!("no synthetic value for ${other}"),
                    };
                    (v.name.clone(), value)
                })
                .collect(),
            rows_required: false,
        });
    }
    out
}

/// The query as Grafana sends it: variables replaced, `$timeFilter` as an absolute ms range
/// of the last 6 hours, `$__interval` 1m.
fn render(text: &str, values: &BTreeMap<String, String>, now: i64) -> String {
    let from = now - 360 * MINUTE;
    let mut out = String::new();
    let mut pos = 0;
    for r in var_refs(text) {
        out.push_str(&text[pos..r.start]);
        let value = match r.name.as_str() {
            "timeFilter" | "__timeFilter" => format!("time >= {from}ms and time <= {now}ms"),
            "__interval" | "__rate_interval" => "1m".into(),
            "__interval_ms" => "60000".into(),
            "__range" => "6h".into(),
            "__range_s" => "21600".into(),
            "__range_ms" => "21600000".into(),
            "__from" => from.to_string(),
            "__to" => now.to_string(),
            name => values
                .get(name)
                .cloned()
                .unwrap_or_else(|| panic!("no value for ${name} in {text}")),
        };
        out.push_str(&value);
        pos = r.end;
    }
    out.push_str(&text[pos..]);
    out
}

/// Runs one InfluxQL query as Grafana does (GET /query, epoch=ms); returns the number of rows
/// or InfluxDB's error.
async fn run_query(
    client: &reqwest::Client,
    url: &str,
    db: &str,
    q: &str,
) -> Result<usize, String> {
    let resp = client
        .get(format!("{url}/query"))
        .query(&[("db", db), ("q", q), ("epoch", "ms")])
        .send()
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| format!("HTTP {status}, not JSON: {e}"))?;
    if let Some(e) = body["error"].as_str() {
        return Err(format!("HTTP {status}: {e}"));
    }
    let mut rows = 0;
    for result in body["results"].as_array().into_iter().flatten() {
        if let Some(e) = result["error"].as_str() {
            return Err(e.to_string());
        }
        for series in result["series"].as_array().into_iter().flatten() {
            rows += series["values"].as_array().map_or(0, Vec::len);
        }
    }
    Ok(rows)
}

async fn admin(client: &reqwest::Client, url: &str, q: &str) {
    let resp: Value = client
        .post(format!("{url}/query"))
        .form(&[("q", q)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        resp["error"].is_null() && resp["results"][0]["error"].is_null(),
        "{q}: {resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_every_dashboard_query_runs_on_influxdb_1x() {
    let Some(svc) = Services::get() else { return };
    // The dashboards and their variable settings, before anything is written.
    let dashboards: Vec<(Dashboard, Vec<Scenario>)> = DASHBOARDS
        .iter()
        .map(|file| {
            let d = load(file);
            let s = scenarios(&d.variables);
            (d, s)
        })
        .collect();
    let url = svc.influx_v1_url.clone();
    let db = format!("calwatch_grafana_{}", std::process::id());
    let client = reqwest::Client::new();
    admin(&client, &url, &format!("CREATE DATABASE {db}")).await;

    let now = now_ms();
    let body = synthetic_fleet(now);
    let resp = client
        .post(format!("{url}/write"))
        .query(&[("db", db.as_str()), ("precision", "ms")])
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status.as_u16(), 204, "write: {text}");
    eprintln!("wrote {} points to {db}", body.lines().count());

    let mut failures = Vec::new();
    let mut runs = 0;
    let mut queries = 0;
    for (d, scenarios) in &dashboards {
        for q in &d.queries {
            queries += 1;
            let mut single_rows = false;
            for s in scenarios {
                let rendered = render(&q.text, &s.values, now);
                runs += 1;
                match run_query(&client, &url, &db, &rendered).await {
                    Err(e) => failures.push(format!(
                        "{} [{}]: InfluxDB error: {e}\n    query: {rendered}",
                        q.place, s.name
                    )),
                    Ok(0) if s.rows_required => failures.push(format!(
                        "{} [{}]: no rows\n    query: {rendered}",
                        q.place, s.name
                    )),
                    Ok(n) => single_rows |= !s.rows_required && n > 0,
                }
            }
            if !single_rows {
                failures.push(format!(
                    "{}: no rows for any single instrument\n    query: {}",
                    q.place, q.text
                ));
            }
        }
    }
    admin(&client, &url, &format!("DROP DATABASE {db}")).await;
    eprintln!("{queries} dashboard queries, {runs} runs against InfluxDB");
    assert!(
        failures.is_empty(),
        "{} of {runs} query runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
