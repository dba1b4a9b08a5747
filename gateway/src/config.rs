//! `gateway.toml` (CONTRACT §5): broker, registry, HTTP listener and time-series sinks, plus
//! the gateway's own tables: `[checks]` (the parameters of the domain checks), `[alerts]`,
//! `[sweep]` and `[queue]` (the durable queue in front of every sink).

use std::path::{Path, PathBuf};
use std::time::Duration;

use calwatch_protocol::node::mqtt::MqttConfig;
use calwatch_protocol::node::tomlfile::{self, ConfigError};
use serde::Deserialize;

use crate::checks::CheckConfig;

/// The gateway's configuration, parsed and validated.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub mqtt: MqttConfig,
    /// MQTT client id; one per gateway so its persistent session (unacked batches) is its own.
    pub client_id: String,
    pub registry: RegistryConfig,
    pub http: HttpConfig,
    pub sinks: Vec<Sink>,
    /// Parameters of the checks (`[checks]`, every key optional; DESIGN's defaults).
    pub checks: CheckConfig,
    /// How long a cleared condition must stay clear before its alert resolves, ms of event
    /// time (`[alerts] hold_ms`, DESIGN decision 10: 10 min).
    pub hold_ms: i64,
    /// Period of the wall-clock sweep (`[sweep] interval_s`, default 60 s): window states of
    /// silent devices, liveness, `device_status`, `coverage`, open alerts.
    pub sweep_interval: Duration,
    /// The durable queues in front of the sinks (`[queue]`).
    pub queue: QueueConfig,
    /// `[ingest]`: the watchdog's bound and the shutdown bound.
    pub ingest: IngestConfig,
    pub file: PathBuf,
}

/// `[ingest]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestConfig {
    /// `/healthz` answers 503 (and the systemd watchdog is no longer fed) when ingest made no
    /// progress this long while messages wait, or the broker connection is down this long
    /// (`stall_after_s`, default 120 s).
    pub stall_after: Duration,
    /// SIGTERM ends the process within this time whatever ingest is doing
    /// (`shutdown_timeout_s`, default 20 s; what was acknowledged is durable before the ack).
    pub shutdown_timeout: Duration,
    /// Messages received from the broker and not yet acknowledged beyond which the gateway
    /// takes no more until they are processed (`max_pending`, default 65,536; see
    /// [`DEFAULT_MAX_PENDING`]).
    pub max_pending: u64,
}

/// Messages received and not yet acknowledged beyond which the source takes no more
/// (`[ingest] max_pending`; DESIGN "The gateway never stalls"). A broker's in-flight limit
/// does not bound this: mosquitto 2.0 hands a resumed session's whole queue over at once
/// (65,324 messages, 94 MB, were waiting in the flood test with `max_inflight_messages 100`).
/// What arrives beyond the bound is dropped *unacknowledged*; once everything taken is
/// processed, the source reconnects and the persistent session redelivers it.
pub const DEFAULT_MAX_PENDING: u64 = 65_536;

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            stall_after: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(20),
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

/// `[queue]`: one crash-safe spool per sink target, `<dir>/<sink name>`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Default: `queue/` next to the registry file.
    pub dir: PathBuf,
    /// Bound of each target's queue in bytes (default 1 GiB). A full queue blocks ingest
    /// (no MQTT acks, so the agents' spools hold the backlog); nothing is dropped.
    pub max_bytes: u64,
}

/// Default `[queue] max_bytes`: 1 GiB per target.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 1 << 30;

/// One configured target: its name (the queue directory) and where it writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Sink {
    /// `name` in the file; defaults to the kind when only one sink has that kind.
    pub name: String,
    pub target: SinkConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// SQLite file of devices and certificates.
    pub path: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP API and console (`host:port`; port 0 picks a free one).
    pub listen: String,
    /// Certificate chain (PEM) for HTTPS; with `key_file`. Without them, plain HTTP (keep
    /// `listen` on loopback then, or behind a TLS proxy).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Serve `/metrics` without a token to any address, not only loopback (default false:
    /// a scraper elsewhere presents a supervisor, verifier or admin token).
    #[serde(default)]
    pub metrics_public: bool,
}

