//! The walking skeleton end to end, as a user runs it: `calwatch-agent simulate` serves a
//! scale over Modbus TCP, `calwatch-agent run` polls it and publishes to mosquitto,
//! `calwatch-gateway run` ingests and writes to InfluxDB 1.x through /write.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use calwatch_tests::{bin, eventually, free_port, influxql, run_to_end, workspace, Proc, Services};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_reading_reaches_influxdb_v1() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("e2e-scale");
    let device = format!("E2E-SCL-{}", std::process::id());
    let agent_id = format!("e2e-agent-{}", std::process::id());
    let profile = workspace().join("config/profiles/ft112.toml");

    // The registry: one class III scale, verified and valid, assigned to our agent.
    std::fs::write(
        dir.join("devices.csv"),
        format!(
            "id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device\n\
             {device},scale,e2e-owner,e2e-site,{agent_id},FT-112,SIM00001,III,15,0.005,,1,\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("verifications.csv"),
        format!(
            "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\n\
             {device},E2E-CERT-1,2020-01-01,2099-12-31,pass,e2e-verifier,7,\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "client_id = \"e2e-gateway-{pid}\"\n[mqtt]\nurl = \"mqtt://{mqtt}\"\n[registry]\npath = \"registry.db\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [[sink]]\nkind = \"influx_v1\"\nurl = \"{influx}\"\ndb = \"{db}\"\n",
            pid = std::process::id(),
            mqtt = svc.mqtt_addr,
            influx = svc.influx_v1_url,
            db = svc.influx_v1_db
        ),
    )
    .unwrap();
    let gateway_toml = dir.join("gateway.toml");
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
    assert_eq!(code, 0, "import failed: {out}{err}");

    let sim_port = free_port();
    let mut sim = Proc::start(
        &dir,
        "simulator",
        &bin("calwatch-agent"),
        &[
            "simulate",
            "--profile",
            profile.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
        ],
    );
    sim.wait_stdout_line("simulating", Duration::from_secs(10));

    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "agent = \"{agent_id}\"\n[mqtt]\nurl = \"mqtt://{mqtt}\"\n[spool]\ndir = \"spool\"\n[batch]\nlinger_ms = 200\n\
             [[device]]\nid = \"{device}\"\nprofile = \"{profile}\"\naddress = \"127.0.0.1:{sim_port}\"\ninterval_ms = 250\n",
            mqtt = svc.mqtt_addr,
            profile = profile.display()
        ),
    )
    .unwrap();
    let _gateway = Proc::start(
        &dir,
        "gateway",
        &gw,
        &["run", "--config", gateway_toml.to_str().unwrap()],
    );
    let mut agent = Proc::start(
        &dir,
        "agent",
        &bin("calwatch-agent"),
        &["run", "--config", dir.join("agent.toml").to_str().unwrap()],
    );

    let q = format!("SELECT * FROM reading WHERE device = '{device}' ORDER BY time");
    let found = eventually(Duration::from_secs(30), || {
        let q = q.clone();
        let svc = svc.clone();
        async move {
            let (cols, rows) = influxql(&svc.influx_v1_url, &svc.influx_v1_db, &q).await;
            (rows.len() >= 4).then_some((cols, rows))
        }
    })
    .await;
    let Some((cols, rows)) = found else {
        panic!(
            "no readings in InfluxDB after 30 s\nagent log:\n{}\ngateway log:\n{}",
            agent.log_text(),
            _gateway.log_text()
        );
    };
    let col = |name: &str| {
        cols.iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("no column {name} in {cols:?}"))
    };
    let mut last_seq = 0;
    for row in &rows {
        assert_eq!(row[col("kind")], Value::from("scale"));
        assert_eq!(row[col("owner")], Value::from("e2e-owner"));
        assert_eq!(row[col("site")], Value::from("e2e-site"));
        assert_eq!(row[col("vstate")], Value::from("valid"));
        assert_eq!(row[col("event_counter")], Value::from(7));
        assert!(row[col("stable")].is_boolean(), "{row:?}");
        assert!(row[col("zero")].is_boolean(), "{row:?}");
        assert_eq!(row[col("overload")], Value::from(false));
        let gross = row[col("gross_kg")].as_f64().expect("gross is a number");
        assert!((0.0..=15.0).contains(&gross), "{gross}");
        assert_eq!(
            row[col("net_kg")],
            row[col("gross_kg")],
            "no tare on the simulated scale"
        );
        // seq is an integer field, +1 per reading, from 1.
        let seq = row[col("seq")].as_u64().expect("seq is an integer");
        assert_eq!(seq, last_seq + 1, "{rows:?}");
        last_seq = seq;
        let ts = row[col("time")].as_i64().expect("time");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!(
            (now - 60_000..=now).contains(&ts),
            "event time of the reading, ms: {ts}"
        );
    }
    // A clean stop of the agent is graceful.
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        Some(0),
        "{}",
        agent.log_text()
    );
}

