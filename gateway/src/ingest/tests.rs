//! Ingest through a source of our own: the order of durability, acks and publishing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use calwatch_protocol::{readings_topic, Id, Reading, ReadingBatch, Value};
use tokio::sync::{broadcast, mpsc, watch};

use super::*;
use crate::alerts::AlertBook;
use crate::checks::CheckConfig;
use crate::config::QueueConfig;
use crate::source::{Ack, Closed, Message, Source};

const DEVICES: &str =
    "id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device
S-1,scale,market-3,stall-12,agent-a,FT-112,FT0001,III,15,0.005,,1,
";

/// What the test source saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// An ack, with the device's `last_seq` committed at that moment.
    Ack(Ack, Option<i64>),
    Publish(String, String),
}

/// A source fed by the test; it records acks (with what the store held when each came)
/// and publishes, and confirms as many events as the test says.
struct TestSource {
    rx: mpsc::UnboundedReceiver<Message>,
    db: std::path::PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    confirmed: Arc<AtomicU64>,
}

impl TestSource {
    fn last_seq(&self) -> Option<i64> {
        let conn = rusqlite::Connection::open(&self.db).ok()?;
        conn.query_row(
            "SELECT last_seq FROM device_state WHERE device = 'S-1'",
            [],
            |r| r.get(0),
        )
        .ok()
    }
}

impl Source for TestSource {
    async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
    fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }
    fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
    async fn ack(&mut self, ack: Ack) -> Result<(), Closed> {
        let seq = self.last_seq();
        self.seen.lock().unwrap().push(Seen::Ack(ack, seq));
        Ok(())
    }
    async fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), Closed> {
        let text = String::from_utf8(payload).unwrap();
        self.seen.lock().unwrap().push(Seen::Publish(topic, text));
        Ok(())
    }
    fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }
    async fn close(self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }
}

fn batch(seqs: std::ops::RangeInclusive<u64>, t0: i64) -> Message {
    let agent = Id::new("agent-a").unwrap();
    let readings = seqs
        .map(|seq| Reading {
            device: Id::new("S-1").unwrap(),
            seq,
            ts: t0 + seq as i64 * 1000,
            values: vec![
                (Id::new("gross_kg").unwrap(), Value::Number(1.25)),
                (Id::new("stable").unwrap(), Value::Bool(true)),
            ],
        })
        .collect();
    let payload = ReadingBatch {
        agent: agent.clone(),
        sent: t0,
        readings,
    }
    .encode()
    .unwrap();
    Message {
        topic: readings_topic(&agent),
        payload: payload.into(),
        ack: Ack(0),
    }
}

struct Run {
    db: std::path::PathBuf,
    tx: mpsc::UnboundedSender<Message>,
    seen: Arc<Mutex<Vec<Seen>>>,
    confirmed: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), IngestError>>,
}

