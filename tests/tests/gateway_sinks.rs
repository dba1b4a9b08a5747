//! The gateway's sinks end to end: the real `calwatch-gateway run` fed over mosquitto.
//!
//! - `gateway_sinks_write_exactly_once_to_influxdb_v1_and_victoriametrics`: the same points
//!   land once in InfluxDB 1.x (`/write`) and VictoriaMetrics (`/api/v2/write`), with the
//!   tags, fields and times of CONTRACT §4.
//! - `gateway_sink_outage_retries_in_order_and_dead_letters_bad_lines`: a fake store answers
//!   503 for a while, then 204, and 400 to any request holding one poisoned line: every other
//!   point arrives once and in order, the poisoned line is in the dead-letter file.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod gateway_common;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use calwatch_protocol::{Id, Reading, ReadingBatch, Value};
use calwatch_tests::{eventually, influxql, Services};
use gateway_common::*;
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Publishes the fleet's batches (10 rounds each) and returns every reading sent, by device.
async fn publish_fleet(mqtt: &Mqtt, fleet: &Fleet) -> BTreeMap<String, Vec<Reading>> {
    let mut sims = Sims::default();
    let mut sent: BTreeMap<String, Vec<Reading>> = BTreeMap::new();
    let mut published = 0;
    for from in (0..fleet.rounds).step_by(10) {
        for agent in [&fleet.agent_a, &fleet.agent_b] {
            if let Some(p) = fleet.batch(&mut sims, agent, from, from + 10) {
                for r in ReadingBatch::decode(&p).unwrap().readings {
                    sent.entry(r.device.to_string()).or_default().push(r);
                }
                mqtt.publish_batch(agent, p).await;
                published += 1;
            }
        }
    }
    mqtt.wait_acked(published, Duration::from_secs(20)).await;
    sent
}

