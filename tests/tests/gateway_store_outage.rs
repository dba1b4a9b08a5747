//! A real InfluxDB killed for 60 s under load, and the gateway killed and restarted while
//! the store is down: every point arrives once the store is back (the sink's disk queue
//! holds them; nothing acked to the broker is lost).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use calwatch_protocol::{Id, Reading, ReadingBatch, Value};
use calwatch_tests::{bin, eventually, free_port, influxql, run_to_end, Proc, Services};
use rumqttc::{AsyncClient, MqttOptions, QoS};

const DEVICES: usize = 5;

struct Influx {
    dir: std::path::PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Influx {
    fn start(dir: &Path) -> Influx {
        let port = free_port();
        let rpc = free_port();
        let conf = dir.join("influxdb.conf");
        std::fs::write(
            &conf,
            format!(
                "reporting-disabled = true\nreporting-enabled = false\nbind-address = \"127.0.0.1:{rpc}\"\n\
                 [meta]\n  dir = \"{d}/meta\"\n  logging-enabled = false\n\
                 [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n\
                 [monitor]\n  store-enabled = false\n\
                 [http]\n  enabled = true\n  bind-address = \"127.0.0.1:{port}\"\n  auth-enabled = false\n  log-enabled = false\n\
                 [ifql]\n  enabled = false\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let mut ix = Influx {
            dir: dir.to_path_buf(),
            port,
            child: None,
        };
        ix.restart();
        ix
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("influxd.log"))
            .unwrap();
        self.child = Some(
            Command::new("influxd")
                .arg("-config")
                .arg(self.dir.join("influxdb.conf"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                drop(s);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("influxd did not start");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Influx {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_store_down_60s_and_gateway_restart_lose_nothing() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("gateway-store-outage");
    std::fs::create_dir_all(dir.join("influx")).unwrap();
    let mut influx = Influx::start(&dir.join("influx"));
    let client = reqwest::Client::new();
    for _ in 0..50 {
        let ok = client
            .post(format!("{}/query", influx.url()))
            .query(&[("q", "CREATE DATABASE outage")])
            .send()
            .await;
        if ok.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let pid = std::process::id();
    let agent = format!("outage-agent-{pid}");
    let ids: Vec<String> = (1..=DEVICES).map(|i| format!("OUT-{pid}-{i}")).collect();
    let mut devices = String::from("id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device\n");
    let mut certs = String::from(
        "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\n",
    );
    for id in &ids {
        devices.push_str(&format!(
            "{id},scale,o-{pid},s-{pid},{agent},FT-112,x,III,15,0.005,,1,\n"
        ));
        certs.push_str(&format!("{id},C-{id},2020-01-01,2099-12-31,pass,v,7,\n"));
    }
    std::fs::write(dir.join("devices.csv"), devices).unwrap();
    std::fs::write(dir.join("verifications.csv"), certs).unwrap();
    let gateway_toml = dir.join("gateway.toml");
    std::fs::write(
        &gateway_toml,
        format!(
            "client_id = \"outage-gw-{pid}\"\n[mqtt]\nurl = \"mqtt://{}\"\n[registry]\npath = \"registry.db\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [sweep]\ninterval_s = 3600\n[[sink]]\nkind = \"influx_v1\"\nurl = \"{}\"\ndb = \"outage\"\n",
            svc.mqtt_addr,
            influx.url()
        ),
    )
    .unwrap();
    let gw = bin("calwatch-gateway");
    let (code, out, err) = run_to_end(
        &gw,
        &[
            "import",
            "--config",
            gateway_toml.to_str().unwrap(),
            dir.join("devices.csv").to_str().unwrap(),
            dir.join("verifications.csv").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let mut gateway = Proc::start(
        &dir,
        "gateway-1",
        &gw,
        &["run", "--config", gateway_toml.to_str().unwrap()],
    );

    // A publisher standing in for the agent: 5 devices, 10 readings/s each, one batch a second.
    let (host, port) = svc.mqtt_addr.rsplit_once(':').unwrap();
    let mut opts = MqttOptions::new(format!("outage-pub-{pid}"), host, port.parse().unwrap());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (mqtt, mut eventloop) = AsyncClient::new(opts, 100);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let topic = format!("calwatch/v1/agents/{agent}/readings");
    let start = calwatch_tests_now();
    let mut seq = 0u64;
    let mut sent = 0u64;
    let publish_second = |seq: &mut u64, second: u64| {
        let mut readings = Vec::new();
        for tick in 0..10u64 {
            *seq += 1;
            for id in &ids {
                readings.push(Reading {
                    device: Id::new(id.clone()).unwrap(),
                    seq: *seq,
                    ts: start + (second * 1000 + tick * 100) as i64,
                    values: vec![
                        (
                            Id::new("gross_kg").unwrap(),
                            Value::Number(*seq as f64 / 1000.0),
                        ),
                        (Id::new("event_counter").unwrap(), Value::Number(7.0)),
                    ],
                });
            }
        }
        let n = readings.len() as u64;
        (
            ReadingBatch {
                agent: Id::new(agent.clone()).unwrap(),
                sent: start,
                readings,
            }
            .encode()
            .unwrap(),
            n,
        )
    };
    let mut second = 0u64;
    let phase = |secs: u64, second: &mut u64, seq: &mut u64, sent: &mut u64| {
        let mut batches = Vec::new();
        for _ in 0..secs {
            let (bytes, n) = publish_second(seq, *second);
            *second += 1;
            *sent += n;
            batches.push(bytes);
        }
        batches
    };
    for b in phase(10, &mut second, &mut seq, &mut sent) {
        mqtt.publish(&topic, QoS::AtLeastOnce, false, b)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The store dies under load.
    influx.kill();
    for (i, b) in phase(60, &mut second, &mut seq, &mut sent)
        .into_iter()
        .enumerate()
    {
        mqtt.publish(&topic, QoS::AtLeastOnce, false, b)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if i == 30 {
            // And the gateway is killed while the store is down, then started again.
            drop(gateway);
            gateway = Proc::start(
                &dir,
                "gateway-2",
                &gw,
                &["run", "--config", gateway_toml.to_str().unwrap()],
            );
        }
    }
    influx.restart();
    for b in phase(10, &mut second, &mut seq, &mut sent) {
        mqtt.publish(&topic, QoS::AtLeastOnce, false, b)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let url = influx.url();
    let expected = sent;
    let got = eventually(Duration::from_secs(90), || {
        let url = url.clone();
        async move {
            let (_, rows) = influxql(
                &url,
                "outage",
                &format!("SELECT count(seq) FROM reading WHERE owner = 'o-{pid}'"),
            )
            .await;
            let n = rows
                .first()
                .and_then(|r| r.get(1))
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            (n >= expected).then_some(n)
        }
    })
    .await;
    let Some(got) = got else {
        let (_, rows) = influxql(
            &url,
            "outage",
            &format!("SELECT count(seq) FROM reading WHERE owner = 'o-{pid}'"),
        )
        .await;
        panic!(
            "{rows:?} of {expected} readings stored\ngateway log:\n{}",
            gateway.log_text()
        );
    };
    assert_eq!(got, expected, "every reading stored once");
    // Per device, every seq 1..=last is there.
    for id in &ids {
        let (_, rows) = influxql(
            &url,
            "outage",
            &format!("SELECT count(seq), min(seq), max(seq) FROM reading WHERE device = '{id}'"),
        )
        .await;
        let r = &rows[0];
        assert_eq!(
            (r[1].as_u64(), r[2].as_u64(), r[3].as_u64()),
            (Some(seq), Some(1), Some(seq)),
            "{id}"
        );
    }
}

fn calwatch_tests_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3_600_000
}
