//! What both binaries (agent and gateway) need besides the wire format: reconnect
//! [`backoff`], the [`mqtt`] connection settings (URL, credentials, TLS), TOML
//! configuration files with `file:line` errors ([`tomlfile`]) and the [`process`] setup
//! (logging, stop signals).
//!
//! Behind the `node` feature, so a crate that only encodes or decodes payloads does not
//! build an MQTT client, TLS or tokio.

pub mod backoff;
pub mod mqtt;
pub mod process;
pub mod tomlfile;