fn number(v: &Value) -> f64 {
    match *v {
        Value::Number(x) => x,
        Value::Bool(b) => f64::from(u8::from(b)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sinks_write_exactly_once_to_influxdb_v1_and_victoriametrics() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("gateway-sinks");
    let mut fleet = Fleet::new("gws", 60, 0);
    fleet
        .devices
        .retain(|d| matches!(d.fault, Fault::Clean | Fault::SealBroken));
    let sinks = format!(
        "[[sink]]\nkind = \"influx_v1\"\nurl = \"{}\"\ndb = \"{}\"\n\
         [[sink]]\nkind = \"influx_v2\"\nurl = \"{}\"\norg = \"bureau\"\nbucket = \"calwatch\"\n",
        svc.influx_v1_url, svc.influx_v1_db, svc.vm_url
    );
    let toml = setup_gateway(&dir, &fleet, &svc.mqtt_addr, &sinks);
    let gw = {
        let (dir, toml) = (dir.clone(), toml.clone());
        tokio::task::spawn_blocking(move || start_gateway(&dir, "gateway", &toml))
            .await
            .unwrap()
    };
    let mqtt = Mqtt::connect(&svc.mqtt_addr, &format!("gws-test-{}", std::process::id())).await;
    let sent = publish_fleet(&mqtt, &fleet).await;

    // InfluxDB 1.x: every reading once, its tags, values and time.
    for d in &fleet.devices {
        let readings = &sent[&d.id];
        let q = format!(
            "SELECT * FROM reading WHERE device = '{}' ORDER BY time",
            d.id
        );
        let found = eventually(Duration::from_secs(30), || {
            let (q, svc, n) = (q.clone(), svc.clone(), readings.len());
            async move {
                let (cols, rows) = influxql(&svc.influx_v1_url, &svc.influx_v1_db, &q).await;
                (rows.len() == n).then_some((cols, rows))
            }
        })
        .await;
        let Some((cols, rows)) = found else {
            panic!("{}: not all readings in InfluxDB\n{}", d.id, gw.log_text())
        };
        let col = |n: &str| {
            cols.iter()
                .position(|c| c == n)
                .unwrap_or_else(|| panic!("no column {n} in {cols:?}"))
        };
        for (row, r) in rows.iter().zip(readings) {
            assert_eq!(row[col("time")], Json::from(r.ts), "{}", d.id);
            assert_eq!(row[col("seq")], Json::from(r.seq));
            assert_eq!(row[col("kind")], Json::from(d.kind));
            assert_eq!(row[col("owner")], Json::from(fleet.owner.as_str()));
            assert_eq!(row[col("site")], Json::from(fleet.site.as_str()));
            assert_eq!(row[col("vstate")], Json::from("valid"));
            for (name, value) in &r.values {
                let got = &row[col(name.as_str())];
                match value {
                    Value::Bool(b) => assert_eq!(got, &Json::from(*b), "{name}"),
                    Value::Number(x) => {
                        assert_eq!(got.as_f64(), Some(*x), "{}: {name} of seq {}", d.id, r.seq)
                    }
                }
            }
        }
    }

    // VictoriaMetrics (measurement_field names): each reading's values once, at its time.
    let client = reqwest::Client::new();
    for d in &fleet.devices {
        let readings = &sent[&d.id];
        let url = format!("{}/api/v1/export", svc.vm_url);
        let matcher = format!("{{__name__=~\"reading_.*\",device=\"{}\"}}", d.id);
        let series = eventually(Duration::from_secs(30), || {
            let (client, url, matcher) = (client.clone(), url.clone(), matcher.clone());
            async move {
                let text = client
                    .get(&url)
                    .query(&[("match[]", matcher.as_str())])
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let series: Vec<Json> = text
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                let complete = series.iter().any(|s| {
                    s["metric"]["__name__"] == "reading_seq"
                        && s["timestamps"].as_array().map(Vec::len) == Some(readings.len())
                });
                complete.then_some(series)
            }
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "{}: readings not in VictoriaMetrics\n{}",
                d.id,
                gw.log_text()
            )
        });
        let names: Vec<&str> = readings[0].values.iter().map(|(n, _)| n.as_str()).collect();
        for name in names.iter().chain(&["seq"]) {
            let metric = format!("reading_{name}");
            let s = series
                .iter()
                .find(|s| s["metric"]["__name__"] == metric.as_str())
                .unwrap_or_else(|| panic!("{}: no {metric}", d.id));
            let m = &s["metric"];
            assert_eq!(m["kind"], d.kind);
            assert_eq!(m["owner"], fleet.owner.as_str());
            assert_eq!(m["site"], fleet.site.as_str());
            assert_eq!(m["vstate"], "valid");
            let mut want: Vec<(i64, f64)> = readings
                .iter()
                .filter_map(|r| {
                    let v = if *name == "seq" {
                        Some(r.seq as f64)
                    } else {
                        r.value(name).map(|v| number(&v))
                    };
                    v.map(|v| (r.ts, v))
                })
                .collect();
            want.sort_by_key(|(t, _)| *t);
            let got: Vec<(i64, f64)> = s["timestamps"]
                .as_array()
                .unwrap()
                .iter()
                .zip(s["values"].as_array().unwrap())
                .map(|(t, v)| (t.as_i64().unwrap(), v.as_f64().unwrap()))
                .collect();
            assert_eq!(
                got, want,
                "{}: {metric} once per reading, at its time",
                d.id
            );
        }
    }
    // The broken seal's alert reached both stores.
    let seal = fleet.device(Fault::SealBroken);
    let q = format!(
        "SELECT \"count\", \"severity\" FROM alert WHERE device = '{}' AND kind = 'seal_broken' AND state = 'active'",
        seal.id
    );
    eventually(Duration::from_secs(20), || async {
        let (_, rows) = influxql(&svc.influx_v1_url, &svc.influx_v1_db, &q).await;
        (!rows.is_empty()).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("seal_broken alert point not in InfluxDB\n{}", gw.log_text()));
    // VictoriaMetrics makes a new series searchable about a second after it is written.
    let matcher = format!("alert_count{{device=\"{}\",kind=\"seal_broken\"}}", seal.id);
    eventually(Duration::from_secs(20), || {
        let client = client.clone();
        let matcher = matcher.clone();
        let url = format!("{}/api/v1/export", svc.vm_url);
        async move {
            let text = client
                .get(url)
                .query(&[("match[]", matcher.as_str())])
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("\"severity\":\"critical\"").then_some(())
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "seal_broken alert not in VictoriaMetrics\n{}",
            gw.log_text()
        )
    });
}

/// A store that answers 503 until `fail_until`, 400 to a request holding a poisoned line,
/// and 204 otherwise, keeping the lines it accepted.
struct FakeStore {
    fail_until: Instant,
    accepted: Mutex<Vec<String>>,
    statuses: Mutex<Vec<u16>>,
    gzip: AtomicBool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn fake_connection(mut sock: TcpStream, store: Arc<FakeStore>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    loop {
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < head_end + len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        let body = if head.contains("content-encoding: gzip") {
            store.gzip.store(true, Ordering::SeqCst);
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut out)
                .unwrap();
            out
        } else {
            body
        };
        let text = String::from_utf8(body).unwrap();
        let (status, reply) = if Instant::now() < store.fail_until {
            (503, "{\"error\":\"overloaded, try later\"}")
        } else if text.contains("poison=") {
            (
                400,
                "{\"error\":\"unable to parse 'poison': field type conflict\"}",
            )
        } else {
            store
                .accepted
                .lock()
                .unwrap()
                .extend(text.lines().map(String::from));
            (204, "")
        };
        store.statuses.lock().unwrap().push(status);
        let reason = match status {
            204 => "No Content",
            400 => "Bad Request",
            _ => "Service Unavailable",
        };
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if sock.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sink_outage_retries_in_order_and_dead_letters_bad_lines() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("gateway-sink-outage");
    let mut fleet = Fleet::new("gwo", 200, 0);
    fleet
        .devices
        .retain(|d| d.fault == Fault::Clean && d.kind == "scale");
    let device = fleet.devices[0].id.clone();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let store = Arc::new(FakeStore {
        fail_until: Instant::now() + Duration::from_secs(4),
        accepted: Mutex::new(Vec::new()),
        statuses: Mutex::new(Vec::new()),
        gzip: AtomicBool::new(false),
    });
    {
        let store = store.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(fake_connection(sock, store.clone()));
            }
        });
    }
    let sinks = format!(
        "[[sink]]\nkind = \"influx_v1\"\nurl = \"http://127.0.0.1:{port}\"\ndb = \"fake\"\n"
    );
    let toml = setup_gateway(&dir, &fleet, &svc.mqtt_addr, &sinks);
    let gw = {
        let (dir, toml) = (dir.clone(), toml.clone());
        tokio::task::spawn_blocking(move || start_gateway(&dir, "gateway", &toml))
            .await
            .unwrap()
    };
    let mqtt = Mqtt::connect(&svc.mqtt_addr, &format!("gwo-test-{}", std::process::id())).await;

    // 200 readings in batches of 10; reading 77 carries a value the store refuses.
    let mut sims = Sims::default();
    let mut published = 0;
    for from in (0..fleet.rounds).step_by(10) {
        let p = fleet
            .batch(&mut sims, &fleet.agent_a, from, from + 10)
            .unwrap();
        let mut batch = ReadingBatch::decode(&p).unwrap();
        for r in &mut batch.readings {
            if r.seq == 77 {
                r.values
                    .push((Id::new("poison").unwrap(), Value::Number(1.0)));
            }
        }
        mqtt.publish_batch(&fleet.agent_a, batch.encode().unwrap())
            .await;
        published += 1;
    }
    mqtt.wait_acked(published, Duration::from_secs(20)).await;

    let prefix = format!("reading,device={device},");
    let seqs = |store: &FakeStore| -> Vec<u64> {
        store
            .accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(&prefix))
            .map(|l| {
                let at = l.find("seq=").unwrap() + 4;
                l[at..].split('i').next().unwrap().parse().unwrap()
            })
            .collect()
    };
    let done = eventually(Duration::from_secs(60), || {
        let n = seqs(&store).len();
        async move { (n >= 199).then_some(()) }
    })
    .await;
    assert!(
        done.is_some(),
        "only {} readings arrived\n{}",
        seqs(&store).len(),
        gw.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let want: Vec<u64> = (1..=200).filter(|s| *s != 77).collect();
    assert_eq!(
        seqs(&store),
        want,
        "every reading once, in order, but the poisoned one"
    );

    let statuses = store.statuses.lock().unwrap().clone();
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(statuses.contains(&400), "{statuses:?}");
    assert!(store.gzip.load(Ordering::SeqCst), "bodies are gzipped");

    let dead = std::fs::read_to_string(dir.join("queue/influx_v1.dead-letter.lp"))
        .unwrap_or_else(|e| panic!("dead-letter file: {e}\n{}", gw.log_text()));
    let lines: Vec<&str> = dead.lines().collect();
    assert_eq!(lines.len(), 2, "one header, one line:\n{dead}");
    assert!(lines[0].starts_with("# "), "{dead}");
    assert!(
        lines[0].contains(" 400 ") && lines[0].contains("unable to parse 'poison'"),
        "{dead}"
    );
    assert!(
        lines[1].starts_with(&prefix)
            && lines[1].contains("seq=77i")
            && lines[1].contains("poison=1"),
        "{dead}"
    );
}
