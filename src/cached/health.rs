//! Redis's health as this process sees it: a circuit breaker with backoff, and the writes that went
//! straight to PostgreSQL while Redis was away (docs/design.md, "Faults").

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::cache::Bypass;

/// Shortest and longest pause before Redis is tried again after it failed (docs/design.md, "Faults").
const MIN_REDIS_BACKOFF: Duration = Duration::from_millis(250);
const MAX_REDIS_BACKOFF: Duration = Duration::from_secs(30);

/// Writes that went straight to PostgreSQL and are not yet reconciled with Redis, at most this many
/// (deduplicated by conversation). Past it, further ones are not tracked, and the log says how many.
pub(crate) const MAX_BYPASSES: usize = 100_000;
/// Redis's health as this process sees it: a circuit breaker with exponential backoff, and the
/// writes that went straight to PostgreSQL meanwhile (or because Redis refused them), which Redis
/// is brought in line with before it serves anything again.
#[derive(Debug, Default)]
pub(crate) struct Health {
    pub(crate) degraded: AtomicBool,
    /// Whether bypasses wait to be replayed, or a replay is under way: checked on every call without
    /// taking a lock. Cleared only once a replay finished with nothing left, so no call reads Redis
    /// while another thread's replay has taken the entries but not yet acted on them.
    pub(crate) pending: AtomicBool,
    /// One replay at a time; a call that finds one under way waits for it.
    pub(crate) replaying: Mutex<()>,
    pub(crate) state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
pub(crate) struct HealthState {
    pub(crate) retry_at: Option<Instant>,
    pub(crate) backoff: Duration,
    /// By (user, id): the newest write that went straight to PostgreSQL.
    pub(crate) bypasses: HashMap<(String, String), Bypass>,
    /// Bypasses not tracked because the map was full.
    pub(crate) untracked: u64,
    /// Why Redis is not in use, while it is not: the last failure, for `stats()`.
    pub(crate) why: Option<String>,
}

impl Health {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// False while backing off: the call goes to PostgreSQL without waiting on Redis.
    pub(crate) fn usable(&self) -> bool {
        !self.degraded.load(Ordering::Acquire) || self.lock().retry_at.is_none_or(|t| Instant::now() >= t)
    }

    pub(crate) fn failed(&self, why: &str) {
        let mut state = self.lock();
        state.backoff = if self.degraded.swap(true, Ordering::AcqRel) {
            (state.backoff * 2).clamp(MIN_REDIS_BACKOFF, MAX_REDIS_BACKOFF)
        } else {
            log::warn!("Redis is unavailable ({why}); using PostgreSQL directly until it is back");
            MIN_REDIS_BACKOFF
        };
        state.retry_at = Some(Instant::now() + state.backoff);
        state.why = Some(why.to_owned());
    }

    /// The last failure, while Redis is not in use.
    pub(crate) fn why(&self) -> Option<String> {
        if self.degraded.load(Ordering::Acquire) {
            self.lock().why.clone()
        } else {
            None
        }
    }

    pub(crate) fn remember(&self, bypass: Bypass) {
        let mut state = self.lock();
        let key = (bypass.user_id.clone(), bypass.conversation_id.clone());
        let full = state.bypasses.len() >= MAX_BYPASSES;
        match state.bypasses.get_mut(&key) {
            Some(known) if known.version < bypass.version => *known = bypass,
            Some(_) => {}
            None if full => state.untracked += 1,
            None => {
                state.bypasses.insert(key, bypass);
            }
        }
        self.pending.store(true, Ordering::Release);
    }

    pub(crate) fn succeeded(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            let mut state = self.lock();
            state.retry_at = None;
            state.backoff = Duration::ZERO;
            state.why = None;
            log::info!("Redis is back; caching resumed");
        }
    }
}
