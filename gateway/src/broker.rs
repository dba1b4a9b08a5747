//! The embedded MQTT broker (rumqttd) for `demo` and tests: production runs mosquitto or
//! another MQTT 5 broker with TLS and per-agent ACLs (deploy/).

use std::net::SocketAddr;

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrokerError {
    #[error("embedded broker config: {0}")]
    Config(String),
}

/// Starts rumqttd on `listen` on its own threads; it runs until the process exits.
pub(crate) fn start(listen: SocketAddr) -> Result<(), BrokerError> {
    // Payloads up to the contract's 256 KiB batch, plus headroom for topic and header.
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "{listen}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload}
    max_inflight_count = 100
    dynamic_filters = true
"#,
        max_payload = calwatch_protocol::MAX_BATCH_BYTES + 4096
    );
    let config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| BrokerError::Config(e.to_string()))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    Ok(())
}
