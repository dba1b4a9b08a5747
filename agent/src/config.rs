//! `agent.toml`: the agent's identity, broker, spool and devices (CONTRACT §5).

use std::path::{Path, PathBuf};
use std::time::Duration;

use calwatch_protocol::Id;
use serde::Deserialize;

use crate::mqtt::MqttConfig;
use crate::profile::Profile;
use crate::tomlfile::{self, ConfigError};

/// The agent's configuration, parsed and validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Agent id: the `{agent}` of the topics.
    pub agent: Id,
    pub mqtt: MqttConfig,
    pub spool: SpoolConfig,
    /// Batching of readings into one MQTT message.
    pub batch: BatchConfig,
    pub devices: Vec<DeviceConfig>,
    /// The file this came from; relative paths inside were resolved against it.
    pub file: PathBuf,
}

/// Where the agent keeps what must survive a restart.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory for the spool and per-device sequence state.
    pub dir: PathBuf,
    /// Upper bound of the spool on disk, in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_max_bytes() -> u64 {
    1 << 30
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

/// Where a device is reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Modbus TCP (MBAP framing).
    Tcp(String),
}

/// One polled instrument.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub id: Id,
    pub profile: Profile,
    pub profile_path: PathBuf,
    pub transport: Transport,
    /// Modbus unit (slave) id.
    pub unit: u8,
    pub interval: Duration,
    pub timeout: Duration,
    /// Largest hole of unused registers a merged read may span.
    pub max_gap: u16,
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
        let agent = Id::new(raw.agent).map_err(|e| {
            let at = text.find("agent").unwrap_or(0);
            ConfigError::at_offset(path, &text, at, format!("agent: {e}"))
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
        let mut devices: Vec<DeviceConfig> = Vec::with_capacity(raw.device.len());
        for spanned in raw.device {
            let offset = spanned.span().start;
            let err = |m: String| ConfigError::at_offset(path, &text, offset, m);
            let d = spanned.into_inner();
            let id = Id::new(d.id).map_err(|e| err(format!("device id: {e}")))?;
            if devices.iter().any(|o| o.id == id) {
                return Err(err(format!("device {id}: id used twice")));
            }
            let transport =
                parse_address(&d.address).map_err(|m| err(format!("device {id}: {m}")))?;
            if d.interval_ms == 0 || d.timeout_ms == 0 {
                return Err(err(format!(
                    "device {id}: interval_ms and timeout_ms must be positive"
                )));
            }
            if d.unit == 0 || d.unit > 247 {
                return Err(err(format!(
                    "device {id}: unit {} out of range 1..=247",
                    d.unit
                )));
            }
            let profile_path = tomlfile::resolve(path, &d.profile);
            let profile = Profile::load(&profile_path)
                .map_err(|e| err(format!("device {id}: profile: {e}")))?;
            devices.push(DeviceConfig {
                id,
                profile,
                profile_path,
                transport,
                unit: d.unit,
                interval: Duration::from_millis(d.interval_ms),
                timeout: Duration::from_millis(d.timeout_ms),
                max_gap: d.max_gap,
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
            devices,
            file: path.to_path_buf(),
        })
    }
}

/// Parses a device address: `host:port` (Modbus TCP) or `tcp://host:port`.
fn parse_address(address: &str) -> Result<Transport, String> {
    let hostport = address.strip_prefix("tcp://").unwrap_or(address);
    if hostport.contains("://") {
        return Err(format!(
            "address {address:?}: unsupported scheme; this agent speaks Modbus TCP (host:port)"
        ));
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(Transport::Tcp(hostport.to_string()))
        }
        _ => Err(format!("address {address:?}: expected host:port")),
    }
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

    fn tempdir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("calwatch-agent-cfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
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
