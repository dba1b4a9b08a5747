//! What the `calwatch-gateway` command line does besides running the gateway: registry
//! imports, tokens, the audit chain's check, and a dump of the check state. The gateway's
//! own modules stay private; this is their face to the operator's tools.

use std::io::Write;

pub use crate::domain::role::Role;
pub use crate::domain::{Device, ImportError};
pub use crate::persist::audit::{AuditEntry, AuditError};
pub use crate::persist::registry::{Registry, RegistryError};
pub use crate::persist::tokens::{create as create_token, revoke as revoke_token, TokenError};

use crate::checks::DeviceState;
use crate::config::GatewayConfig;
use crate::persist::state::{AlertFilter, AlertReader, StateStore};

/// The state's JSON with `last_seq` and `last_ts` (stored in columns of their own).
fn state_with_counters(state: &DeviceState) -> serde_json::Value {
    let mut v = serde_json::to_value(state).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("last_seq".into(), state.last_seq.into());
        o.insert("last_ts".into(), state.last_ts.into());
    }
    v
}

/// Writes `{"device":..,"gaps":..,"readings":..,"state":{..}}` per device (by id), then
/// `{"alert":{..}}` per alert, oldest first: the check state of the gateway at `cfg`.
pub fn dump_state(cfg: &GatewayConfig, out: &mut impl Write) -> Result<(), String> {
    let store = StateStore::open(&cfg.registry.path).map_err(|e| e.to_string())?;
    let mut devices = store.load_devices().map_err(|e| e.to_string())?;
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    for (id, saved) in devices {
        let line = serde_json::json!({
            "device": id.as_str(),
            "gaps": saved.gaps,
            "readings": saved.readings,
            "state": state_with_counters(&saved.state),
        });
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
    }
    drop(store);
    let reader = AlertReader::open(&cfg.registry.path).map_err(|e| e.to_string())?;
    let (mut alerts, _) = reader
        .alerts(&AlertFilter::default(), usize::MAX >> 1, 0)
        .map_err(|e| e.to_string())?;
    alerts.reverse();
    for a in alerts {
        let event: serde_json::Value =
            serde_json::from_slice(&a.encode()).map_err(|e| e.to_string())?;
        writeln!(out, "{}", serde_json::json!({ "alert": event })).map_err(|e| e.to_string())?;
    }
    Ok(())
}
