//! `gateway.toml` (CONTRACT §5): broker, registry, HTTP listener and time-series sinks.

use std::path::{Path, PathBuf};

use calwatch_agent::mqtt::MqttConfig;
use calwatch_agent::tomlfile::{self, ConfigError};
use serde::Deserialize;

/// The gateway's configuration, parsed and validated.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub mqtt: MqttConfig,
    /// MQTT client id; one per gateway so its persistent session (unacked batches) is its own.
    pub client_id: String,
    pub registry: RegistryConfig,
    pub http: HttpConfig,
    pub sinks: Vec<SinkConfig>,
    pub file: PathBuf,
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
    /// Address of the HTTP API and console.
    pub listen: String,
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
}

fn default_client_id() -> String {
    "calwatch-gateway".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
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

    fn from_raw(path: &Path, text: &str, raw: RawConfig) -> Result<GatewayConfig, ConfigError> {
        raw.mqtt.validate(path)?;
        let mut sinks = Vec::new();
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
            sinks.push(sink);
        }
        let mut mqtt = raw.mqtt;
        mqtt.resolve_paths(path);
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
                path: tomlfile::resolve(path, &raw.registry.path),
            },
            http: raw.http,
            sinks,
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
        assert_eq!(
            c.sinks[0],
            SinkConfig::InfluxV1 {
                url: "http://127.0.0.1:8086".into(),
                db: "calwatch".into(),
                rp: None,
                username: None,
                password: None
            }
        );
        assert!(matches!(&c.sinks[1], SinkConfig::InfluxV2 { org, .. } if org == "bureau"));
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