#[test]
fn bad_config_files_exit_2_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("calwatch-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let agent_toml = dir.join("agent.toml");
    std::fs::write(&agent_toml, "agent = \"a\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\ncolour = \"red\"\n[spool]\ndir = \"s\"\n").unwrap();
    let (code, _, err) = run_to_end(
        &bin("calwatch-agent"),
        &["run", "--config", agent_toml.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with(&format!("{}:4: ", agent_toml.display())),
        "{err}"
    );
    assert!(err.contains("colour"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let gateway_toml = dir.join("gateway.toml");
    std::fs::write(
        &gateway_toml,
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[registry]\npath = \"r.db\"\n[http]\nlisten = \"127.0.0.1:0\"\n[[sink]]\nkind = \"influx_v1\"\nurl = \"http://127.0.0.1:8086\"\n",
    )
    .unwrap();
    let (code, _, err) = run_to_end(
        &bin("calwatch-gateway"),
        &["run", "--config", gateway_toml.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with(&format!("{}:7: ", gateway_toml.display())),
        "{err}"
    );
    assert!(err.contains("needs db"), "{err}");

    let (code, _, err) = run_to_end(
        &bin("calwatch-gateway"),
        &[
            "run",
            "--config",
            dir.join("missing.toml").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("missing.toml") && err.contains("cannot read"),
        "{err}"
    );

    let profile = dir.join("bad-profile.toml");
    std::fs::write(&profile, "kind = \"scale\"\nmodel = \"m\"\n[[value]]\nname = \"x\"\ntable = \"holding\"\naddress = 0\ntype = \"f33\"\n").unwrap();
    let (code, _, err) = run_to_end(
        &bin("calwatch-agent"),
        &["simulate", "--profile", profile.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with(&format!("{}:7: ", profile.display())),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_csv_row_is_named_and_nothing_is_imported() {
    let dir = std::env::temp_dir().join(format!("calwatch-badcsv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gateway_toml = dir.join("gateway.toml");
    std::fs::write(&gateway_toml, "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[registry]\npath = \"r.db\"\n[http]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let devices = dir.join("devices.csv");
    std::fs::write(
        &devices,
        "id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device\n\
         S-1,scale,o,s,a,m,x,III,15,0.005,,1,\nS-2,scale,o,s,a,m,x,III,15,0.005,,soon,\n",
    )
    .unwrap();
    let gw = bin("calwatch-gateway");
    let (code, _, err) = run_to_end(
        &gw,
        &[
            "import",
            "--config",
            gateway_toml.to_str().unwrap(),
            devices.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "{}:3: interval_s: \"soon\" is not a positive whole number of seconds",
            devices.display()
        )
    );
    // All or nothing: S-1 was not imported either, so its certificate is refused.
    let v = dir.join("v.csv");
    std::fs::write(&v, "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\nS-1,C,2026-01-01,2027-01-01,pass,v,,\n").unwrap();
    std::fs::write(&devices, "id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device\n").unwrap();
    let (code, _, err) = run_to_end(
        &gw,
        &[
            "import",
            "--config",
            gateway_toml.to_str().unwrap(),
            devices.to_str().unwrap(),
            v.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("v.csv:2: device: unknown device S-1"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