fn start(tag: &str) -> Run {
    let dir = std::env::temp_dir().join(format!("calwatch-ingest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("registry.db");
    let mut registry = Registry::open(&db).unwrap();
    registry
        .import_devices(std::path::Path::new("devices.csv"), DEVICES, "test")
        .unwrap();
    let store = StateStore::open(&db).unwrap();
    let queues = Arc::new(
        Queues::open(
            &[],
            &QueueConfig {
                dir: dir.join("queue"),
                max_bytes: 1 << 20,
            },
        )
        .unwrap(),
    );
    let metrics = Arc::new(crate::metrics::Metrics::new(Vec::new()));
    let pipeline = Pipeline::new(
        registry.devices().clone(),
        Vec::new(),
        AlertBook::new(600_000, 1, Vec::new()),
        CheckConfig::default(),
        metrics,
    );
    let core = Core::new(pipeline, registry, store, queues);
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let confirmed = Arc::new(AtomicU64::new(0));
    let source = TestSource {
        rx,
        db: db.clone(),
        seen: seen.clone(),
        confirmed: confirmed.clone(),
    };
    let (stop, shutdown) = watch::channel(false);
    let (_commands_tx, commands) = mpsc::channel(1);
    let task = tokio::spawn(run(IngestTask {
        source,
        core,
        alerts: broadcast::channel(16).0,
        commands,
        sweep_interval: Duration::from_secs(3600),
        shutdown,
    }));
    Run {
        db,
        tx,
        seen,
        confirmed,
        stop,
        task,
    }
}

async fn wait_for(seen: &Arc<Mutex<Vec<Seen>>>, what: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
    for _ in 0..500 {
        {
            let s = seen.lock().unwrap();
            if what(&s) {
                return s.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out; seen: {:?}", seen.lock().unwrap());
}

fn acks(seen: &[Seen]) -> Vec<(Ack, Option<i64>)> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Ack(a, seq) => Some((*a, *seq)),
            Seen::Publish(..) => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_come_in_order_and_only_after_the_commit() {
    let r = start("order");
    let t0 = now_ms() - 60_000;
    for (i, seqs) in [1..=3, 4..=6, 7..=7].into_iter().enumerate() {
        let mut m = batch(seqs, t0);
        m.ack = Ack(i as u64 + 1);
        r.tx.send(m).unwrap();
    }
    let seen = wait_for(&r.seen, |s| acks(s).len() == 3).await;
    let acks = acks(&seen);
    assert_eq!(
        acks.iter().map(|(a, _)| a.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "in the order received"
    );
    for ((_, committed), last) in acks.iter().zip([3, 6, 7]) {
        assert!(
            committed.is_some_and(|c| c >= last),
            "acked before its readings were committed: {acks:?}"
        );
    }
    // A redelivery after the acks is a duplicate: acked again, nothing checked twice.
    let mut again = batch(1..=3, t0);
    again.ack = Ack(9);
    r.tx.send(again).unwrap();
    wait_for(&r.seen, |s| self::acks(s).len() == 4).await;
    let _ = r.stop.send(true);
    r.task.await.unwrap().unwrap();
    let store = StateStore::open(&r.db).unwrap();
    let saved = store.load_devices().unwrap();
    assert_eq!(saved.len(), 1);
    assert_eq!((saved[0].1.readings, saved[0].1.state.last_seq), (7, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_event_stays_in_the_outbox_until_the_source_confirms_it() {
    for confirm in [false, true] {
        let r = start(if confirm { "confirmed" } else { "unconfirmed" });
        r.tx.send(batch(1..=1, now_ms() - 1_000)).unwrap();
        // An unverified scale in use: a critical alert, published after its reading's ack
        // (the first sweep may have raised it as a warning already, for a silent device).
        let critical =
            |s: &Seen| matches!(s, Seen::Publish(_, p) if p.contains("\"severity\":\"critical\""));
        let seen = wait_for(&r.seen, |s| s.iter().any(critical)).await;
        let Some(Seen::Publish(topic, payload)) = seen.iter().find(|s| critical(s)) else {
            unreachable!()
        };
        assert_eq!(topic, "calwatch/v1/alerts/market-3/S-1");
        assert!(payload.contains("\"kind\":\"unverified\""), "{payload}");
        assert!(
            seen.iter().position(|s| matches!(s, Seen::Ack(..))) < seen.iter().position(critical),
            "the event goes out after the ack: {seen:?}"
        );
        let published = seen
            .iter()
            .filter(|s| matches!(s, Seen::Publish(..)))
            .count();
        if confirm {
            r.confirmed.store(published as u64, Ordering::Relaxed);
        }
        let _ = r.stop.send(true);
        r.task.await.unwrap().unwrap();
        let outbox = StateStore::open(&r.db).unwrap().load_outbox().unwrap();
        if confirm {
            assert!(outbox.is_empty(), "confirmed, yet kept: {outbox:?}");
        } else {
            assert_eq!(
                outbox.len(),
                published,
                "unconfirmed events are published again at start"
            );
            assert!(
                outbox.iter().all(|(_, e)| e.kind.as_str() == "unverified"),
                "{outbox:?}"
            );
        }
    }
}
