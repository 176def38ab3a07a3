//! Wall-clock time for schedules, derived from tokio's clock.
//!
//! Schedules are stored as epoch milliseconds, but timers are tokio timers. Deriving "now"
//! from the wall clock at start-up plus tokio's monotonic elapsed time keeps the two in step,
//! and makes paused tokio time in tests move the wall clock too. Over a long uptime this can
//! drift from the system clock by whatever the system clock was adjusted; schedules are
//! precise to the runtime's own clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Epoch milliseconds anchored at runtime start.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch_ms_at_start: i64,
    start: Instant,
}

impl Clock {
    /// A clock anchored now.
    pub fn new() -> Clock {
        let epoch_ms_at_start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Clock {
            epoch_ms_at_start,
            start: Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        self.epoch_ms_at_start + self.start.elapsed().as_millis() as i64
    }

    /// The tokio instant at which the clock reads `at_ms` (now, if that is in the past).
    pub fn instant_at(&self, at_ms: i64) -> Instant {
        let ahead = at_ms.saturating_sub(self.now_ms()).max(0) as u64;
        Instant::now() + Duration::from_millis(ahead)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}
