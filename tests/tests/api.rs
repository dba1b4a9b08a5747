//! The HTTP API of the real `calwatch-gateway run` against real mosquitto, with two owners'
//! fleets replayed through it (every fault kind, so alerts exist for both):
//!
//! - `api_authorization_matrix`: every endpoint × every role × own/other owner; allowed calls
//!   succeed, the rest get 401/403, and no answer (lists, single reads, coverage, the SSE
//!   stream) carries the other owner's data.
//! - `api_owner_cannot_record_certificates`: an owner recording a certificate or importing
//!   one (to extend `valid_until`) is refused and audited; the verifier's certificate is
//!   recorded, audited and takes effect at once.
//! - `api_csv_import_and_registration`: devices.csv and verifications.csv through the API
//!   (all or nothing, `file:line: reason`), owners confined to their own devices.
//! - `api_alert_stream_replays_and_acks`: SSE with `Last-Event-ID` replays what was missed
//!   without duplicates; a supervisor's ack changes the alert and is streamed.
//! - `api_fuzzed_requests_never_fail_the_server`: bad JSON, huge bodies, bad ids, path
//!   traversal, random bytes to every endpoint: 4xx, never 5xx, and the server stays up.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod gateway_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use calwatch_tests::{bin, eventually, run_to_end, Proc, Services};
use gateway_common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value as Json};

/// A running gateway with two owners' fleets replayed and a token per role.
struct Api {
    base: String,
    toml: PathBuf,
    a: Fleet,
    b: Fleet,
    tokens: Tokens,
    gw: Proc,
    http: reqwest::Client,
}

struct Tokens {
    owner_a: String,
    owner_b: String,
    verifier: String,
    supervisor: String,
    admin: String,
}

fn token(toml: &Path, role: &str, owner: Option<&str>, name: &str) -> String {
    let mut args = vec![
        "token",
        "--config",
        toml.to_str().unwrap(),
        "--role",
        role,
        "--name",
        name,
    ];
    if let Some(o) = owner {
        args.extend(["--owner", o]);
    }
    let (code, out, err) = run_to_end(&bin("calwatch-gateway"), &args);
    assert_eq!(code, 0, "token: {err}");
    let t = out.trim().to_string();
    assert!(t.starts_with("cw_"), "{out}");
    t
}

