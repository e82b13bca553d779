//! Redis's clock as this process can bound it, and the deadline every write carries.
//!
//! A write is ordered by what its writer did, not by when its bytes arrive (docs/design.md,
//! "Write order"). A client gives up on a call one `redis_timeout` after sending it; TCP may still
//! deliver the bytes later, and Redis would then run a write whose caller already fell back to
//! PostgreSQL or raised, over whatever newer write came meanwhile. So every script that changes
//! something is sent with a deadline on Redis's own clock, and refuses to act after it.
//!
//! The deadline must never lie after the moment the client gives up, whatever the two clocks say.
//! This process measures Redis's clock against its own monotonic clock (wall-clock steps here do
//! not matter): a `TIME` reply read at local instant `r` was produced no later than `r`, so
//! `TIME - r` is a lower bound of the offset. A deadline of `sent + timeout - margin + offset`
//! therefore lies before the give-up as Redis's clock counts it, as long as the offset has not
//! shrunk by more than `margin` since it was measured (clock rate drift, a step of Redis's clock,
//! or on a cluster a node whose clock is behind the node measured). The margin is a quarter of the
//! timeout, at least a millisecond.

use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The instant this process's offsets are counted from.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// How long a measured offset is preferred to a lower one measured later.
const SAMPLE_LIFETIME: Duration = Duration::from_secs(60);

fn micros_since_epoch(at: Instant) -> i64 {
    i64::try_from(at.saturating_duration_since(*EPOCH).as_micros()).unwrap_or(i64::MAX)
}

/// A lower bound of (Redis's clock - this process's monotonic clock), in microseconds.
#[derive(Debug, Default)]
pub struct RedisClock {
    /// The best lower bound measured and when; `None` before the first measurement.
    offset: Mutex<Option<(i64, Instant)>>,
}

impl RedisClock {
    /// Records a `TIME` reply (in microseconds) that was read at `received`. The highest lower
    /// bound measured in the last minute is kept: each is valid, and the highest is the closest.
    pub fn observe(&self, redis_micros: i64, received: Instant) {
        let sample = redis_micros - micros_since_epoch(received);
        let mut offset = self.offset.lock().unwrap_or_else(PoisonError::into_inner);
        let keep = match *offset {
            Some((best, at)) => sample < best && at.elapsed() < SAMPLE_LIFETIME,
            None => false,
        };
        if !keep {
            *offset = Some((sample, received));
        }
    }

    /// The deadline on Redis's clock for a call sent now, by a client that gives up `timeout`
    /// after sending it; `None` before Redis's clock was measured (the scripts then act at any
    /// time, as they did before deadlines existed).
    #[must_use]
    pub fn deadline(&self, timeout: Duration) -> Option<i64> {
        let offset = (*self.offset.lock().unwrap_or_else(PoisonError::into_inner))?.0;
        let margin = (timeout / 4).max(Duration::from_millis(1));
        let budget = i64::try_from(timeout.saturating_sub(margin).as_micros()).unwrap_or(i64::MAX);
        Some(micros_since_epoch(Instant::now()).saturating_add(budget).saturating_add(offset))
    }

    /// Parses a `TIME` reply (seconds, microseconds) into microseconds.
    #[must_use]
    pub fn parse_time(reply: &[String]) -> Option<i64> {
        let seconds: i64 = reply.first()?.parse().ok()?;
        let micros: i64 = reply.get(1)?.parse().ok()?;
        seconds.checked_mul(1_000_000)?.checked_add(micros)
    }
}

/// The deadline argument of a script: empty when there is none.
#[must_use]
pub fn deadline_arg(deadline: Option<i64>) -> String {
    deadline.map(|d| d.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_deadline_before_a_measurement() {
        assert_eq!(RedisClock::default().deadline(Duration::from_millis(500)), None);
    }

    #[test]
    fn the_deadline_lies_before_the_give_up_on_redis_clock() {
        LazyLock::force(&EPOCH);
        // Redis's clock is 1000 s ahead; the reply was read 2 ms after Redis produced it.
        let clock = RedisClock::default();
        let now = Instant::now();
        let true_offset = 1_000_000_000i64;
        clock.observe(micros_since_epoch(now) + true_offset - 2_000, now);
        let timeout = Duration::from_millis(500);
        let sent = micros_since_epoch(Instant::now());
        let deadline = clock.deadline(timeout).expect("measured");
        let give_up_on_redis_clock = sent + 500_000 + true_offset;
        assert!(deadline < give_up_on_redis_clock, "{deadline} >= {give_up_on_redis_clock}");
        // And not needlessly early: within the margin (125 ms) plus the measurement's error.
        assert!(give_up_on_redis_clock - deadline <= 125_000 + 2_000 + 10_000);
    }

    #[test]
    fn the_closest_bound_wins_and_a_slow_reply_does_not_pull_it_down() {
        LazyLock::force(&EPOCH);
        let clock = RedisClock::default();
        let now = Instant::now();
        clock.observe(micros_since_epoch(now) + 5_000, now); // a fast reply: offset >= 5 ms
        clock.observe(micros_since_epoch(now) - 300_000, now); // a slow one: only >= -300 ms
        let offset = clock.offset.lock().unwrap().expect("measured").0;
        assert_eq!(offset, 5_000);
        clock.observe(micros_since_epoch(now) + 7_000, now);
        assert_eq!(clock.offset.lock().unwrap().expect("measured").0, 7_000);
    }

    #[test]
    fn an_old_bound_gives_way() {
        let clock = RedisClock::default();
        let long_ago = Instant::now().checked_sub(SAMPLE_LIFETIME * 2).unwrap_or(*EPOCH);
        *clock.offset.lock().unwrap() = Some((9_000, long_ago));
        let now = Instant::now();
        clock.observe(micros_since_epoch(now) + 1_000, now);
        assert_eq!(clock.offset.lock().unwrap().expect("measured").0, 1_000);
    }

    #[test]
    fn time_replies_parse() {
        assert_eq!(RedisClock::parse_time(&["1700000000".into(), "123456".into()]), Some(1_700_000_000_123_456));
        assert_eq!(RedisClock::parse_time(&["x".into()]), None);
        assert_eq!(deadline_arg(None), "");
        assert_eq!(deadline_arg(Some(5)), "5");
    }
}
