//! `GET /api/alerts/stream`: alert events as Server-Sent Events.
//!
//! Each event is `event: alert`, `id: <alert_log seq>`, `data: <alert event JSON>` (CONTRACT
//! §1). A reconnecting client sends `Last-Event-ID` and first gets what it missed, from the
//! persisted log; then live events, with no duplicate across the seam. A client that cannot
//! keep up (its buffer full while the gateway's broadcast moves on) gets an `event: resync`
//! saying how many it missed, so it re-reads `/api/alerts` rather than trusting a stream
//! with a hole; so does one whose `Last-Event-ID` is older than the log keeps. Comments every
//! 15 s keep proxies from closing an idle stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{authorize, owner_filter, query, Action, ApiError, ApiResult, ApiState, Shared};

/// Events buffered per client before it counts as lagging.
pub(super) const CLIENT_BUFFER: usize = 256;
/// Most events replayed after a reconnect; beyond, the client is told to resync.
pub(super) const REPLAY_MAX: usize = 10_000;
/// Open streams per token; one more is refused with 429 (a console tab holds one).
pub(super) const STREAMS_PER_TOKEN: usize = 8;
/// How often an open stream checks that its token is still good: a revoked token's
/// streams end within this (and the time to notice), well within 5 s.
pub(super) const REVALIDATE: Duration = Duration::from_secs(2);

/// One open stream of a token, counted in [`ApiState::streams`] while it lives.
struct StreamSlot {
    st: Arc<ApiState>,
    name: String,
}

impl StreamSlot {
    fn take(st: &Arc<ApiState>, name: &str) -> Option<StreamSlot> {
        let mut open = st.streams.lock().ok()?;
        let n = open.entry(name.to_owned()).or_insert(0);
        if *n >= STREAMS_PER_TOKEN {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            st: st.clone(),
            name: name.to_owned(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.st.streams.lock() {
            if let Some(n) = open.get_mut(&self.name) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.name);
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamQuery {
    owner: Option<String>,
}

pub(super) async fn stream(
    State(st): Shared,
    headers: HeaderMap,
    q: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let p = authorize(&st, &headers, Action::StreamAlerts)?;
    let token = super::bearer(&headers)?.to_owned();
    let slot = StreamSlot::take(&st, &p.name).ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too many requests",
            format!("at most {STREAMS_PER_TOKEN} open alert streams per token"),
        )
    })?;
    let q = query(q)?;
    let owner = owner_filter(&p, q.owner)?.map(|o| o.to_string());
    let last_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID: expected a number"))?,
        ),
    };
    // Subscribe before reading the log, so nothing falls between the two.
    let live = st.stream.subscribe();
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    tokio::spawn(pump(st.clone(), (token, slot), owner, last_id, live, tx));
    let body = ReceiverStream::new(rx).map(Ok::<Event, Infallible>);
    let mut r = Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

fn alert_event(seq: i64, e: &calwatch_protocol::AlertEvent) -> Event {
    let ev = Event::default()
        .event("alert")
        .data(String::from_utf8_lossy(&e.encode()));
    if seq > 0 {
        ev.id(seq.to_string())
    } else {
        ev
    }
}

fn resync(reason: &str, missed: u64) -> Event {
    Event::default()
        .event("resync")
        .data(serde_json::json!({"reason": reason, "missed": missed}).to_string())
}

