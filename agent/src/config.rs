//! `agent.toml`: the agent's identity, broker, spool and devices (CONTRACT §5).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use calwatch_protocol::node::mqtt::MqttConfig;
use calwatch_protocol::node::tomlfile::{self, ConfigError};
use calwatch_protocol::Id;
use serde::Deserialize;

use crate::profile::Profile;

/// The agent's configuration, parsed and validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Agent id: the `{agent}` of the topics.
    pub agent: Id,
    pub mqtt: MqttConfig,
    pub spool: SpoolConfig,
    /// Batching of readings into one MQTT message.
    pub batch: BatchConfig,
    pub publish: PublishConfig,
    pub devices: Vec<DeviceConfig>,
    /// The file this came from; relative paths inside were resolved against it.
    pub file: PathBuf,
}

/// Where the agent keeps what must survive a restart: the spool of batches not yet
/// acknowledged by the broker, and the per-device sequence numbers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory for the spool and per-device sequence state.
    pub dir: PathBuf,
    /// Upper bound of the spool on disk, in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Size of one segment file, in bytes.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// When the spool is full: `drop_oldest` (lose the oldest unsent batches) or
    /// `block_polling` (refuse new batches until the broker catches up; polling goes on).
    #[serde(default = "default_full_policy")]
    pub full_policy: String,
    /// `batch`: fsync every batch; `interval`: fsync every `fsync_interval_ms` (group
    /// commit: faster, but a power cut can lose that much).
    #[serde(default = "default_fsync")]
    pub fsync: String,
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
}

fn default_max_bytes() -> u64 {
    1 << 30
}
fn default_segment_bytes() -> u64 {
    8 << 20
}
fn default_full_policy() -> String {
    "drop_oldest".into()
}
fn default_fsync() -> String {
    "batch".into()
}
fn default_fsync_interval_ms() -> u64 {
    100
}

impl SpoolConfig {
    /// The spool's settings, or what is wrong with them.
    pub fn spool(&self) -> Result<(calwatch_spool::SpoolConfig, Option<Duration>), String> {
        let full = calwatch_spool::FullPolicy::parse(&self.full_policy).ok_or_else(|| {
            format!(
                "spool.full_policy {:?}: expected drop_oldest or block_polling",
                self.full_policy
            )
        })?;
        let (sync, every) = match self.fsync.as_str() {
            "batch" => (calwatch_spool::SyncPolicy::EveryAppend, None),
            "interval" if self.fsync_interval_ms > 0 => (
                calwatch_spool::SyncPolicy::Manual,
                Some(Duration::from_millis(self.fsync_interval_ms)),
            ),
            _ => {
                return Err(format!(
                    "spool.fsync {:?}: expected batch or interval (with fsync_interval_ms > 0)",
                    self.fsync
                ))
            }
        };
        if self.max_bytes < 2 * 1024 * 1024 {
            return Err(
                "spool.max_bytes must be at least 2 MiB (two segments of the largest batch)".into(),
            );
        }
        let mut cfg = calwatch_spool::SpoolConfig::new(self.dir.join("batches"));
        cfg.max_bytes = self.max_bytes;
        // A segment holds at least one largest batch (256 KiB plus record header).
        cfg.segment_bytes = self.segment_bytes.max(300 * 1024);
        cfg.sync = sync;
        cfg.full = full;
        Ok((cfg, every))
    }
}

/// MQTT delivery tuning.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// Batches published and not yet acknowledged, at most.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// Upper bound of batches sent per second (0: as fast as the broker acknowledges);
    /// applies to the backlog after an outage and to live data alike (order is kept).
    #[serde(default)]
    pub catchup_batches_per_s: u32,
}

fn default_inflight() -> u16 {
    16
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            inflight: default_inflight(),
            catchup_batches_per_s: 0,
        }
    }
}

/// How readings are grouped into batches.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Longest a reading waits for its batch to be sent, in milliseconds.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Most readings in one batch (at most the contract's 10,000).
    #[serde(default = "default_max_readings")]
    pub max_readings: usize,
}

