//! Exponential backoff with full jitter, as a value (reconnects to devices, broker, stores).

use std::time::Duration;

/// Backoff policy: the n-th retry waits a random time in `[0, min(max, min·2ⁿ)]`,
/// never less than `min / 2`, so a fleet of agents does not reconnect in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

/// Why a backoff policy is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid backoff: {0}")]
pub struct InvalidBackoff(&'static str);

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Result<Backoff, InvalidBackoff> {
        if min.is_zero() {
            return Err(InvalidBackoff("minimum must be positive"));
        }
        if min > max {
            return Err(InvalidBackoff("maximum must not be less than minimum"));
        }
        Ok(Backoff { min, max })
    }

    /// The wait before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .min
            .checked_mul(1u32 << attempt.min(20))
            .unwrap_or(self.max)
            .min(self.max);
        let floor = self.min / 2;
        let span = ceiling.saturating_sub(floor);
        floor + span.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps_with_jitter() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).expect("valid");
        for attempt in 0..40 {
            let d = b.delay(attempt);
            assert!(d >= Duration::from_millis(50), "{attempt}: {d:?}");
            let cap = Duration::from_millis(100 * (1u64 << attempt.min(20))).min(b.max);
            assert!(d <= cap, "{attempt}: {d:?} > {cap:?}");
        }
        // Jitter: not every delay at the same attempt is equal.
        let samples: std::collections::HashSet<Duration> = (0..20).map(|_| b.delay(6)).collect();
        assert!(samples.len() > 1);
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }
}
