//! The ingest watchdog and the shutdown bound (issue #19, DESIGN "The gateway never stalls").
//!
//! - `/healthz` answers 503 with the reason when the broker connection has been down longer
//!   than `[ingest] stall_after_s`, and 200 again once it is back; under systemd
//!   (`NOTIFY_SOCKET`, `WATCHDOG_USEC`) the gateway sends `READY=1`, feeds the watchdog with
//!   `WATCHDOG=1` only while ingest is healthy, and says why it stopped feeding it.
//! - A full sink queue (the store unreachable, the queue at its 4 MiB minimum) blocks a
//!   burst: `/healthz` names it, and deploy/compose.yaml's healthcheck stops it (SIGTERM),
//!   promptly and with exit 0, for `restart: unless-stopped` to start it again.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod gateway_common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use calwatch_tests::broker::Mosquitto;
use calwatch_tests::{eventually, free_port, Proc, Services};
use gateway_common::*;
use serde_json::Value as Json;

async fn healthz(gw: &Proc) -> (u16, Json) {
    // Bounded: a hung gateway fails the test instead of hanging it.
    let r = reqwest::Client::new()
        .get(format!("http://{}/healthz", gw.http_addr()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap())
}

/// `/healthz`'s body once it answers `code`, within `limit`.
async fn healthz_answers(gw: &Proc, code: u16, limit: Duration) -> Option<Json> {
    eventually(limit, || async {
        let (got, body) = healthz(gw).await;
        (got == code).then_some(body)
    })
    .await
}

/// What systemd would have received: a thread reads the socket as systemd does (its queue
/// holds only net.unix.max_dgram_qlen datagrams, 10 by default).
#[derive(Clone)]
struct Manager {
    got: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Manager {
    fn listen(sock: UnixDatagram) -> Manager {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                g.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Manager { got }
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Waits for a notification starting with `prefix` after the first `from`; its index.
    fn wait(&self, from: usize, prefix: &str, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.got.lock().unwrap()[from..]
                .iter()
                .position(|n| n.starts_with(prefix))
            {
                return from + i;
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} notification within {limit:?}; got {:?}",
                self.got.lock().unwrap()[from..].to_vec()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn since(&self, from: usize) -> Vec<String> {
        self.got.lock().unwrap()[from..].to_vec()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_turns_healthz_503_and_starves_the_systemd_watchdog() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("gateway-watchdog");
    let port = free_port();
    let mut broker = Mosquitto::start(&dir, port);
    let fleet = Fleet::new("wdg", 10, 0);
    let toml = setup_gateway(
        &dir,
        &fleet,
        &format!("127.0.0.1:{port}"),
        "[[sink]]\nkind = \"stdout\"\n[ingest]\nstall_after_s = 2\n",
    );
    let sock_path = dir.join("notify.sock");
    let manager = Manager::listen(UnixDatagram::bind(&sock_path).unwrap());
    let mut gw = start_gateway_env(
        &dir,
        "gateway",
        &toml,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let fed = manager.wait(0, "WATCHDOG=1", Duration::from_secs(10));
    assert_eq!(manager.since(0)[0], "READY=1", "{:?}", manager.since(0));
    assert!(fed > 0);
    let (code, body) = healthz(&gw).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["broker_connected"], true);

    // The broker goes away: past stall_after_s, 503 with the reason, and the watchdog
    // is no longer fed.
    broker.stop();
    let stalled = healthz_answers(&gw, 503, Duration::from_secs(20))
        .await
        .expect("healthz never turned 503 with the broker down");
    assert_eq!(stalled["status"], "stalled");
    assert_eq!(stalled["broker_connected"], false);
    let reason = stalled["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("broker connection down for "),
        "{reason}"
    );
    let stalled_at = manager.wait(
        0,
        "STATUS=stalled: broker connection down",
        Duration::from_secs(5),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = manager.since(stalled_at);
    assert!(
        !later.iter().any(|n| n == "WATCHDOG=1"),
        "the watchdog was fed while stalled: {later:?}"
    );

    // Back: healthy again, the watchdog fed again.
    broker.restart();
    let healthy = healthz_answers(&gw, 200, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("healthz did not recover:\n{}", gw.log_text()));
    assert_eq!(healthy["broker_connected"], true);
    let back = manager.count();
    manager.wait(back, "WATCHDOG=1", Duration::from_secs(5));
    let (code, out) = compose_healthcheck(&format!("http://{}/healthz", gw.http_addr()), gw.pid());
    assert_eq!(
        code, 0,
        "the compose healthcheck failed a healthy gateway: {out}"
    );

    assert_eq!(
        gw.terminate(Duration::from_secs(20)),
        Some(0),
        "{}",
        gw.log_text()
    );
    manager.wait(0, "STOPPING=1", Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sink_queue_is_reported_and_sigterm_still_ends_the_gateway() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("gateway-watchdog-queue");
    let port = free_port();
    let _broker = Mosquitto::start(&dir, port);
    let addr = format!("127.0.0.1:{port}");
    let fleet = Fleet::new("wdq", 4_000, 0);
    // The store never answers; the queue holds its minimum of 4 MiB.
    let dead = free_port();
    let toml = setup_gateway(
        &dir,
        &fleet,
        &addr,
        &format!(
            "[[sink]]\nkind = \"influx_v1\"\nurl = \"http://127.0.0.1:{dead}\"\ndb = \"x\"\n\
             [queue]\nmax_bytes = 4194304\n[ingest]\nstall_after_s = 2\nshutdown_timeout_s = 10\n"
        ),
    );
    let mut gw = start_gateway(&dir, "gateway", &toml);
    let mqtt = Mqtt::connect(&addr, &format!("wdq-test-{}", std::process::id())).await;
    let mut sims = Sims::default();
    for round in 0..fleet.rounds {
        for agent in fleet.agents() {
            if let Some(p) = fleet.batch(&mut sims, &agent, round, round + 1) {
                mqtt.publish_batch(&agent, p).await;
            }
        }
    }
    let stalled = healthz_answers(&gw, 503, Duration::from_secs(120))
        .await
        .unwrap_or_else(|| panic!("healthz never reported the full queue:\n{}", gw.log_text()));
    let reason = stalled["reason"].as_str().unwrap();
    assert!(reason.contains("a full sink queue"), "{reason}");
    assert!(stalled["pending"].as_u64().unwrap() > 0, "{stalled}");

    // Blocked on the queue, it still stops on SIGTERM, cleanly and well within the bound:
    // sent by deploy/compose.yaml's own healthcheck, aimed at this gateway.
    let t = Instant::now();
    let (code, out) = compose_healthcheck(&format!("http://{}/healthz", gw.http_addr()), gw.pid());
    assert_eq!(code, 1, "the healthcheck passed a stalled gateway: {out}");
    assert_eq!(
        gw.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        gw.log_text()
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopped after {:?}",
        t.elapsed()
    );
    assert!(gw.log_text().contains("shutting down"), "{}", gw.log_text());
}

/// Runs the gateway healthcheck of deploy/compose.yaml against `url`, with `pid` standing
/// for the container's PID 1; its exit code and output.
fn compose_healthcheck(url: &str, pid: u32) -> (i32, String) {
    let compose =
        std::fs::read_to_string(calwatch_tests::workspace().join("deploy/compose.yaml")).unwrap();
    let gateway = &compose[compose.find("\n  gateway:\n").unwrap()..];
    let script: Vec<&str> = gateway[gateway.find("- >-\n").unwrap() + 5..]
        .lines()
        .take_while(|l| l.starts_with("          "))
        .map(str::trim)
        .collect();
    let script = script
        .join(" ")
        .replace("$$", "$")
        .replace("http://127.0.0.1:8080/healthz", url)
        .replace("kill -TERM 1", &format!("kill -TERM {pid}"));
    assert!(
        script.contains(url) && script.contains(&format!("kill -TERM {pid}")),
        "{script}"
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{script}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A disk that does not answer: the registry locked by another process (`BEGIN EXCLUSIVE`
/// from the sqlite3 shell), so the state commit waits. `/healthz` names the job that does
/// not end, SIGTERM ends the process within `shutdown_timeout_s` all the same (exit 3 when
/// the bound cut it short), and after the lock is gone a restart checks every reading
/// exactly once: nothing acked was lost, nothing is checked twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_registry_cannot_hold_the_shutdown_and_loses_nothing() {
    use std::io::Write as _;
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("gateway-watchdog-lock");
    let port = free_port();
    let _broker = Mosquitto::start(&dir, port);
    let addr = format!("127.0.0.1:{port}");
    let fleet = Fleet::new("wdl", 200, 0);
    let toml = setup_gateway(
        &dir,
        &fleet,
        &addr,
        &format!(
            "[[sink]]\nkind = \"influx_v1\"\nurl = \"{}\"\ndb = \"{}\"\n\
             [ingest]\nstall_after_s = 2\nshutdown_timeout_s = 3\n",
            svc.influx_v1_url, svc.influx_v1_db
        ),
    );
    let mut gw = start_gateway(&dir, "gateway", &toml);
    let mut lock = std::process::Command::new("sqlite3")
        .arg(dir.join("registry.db"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut shell = lock.stdin.take().unwrap();
    // Waits for the gateway's own commits (busy timeout), then holds the write lock.
    shell
        .write_all(
            b".timeout 20000\nBEGIN EXCLUSIVE;\nINSERT INTO alert_log (owner, event) VALUES ('x', 'x');\nSELECT 'locked';\n",
        )
        .unwrap();
    shell.flush().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(lock.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");

    let mqtt = Mqtt::connect(&addr, &format!("wdl-test-{}", std::process::id())).await;
    let mut sims = Sims::default();
    let mut published = 0;
    for round in 0..fleet.rounds {
        for agent in fleet.agents() {
            if let Some(p) = fleet.batch(&mut sims, &agent, round, round + 1) {
                mqtt.publish_batch(&agent, p).await;
                published += 1;
            }
        }
    }
    mqtt.wait_acked(published, Duration::from_secs(30)).await;
    let stalled = healthz_answers(&gw, 503, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| {
            panic!(
                "healthz never reported the stuck commit:\n{}",
                gw.log_text()
            )
        });
    assert!(
        stalled["reason"]
            .as_str()
            .unwrap()
            .contains("has been running for"),
        "{stalled}"
    );

    let t = Instant::now();
    let code = gw.terminate(Duration::from_secs(15));
    let took = t.elapsed();
    eprintln!("locked registry: SIGTERM → exit {code:?} after {took:?}");
    assert!(
        matches!(code, Some(0) | Some(3)),
        "exit {code:?}:\n{}",
        gw.log_text()
    );
    assert!(
        took < Duration::from_secs(6),
        "stopped after {took:?} (bound 3 s)"
    );
    if code == Some(3) {
        assert!(gw
            .log_text()
            .contains("not stopped within ingest.shutdown_timeout_s"));
    }

    // The lock goes; a restart takes the redelivered rest, each reading once.
    drop(shell);
    let _ = lock.wait();
    let gw2 = start_gateway(&dir, "gateway-2", &toml);
    let dump = all_checked(&fleet, &toml, Duration::from_secs(60), || {})
        .await
        .unwrap_or_else(|| {
            panic!(
                "not every reading checked after the restart:\n{}",
                gw2.log_text()
            )
        });
    for d in &fleet.devices {
        let l = dump.iter().find(|l| l["device"] == d.id.as_str()).unwrap();
        assert_eq!(l["state"]["last_seq"], fleet.sent(d), "{}", d.id);
        assert_eq!(l["gaps"], 0, "{}", d.id);
    }
}