fn default_linger_ms() -> u64 {
    500
}

fn default_max_readings() -> usize {
    1000
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            linger_ms: default_linger_ms(),
            max_readings: default_max_readings(),
        }
    }
}

/// Where a device is reached. Devices with the same transport share one line: one
/// connection, one request at a time (a serial bus or a TCP gateway does not do more).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// Modbus TCP (MBAP framing): `host:port` or `tcp://host:port`.
    Tcp(String),
    /// Modbus RTU frames over a TCP socket (serial device servers): `rtu+tcp://host:port`.
    RtuOverTcp(String),
    /// Modbus RTU on a serial port: `rtu:///dev/ttyUSB0?baud=9600&parity=N&data_bits=8&stop_bits=1`.
    Serial(SerialLine),
}

impl Transport {
    /// Serial framing needs a silent interval between requests; TCP does not.
    fn default_delay_ms(&self) -> u64 {
        match self {
            Transport::Tcp(_) => 0,
            Transport::RtuOverTcp(_) | Transport::Serial(_) => 5,
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tcp(a) => write!(f, "tcp://{a}"),
            Transport::RtuOverTcp(a) => write!(f, "rtu+tcp://{a}"),
            Transport::Serial(s) => write!(f, "rtu://{}?baud={}", s.path, s.baud),
        }
    }
}

/// Serial port settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SerialLine {
    pub path: String,
    pub baud: u32,
    /// `N`, `E` or `O`.
    pub parity: char,
    pub data_bits: u8,
    pub stop_bits: u8,
}

/// One polled instrument.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceConfig {
    pub id: Id,
    /// Shared by every device of the same profile file (10,000 devices, a few profiles).
    pub profile: Arc<Profile>,
    pub profile_path: PathBuf,
    pub transport: Transport,
    /// Modbus unit (slave) id.
    pub unit: u8,
    pub interval: Duration,
    pub timeout: Duration,
    /// Largest hole of unused registers a merged read may span.
    pub max_gap: u16,
    /// Pause after each request on this device's line (serial turnaround).
    pub delay: Duration,
    /// Values polled less often than `interval`, by name.
    pub value_intervals: BTreeMap<Id, Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: String,
    mqtt: MqttConfig,
    spool: SpoolConfig,
    #[serde(default)]
    batch: BatchConfig,
    #[serde(default)]
    publish: PublishConfig,
    #[serde(default)]
    device: Vec<toml::Spanned<RawDevice>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: String,
    profile: PathBuf,
    address: String,
    #[serde(default = "default_unit")]
    unit: u8,
    #[serde(default = "default_interval_ms")]
    interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_max_gap")]
    max_gap: u16,
    delay_ms: Option<u64>,
    #[serde(default)]
    value_interval_ms: BTreeMap<String, u64>,
}

fn default_unit() -> u8 {
    1
}
fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_max_gap() -> u16 {
    8
}

