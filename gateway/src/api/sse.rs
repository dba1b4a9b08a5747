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
pub const CLIENT_BUFFER: usize = 256;
/// Most events replayed after a reconnect; beyond, the client is told to resync.
pub const REPLAY_MAX: usize = 10_000;

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
    tokio::spawn(pump(st.clone(), owner, last_id, live, tx));
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
        let reader = st.clone();
        let owner2 = owner.clone();
        let replay = tokio::task::spawn_blocking(move || {
            reader
                .alerts
                .lock()
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
    loop {
        let next = tokio::select! {
            r = live.recv() => r,
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return } else { continue }
            }
            _ = tx.closed() => return,
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
    use crate::api::auth::{self, Authenticator, Role};
    use crate::config::HttpConfig;
    use crate::registry::Registry;
    use crate::store::{AlertReader, StateStore};
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

    /// A client that stops reading while events pour in gets `resync` (with how many it
    /// missed) when it reads again, and the live stream goes on after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lagging_client_gets_resync_then_the_stream_goes_on() {
        let dir = std::env::temp_dir().join(format!("calwatch-sse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.db");
        let mut reg = Registry::open(&path).unwrap();
        let token = auth::create(&mut reg, "sup", Role::Supervisor, None, "test").unwrap();
        drop(StateStore::open(&path).unwrap());
        // A tiny broadcast buffer: lagging is quick to reach.
        let (stream, _) = broadcast::channel(4);
        let (commands, _rx) = mpsc::channel(1);
        let (_stop_tx, shutdown) = watch::channel(false);
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
        });
        let cfg = HttpConfig {
            listen: "127.0.0.1:0".into(),
            cert_file: None,
            key_file: None,
            metrics_public: false,
        };
        let server = crate::api::serve(&cfg, state).await.unwrap();
        let mut resp = reqwest::Client::new()
            .get(format!("http://{}/api/alerts/stream", server.addr))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
