//! MQTT connection settings shared by the agent and the gateway: URL, credentials, TLS.
//!
//! Passwords come from a file or the `CALWATCH_MQTT_PASSWORD` environment variable,
//! never from the command line, and are never logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use serde::Deserialize;

use super::tomlfile::{self, ConfigError};

/// Environment variable holding the MQTT password when no `password_file` is given.
pub const PASSWORD_ENV: &str = "CALWATCH_MQTT_PASSWORD";

/// The `[mqtt]` table of agent.toml and gateway.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// Optional user name; the password comes from `password_file` or `CALWATCH_MQTT_PASSWORD`.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the broker's certificate; without it, the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// MQTT keep-alive, in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
}

fn default_keep_alive() -> u64 {
    30
}

/// Broker address parsed from the URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(format!(
                "url {url:?}: expected mqtt://host:port or mqtts://host:port"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("url {url:?}: bad port {p:?}"))?;
                (
                    h.trim_start_matches('[').trim_end_matches(']').to_string(),
                    port,
                )
            }
            _ => (rest.to_string(), default_port),
        };
        if host.is_empty() {
            return Err(format!("url {url:?}: no host"));
        }
        Ok(BrokerUrl { tls, host, port })
    }
}

impl MqttConfig {
    /// A plain-TCP config for `host:port`, used by the demo and tests.
    pub fn plain(addr: &str) -> MqttConfig {
        MqttConfig {
            url: format!("mqtt://{addr}"),
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            keep_alive_s: default_keep_alive(),
        }
    }

    /// Checks what can be checked without touching files.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        BrokerUrl::parse(&self.url).map_err(|m| ConfigError::whole(file, format!("mqtt.{m}")))?;
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError::whole(
                file,
                "mqtt: cert_file and key_file go together",
            ));
        }
        if self.keep_alive_s < 5 {
            return Err(ConfigError::whole(
                file,
                "mqtt.keep_alive_s must be at least 5",
            ));
        }
        Ok(())
    }

    /// Makes paths relative to the config file absolute.
    pub fn resolve_paths(&mut self, file: &Path) {
        for p in [
            &mut self.password_file,
            &mut self.ca_file,
            &mut self.cert_file,
            &mut self.key_file,
        ]
        .into_iter()
        .flatten()
        {
            *p = tomlfile::resolve(file, p);
        }
    }

    /// Client options for this broker; reads the password and certificate files.
    pub fn options(&self, client_id: &str) -> Result<MqttOptions, String> {
        let url = BrokerUrl::parse(&self.url)?;
        let mut opts = MqttOptions::new(client_id, url.host.clone(), url.port);
        opts.set_keep_alive(Duration::from_secs(self.keep_alive_s));
        // Batches are up to 256 KiB; leave room for the topic and headers.
        opts.set_max_packet_size(crate::MAX_BATCH_BYTES + 4096, crate::MAX_BATCH_BYTES + 4096);
        if let Some(user) = &self.username {
            let password = match &self.password_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| format!("mqtt.password_file {}: {e}", f.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                None => std::env::var(PASSWORD_ENV).unwrap_or_default(),
            };
            opts.set_credentials(user.clone(), password);
        }
        if url.tls {
            // One TLS implementation in the tree (ring, through rustls); choose it explicitly
            // so no feature of another crate can leave rustls guessing. Already set: fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let read = |p: &PathBuf, what: &str| {
                std::fs::read(p).map_err(|e| format!("mqtt.{what} {}: {e}", p.display()))
            };
            let client_auth = match (&self.cert_file, &self.key_file) {
                (Some(c), Some(k)) => Some((read(c, "cert_file")?, read(k, "key_file")?)),
                _ => None,
            };
            let transport = match &self.ca_file {
                Some(ca) => Transport::tls_with_config(TlsConfiguration::Simple {
                    ca: read(ca, "ca_file")?,
                    alpn: None,
                    client_auth,
                }),
                None if client_auth.is_none() => Transport::tls_with_default_config(),
                None => return Err("mqtt: a client certificate needs ca_file too".into()),
            };
            opts.set_transport(transport);
        }
        Ok(opts)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            BrokerUrl::parse("mqtt://127.0.0.1:1884").unwrap(),
            BrokerUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1884
            }
        );
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example").unwrap().port,
            8883
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1883").unwrap().host, "::1");
        assert!(BrokerUrl::parse("http://x").is_err());
        assert!(BrokerUrl::parse("mqtt://h:notaport").is_err());
    }
}