impl AgentConfig {
    /// Loads `agent.toml` and every profile it names.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let (raw, text): (RawConfig, String) = tomlfile::load(path)?;
        Self::from_raw(path, &text, raw)
    }

    /// Parses and validates `agent.toml` text that came from `path` (the profiles it names
    /// are read, relative to `path`).
    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = tomlfile::parse(path, text)?;
        Self::from_raw(path, text, raw)
    }

    fn from_raw(path: &Path, text: &str, raw: RawConfig) -> Result<AgentConfig, ConfigError> {
        let agent = Id::new(raw.agent).map_err(|e| {
            let at = text.find("agent").unwrap_or(0);
            ConfigError::at_offset(path, text, at, format!("agent: {e}"))
        })?;
        if raw.batch.max_readings == 0 || raw.batch.max_readings > calwatch_protocol::MAX_READINGS {
            return Err(ConfigError::whole(
                path,
                format!(
                    "batch.max_readings must be 1..={}",
                    calwatch_protocol::MAX_READINGS
                ),
            ));
        }
        raw.mqtt.validate(path)?;
        raw.spool.spool().map_err(|m| ConfigError::whole(path, m))?;
        if raw.publish.inflight == 0 || raw.publish.inflight > 1000 {
            return Err(ConfigError::whole(
                path,
                "publish.inflight must be 1..=1000",
            ));
        }
        let mut devices: Vec<DeviceConfig> = Vec::with_capacity(raw.device.len());
        let mut profiles: HashMap<PathBuf, Arc<Profile>> = HashMap::new();
        let mut ids: std::collections::HashSet<Id> = std::collections::HashSet::new();
        for spanned in raw.device {
            let offset = spanned.span().start;
            let err = |m: String| ConfigError::at_offset(path, text, offset, m);
            let d = spanned.into_inner();
            let id = Id::new(d.id).map_err(|e| err(format!("device id: {e}")))?;
            if !ids.insert(id.clone()) {
                return Err(err(format!("device {id}: id used twice")));
            }
            let transport =
                parse_address(&d.address).map_err(|m| err(format!("device {id}: {m}")))?;
            if d.interval_ms == 0 || d.timeout_ms == 0 {
                return Err(err(format!(
                    "device {id}: interval_ms and timeout_ms must be positive"
                )));
            }
            // Unit 0 is broadcast (no answer); 248..=255 are reserved. Modbus TCP devices
            // often ignore the unit id, but one must still be sent.
            if d.unit == 0 || d.unit > 247 {
                return Err(err(format!(
                    "device {id}: unit {} out of range 1..=247",
                    d.unit
                )));
            }
            let profile_path = tomlfile::resolve(path, &d.profile);
            let profile = match profiles.get(&profile_path) {
                Some(p) => Arc::clone(p),
                None => {
                    let p = Arc::new(
                        Profile::load(&profile_path)
                            .map_err(|e| err(format!("device {id}: profile: {e}")))?,
                    );
                    profiles.insert(profile_path.clone(), Arc::clone(&p));
                    p
                }
            };
            let mut value_intervals = BTreeMap::new();
            for (name, ms) in d.value_interval_ms {
                if !profile
                    .values
                    .iter()
                    .any(|v| v.name.as_str() == name && !v.is_identity())
                {
                    return Err(err(format!(
                        "device {id}: value_interval_ms names {name:?}, not a value of the profile"
                    )));
                }
                if ms < d.interval_ms {
                    return Err(err(format!(
                        "device {id}: value_interval_ms.{name} = {ms} is shorter than interval_ms"
                    )));
                }
                let name = Id::new(name).map_err(|e| err(format!("device {id}: {e}")))?;
                value_intervals.insert(name, Duration::from_millis(ms));
            }
            let delay =
                Duration::from_millis(d.delay_ms.unwrap_or_else(|| transport.default_delay_ms()));
            devices.push(DeviceConfig {
                id,
                profile,
                profile_path,
                transport,
                unit: d.unit,
                interval: Duration::from_millis(d.interval_ms),
                timeout: Duration::from_millis(d.timeout_ms),
                max_gap: d.max_gap,
                delay,
                value_intervals,
            });
        }
        let mut mqtt = raw.mqtt;
        mqtt.resolve_paths(path);
        let mut spool = raw.spool;
        spool.dir = tomlfile::resolve(path, &spool.dir);
        Ok(AgentConfig {
            agent,
            mqtt,
            spool,
            batch: raw.batch,
            publish: raw.publish,
            devices,
            file: path.to_path_buf(),
        })
    }
}

