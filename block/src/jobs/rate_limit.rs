//! The `speed` limit of a job (QEMU: `RateLimit`, `ratelimit_calculate_delay`,
//! `block_job_ratelimit_processed`).
//!
//! Time is cut into 100 ms slices (QEMU's `BLOCK_JOB_SLICE_TIME`); each
//! slice may dispatch `speed / 10` bytes. A request that finds the slice's
//! quota used up waits for the next slice. The first request of a slice
//! always goes, so a chunk larger than the quota still makes progress.

/// QEMU's `BLOCK_JOB_SLICE_TIME`: 100 ms.
pub const SLICE_NS: u64 = 100_000_000;

/// A rate limiter over the job's clock.
#[derive(Debug, Clone, Default)]
pub struct RateLimit {
    slice_start: u64,
    slice_end: u64,
    dispatched: u64,
}

impl RateLimit {
    /// A limiter with an empty slice.
    pub fn new() -> RateLimit {
        RateLimit::default()
    }

    /// Accounts `n` bytes at time `now` under `speed` bytes per second
    /// (0: unlimited) and returns how long to wait first, in nanoseconds
    /// (QEMU: `ratelimit_calculate_delay`). A non-zero delay accounts
    /// nothing: ask again after waiting.
    pub fn delay_ns(&mut self, now: u64, speed: u64, n: u64) -> u64 {
        if speed == 0 {
            return 0;
        }
        let quota = ((u128::from(speed) * u128::from(SLICE_NS)) / 1_000_000_000) as u64;
        if self.slice_end <= now {
            self.slice_start = now;
            self.slice_end = now + SLICE_NS;
            self.dispatched = 0;
        }
        if self.dispatched == 0 || self.dispatched + n <= quota.max(1) {
            self.dispatched += n;
            0
        } else {
            self.slice_end - now
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slice_quota_then_wait() {
        let mut r = RateLimit::new();
        // 1 MiB/s: 104857 bytes per 100 ms slice.
        let speed = 1 << 20;
        assert_eq!(r.delay_ns(0, speed, 65536), 0);
        assert_eq!(r.delay_ns(10, speed, 65536), SLICE_NS - 10);
        assert_eq!(r.delay_ns(SLICE_NS, speed, 65536), 0);
        assert_eq!(r.delay_ns(5, 0, 1 << 30), 0);
    }
}