impl Api {
    async fn start(svc: &Services, tag: &str) -> Api {
        let dir = svc.test_dir(tag);
        let a = Fleet::new(&format!("{tag}a"), 40, 5);
        let b = Fleet::new(&format!("{tag}b"), 40, 5);
        let toml = setup_gateway(&dir, &a, &svc.mqtt_addr, "");
        // The second owner's fleet into the same registry.
        std::fs::write(dir.join("devices-b.csv"), b.devices_csv()).unwrap();
        std::fs::write(dir.join("verifications-b.csv"), b.verifications_csv()).unwrap();
        let (code, _, err) = run_to_end(
            &bin("calwatch-gateway"),
            &[
                "import",
                "--config",
                toml.to_str().unwrap(),
                dir.join("devices-b.csv").to_str().unwrap(),
                dir.join("verifications-b.csv").to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "{err}");
        let tokens = Tokens {
            owner_a: token(&toml, "owner", Some(&a.owner), "owner-a"),
            owner_b: token(&toml, "owner", Some(&b.owner), "owner-b"),
            verifier: token(&toml, "verifier", None, "vera-verifier"),
            supervisor: token(&toml, "supervisor", None, "sam-supervisor"),
            admin: token(&toml, "admin", None, "ada-admin"),
        };
        let gw = {
            let (dir, toml) = (dir.clone(), toml.clone());
            tokio::task::spawn_blocking(move || start_gateway(&dir, "gateway", &toml))
                .await
                .unwrap()
        };
        let base = format!("http://{}", gw.http_addr());
        let mqtt = Mqtt::connect(
            &svc.mqtt_addr,
            &format!("{tag}-test-{}", std::process::id()),
        )
        .await;
        let mut published = 0;
        for fleet in [&a, &b] {
            let mut sims = Sims::default();
            for agent in [&fleet.agent_a, &fleet.agent_b] {
                if let Some(p) = fleet.batch(&mut sims, agent, 0, fleet.rounds) {
                    mqtt.publish_batch(agent, p).await;
                    published += 1;
                }
            }
        }
        mqtt.wait_acked(published, Duration::from_secs(20)).await;
        let api = Api {
            base,
            toml,
            a,
            b,
            tokens,
            gw,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        };
        // Both owners have alerts before the tests look.
        for fleet in [&api.a, &api.b] {
            let owner = fleet.owner.clone();
            let found = eventually(Duration::from_secs(30), || {
                let api = &api;
                let owner = owner.clone();
                async move {
                    let (s, body) = api
                        .get(
                            &format!("/api/alerts?owner={owner}"),
                            &api.tokens.supervisor,
                        )
                        .await;
                    (s == 200 && body["total"].as_u64().unwrap_or(0) >= 4).then_some(())
                }
            })
            .await;
            assert!(
                found.is_some(),
                "alerts of {owner} did not appear\n{}",
                api.gw.log_text()
            );
        }
        api
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> (StatusCode, Json) {
        let (s, text) = self.call_text(method, path, token, body).await;
        (s, serde_json::from_str(&text).unwrap_or(Json::String(text)))
    }

    /// GETs `path` with `token`.
    async fn get(&self, path: &str, token: &str) -> (StatusCode, Json) {
        self.call(Method::GET, path, Some(token), None).await
    }

    /// POSTs CSV text with `token`.
    async fn post_csv(&self, path: &str, token: &str, csv: String) -> (StatusCode, Json) {
        self.call(
            Method::POST,
            path,
            Some(token),
            Some(("text/csv", csv.into_bytes())),
        )
        .await
    }

    /// POSTs `value` as JSON with `token`.
    async fn post_json(&self, path: &str, token: &str, value: &Json) -> (StatusCode, Json) {
        let body = serde_json::to_vec(value).unwrap();
        self.call(
            Method::POST,
            path,
            Some(token),
            Some(("application/json", body)),
        )
        .await
    }

    async fn call_text(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> (StatusCode, String) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some((ct, b)) = body {
            req = req.header("content-type", ct).body(b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let s = resp.status();
        (s, resp.text().await.unwrap_or_default())
    }

    /// Reads the SSE stream for `for_`, returning (event, id, data) triples.
    async fn sse(
        &self,
        token: &str,
        last_id: Option<&str>,
        for_: Duration,
    ) -> (StatusCode, Vec<(String, String, String)>) {
        let mut req = self
            .http
            .get(format!("{}/api/alerts/stream", self.base))
            .bearer_auth(token);
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let mut resp = req.send().await.unwrap();
        let status = resp.status();
        if status != 200 {
            let text = resp.text().await.unwrap_or_default();
            return (status, vec![("error".into(), String::new(), text)]);
        }
        let mut buf = String::new();
        let deadline = tokio::time::Instant::now() + for_;
        while let Ok(Ok(Some(c))) = tokio::time::timeout_at(deadline, resp.chunk()).await {
            buf.push_str(&String::from_utf8_lossy(&c));
        }
        let mut events = Vec::new();
        for block in buf.split("\n\n") {
            let (mut ev, mut id, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    ev = v.trim().into();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().into();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !ev.is_empty() {
                events.push((ev, id, data));
            }
        }
        (status, events)
    }

    fn audit(&self) -> Vec<Json> {
        let (code, out, err) = run_to_end(
            &bin("calwatch-gateway"),
            &[
                "audit",
                "--config",
                self.toml.to_str().unwrap(),
                "--limit",
                "500",
            ],
        );
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Who calls: a role's token, an owner's token for its own or the other's data, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Anonymous,
    BadToken,
    OwnerOwn,
    OwnerOther,
    Verifier,
    Supervisor,
    Admin,
}

const CALLERS: [Caller; 7] = [
    Caller::Anonymous,
    Caller::BadToken,
    Caller::OwnerOwn,
    Caller::OwnerOther,
    Caller::Verifier,
    Caller::Supervisor,
    Caller::Admin,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_authorization_matrix() {
    let Some(svc) = Services::get() else { return };
    let api = Api::start(&svc, "apim").await;
    let a_dev = api.a.device(Fault::Overdue).id.clone();
    let a_cheat = api.a.device(Fault::Cheating).id.clone();
    // The alert acknowledged in the matrix: one of owner A's.
    let (_, alerts) = api
        .get(
            &format!("/api/alerts?owner={}&state=active", api.a.owner),
            &api.tokens.supervisor,
        )
        .await;
    let alert_id = alerts["items"][0]["id"].as_str().unwrap().to_string();
    let new_dev = |n: &str| {
        json!({"id": format!("{}-NEW-{n}", api.a.tag), "kind": "scale", "owner": api.a.owner, "site": api.a.site,
               "agent": api.a.agent_a, "model": "FT-112", "serial": n, "accuracy_class": "III", "max": 30, "e": 0.005,
               "interval_s": 60})
    };
    let cert = json!({"certificate": "API-CERT-1", "verified_at": "2026-01-10", "valid_until": "2027-01-10", "result": "pass"});
    // (method, path, body, which callers may, the owner whose data it is).
    type Case = (Method, String, Option<Json>, &'static [Caller]);
    use Caller::*;
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            "/api/devices".into(),
            None,
            &[OwnerOwn, OwnerOther, Verifier, Supervisor, Admin],
        ),
        (
            Method::GET,
            format!("/api/devices/{a_dev}"),
            None,
            &[OwnerOwn, Verifier, Supervisor, Admin],
        ),
        (
            Method::GET,
            format!("/api/devices/{a_dev}/readings"),
            None,
            &[OwnerOwn, Verifier, Supervisor, Admin],
        ),
        (
            Method::POST,
            "/api/devices".into(),
            Some(new_dev("1")),
            &[OwnerOwn, Admin],
        ),
        (
            Method::POST,
            format!("/api/devices/{a_cheat}/verifications"),
            Some(cert),
            &[Verifier],
        ),
        (
            Method::GET,
            "/api/alerts".into(),
            None,
            &[OwnerOwn, OwnerOther, Supervisor, Admin],
        ),
        (
            Method::GET,
            format!("/api/alerts?owner={}", api.a.owner),
            None,
            &[OwnerOwn, Supervisor, Admin],
        ),
        (
            Method::POST,
            format!("/api/alerts/{alert_id}/ack"),
            None,
            &[Supervisor],
        ),
        (
            Method::GET,
            "/api/alerts/stream".into(),
            None,
            &[OwnerOwn, OwnerOther, Supervisor, Admin],
        ),
        (
            Method::GET,
            "/api/coverage?by=site".into(),
            None,
            &[OwnerOwn, OwnerOther, Supervisor, Admin],
        ),
        (
            Method::GET,
            "/api/me".into(),
            None,
            &[OwnerOwn, OwnerOther, Verifier, Supervisor, Admin],
        ),
        (
            Method::POST,
            "/api/import/devices".into(),
            None,
            &[OwnerOwn, Admin],
        ),
        (
            Method::POST,
            "/api/import/verifications".into(),
            None,
            &[Verifier],
        ),
    ];
    let bad = "cw_1_0000000000000000000000000000000000000000000000000000000000000000".to_string();
    let mut checked = 0;
    for (method, path, body, allowed) in &cases {
        for caller in CALLERS {
            // Owner B calling about owner A's data is "other"; owner A is "own".
            let tok = match caller {
                Anonymous => None,
                BadToken => Some(bad.clone()),
                OwnerOwn => Some(api.tokens.owner_a.clone()),
                OwnerOther => Some(api.tokens.owner_b.clone()),
                Verifier => Some(api.tokens.verifier.clone()),
                Supervisor => Some(api.tokens.supervisor.clone()),
                Admin => Some(api.tokens.admin.clone()),
            };
            let payload = match (path.as_str(), body) {
                ("/api/import/devices", _) => Some(("text/csv", api.a.devices_csv().into_bytes())),
                ("/api/import/verifications", _) => {
                    Some(("text/csv", api.a.verifications_csv().into_bytes()))
                }
                (_, Some(b)) => Some(("application/json", serde_json::to_vec(b).unwrap())),
                _ => None,
            };
            let (status, text) = if path.ends_with("/stream") {
                let (s, events) = api
                    .sse(
                        tok.as_deref().unwrap_or(""),
                        Some("0"),
                        Duration::from_millis(1500),
                    )
                    .await;
                if s == 200 {
                    // Replayed from the start of the log: the caller's alerts only, and some.
                    let owners: BTreeSet<String> = events
                        .iter()
                        .filter(|(e, _, _)| e == "alert")
                        .map(|(_, _, d)| {
                            serde_json::from_str::<Json>(d).unwrap()["owner"]
                                .as_str()
                                .unwrap()
                                .to_string()
                        })
                        .collect();
                    let want = match caller {
                        OwnerOwn => BTreeSet::from([api.a.owner.clone()]),
                        OwnerOther => BTreeSet::from([api.b.owner.clone()]),
                        _ => BTreeSet::from([api.a.owner.clone(), api.b.owner.clone()]),
                    };
                    assert!(
                        want.is_subset(&owners) || caller == Admin || caller == Supervisor,
                        "{caller:?} stream saw {owners:?}"
                    );
                    assert!(
                        owners.is_subset(&want) || !matches!(caller, OwnerOwn | OwnerOther),
                        "{caller:?} stream leaked {owners:?}"
                    );
                    assert!(!owners.is_empty(), "{caller:?}: nothing replayed");
                }
                let text = if s == 200 {
                    String::new()
                } else {
                    events.first().map(|e| e.2.clone()).unwrap_or_default()
                };
                (s, text)
            } else {
                let tok_s = tok.clone().unwrap_or_default();
                let mut req = api
                    .http
                    .request(method.clone(), format!("{}{path}", api.base));
                if caller != Anonymous {
                    req = req.bearer_auth(&tok_s);
                }
                if let Some((ct, b)) = payload {
                    req = req.header("content-type", ct).body(b);
                }
                let resp = req.send().await.unwrap();
                (resp.status(), resp.text().await.unwrap())
            };
            let ok = allowed.contains(&caller);
            if ok {
                assert!(
                    status.is_success(),
                    "{caller:?} {method} {path}: {status} {text}"
                );
            } else {
                let want = if matches!(caller, Anonymous | BadToken) {
                    401
                } else {
                    403
                };
                assert_eq!(status.as_u16(), want, "{caller:?} {method} {path}: {text}");
                let err: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
                assert!(
                    err["error"].is_string(),
                    "{caller:?} {method} {path}: error body {text}"
                );
            }
            // Nothing of owner A's in what owner B got, and nothing of B's in A's.
            let (mine, theirs) = match caller {
                OwnerOwn => (&api.a, &api.b),
                OwnerOther => (&api.b, &api.a),
                _ => (&api.a, &api.a),
            };
            if matches!(caller, OwnerOwn | OwnerOther) {
                assert!(
                    !text.contains(&theirs.owner) && !text.contains(&theirs.site),
                    "{caller:?} ({}) {method} {path} leaked {}: {text}",
                    mine.owner,
                    theirs.owner
                );
                if caller == OwnerOther {
                    for d in &theirs.devices {
                        assert!(
                            !text.contains(&format!("\"{}\"", d.id)),
                            "{caller:?} {path} leaked device {}: {text}",
                            d.id
                        );
                    }
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, cases.len() * CALLERS.len());
    // Coverage of an owner is its own rows only, with the 92 % target.
    for (tok, fleet) in [(&api.tokens.owner_a, &api.a), (&api.tokens.owner_b, &api.b)] {
        let (s, body) = api.get("/api/coverage?by=owner", tok).await;
        assert_eq!(s, 200);
        let keys: Vec<&str> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, vec![fleet.owner.as_str()], "{body}");
        assert_eq!(body["items"][0]["target_pct"], 92.0);
    }
    // An owner's device list is its own devices, all of them.
    let (_, body) = api
        .get("/api/devices?limit=1000", &api.tokens.owner_b)
        .await;
    let ids: BTreeSet<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    let want: BTreeSet<&str> = api.b.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, want);
    // /metrics from loopback without a token; with an owner's token, refused.
    let (s, text) = api.call_text(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, 200);
    assert!(text.contains("calwatch_readings_in_total"), "{text}");
    let (s, _) = api
        .call_text(Method::GET, "/metrics", Some(&api.tokens.owner_a), None)
        .await;
    assert_eq!(s, 403);
    let (s, _) = api.call_text(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_owner_cannot_record_certificates() {
    let Some(svc) = Services::get() else { return };
    let api = Api::start(&svc, "apic").await;
    let overdue = api.a.device(Fault::Overdue).id.clone();
    let path = format!("/api/devices/{overdue}");
    let (_, before) = api.get(&path, &api.tokens.supervisor).await;
    assert_eq!(before["vstate"], "overdue", "{before}");
    // The owner extends valid_until of its own overdue scale: refused, audited.
    let extend = json!({"certificate": "FORGED-1", "verified_at": "2026-11-01", "valid_until": "2030-01-01", "result": "pass"});
    let (s, body) = api
        .post_json(
            &format!("{path}/verifications"),
            &api.tokens.owner_a,
            &extend,
        )
        .await;
    assert_eq!(s, 403, "{body}");
    let csv = format!(
        "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\n{overdue},FORGED-2,2026-11-01,2030-01-01,pass,me,,\n"
    );
    let (s, body) = api
        .post_csv("/api/import/verifications", &api.tokens.owner_a, csv)
        .await;
    assert_eq!(s, 403, "{body}");
    // Registering its device again with another owner's id (to hand it over) is refused too.
    let (s, _) = api
        .post_json("/api/devices", &api.tokens.owner_a, &json!({"id": overdue, "kind": "scale", "owner": api.b.owner, "site": api.a.site, "agent": api.a.agent_a,
                "model": "m", "serial": "s", "accuracy_class": "III", "max": 30, "e": 0.005, "interval_s": 60}))
        .await;
    assert_eq!(s, 403);
    let (_, after) = api.get(&path, &api.tokens.supervisor).await;
    assert_eq!(
        after["certificates"], before["certificates"],
        "nothing recorded"
    );
    assert_eq!(after["vstate"], "overdue");
    let audit = api.audit();
    let denied: Vec<&Json> = audit
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("denied."))
        .collect();
    let actions: BTreeSet<&str> = denied
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains("denied.certificate.record"), "{audit:?}");
    assert!(actions.contains("denied.certificate.import"), "{audit:?}");
    assert!(actions.contains("denied.device.register"), "{audit:?}");
    let forged = denied
        .iter()
        .find(|e| e["action"] == "denied.certificate.record")
        .unwrap();
    assert_eq!(forged["actor"], "token:owner-a");
    assert_eq!(forged["subject"], overdue.as_str());
    assert!(
        forged["new"].as_str().unwrap().contains("2030-01-01"),
        "the attempt is kept: {forged}"
    );

    // The verifier records a passing certificate: in force at once, audited under its name.
    let cert = json!({"certificate": "REVERIFY-1", "verified_at": iso_date(now_ms() - DAY), "valid_until": iso_date(now_ms() + 365 * DAY),
                      "result": "pass", "event_counter": 4, "k_factor": null});
    let (s, body) = api
        .post_json(
            &format!("{path}/verifications"),
            &api.tokens.verifier,
            &cert,
        )
        .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["vstate"], "valid", "{body}");
    assert_eq!(body["certificate"]["verifier"], "vera-verifier");
    // A certificate under another verifier's name is refused.
    let other = json!({"certificate": "REVERIFY-2", "verified_at": "2026-11-01", "valid_until": "2027-11-01", "result": "pass", "verifier": "someone-else"});
    let (s, body) = api
        .post_json(
            &format!("{path}/verifications"),
            &api.tokens.verifier,
            &other,
        )
        .await;
    assert_eq!(s, 422, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("verifier"),
        "{body}"
    );
    let audit = api.audit();
    let rec = audit
        .iter()
        .find(|e| e["action"] == "certificate.record" && e["subject"] == overdue.as_str())
        .unwrap();
    assert_eq!(rec["actor"], "token:vera-verifier");
    let (code, out, err) = run_to_end(
        &bin("calwatch-gateway"),
        &["verify", "--config", api.toml.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_csv_import_and_registration() {
    let Some(svc) = Services::get() else { return };
    let api = Api::start(&svc, "apii").await;
    let tag = &api.a.tag;
    let header = "id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device\n";
    let row = |n: u32, owner: &str| {
        format!(
            "{tag}-IMP-{n},scale,{owner},{},{},FT-112,S{n},III,30,0.005,,60,\n",
            api.a.site, api.a.agent_a
        )
    };
    // A bad third line: nothing imported, the line named.
    let bad = format!(
        "{header}{}{}{tag}-IMP-9,scale,{},{},{},FT-112,S9,III,30,0.005,,sixty,\n",
        row(1, &api.a.owner),
        row(2, &api.a.owner),
        api.a.owner,
        api.a.site,
        api.a.agent_a
    );
    let (s, body) = api
        .post_csv(
            "/api/import/devices?name=market.csv",
            &api.tokens.admin,
            bad,
        )
        .await;
    assert_eq!(s, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("market.csv:4: interval_s"),
        "{body}"
    );
    let (s, _) = api
        .get(&format!("/api/devices/{tag}-IMP-1"), &api.tokens.admin)
        .await;
    assert_eq!(s, 404, "all or nothing");
    // The owner's own rows: imported; a row of another owner in its file: refused whole.
    let good = format!("{header}{}{}", row(1, &api.a.owner), row(2, &api.a.owner));
    let (s, body) = api
        .post_csv("/api/import/devices", &api.tokens.owner_a, good)
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["imported"], 2);
    let mixed = format!("{header}{}{}", row(3, &api.a.owner), row(4, &api.b.owner));
    let (s, body) = api
        .post_csv("/api/import/devices", &api.tokens.owner_a, mixed)
        .await;
    assert_eq!(s, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("devices.csv:3:"),
        "{body}"
    );
    let (s, _) = api
        .get(&format!("/api/devices/{tag}-IMP-3"), &api.tokens.admin)
        .await;
    assert_eq!(s, 404, "all or nothing");
    // Certificates for the new devices by the verifier; the device shows them at once.
    let certs = format!(
        "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\n{tag}-IMP-1,C-1,2026-06-01,2027-06-01,pass,vera-verifier,,\n{tag}-IMP-2,C-2,2025-01-01,2026-01-01,pass,vera-verifier,,\n"
    );
    let (s, body) = api
        .post_csv("/api/import/verifications", &api.tokens.verifier, certs)
        .await;
    assert_eq!(s, 200, "{body}");
    let (_, d1) = api
        .get(&format!("/api/devices/{tag}-IMP-1"), &api.tokens.owner_a)
        .await;
    assert_eq!(d1["vstate"], "valid", "{d1}");
    assert_eq!(d1["certificate"]["certificate"], "C-1");
    let (_, d2) = api
        .get(&format!("/api/devices/{tag}-IMP-2"), &api.tokens.owner_a)
        .await;
    assert_eq!(d2["vstate"], "overdue", "{d2}");
    // Registered through the API, a device's readings are checked at once (no restart).
    let (s, body) = api
        .post_json("/api/devices", &api.tokens.owner_a, &json!({"id": format!("{tag}-API-1"), "kind": "scale", "site": api.a.site, "agent": api.a.agent_a,
                "model": "FT-112", "serial": "X1", "accuracy_class": "III", "max": 30, "e": 0.005, "interval_s": 60}))
        .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(
        body["owner"],
        api.a.owner.as_str(),
        "an owner's device is its own by default"
    );
    assert_eq!(body["vstate"], "unverified");
    let mqtt = Mqtt::connect(&svc.mqtt_addr, &format!("apii-pub-{}", std::process::id())).await;
    let batch = calwatch_protocol::ReadingBatch {
        agent: calwatch_protocol::Id::new(api.a.agent_a.clone()).unwrap(),
        sent: now_ms(),
        readings: vec![calwatch_protocol::Reading {
            device: calwatch_protocol::Id::new(format!("{tag}-API-1")).unwrap(),
            seq: 1,
            ts: now_ms(),
            values: vec![(
                calwatch_protocol::Id::new("gross_kg").unwrap(),
                calwatch_protocol::Value::Number(1.5),
            )],
        }],
    };
    mqtt.publish_batch(&api.a.agent_a, batch.encode().unwrap())
        .await;
    let raised = eventually(Duration::from_secs(15), || async {
        let (_, b) = api
            .get(
                &format!("/api/alerts?device={tag}-API-1"),
                &api.tokens.owner_a,
            )
            .await;
        b["items"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["kind"] == "unverified").cloned())
    })
    .await;
    let raised = raised.unwrap_or_else(|| panic!("no unverified alert\n{}", api.gw.log_text()));
    assert_eq!(
        raised["severity"], "critical",
        "in use unverified: {raised}"
    );
    // A certificate imported with the CLI beside the running gateway counts within seconds,
    // no restart.
    let dir = api.toml.parent().unwrap();
    let devices = dir.join("cli-devices.csv");
    std::fs::write(&devices, header).unwrap();
    let csv = dir.join("cli-verifications.csv");
    std::fs::write(
        &csv,
        format!("device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\n{tag}-API-1,C-CLI,2026-01-01,2099-01-01,pass,vera-verifier,,\n"),
    )
    .unwrap();
    let (code, _, err) = run_to_end(
        &bin("calwatch-gateway"),
        &[
            "import",
            "--config",
            api.toml.to_str().unwrap(),
            devices.to_str().unwrap(),
            csv.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let seen = eventually(Duration::from_secs(15), || async {
        let (_, d) = api
            .get(&format!("/api/devices/{tag}-API-1"), &api.tokens.owner_a)
            .await;
        (d["vstate"] == "valid" && d["certificate"]["certificate"] == "C-CLI").then_some(d)
    })
    .await;
    assert!(
        seen.is_some(),
        "CLI import not picked up\n{}",
        api.gw.log_text()
    );
    assert!(api
        .gw
        .log_text()
        .contains("registry changed by another process; picked up"));
    // Audited: the admin's refused import is not there, the owner's rows are.
    let audit = api.audit();
    assert!(audit.iter().any(|e| e["action"] == "device.register"
        && e["subject"] == format!("{tag}-IMP-1")
        && e["actor"] == "token:owner-a"));
    assert!(audit
        .iter()
        .any(|e| e["action"] == "denied.device.import" && e["actor"] == "token:owner-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_alert_stream_replays_and_acks() {
    let Some(svc) = Services::get() else { return };
    let api = Api::start(&svc, "apis").await;
    // Everything so far, from the log.
    let (s, first) = api
        .sse(
            &api.tokens.supervisor,
            Some("0"),
            Duration::from_millis(1500),
        )
        .await;
    assert_eq!(s, 200);
    let alerts: Vec<&(String, String, String)> = first.iter().filter(|e| e.0 == "alert").collect();
    assert!(alerts.len() >= 16, "{first:?}");
    let ids: Vec<i64> = alerts.iter().map(|e| e.1.parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let last = *ids.last().unwrap();
    // A new live stream while acking: the ack arrives on it, with the next id.
    let live = {
        let api_base = api.base.clone();
        let tok = api.tokens.supervisor.clone();
        let http = api.http.clone();
        tokio::spawn(async move {
            let mut resp = http
                .get(format!("{api_base}/api/alerts/stream"))
                .bearer_auth(tok)
                .send()
                .await
                .unwrap();
            let mut buf = String::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while let Ok(Ok(Some(c))) = tokio::time::timeout_at(deadline, resp.chunk()).await {
                buf.push_str(&String::from_utf8_lossy(&c));
                if buf.contains("\"acknowledged\"") {
                    break;
                }
            }
            buf
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let target: Json = serde_json::from_str(
        &alerts
            .iter()
            .find(|e| e.2.contains("\"active\""))
            .unwrap()
            .2,
    )
    .unwrap();
    let id = target["id"].as_str().unwrap();
    let (s, acked) = api
        .call(
            Method::POST,
            &format!("/api/alerts/{id}/ack"),
            Some(&api.tokens.supervisor),
            None,
        )
        .await;
    assert_eq!(s, 200, "{acked}");
    assert_eq!(acked["state"], "acknowledged");
    assert_eq!(acked["ack_by"], "sam-supervisor");
    let buf = live.await.unwrap();
    assert!(
        buf.contains(&format!("\"id\":\"{id}\"")) && buf.contains("\"acknowledged\""),
        "{buf}"
    );
    // Acknowledging twice is harmless; an unknown alert is 404.
    let (s, _) = api
        .call(
            Method::POST,
            &format!("/api/alerts/{id}/ack"),
            Some(&api.tokens.supervisor),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .call(
            Method::POST,
            "/api/alerts/a-999999999/ack",
            Some(&api.tokens.supervisor),
            None,
        )
        .await;
    assert_eq!(s, 404);
    // Reconnecting after `last`: exactly the ack (nothing before it again).
    let (_, after) = api
        .sse(
            &api.tokens.supervisor,
            Some(&last.to_string()),
            Duration::from_millis(1500),
        )
        .await;
    let replayed: Vec<Json> = after
        .iter()
        .filter(|e| e.0 == "alert")
        .map(|e| serde_json::from_str(&e.2).unwrap())
        .collect();
    assert_eq!(replayed.len(), 1, "{after:?}");
    assert_eq!(replayed[0]["id"], id);
    assert_eq!(replayed[0]["state"], "acknowledged");
    // The alert list agrees, and the audit log names the supervisor.
    let (_, list) = api
        .get(
            &format!(
                "/api/alerts?state=acknowledged&owner={}",
                target["owner"].as_str().unwrap()
            ),
            &api.tokens.supervisor,
        )
        .await;
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id),
        "{list}"
    );
    assert!(api
        .audit()
        .iter()
        .any(|e| e["action"] == "alert.acknowledged"
            && e["subject"] == id
            && e["actor"] == "sam-supervisor"));
    // An owner replaying from 0 sees its own alerts only.
    let (_, own) = api
        .sse(&api.tokens.owner_b, Some("0"), Duration::from_millis(1000))
        .await;
    assert!(own
        .iter()
        .filter(|e| e.0 == "alert")
        .all(|e| e.2.contains(&api.b.owner)));
    // A bad Last-Event-ID is a 400.
    let resp = api
        .http
        .get(format!("{}/api/alerts/stream", api.base))
        .bearer_auth(&api.tokens.supervisor)
        .header("last-event-id", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_fuzzed_requests_never_fail_the_server() {
    let Some(svc) = Services::get() else { return };
    let api = Api::start(&svc, "apif").await;
    let dev = api.a.device(Fault::Clean).id.clone();
    let toks = [
        None,
        Some(api.tokens.owner_a.clone()),
        Some(api.tokens.verifier.clone()),
        Some(api.tokens.supervisor.clone()),
        Some(api.tokens.admin.clone()),
        Some("cw_1_zz".to_string()),
        Some("Bearer".to_string()),
        Some("\u{0}".repeat(3)),
    ];
    let paths = [
        "/api/devices".to_string(),
        format!("/api/devices/{dev}"),
        format!("/api/devices/{dev}/readings"),
        format!("/api/devices/{dev}/verifications"),
        "/api/alerts".into(),
        "/api/alerts/a-000001/ack".into(),
        "/api/coverage".into(),
        "/api/import/devices".into(),
        "/api/import/verifications".into(),
        "/api/me".into(),
        "/metrics".into(),
        "/healthz".into(),
        "/".into(),
        "/assets/app.js".into(),
    ];
    let evil_paths = [
        "/assets/../../../../etc/passwd",
        "/assets/..%2f..%2f..%2fetc%2fpasswd",
        "/assets/%2e%2e/%2e%2e/etc/passwd",
        "/api/devices/..%2f..%2fetc",
        "/api/devices/%00",
        "/api/devices/%ff%fe",
        "/api/devices/a%20b",
        "/api/devices/x/verifications/../../../",
        "/api/devices?limit=-1",
        "/api/devices?limit=100000000000000000000000",
        "/api/devices?offset=abc",
        "/api/devices?owner=%00",
        "/api/devices?unknown=1",
        "/api/alerts?state=nonsense",
        "/api/alerts?kind=%27%3B%20DROP%20TABLE%20alert%3B--",
        "/api/alerts?device=x%27%20OR%201%3D1--",
        "/api/coverage?by=../../",
        "/api/alerts/%27/ack",
        "/api/alerts/a-1%27%20OR%20%271%27%3D%271/ack",
        "/api/import/devices?name=../../etc/passwd",
        "//api//devices",
        "/api/devices/",
        "/%2e%2e/",
    ];
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("application/json", b"{".to_vec()),
        ("application/json", b"[]".to_vec()),
        ("application/json", b"null".to_vec()),
        ("application/json", b"{\"id\": 1e999}".to_vec()),
        ("application/json", b"{\"id\": \"\\ud800\"}".to_vec()),
        ("application/json", "[".repeat(100_000).into_bytes()),
        ("application/json", serde_json::to_vec(&json!({"id": "x".repeat(70), "kind": "scale"})).unwrap()),
        ("application/json", serde_json::to_vec(&json!({"certificate": "", "verified_at": "yesterday"})).unwrap()),
        ("application/json", serde_json::to_vec(&json!({"id": "A", "kind": "scale", "owner": "o", "site": "s", "agent": "a", "model": "m",
            "serial": "s", "accuracy_class": "III", "max": -1, "e": 0, "interval_s": 0, "extra": true})).unwrap()),
        ("text/csv", b"\xff\xfe\x00garbage".to_vec()),
        ("text/csv", b"id,kind\n\"unterminated".to_vec()),
        ("text/csv", vec![b'a'; 40 << 20]),
        ("application/json", vec![b' '; 2 << 20]),
        ("application/x-www-form-urlencoded", b"a=b".to_vec()),
    ];
    let mut rng = fastrand_seed();
    let mut n = 0;
    let mut statuses = std::collections::BTreeMap::new();
    for p in paths.iter().map(String::as_str).chain(evil_paths) {
        for m in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
            for tok in &toks {
                let s = send(&api, m.clone(), p.to_string(), tok.clone(), None).await;
                *statuses.entry(s).or_insert(0) += 1;
                n += 1;
            }
        }
        if p.contains("passwd") {
            let (s, text) = api.call_text(Method::GET, p, None, None).await;
            assert!(!text.contains("root:"), "{p}: {s} {text}");
        }
    }
    for p in &paths {
        for (ct, b) in &bodies {
            for tok in [&toks[1], &toks[2], &toks[4]] {
                let s = send(
                    &api,
                    Method::POST,
                    p.clone(),
                    tok.clone(),
                    Some((ct, b.clone())),
                )
                .await;
                *statuses.entry(s).or_insert(0) += 1;
                n += 1;
            }
        }
    }
    // Random bytes as bodies and as path segments.
    for _ in 0..300 {
        let len = rng.usize(0..2048);
        let body: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let seg: String = (0..rng.usize(1..40))
            .map(|_| char::from(rng.u8(0x21..0x7f)))
            .collect();
        let seg = seg.replace(['?', '#', '/'], "_");
        let p = &paths[rng.usize(..paths.len())];
        let s = send(
            &api,
            Method::POST,
            p.clone(),
            toks[rng.usize(..toks.len())].clone(),
            Some(("application/json", body)),
        )
        .await;
        *statuses.entry(s).or_insert(0) += 1;
        let s = send(
            &api,
            Method::GET,
            format!("/api/devices/{seg}"),
            toks[1].clone(),
            None,
        )
        .await;
        *statuses.entry(s).or_insert(0) += 1;
        n += 2;
    }
    eprintln!("{n} fuzzed requests, statuses {statuses:?}");
    // Still serving, and the registry untouched by the noise.
    let (s, me) = api.get("/api/me", &api.tokens.supervisor).await;
    assert_eq!((s.as_u16(), me["role"].as_str()), (200, Some("supervisor")));
    assert!(
        !api.gw.log_text().contains("panicked"),
        "{}",
        api.gw.log_text()
    );
}

/// One fuzzed request; its status (413 when the server cut off a huge body); never 5xx.
async fn send(
    api: &Api,
    method: Method,
    path: String,
    tok: Option<String>,
    body: Option<(&str, Vec<u8>)>,
) -> u16 {
    let mut req = api
        .http
        .request(method.clone(), format!("{}{path}", api.base));
    if let Some(t) = &tok {
        if let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")) {
            req = req.header("authorization", v);
        }
    }
    if let Some((ct, b)) = body {
        req = req.header("content-type", ct).body(b);
    }
    match req.send().await {
        Ok(resp) => {
            let s = resp.status();
            assert!(
                !s.is_server_error(),
                "{method} {path} → {s}: {}",
                resp.text().await.unwrap_or_default()
            );
            s.as_u16()
        }
        // A huge body may be cut off by the server's limit before it is all sent.
        Err(e) if e.is_request() || e.is_body() => 413,
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

/// A small deterministic generator (no extra dependency): xorshift seeded from the pid.
struct Rng(u64);

fn fastrand_seed() -> Rng {
    Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()))
}

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn usize(&mut self, r: impl std::ops::RangeBounds<usize>) -> usize {
        use std::ops::Bound::*;
        let lo = match r.start_bound() {
            Included(&x) => x,
            Excluded(&x) => x + 1,
            Unbounded => 0,
        };
        let hi = match r.end_bound() {
            Included(&x) => x + 1,
            Excluded(&x) => x,
            Unbounded => usize::MAX,
        };
        lo + (self.next() as usize) % (hi - lo).max(1)
    }
    fn u8(&mut self, r: impl std::ops::RangeBounds<u8>) -> u8 {
        use std::ops::Bound::*;
        let lo = match r.start_bound() {
            Included(&x) => x as usize,
            Excluded(&x) => x as usize + 1,
            Unbounded => 0,
        };
        let hi = match r.end_bound() {
            Included(&x) => x as usize + 1,
            Excluded(&x) => x as usize,
            Unbounded => 256,
        };
        self.usize(lo..hi) as u8
    }
}

/// The console in headless Chromium: it loads with the token from the URL, shows an alert
/// raised by a fault replayed while it is open within 2 s (over SSE), acknowledging it from
/// the page changes its state over the API; every page is screenshotted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_console_in_chromium() {
    let Some(svc) = Services::get() else { return };
    let api = Api::start(&svc, "apib").await;
    // Kept after the run (tests/run removes its temp dir): target/test-output/console/.
    let shots = calwatch_tests::workspace().join("target/test-output/console");
    std::fs::create_dir_all(&shots).unwrap();
    let browser = calwatch_tests::webdriver::Browser::start(&svc.test_dir("apib-chromium")).await;
    browser
        .goto(&format!("{}/#token={}", api.base, api.tokens.supervisor))
        .await;
    let who = browser
        .wait_for(
            "return document.querySelector('#who').textContent",
            json!([]),
            Duration::from_secs(15),
        )
        .await
        .unwrap_or_else(|| panic!("console did not sign in\n{}", api.gw.log_text()));
    assert!(who.as_str().unwrap().contains("supervisor"), "{who}");
    browser
        .wait_for(
            "return document.querySelector('#stream-state').textContent === 'live' && document.querySelectorAll('tr[data-alert-id]').length",
            json!([]),
            Duration::from_secs(15),
        )
        .await
        .expect("alert feed loaded and live");
    assert_eq!(
        browser.eval("return location.hash", json!([])).await,
        "#/alerts",
        "the token is taken out of the URL"
    );
    browser.screenshot(&shots.join("alerts.png")).await;

    // A fault while the page is open: a reading from an unregistered-certificate scale.
    let tag = &api.a.tag;
    let dev = format!("{tag}-LIVE-1");
    let (s, body) = api
        .post_json("/api/devices", &api.tokens.admin, &json!({"id": dev, "kind": "scale", "owner": api.a.owner, "site": api.a.site, "agent": api.a.agent_a,
                "model": "FT-112", "serial": "L1", "accuracy_class": "III", "max": 30, "e": 0.005, "interval_s": 60}))
        .await;
    assert_eq!(s, 201, "{body}");
    let mqtt = Mqtt::connect(&svc.mqtt_addr, &format!("apib-pub-{}", std::process::id())).await;
    let batch = calwatch_protocol::ReadingBatch {
        agent: calwatch_protocol::Id::new(api.a.agent_a.clone()).unwrap(),
        sent: now_ms(),
        readings: vec![calwatch_protocol::Reading {
            device: calwatch_protocol::Id::new(dev.clone()).unwrap(),
            seq: 1,
            ts: now_ms(),
            values: vec![(
                calwatch_protocol::Id::new("gross_kg").unwrap(),
                calwatch_protocol::Value::Number(2.5),
            )],
        }],
    };
    let sent = Instant::now();
    mqtt.publish_batch(&api.a.agent_a, batch.encode().unwrap())
        .await;
    let row = "return [...document.querySelectorAll('tr[data-alert-id]')].filter(r => r.textContent.includes(arguments[0]) && r.textContent.includes('unverified')).map(r => r.dataset.alertId)[0]";
    let alert_id = browser
        .wait_for(row, json!([dev]), Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("the alert did not show\n{}", api.gw.log_text()));
    let shown_after = sent.elapsed();
    assert!(
        shown_after < Duration::from_secs(2),
        "alert shown after {shown_after:?}"
    );
    eprintln!("alert shown in the console {shown_after:?} after the reading was published");
    let alert_id = alert_id.as_str().unwrap().to_string();
    browser.screenshot(&shots.join("alert-raised.png")).await;

    // The feed re-renders on every event (the sweep runs each second here), which can detach
    // a button between WebDriver finding and clicking it: click the row's current button,
    // again if the row still shows it a second later (acknowledging twice is harmless).
    browser
        .click(&format!("tr[data-alert-id='{alert_id}'] .ack-button"))
        .await;
    let mut state = None;
    for _ in 0..10 {
        state = browser
            .wait_for(
                "const r = document.querySelector(`tr[data-alert-id='${arguments[0]}']`); return r && r.dataset.state === 'acknowledged' && r.dataset.state",
                json!([alert_id]),
                Duration::from_secs(1),
            )
            .await;
        if state.is_some() {
            break;
        }
        browser
            .eval(
                "const b = document.querySelector(`tr[data-alert-id='${arguments[0]}'] .ack-button`); if (b && !b.disabled) b.click(); return !!b",
                json!([alert_id]),
            )
            .await;
    }
    assert_eq!(state, Some(json!("acknowledged")), "page shows the ack");
    let (_, list) = api
        .get(&format!("/api/alerts?device={dev}"), &api.tokens.supervisor)
        .await;
    let a = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == alert_id.as_str())
        .unwrap();
    assert_eq!(a["state"], "acknowledged", "{a}");
    assert_eq!(a["ack_by"], "sam-supervisor");
    browser
        .screenshot(&shots.join("alert-acknowledged.png"))
        .await;

    for (page, ready, file) in [
        (
            "#/devices",
            "return document.querySelectorAll('#device-table tbody tr').length",
            "instruments.png",
        ),
        (
            "#/coverage",
            "return document.querySelectorAll('#coverage-owner tbody tr').length",
            "coverage.png",
        ),
    ] {
        browser
            .eval(&format!("location.hash = '{page}'"), json!([]))
            .await;
        browser
            .wait_for(ready, json!([]), Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{page} did not render"));
        browser.screenshot(&shots.join(file)).await;
    }
    // An instrument with readings: its page charts them once watched.
    let drift = api.a.device(Fault::Drift).id.clone();
    browser
        .eval(&format!("location.hash = '#/device/{drift}'"), json!([]))
        .await;
    browser
        .wait_for(
            "return document.querySelectorAll('#device-facts div').length",
            json!([]),
            Duration::from_secs(10),
        )
        .await
        .expect("instrument page");
    browser
        .wait_for(
            "return document.querySelectorAll('svg.chart').length === 2",
            json!([]),
            Duration::from_secs(10),
        )
        .await
        .expect("charts drawn");
    browser.screenshot(&shots.join("instrument.png")).await;
    for f in [
        "alerts.png",
        "alert-raised.png",
        "alert-acknowledged.png",
        "instruments.png",
        "coverage.png",
        "instrument.png",
    ] {
        let bytes = std::fs::read(shots.join(f)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000, "{f}");
    }
    eprintln!("screenshots in {}", shots.display());
    browser.quit().await;
}

/// With `[http] cert_file`/`key_file` the API is HTTPS only (rustls): a client trusting the
/// CA gets answers, plain HTTP on that port gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_https_with_a_configured_certificate() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("apihttps");
    calwatch_tests::make_test_certs(&dir);
    let port = calwatch_tests::free_port();
    let toml = dir.join("gateway.toml");
    std::fs::write(
        &toml,
        format!(
            "client_id = \"https-gw-{}\"\n[mqtt]\nurl = \"mqtt://{}\"\n[registry]\npath = \"registry.db\"\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"server.pem\"\nkey_file = \"server.key\"\n",
            std::process::id(),
            svc.mqtt_addr
        ),
    )
    .unwrap();
    let sup = token(&toml, "supervisor", None, "sup");
    let gw = {
        let (dir, toml) = (dir.clone(), toml.clone());
        tokio::task::spawn_blocking(move || start_gateway(&dir, "gateway", &toml))
            .await
            .unwrap()
    };
    assert!(gw.log_text().contains("https=true"), "{}", gw.log_text());
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let me: Json = client
        .get(format!("https://127.0.0.1:{port}/api/me"))
        .bearer_auth(&sup)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["role"], "supervisor");
    let page = client
        .get(format!("https://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    // A slowloris over TLS: the handshake done, half a request, then nothing. The
    // connection is closed after the header timeout (10 s), not held.
    let mut sc = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = sc.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    let closed = loop {
        if let Some(status) = sc.try_wait().unwrap() {
            break Some(status);
        }
        if t.elapsed() > Duration::from_secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = sc.kill();
    drop(stdin);
    assert!(
        closed.is_some(),
        "a half-sent request over TLS held its connection for 30 s"
    );
    // Plain HTTP to the HTTPS port: no answer, and an untrusting client refuses.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(!plain.is_ok_and(|r| r.status().is_success()));
    assert!(reqwest::get(format!("https://127.0.0.1:{port}/healthz"))
        .await
        .is_err());
}

/// Issue #19: the API had no header-read timeout, so a client that sends half a request
/// and then nothing (slowloris) held a connection and its task forever; enough of them
/// exhaust the gateway's descriptors. Now the connection is closed after 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_closes_a_connection_that_never_finishes_its_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(svc) = Services::get() else { return };
    let api = Api::start(&svc, "slowloris").await;
    let addr = api.gw.http_addr();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "a half-sent request held its connection for 30 s"
    );
    assert!(
        t.elapsed() >= Duration::from_secs(5),
        "closed after {:?}",
        t.elapsed()
    );
    // An idle kept-alive connection is closed the same way.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), idle.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "an idle connection was held for 30 s");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{got:?}"
    );
}

/// Issue #19: a CSV import was read whole (32 MiB) and parsed and validated (quadratically)
/// on the ingest task before the owner check. Now: the role is checked before the body is
/// read, an owner may send at most 1 MiB, and rows are parsed off the ingest task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_csv_import_is_authorised_first_and_limited_per_role() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(svc) = Services::get() else { return };
    let api = Api::start(&svc, "apilim").await;
    let tag = &api.a.tag;
    let header = "id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device\n";
    let row = |n: usize| {
        format!(
            "{tag}-L-{n},scale,{},{},{},FT-112,S{n},III,30,0.005,,60,\n",
            api.a.owner, api.a.site, api.a.agent_a
        )
    };
    // An owner's 1.2 MiB file: refused whole (413), nothing imported.
    let mut big = header.to_string();
    let mut n = 0;
    while big.len() <= (1 << 20) + (200 << 10) {
        big.push_str(&row(n));
        n += 1;
    }
    let (s, body) = api
        .post_csv("/api/import/devices", &api.tokens.owner_a, big.clone())
        .await;
    assert_eq!(s, 413, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("1048576 bytes"),
        "{body}"
    );
    let (s, _) = api
        .get(&format!("/api/devices/{tag}-L-0"), &api.tokens.admin)
        .await;
    assert_eq!(s, 404);
    // The same file from the bureau's admin: imported.
    let (s, body) = api
        .post_csv("/api/import/devices", &api.tokens.admin, big)
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["imported"], n);
    // A role that may not import is answered before it sends its (announced 32 MiB) body.
    let addr = api.gw.http_addr();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(
        format!(
            "POST /api/import/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: text/csv\r\nContent-Length: {}\r\n\r\n{header}",
            api.tokens.supervisor,
            32 << 20
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut answer))
        .await
        .expect("no answer until the whole body is sent")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}

/// Issue #19: the burst loop took API commands before MQTT messages (`biased`), so a steady
/// stream of API writes starved ingest for as long as it lasted. With fair turns, readings
/// published while 32 clients re-register devices as fast as they can are all checked,
/// and the writes go on too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_writes_do_not_starve_ingest() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    /// Clients writing at once: enough that one is always waiting for the ingest task.
    const HAMMERS: usize = 32;
    use std::sync::Arc;
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("apistarve");
    let fleet = Fleet::new("apistarve", 300, 5);
    let toml = setup_gateway(&dir, &fleet, &svc.mqtt_addr, "");
    let admin = token(&toml, "admin", None, "ada-admin");
    let gw = {
        let (dir, toml) = (dir.clone(), toml.clone());
        tokio::task::spawn_blocking(move || start_gateway(&dir, "gateway", &toml))
            .await
            .unwrap()
    };
    let base = format!("http://{}", gw.http_addr());
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mut hammers = Vec::new();
    for i in 0..HAMMERS {
        let (stop, writes, base, admin) =
            (stop.clone(), writes.clone(), base.clone(), admin.clone());
        let device = json!({"id": format!("{}-HAMMER-{i}", fleet.tag), "kind": "scale", "owner": fleet.owner,
            "site": fleet.site, "agent": fleet.agent_a, "model": "FT-112", "serial": format!("H{i}"),
            "accuracy_class": "III", "max": 30, "e": 0.005, "interval_s": 60});
        hammers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .post(format!("{base}/api/devices"))
                    .bearer_auth(&admin)
                    .json(&device)
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status().is_success()) {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // The writes are in full swing before the readings come.
    let swing = eventually(Duration::from_secs(30), || {
        let n = writes.load(Ordering::Relaxed);
        async move { (n >= 30).then_some(()) }
    })
    .await;
    assert!(
        swing.is_some(),
        "the API writes do not go through:\n{}",
        gw.log_text()
    );
    let mqtt = Mqtt::connect(&svc.mqtt_addr, &format!("apistarve-{}", std::process::id())).await;
    let mut sims = Sims::default();
    let mut published = 0;
    for round in 0..fleet.rounds {
        for agent in [&fleet.agent_a, &fleet.agent_b] {
            if let Some(p) = fleet.batch(&mut sims, agent, round, round + 1) {
                mqtt.publish_batch(agent, p).await;
                published += 1;
            }
        }
    }
    mqtt.wait_acked(published, Duration::from_secs(30)).await;
    let before = writes.load(Ordering::Relaxed);
    let checked = all_checked(&fleet, &toml, Duration::from_secs(90), || {}).await;
    let during = writes.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for h in hammers {
        let _ = h.await;
    }
    assert!(
        checked.is_some(),
        "ingest starved by API writes ({during} writes meanwhile):\n{}",
        gw.log_text()
    );
    assert!(during > 0, "the API was starved instead");
}