async fn pump(
    st: Arc<ApiState>,
    (token, _slot): (String, StreamSlot),
    owner: Option<String>,
    last_id: Option<i64>,
    mut live: broadcast::Receiver<crate::LoggedAlert>,
    tx: mpsc::Sender<Event>,
) {
    let mut shutdown = st.shutdown.clone();
    if tx
        .send(Event::default().comment("connected"))
        .await
        .is_err()
    {
        return;
    }
    let mut high = 0i64;
    if let Some(after) = last_id {
        high = after;
        let path = st.registry_path.clone();
        let owner2 = owner.clone();
        // Its own connection: a long replay holds no lock `/api/alerts` waits on.
        let replay = tokio::task::spawn_blocking(move || {
            crate::persist::state::AlertReader::open(&path)
                .ok()
                .and_then(|r| r.log_after(after, owner2.as_deref(), REPLAY_MAX + 1).ok())
        })
        .await
        .ok()
        .flatten();
        match replay {
            Some(Some(events)) if events.len() <= REPLAY_MAX => {
                for (seq, e) in events {
                    high = high.max(seq);
                    if tx.send(alert_event(seq, &e)).await.is_err() {
                        return;
                    }
                }
            }
            Some(Some(_)) => {
                if tx
                    .send(resync("too_far_behind", REPLAY_MAX as u64))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Some(None) => {
                if tx.send(resync("too_old", 0)).await.is_err() {
                    return;
                }
            }
            None => {
                if tx.send(resync("log_unavailable", 0)).await.is_err() {
                    return;
                }
            }
        }
    }
    let mut revalidate = tokio::time::interval(REVALIDATE);
    loop {
        let next = tokio::select! {
            r = live.recv() => r,
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return } else { continue }
            }
            _ = tx.closed() => return,
            _ = revalidate.tick() => {
                if st.auth.check(&token).is_none() {
                    let _ = tx.try_send(Event::default().event("revoked").data(
                        serde_json::json!({"reason": "the token was revoked"}).to_string(),
                    ));
                    return;
                }
                continue;
            }
        };
        let ev = match next {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "SSE client lagging; sent resync");
                if tx.send(resync("lagged", n)).await.is_err() {
                    return;
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if ev.seq != 0 && ev.seq <= high {
            continue;
        }
        if owner
            .as_deref()
            .is_some_and(|o| ev.event.owner.as_str() != o)
        {
            continue;
        }
        if tx.send(alert_event(ev.seq, &ev.event)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use calwatch_protocol::AlertEvent;
    use tokio::sync::watch;

    use super::*;
    use crate::config::HttpConfig;
    use crate::persist::registry::Registry;
    use crate::persist::state::{AlertReader, StateStore};
    use crate::persist::tokens::{self, Authenticator, Role};
    use crate::LoggedAlert;

    fn event(seq: i64, message: &str) -> LoggedAlert {
        let json = serde_json::json!({"v":1,"id":format!("a-{seq:06}"),"device":"D1","owner":"o1","site":"s1",
            "kind":"drift","severity":"warning","state":"active","raised":1,"updated":1,"resolved":null,
            "ack_by":null,"count":1,"message":message,"evidence":{}});
        LoggedAlert {
            seq,
            event: AlertEvent::decode(json.to_string().as_bytes()).unwrap(),
        }
    }

    struct Fixture {
        dir: std::path::PathBuf,
        reg: Registry,
        token: String,
        state: Arc<ApiState>,
        stream: broadcast::Sender<LoggedAlert>,
        url: String,
        _stop: watch::Sender<bool>,
    }

    /// A registry with a supervisor token `sup`, and the API serving it.
    async fn fixture(tag: &str, broadcast_cap: usize) -> Fixture {
        let dir = std::env::temp_dir().join(format!("calwatch-sse-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.db");
        let mut reg = Registry::open(&path).unwrap();
        let token = tokens::create(&mut reg, "sup", Role::Supervisor, None, "test").unwrap();
        drop(StateStore::open(&path).unwrap());
        let (stream, _) = broadcast::channel(broadcast_cap);
        let (commands, _rx) = mpsc::channel(1);
        let (stop, shutdown) = watch::channel(false);
        let state = Arc::new(ApiState {
            auth: Authenticator::open(&path).unwrap(),
            alerts: Mutex::new(AlertReader::open(&path).unwrap()),
            registry_path: path.clone(),
            commands,
            stream: stream.clone(),
            metrics: Arc::new(crate::metrics::Metrics::new(Vec::new())),
            metrics_public: false,
            shutdown,
            stall_after: std::time::Duration::from_secs(120),
            streams: Default::default(),
            refusals: Default::default(),
            zone: Default::default(),
        });
        let cfg = HttpConfig {
            listen: "127.0.0.1:0".into(),
            cert_file: None,
            key_file: None,
            metrics_public: false,
        };
        let server = crate::api::serve(&cfg, state.clone()).await.unwrap();
        Fixture {
            dir,
            reg,
            token,
            state,
            stream,
            url: format!("http://{}/api/alerts/stream", server.addr),
            _stop: stop,
        }
    }

    async fn open(f: &Fixture, last_id: Option<i64>) -> reqwest::Response {
        let mut req = reqwest::Client::new().get(&f.url).bearer_auth(&f.token);
        if let Some(id) = last_id {
            req = req.header("last-event-id", id.to_string());
        }
        req.send().await.unwrap()
    }

    /// Reads the stream until it ends or `limit` passes; the text and whether it ended.
    async fn read_until_end(resp: &mut reqwest::Response, limit: Duration) -> (String, bool) {
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
                Ok(_) => return (text, true),
                Err(_) => return (text, false),
            }
        }
    }

    /// Issue #19: the token was checked only when the stream opened, so a revoked token
    /// went on streaming every alert.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoked_tokens_stream_ends_within_5_s() {
        let mut f = fixture("revoke", 64).await;
        let mut resp = open(&f, None).await;
        assert_eq!(resp.status(), 200);
        let first = resp.chunk().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains(": connected"));
        assert!(tokens::revoke(&mut f.reg, "sup", "test").unwrap());
        let t = std::time::Instant::now();
        let (text, ended) = read_until_end(&mut resp, Duration::from_secs(5)).await;
        assert!(ended, "still streaming 5 s after the revocation: {text:?}");
        assert!(text.contains("event: revoked"), "{text:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // And it cannot open a new one.
        assert_eq!(open(&f, None).await.status(), 401);
        std::fs::remove_dir_all(&f.dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_per_token_are_capped_and_freed_when_closed() {
        let f = fixture("cap", 64).await;
        let mut open_streams = Vec::new();
        for _ in 0..STREAMS_PER_TOKEN {
            let r = open(&f, None).await;
            assert_eq!(r.status(), 200);
            open_streams.push(r);
        }
        let refused = open(&f, None).await;
        assert_eq!(refused.status(), 429);
        let body: serde_json::Value =
            serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
        assert!(
            body["detail"].as_str().unwrap().contains("at most 8"),
            "{body}"
        );
        // A closed stream gives its slot back.
        drop(open_streams.pop());
        let mut again = None;
        for _ in 0..100 {
            let r = open(&f, None).await;
            if r.status() == 200 {
                again = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(again.is_some(), "the slot of a closed stream was not freed");
        std::fs::remove_dir_all(&f.dir).unwrap();
    }

    /// Issue #19: a `Last-Event-ID: 0` replay read the log under the lock `/api/alerts`
    /// uses, so one client could hold every alert list up. Here the lock is held (as by a
    /// long `/api/alerts` query) and the replay still arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::await_holding_lock)] // the point: the lock is held while the replay runs
    async fn a_replay_does_not_wait_for_the_alerts_lock() {
        let f = fixture("replay", 64).await;
        for seq in 1..=50 {
            let e = event(seq, "logged");
            f.reg
                .conn()
                .execute(
                    "INSERT INTO alert_log (seq, owner, event) VALUES (?1, 'o1', ?2)",
                    rusqlite::params![seq, String::from_utf8(e.event.encode()).unwrap()],
                )
                .unwrap();
        }
        let held = f.state.alerts.lock().unwrap();
        let mut resp = open(&f, Some(0)).await;
        assert_eq!(resp.status(), 200);
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !text.contains("id: 50\n") {
            match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
                other => panic!(
                    "replay blocked: {:?} after {text:?}",
                    other.map(|r| r.is_ok())
                ),
            }
        }
        drop(held);
        assert_eq!(text.matches("event: alert").count(), 50);
        std::fs::remove_dir_all(&f.dir).unwrap();
    }

    /// A client that stops reading while events pour in gets `resync` (with how many it
    /// missed) when it reads again, and the live stream goes on after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lagging_client_gets_resync_then_the_stream_goes_on() {
        // A tiny broadcast buffer: lagging is quick to reach.
        let f = fixture("lag", 4).await;
        let stream = f.stream.clone();
        let mut resp = open(&f, None).await;
        assert_eq!(resp.status(), 200);
        let first = resp.chunk().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains(": connected"));
        // 64 MB of events while the client reads nothing: the socket, the client's buffer
        // and the broadcast all fill.
        let big = "x".repeat(16 << 10);
        for seq in 1..=4000 {
            let _ = stream.send(event(seq, &big));
            if seq % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !text.contains("event: resync") {
            match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Ok(Ok(Some(c))) => {
                    text.push_str(&String::from_utf8_lossy(&c));
                    // Keep only the tail: the events are large.
                    if text.len() > 1 << 20 {
                        text.drain(..text.len() - (64 << 10));
                    }
                }
                other => panic!(
                    "stream ended without resync: {:?}",
                    other.map(|r| r.map(|c| c.map(|b| b.len())))
                ),
            }
        }
        let resync = text.split("event: resync").nth(1).unwrap();
        let data = resync
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["reason"], "lagged");
        assert!(v["missed"].as_u64().unwrap() > 0, "{v}");
        // Drain, then a new event still arrives.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(Some(_)) = resp.chunk().await {}
        })
        .await;
        let _ = stream.send(event(5000, "after the resync"));
        let mut tail = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !tail.contains("after the resync") {
            match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Ok(Ok(Some(c))) => tail.push_str(&String::from_utf8_lossy(&c)),
                _ => panic!("no live event after the resync"),
            }
        }
        assert!(tail.contains("id: 5000"), "{tail}");
        std::fs::remove_dir_all(&f.dir).unwrap();
    }
}