/// Parses a device address (see [`Transport`]).
fn parse_address(address: &str) -> Result<Transport, String> {
    let hostport = |s: &str| -> Result<String, String> {
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(s.to_string())
            }
            _ => Err(format!("address {address:?}: expected host:port")),
        }
    };
    if let Some(rest) = address.strip_prefix("rtu+tcp://") {
        return Ok(Transport::RtuOverTcp(hostport(rest)?));
    }
    if let Some(rest) = address.strip_prefix("rtu://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !path.starts_with('/') {
            return Err(format!(
                "address {address:?}: expected rtu:///dev/ttyX?baud=N"
            ));
        }
        let mut line = SerialLine {
            path: path.to_string(),
            baud: 9600,
            parity: 'N',
            data_bits: 8,
            stop_bits: 1,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("address {address:?}: {pair:?} is not key=value"))?;
            let bad = || format!("address {address:?}: bad {k} {v:?}");
            match k {
                "baud" => line.baud = v.parse().ok().filter(|&b| b > 0).ok_or_else(bad)?,
                "parity" => {
                    line.parity = match v {
                        "N" | "n" | "none" => 'N',
                        "E" | "e" | "even" => 'E',
                        "O" | "o" | "odd" => 'O',
                        _ => return Err(bad()),
                    }
                }
                "data_bits" => line.data_bits = v.parse().ok().filter(|b| (5..=8).contains(b)).ok_or_else(bad)?,
                "stop_bits" => line.stop_bits = v.parse().ok().filter(|b| (1..=2).contains(b)).ok_or_else(bad)?,
                _ => return Err(format!("address {address:?}: unknown option {k:?} (baud, parity, data_bits, stop_bits)")),
            }
        }
        return Ok(Transport::Serial(line));
    }
    let rest = address.strip_prefix("tcp://").unwrap_or(address);
    if rest.contains("://") {
        return Err(format!(
            "address {address:?}: unsupported scheme; use host:port, rtu+tcp://host:port or rtu:///dev/ttyX"
        ));
    }
    Ok(Transport::Tcp(hostport(rest)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A scratch directory removed when the test ends (also when it fails).
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = PathBuf;
        fn deref(&self) -> &PathBuf {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir(tag: &str) -> TempDir {
        let d =
            std::env::temp_dir().join(format!("calwatch-agent-cfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    const PROFILE: &str = "kind = \"scale\"\nmodel = \"m\"\n[[value]]\nname = \"gross_kg\"\ntable = \"holding\"\naddress = 0\ntype = \"i32\"\n";

    #[test]
    fn loads_a_full_config() {
        let d = tempdir("ok");
        write(&d, "scale.toml", PROFILE);
        let cfg = write(
            &d,
            "agent.toml",
            "agent = \"station-17\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[spool]\ndir = \"spool\"\n\
             [[device]]\nid = \"S-1\"\nprofile = \"scale.toml\"\naddress = \"127.0.0.1:5020\"\nunit = 3\ninterval_ms = 250\n",
        );
        let c = AgentConfig::load(&cfg).unwrap();
        assert_eq!(c.agent.as_str(), "station-17");
        assert_eq!(c.devices[0].unit, 3);
        assert_eq!(c.devices[0].interval, Duration::from_millis(250));
        assert_eq!(c.spool.dir, d.join("spool"));
        assert_eq!(
            c.devices[0].transport,
            Transport::Tcp("127.0.0.1:5020".into())
        );
    }

    #[test]
    fn bad_device_names_its_line() {
        let d = tempdir("bad");
        write(&d, "scale.toml", PROFILE);
        let cfg = write(
            &d,
            "agent.toml",
            "agent = \"a\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[spool]\ndir = \"s\"\n\
             [[device]]\nid = \"S-1\"\nprofile = \"scale.toml\"\naddress = \"nowhere\"\n",
        );
        let err = AgentConfig::load(&cfg).unwrap_err();
        assert!(err.to_string().contains("expected host:port"), "{err}");
        assert!(err.line.is_some());
        let cfg = write(
            &d,
            "agent2.toml",
            "agent = \"a\"\n[mqtt]\nurl = \"mqtt://h:1\"\nport = 3\n[spool]\ndir = \"s\"\n",
        );
        let err = AgentConfig::load(&cfg).unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
    }

    #[test]
    fn missing_profile_is_reported() {
        let d = tempdir("noprof");
        let cfg = write(
            &d,
            "agent.toml",
            "agent = \"a\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[spool]\ndir = \"s\"\n\
             [[device]]\nid = \"S-1\"\nprofile = \"gone.toml\"\naddress = \"h:502\"\n",
        );
        let err = AgentConfig::load(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("gone.toml") && err.contains("cannot read"),
            "{err}"
        );
    }
}
