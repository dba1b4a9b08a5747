//! A private mosquitto per test (so a test may stop and restart it without disturbing the
//! others), a TCP proxy that can blackhole traffic, and a counting MQTT subscriber.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use calwatch_protocol::ReadingBatch;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// A mosquitto of our own, with persistence so subscriptions and queued messages of
/// persistent sessions survive a restart.
pub struct Mosquitto {
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

/// As root, mosquitto drops to user `mosquitto`, which cannot enter a test's private temp
/// dir; keep root there (tests only).
pub fn stay_root() -> &'static str {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    if root {
        "user root\n"
    } else {
        ""
    }
}

/// The mosquitto binary (tests/run exports its path; /usr/sbin is not on every PATH).
pub fn mosquitto_bin() -> String {
    std::env::var("CALWATCH_MOSQUITTO_BIN").unwrap_or_else(|_| "mosquitto".into())
}

impl Mosquitto {
    /// Starts mosquitto with a config file written by the caller; `port` is the one to wait for.
    pub fn with_conf(conf: PathBuf, port: u16, log: PathBuf) -> Mosquitto {
        let mut m = Mosquitto {
            port,
            conf,
            child: None,
            log,
        };
        m.restart();
        m
    }

    pub fn start(dir: &Path, port: u16) -> Mosquitto {
        let data = dir.join("mosquitto-data");
        std::fs::create_dir_all(&data).expect("mosquitto data dir");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "{}set_tcp_nodelay true\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 autosave_interval 1\nmax_queued_messages 100000\nlog_dest stderr\n",
                stay_root(),
                data.display()
            ),
        )
        .expect("mosquitto conf");
        let mut m = Mosquitto {
            port,
            conf,
            child: None,
            log: dir.join("mosquitto.log"),
        };
        m.restart();
        m
    }

    /// Starts (again) on the same port and data.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "mosquitto did not listen on {}:\n{}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Stops it gracefully (SIGTERM: persistence is saved).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP proxy whose traffic can be blackholed: while `blackhole` is set, bytes are read
/// and dropped in both directions and connections are left open, like a dead route.
pub struct Proxy {
    pub port: u16,
    pub blackhole: Arc<AtomicBool>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let port = listener.local_addr().expect("addr").port();
        let blackhole = Arc::new(AtomicBool::new(false));
        let hole = blackhole.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let hole = hole.clone();
                tokio::spawn(async move {
                    let Ok(outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::spawn(pipe(ri, wo, hole.clone()));
                    tokio::spawn(pipe(ro, wi, hole));
                });
            }
        });
        Proxy { port, blackhole }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hole: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if hole.load(Ordering::Relaxed) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Counts every reading seq that arrives per device (including duplicates).
#[derive(Clone, Default)]
pub struct Counter {
    pub seqs: Arc<Mutex<BTreeMap<String, Vec<u64>>>>,
    pub batches: Arc<Mutex<u64>>,
    /// Event time of the newest reading received, Unix ms.
    pub newest_ts: Arc<Mutex<i64>>,
}

impl Counter {
    /// Subscribes with a persistent session (so nothing is missed across broker restarts).
    pub async fn subscribe(port: u16, topic: &str, client_id: &str) -> Counter {
        Counter::subscribe_as(port, topic, client_id, None).await
    }

    /// Subscribes with credentials.
    pub async fn subscribe_as(
        port: u16,
        topic: &str,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> Counter {
        let counter = Counter::default();
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let c = counter.clone();
        let topic = topic.to_string();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready = Some(ready_tx);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(&topic, QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(batch) = ReadingBatch::decode(&p.payload) {
                            *c.batches.lock().expect("lock") += 1;
                            let mut seqs = c.seqs.lock().expect("lock");
                            if let Some(ts) = batch.readings.iter().map(|r| r.ts).max() {
                                let mut n = c.newest_ts.lock().expect("lock");
                                *n = (*n).max(ts);
                            }
                            for r in batch.readings {
                                seqs.entry(r.device.to_string()).or_default().push(r.seq);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        counter
    }

    /// Per device: (distinct seqs sorted, duplicates).
    pub fn summary(&self) -> BTreeMap<String, (Vec<u64>, usize)> {
        self.seqs
            .lock()
            .expect("lock")
            .iter()
            .map(|(d, s)| {
                let mut distinct = s.clone();
                distinct.sort_unstable();
                distinct.dedup();
                let dups = s.len() - distinct.len();
                (d.clone(), (distinct, dups))
            })
            .collect()
    }
}
