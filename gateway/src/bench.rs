//! The pipeline and the sink queues as the benchmarks (`examples/`) and the fuzz targets
//! drive them, without a broker or an HTTP server. Not an API: hidden, and free to change.

pub use crate::alerts::AlertBook;
pub use crate::checks::{CheckConfig, DeviceState, DriftSources, Presence, SavedDevice};
pub use crate::domain::civil::{format_date, Zone};
pub use crate::domain::input::{
    certificate_from_json, device_from_json, parse_device_rows, parse_verification_rows,
};
pub use crate::domain::{Certificate, Device, DeviceKind, Devices, ImportError};
pub use crate::metrics::Metrics;
pub use crate::pipeline::{Output, Pipeline};
pub use crate::sink::line::LineBuffer;
pub use crate::sink::{start_writers, Queues};