/// One time-series target. Every reading goes to every target.
#[derive(Clone, Debug, PartialEq)]
pub enum SinkConfig {
    /// InfluxDB 1.8+/2.x/3.x or VictoriaMetrics through `/api/v2/write`.
    InfluxV2 {
        url: String,
        org: String,
        bucket: String,
        token: Option<String>,
    },
    /// InfluxDB 1.x through `/write`.
    InfluxV1 {
        url: String,
        db: String,
        rp: Option<String>,
        username: Option<String>,
        password: Option<String>,
    },
    /// Line protocol on standard output (demo, debugging).
    Stdout,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mqtt: MqttConfig,
    #[serde(default = "default_client_id")]
    client_id: String,
    registry: RegistryConfig,
    http: HttpConfig,
    #[serde(default)]
    sink: Vec<toml::Spanned<RawSink>>,
    #[serde(default)]
    checks: Option<toml::Spanned<CheckConfig>>,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    sweep: RawSweep,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    ingest: RawIngest,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawIngest {
    stall_after_s: Option<toml::Spanned<u64>>,
    shutdown_timeout_s: Option<toml::Spanned<u64>>,
    max_pending: Option<toml::Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAlerts {
    hold_ms: toml::Spanned<i64>,
}

impl Default for RawAlerts {
    fn default() -> Self {
        RawAlerts {
            hold_ms: toml::Spanned::new(0..0, crate::alerts::DEFAULT_HOLD_MS),
        }
    }
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawSweep {
    interval_s: toml::Spanned<u64>,
}

impl Default for RawSweep {
    fn default() -> Self {
        RawSweep {
            interval_s: toml::Spanned::new(0..0, 60),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawQueue {
    dir: Option<PathBuf>,
    max_bytes: Option<toml::Spanned<u64>>,
}

fn default_client_id() -> String {
    "calwatch-gateway".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    name: Option<String>,
    kind: String,
    url: Option<String>,
    org: Option<String>,
    bucket: Option<String>,
    token_file: Option<PathBuf>,
    db: Option<String>,
    rp: Option<String>,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

impl GatewayConfig {
    /// Loads and validates `gateway.toml`, reading the secret files it names.
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let (raw, text): (RawConfig, String) = tomlfile::load(path)?;
        Self::from_raw(path, &text, raw)
    }

    /// Parses and validates `gateway.toml` text that came from `path` (secret files it
    /// names are read, relative to `path`).
    pub fn parse(path: &Path, text: &str) -> Result<GatewayConfig, ConfigError> {
        let raw: RawConfig = tomlfile::parse(path, text)?;
        Self::from_raw(path, text, raw)
    }

    fn from_raw(path: &Path, text: &str, raw: RawConfig) -> Result<GatewayConfig, ConfigError> {
        raw.mqtt.validate(path)?;
        let mut sinks: Vec<Sink> = Vec::new();
        let mut explicit_names = Vec::new();
        for spanned in raw.sink {
            let offset = spanned.span().start;
            let err = |m: String| ConfigError::at_offset(path, text, offset, m);
            let s = spanned.into_inner();
            let need = |v: Option<String>, key: &str| {
                v.filter(|s| !s.is_empty())
                    .ok_or_else(|| err(format!("sink kind {:?} needs {key}", s.kind)))
            };
            let secret = |f: &Option<PathBuf>, key: &str| -> Result<Option<String>, ConfigError> {
                match f {
                    None => Ok(None),
                    Some(f) => {
                        let p = tomlfile::resolve(path, f);
                        std::fs::read_to_string(&p)
                            .map(|t| Some(t.trim_end_matches(['\r', '\n']).to_string()))
                            .map_err(|e| err(format!("{key} {}: {e}", p.display())))
                    }
                }
            };
            let unused = |keys: &[(&str, bool)]| -> Result<(), ConfigError> {
                match keys.iter().find(|(_, present)| *present) {
                    Some((k, _)) => Err(err(format!("sink kind {:?} does not take {k}", s.kind))),
                    None => Ok(()),
                }
            };
            let sink = match s.kind.as_str() {
                "influx_v2" => {
                    unused(&[
                        ("db", s.db.is_some()),
                        ("rp", s.rp.is_some()),
                        ("username", s.username.is_some()),
                        ("password_file", s.password_file.is_some()),
                    ])?;
                    SinkConfig::InfluxV2 {
                        url: http_url(need(s.url.clone(), "url")?).map_err(err)?,
                        org: need(s.org.clone(), "org")?,
                        bucket: need(s.bucket.clone(), "bucket")?,
                        token: secret(&s.token_file, "token_file")?,
                    }
                }
                "influx_v1" => {
                    unused(&[
                        ("org", s.org.is_some()),
                        ("bucket", s.bucket.is_some()),
                        ("token_file", s.token_file.is_some()),
                    ])?;
                    SinkConfig::InfluxV1 {
                        url: http_url(need(s.url.clone(), "url")?).map_err(err)?,
                        db: need(s.db.clone(), "db")?,
                        rp: s.rp.clone(),
                        username: s.username.clone(),
                        password: secret(&s.password_file, "password_file")?,
                    }
                }
                "stdout" => SinkConfig::Stdout,
                other => {
                    return Err(err(format!(
                        "sink kind {other:?}: expected influx_v2, influx_v1 or stdout"
                    )))
                }
            };
            if let Some(name) = &s.name {
                if !calwatch_protocol::is_valid_id(name) {
                    return Err(err(format!(
                        "sink name {name:?} must match [A-Za-z0-9._-]{{1,64}} (it names the queue directory)"
                    )));
                }
            }
            explicit_names.push((s.name.is_some(), offset));
            sinks.push(Sink {
                name: s.name.clone().unwrap_or_else(|| s.kind.clone()),
                target: sink,
            });
        }
        // Each target has its own queue directory, so names must differ.
        for (i, sink) in sinks.iter().enumerate() {
            if sinks[..i].iter().any(|o| o.name == sink.name) {
                let (explicit, offset) = explicit_names[i];
                let why = if explicit {
                    format!("sink name {:?} is used twice", sink.name)
                } else {
                    format!(
                        "several sinks of kind {:?}: give each a distinct name (it names its queue directory)",
                        sink.name
                    )
                };
                return Err(ConfigError::at_offset(path, text, offset, why));
            }
        }
        let checks = match raw.checks {
            Some(spanned) => {
                let offset = spanned.span().start;
                let checks = spanned.into_inner();
                checks
                    .validate()
                    .map_err(|e| ConfigError::at_offset(path, text, offset, e.to_string()))?;
                checks
            }
            None => CheckConfig::default(),
        };
        let hold_ms = *raw.alerts.hold_ms.get_ref();
        if hold_ms < 0 {
            return Err(ConfigError::at_offset(
                path,
                text,
                raw.alerts.hold_ms.span().start,
                "alerts.hold_ms must not be negative",
            ));
        }
        let interval_s = *raw.sweep.interval_s.get_ref();
        if interval_s == 0 {
            return Err(ConfigError::at_offset(
                path,
                text,
                raw.sweep.interval_s.span().start,
                "sweep.interval_s must be at least 1",
            ));
        }
        let mut ingest = IngestConfig::default();
        for (key, value, into) in [
            (
                "stall_after_s",
                &raw.ingest.stall_after_s,
                &mut ingest.stall_after,
            ),
            (
                "shutdown_timeout_s",
                &raw.ingest.shutdown_timeout_s,
                &mut ingest.shutdown_timeout,
            ),
        ] {
            if let Some(v) = value {
                if *v.get_ref() == 0 {
                    return Err(ConfigError::at_offset(
                        path,
                        text,
                        v.span().start,
                        format!("ingest.{key} must be at least 1"),
                    ));
                }
                *into = Duration::from_secs(*v.get_ref());
            }
        }
        if let Some(v) = &raw.ingest.max_pending {
            if *v.get_ref() < 64 {
                return Err(ConfigError::at_offset(
                    path,
                    text,
                    v.span().start,
                    "ingest.max_pending must be at least 64 (one burst)",
                ));
            }
            ingest.max_pending = *v.get_ref();
        }
        let registry_path = tomlfile::resolve(path, &raw.registry.path);
        let queue_dir = match &raw.queue.dir {
            Some(d) => tomlfile::resolve(path, d),
            None => registry_path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join("queue"),
        };
        let max_bytes = match &raw.queue.max_bytes {
            // Two segments of at least 64 KiB, and room for the largest record (1 MiB).
            Some(m) if *m.get_ref() < 4 << 20 => {
                return Err(ConfigError::at_offset(
                    path,
                    text,
                    m.span().start,
                    "queue.max_bytes must be at least 4194304 (4 MiB)",
                ))
            }
            Some(m) => *m.get_ref(),
            None => DEFAULT_QUEUE_MAX_BYTES,
        };
        let mut mqtt = raw.mqtt;
        mqtt.resolve_paths(path);
        let mut http = raw.http;
        if http.cert_file.is_some() != http.key_file.is_some() {
            return Err(ConfigError::whole(
                path,
                "http: cert_file and key_file go together",
            ));
        }
        if http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::whole(
                path,
                format!(
                    "http.listen {:?}: expected host:port, e.g. 127.0.0.1:8080",
                    http.listen
                ),
            ));
        }
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        for f in [&mut http.cert_file, &mut http.key_file]
            .into_iter()
            .flatten()
        {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        if !calwatch_protocol::is_valid_id(&raw.client_id) {
            return Err(ConfigError::whole(
                path,
                format!(
                    "client_id {:?} must match [A-Za-z0-9._-]{{1,64}}",
                    raw.client_id
                ),
            ));
        }
        Ok(GatewayConfig {
            mqtt,
            client_id: raw.client_id,
            registry: RegistryConfig {
                path: registry_path,
            },
            http,
            sinks,
            checks,
            hold_ms,
            sweep_interval: Duration::from_secs(interval_s),
            queue: QueueConfig {
                dir: queue_dir,
                max_bytes,
            },
            ingest,
            file: path.to_path_buf(),
        })
    }
}

fn http_url(url: String) -> Result<String, String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url.trim_end_matches('/').to_string())
    } else {
        Err(format!("url {url:?}: expected http:// or https://"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        let p = Path::new("/etc/calwatch/gateway.toml");
        let raw: RawConfig = tomlfile::parse(p, text)?;
        GatewayConfig::from_raw(p, text, raw)
    }

    const BASE: &str = "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[registry]\npath = \"registry.db\"\n[http]\nlisten = \"127.0.0.1:8080\"\n";

    #[test]
    fn sinks_of_both_kinds() {
        let c = parse(&format!(
            "{BASE}[[sink]]\nkind = \"influx_v1\"\nurl = \"http://127.0.0.1:8086/\"\ndb = \"calwatch\"\n\
             [[sink]]\nkind = \"influx_v2\"\nurl = \"http://127.0.0.1:8428\"\norg = \"bureau\"\nbucket = \"calwatch\"\n"
        ))
        .unwrap();
        assert_eq!(c.registry.path, PathBuf::from("/etc/calwatch/registry.db"));
        assert_eq!(c.sinks[0].name, "influx_v1");
        assert_eq!(c.queue.dir, PathBuf::from("/etc/calwatch/queue"));
        assert_eq!(c.queue.max_bytes, DEFAULT_QUEUE_MAX_BYTES);
        assert_eq!(c.checks, CheckConfig::default());
        assert_eq!(c.hold_ms, 600_000);
        assert_eq!(c.sweep_interval, Duration::from_secs(60));
        assert_eq!(
            c.sinks[0].target,
            SinkConfig::InfluxV1 {
                url: "http://127.0.0.1:8086".into(),
                db: "calwatch".into(),
                rp: None,
                username: None,
                password: None
            }
        );
        assert!(matches!(&c.sinks[1].target, SinkConfig::InfluxV2 { org, .. } if org == "bureau"));
    }

    #[test]
    fn the_shipped_example_parses_to_the_defaults() {
        let c = parse(include_str!("../../config/gateway.toml")).unwrap();
        assert_eq!(c.checks, CheckConfig::default());
        assert_eq!(c.hold_ms, crate::alerts::DEFAULT_HOLD_MS);
        assert_eq!(c.sweep_interval, Duration::from_secs(60));
        assert_eq!(c.queue.dir, PathBuf::from("/var/lib/calwatch/queue"));
        assert_eq!(c.sinks.len(), 1);
    }

    #[test]
    fn checks_alerts_sweep_queue() {
        let c = parse(&format!(
            "{BASE}[checks]\ncheat_sales = 3\n[checks.drift]\nmin_r = 0.25\n[alerts]\nhold_ms = 1000\n\
             [sweep]\ninterval_s = 5\n[queue]\ndir = \"/var/spool/calwatch\"\nmax_bytes = 8388608\n\
             [[sink]]\nkind = \"stdout\"\n"
        ))
        .unwrap();
        assert_eq!(c.checks.cheat_sales, 3);
        assert_eq!(c.checks.drift.min_r, 0.25);
        assert_eq!(c.checks.drift.lambda, 0.2);
        assert_eq!(c.hold_ms, 1000);
        assert_eq!(c.sweep_interval, Duration::from_secs(5));
        assert_eq!(c.queue.dir, PathBuf::from("/var/spool/calwatch"));
        assert_eq!(c.queue.max_bytes, 8 << 20);
        assert_eq!(c.sinks[0].name, "stdout");

        let err = parse(&format!("{BASE}[checks]\ncheat_sale = 3\n")).unwrap_err();
        assert!(err.to_string().contains("cheat_sale"), "{err}");
        assert_eq!(err.line, Some(8), "{err}");
        let err = parse(&format!("{BASE}[checks.drift]\nlambda = 0.0\n")).unwrap_err();
        assert!(err.to_string().contains("drift.lambda"), "{err}");
        let err = parse(&format!("{BASE}[sweep]\ninterval_s = 0\n")).unwrap_err();
        assert!(err.to_string().contains("sweep.interval_s"), "{err}");
        assert_eq!(err.line, Some(8), "{err}");
        let err = parse(&format!("{BASE}[alerts]\nhold = 3\n")).unwrap_err();
        assert!(err.to_string().contains("hold"), "{err}");
        let err = parse(&format!("{BASE}[queue]\nmax_bytes = 1000\n")).unwrap_err();
        assert!(err.to_string().contains("queue.max_bytes"), "{err}");
        let two = "[[sink]]\nkind = \"stdout\"\n";
        let err = parse(&format!("{BASE}{two}{two}")).unwrap_err();
        assert!(err.to_string().contains("distinct name"), "{err}");
        assert_eq!(err.line, Some(9), "{err}");
        let c = parse(&format!(
            "{BASE}[[sink]]\nname = \"a\"\nkind = \"stdout\"\n[[sink]]\nname = \"b\"\nkind = \"stdout\"\n"
        ))
        .unwrap();
        assert_eq!(
            (c.sinks[0].name.as_str(), c.sinks[1].name.as_str()),
            ("a", "b")
        );
        let err = parse(&format!(
            "{BASE}[[sink]]\nname = \"a/b\"\nkind = \"stdout\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("sink name"), "{err}");
    }

    /// The keys of issue #16 items 3, 7, 8: parsed, defaulted, validated at `file:line`.
    #[test]
    fn dispenser_zero_and_hysteresis_keys() {
        let c = parse(&format!(
            "{BASE}[checks]
min_sale_l = 0.5
zero_return_band_e = 5.0
[checks.drift]
release_r = 0.1
"
        ))
        .unwrap();
        assert_eq!(c.checks.min_sale_l, 0.5);
        assert_eq!(c.checks.zero_return_band_e, 5.0);
        assert_eq!(c.checks.drift.release_r, 0.1);
        let d = CheckConfig::default();
        assert_eq!(
            (d.min_sale_l, d.zero_return_band_e, d.drift.release_r),
            (2.0, 10.0, 0.15)
        );
        // release_r must stay below min_r
        let err = parse(&format!(
            "{BASE}[checks.drift]
release_r = 0.3
"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("drift.release_r"), "{err}");
        assert_eq!(err.line, Some(7), "{err}");
        let err = parse(&format!(
            "{BASE}[checks]
min_sale_l = -1.0
"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("min_sale_l"), "{err}");
    }

    #[test]
    fn checks_timezone() {
        let c = parse(&format!("{BASE}[checks]\ntimezone = \"Asia/Shanghai\"\n")).unwrap();
        assert_eq!(c.checks.timezone.name(), "Asia/Shanghai");
        assert_eq!(
            c.checks.timezone,
            crate::domain::civil::Zone::named("Asia/Shanghai").unwrap()
        );
        // absent: UTC (DESIGN decision 18)
        assert_eq!(parse(BASE).unwrap().checks.timezone.name(), "UTC");
        let err = parse(&format!(
            "{BASE}[checks]\ncheat_sales = 3\ntimezone = \"Asia/Shangai\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.line, Some(9), "{err}");
        assert!(
            err.to_string()
                .starts_with("/etc/calwatch/gateway.toml:9: "),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("unknown time zone \"Asia/Shangai\""),
            "{err}"
        );
        let err = parse(&format!("{BASE}[checks]\ntimezone = 8\n")).unwrap_err();
        assert_eq!(err.line, Some(8), "{err}");
    }

    #[test]
    fn sink_errors_name_the_line() {
        let text = format!("{BASE}\n[[sink]]\nkind = \"influx_v1\"\nurl = \"http://x\"\n");
        let err = parse(&text).unwrap_err();
        assert!(err.to_string().contains("needs db"), "{err}");
        assert_eq!(err.line, Some(8), "{err}");
        let err = parse(&format!("{BASE}[[sink]]\nkind = \"kafka\"\n")).unwrap_err();
        assert!(err.to_string().contains("expected influx_v2"), "{err}");
        let err = parse(&format!("{BASE}[[sink]]\nkind = \"influx_v2\"\nurl = \"http://x\"\norg = \"o\"\nbucket = \"b\"\ndb = \"d\"\n")).unwrap_err();
        assert!(err.to_string().contains("does not take db"), "{err}");
        let err = parse(&format!(
            "{BASE}[[sink]]\nkind = \"stdout\"\nurll = \"x\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
    }
}
