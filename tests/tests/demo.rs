//! `calwatch-gateway demo` as a new user runs it: the binary on a fresh temp dir for 90 s;
//! from its console API, the injected faults and the registry's certificate states raised
//! exactly the expected alerts (the drifting instruments may add drift-related ones), the
//! console is served, and Ctrl-C (SIGTERM here) stops it cleanly.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use calwatch_tests::{bin, free_port, Proc, Services};
use serde_json::Value as Json;

const RUN_S: u64 = 90;
const SPEED: f64 = 10.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_90s_and_raises_exactly_the_expected_alerts() {
    // Needs no services, but is slow: it runs with the suite (tests/run), not `cargo test`.
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("demo");
    let port = free_port();
    let started = Instant::now();
    let mut demo = Proc::start(
        &dir,
        "demo",
        &bin("calwatch-gateway"),
        &[
            "demo",
            "--dir",
            dir.join("work").to_str().unwrap(),
            "--http",
            &format!("127.0.0.1:{port}"),
            "--speed",
            &SPEED.to_string(),
            "--for",
            &(RUN_S + 30).to_string(),
        ],
    );
    // The console's address as the banner prints it: the demo falls back to a free port when
    // the one asked for was taken meanwhile (another test may have bound it).
    let line = demo.wait_stdout_line("#token=", Duration::from_secs(60));
    let (url, token) = line
        .split_whitespace()
        .last()
        .and_then(|u| u.split_once("#token="))
        .unwrap_or_else(|| panic!("no console URL in {line}"));
    let (base, token) = (url.trim_end_matches('/').to_string(), token.to_string());
    assert!(token.starts_with("cw_"), "{line}");
    if base != format!("http://127.0.0.1:{port}") {
        eprintln!("port {port} was taken meanwhile; the demo serves on {base}");
    }
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let req = http.get(format!("{base}{path}")).bearer_auth(&token);
        async move { req.send().await.unwrap().json::<Json>().await.unwrap() }
    };
    // The console is there.
    let page = http
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("calwatch console"), "{page}");

    let wait = Duration::from_secs(RUN_S).saturating_sub(started.elapsed());
    tokio::time::sleep(wait).await;
    let alerts = get("/api/alerts?limit=1000").await;
    let raised: BTreeSet<(String, String)> = alerts["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{alerts}\n{}", demo.log_text()))
        .iter()
        .map(|a| {
            (
                a["device"].as_str().unwrap().to_string(),
                a["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let (must, may) = calwatch_gateway::demo::expected_alerts(SPEED, RUN_S as f64 - 5.0);
    let missing: Vec<_> = must.difference(&raised).collect();
    assert!(
        missing.is_empty(),
        "not raised: {missing:?}\nraised: {raised:?}\n{}",
        demo.log_text()
    );
    let unexpected: Vec<_> = raised
        .iter()
        .filter(|(d, k)| !must.contains(&(d.clone(), k.clone())) && !may.contains(d))
        .collect();
    assert!(unexpected.is_empty(), "unexpected alerts: {unexpected:?}");
    for (d, _) in &raised {
        assert!(d.starts_with("HS-"), "{d}");
    }
    // The city's 101 instruments, all reporting but the silent meter, coverage by site.
    let devices = get("/api/devices?limit=1000").await;
    assert_eq!(devices["total"], 101, "{devices}");
    let silent: Vec<&str> = devices["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["last_seen"].is_null())
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert!(silent.is_empty(), "never heard from: {silent:?}");
    let coverage = get("/api/coverage?by=site").await;
    assert_eq!(coverage["items"].as_array().unwrap().len(), 7, "{coverage}");
    // The alert lines on standard output and a clean stop.
    let code = demo.terminate(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", demo.log_text());
    eprintln!(
        "demo raised {} (device, kind) alerts: {raised:?}",
        raised.len()
    );
}
