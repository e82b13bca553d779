//! Write-back: dirty conversations in Redis written to PostgreSQL in batches, safely.
//!
//! The argument for why nothing is lost or reordered is in the README ("Why nothing is lost").
//! In short: every save gets a version from Redis's clock bumped past the previous one; a flush
//! writes a version to PostgreSQL only when it is newer than the row's and no tombstone is as new;
//! and it marks the Redis copy clean only if the copy still holds the version it wrote.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cache::redis::{split_member, CacheError, Cached, DirtyEntry, RedisCache, Settle, StoredPrefix};
use crate::error::{Error, Result};
use crate::model::messages_fingerprint;
use crate::store::postgres::{FlushOutcome, PostgresStore, WriteBack};
use crate::validate;

/// Longest wait before a conversation PostgreSQL refused is tried again.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);
/// A flush reads the dirty hashes of a batch in one pipeline; that may take longer than a call.
const FLUSH_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A conversation PostgreSQL (or parsing) refused: kept dirty, retried with backoff, reported.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not retried before this.
    pub next_attempt: Instant,
    /// The last reason.
    pub error: String,
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    /// Conversations written to PostgreSQL by this flush.
    pub written: usize,
    /// Conversations that failed and stay dirty.
    pub failed: usize,
    /// Conversations whose cached copy was older than PostgreSQL's or deleted, dropped.
    pub dropped: usize,
    /// Whether the flush stopped at its deadline with work left.
    pub incomplete: bool,
}

/// The write-back machinery of one manager.
#[derive(Debug)]
pub struct Flusher {
    redis: Arc<RedisCache>,
    postgres: Arc<PostgresStore>,
    batch_size: usize,
    failures: Mutex<HashMap<String, Failure>>,
    /// One flush at a time per process: a second caller waits and then finds little to do.
    running: Mutex<()>,
    /// Completed flush runs.
    pub flushes: AtomicU64,
    /// Conversations written back, all runs.
    pub conversations_flushed: AtomicU64,
    /// Failed write-back attempts, all runs.
    pub flush_failures: AtomicU64,
}

impl Flusher {
    /// Write-back from `redis` to `postgres`, `batch_size` conversations per transaction.
    #[must_use]
    pub fn new(redis: Arc<RedisCache>, postgres: Arc<PostgresStore>, batch_size: usize) -> Self {
        Flusher {
            redis,
            postgres,
            batch_size: batch_size.max(1),
            failures: Mutex::new(HashMap::new()),
            running: Mutex::new(()),
            flushes: AtomicU64::new(0),
            conversations_flushed: AtomicU64::new(0),
            flush_failures: AtomicU64::new(0),
        }
    }

    /// The `<user>:<id>` members stuck in retry, sorted.
    #[must_use]
    pub fn stuck(&self) -> Vec<String> {
        let mut stuck: Vec<String> =
            self.failures.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        stuck.sort();
        stuck
    }

    /// Writes every dirty conversation back, streaming the dirty set in batches. Stops early (and
    /// says so) at `deadline`. Fails only when Redis or PostgreSQL cannot be reached; what was
    /// written until then stays written, the rest stays dirty.
    pub fn flush(&self, deadline: Option<Instant>) -> Result<FlushReport> {
        let _running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let mut report = FlushReport::default();
        let mut cursor = 0;
        let mut batches = 0u64;
        loop {
            // SSCAN may return a member twice; the second write finds PostgreSQL current and only
            // settles Redis, so no set of seen members (memory growing with the dirty count) is kept.
            let (next, members) = self.redis.scan_dirty(cursor, self.batch_size).map_err(CacheError::into_error)?;
            for chunk in members.chunks(self.batch_size) {
                self.flush_batch(chunk, &mut report)?;
                batches += 1;
                if batches % 20 == 0 {
                    log::info!(
                        "write-back in progress: {} conversations written, {} failed",
                        report.written,
                        report.failed
                    );
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                report.incomplete = true;
                break;
            }
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if report.written > 0 || report.failed > 0 {
            log::info!(
                "write-back: {} conversations written to PostgreSQL, {} failed, {} stale copies dropped in {:.0?}",
                report.written,
                report.failed,
                report.dropped,
                started.elapsed()
            );
        }
        Ok(report)
    }

    fn flush_batch(&self, members: &[String], report: &mut FlushReport) -> Result<()> {
        let now = Instant::now();
        let due: Vec<String> = {
            let failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
            members.iter().filter(|m| failures.get(*m).is_none_or(|f| f.next_attempt <= now)).cloned().collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        let entries = self.redis.fetch_dirty(&due, FLUSH_READ_TIMEOUT).map_err(CacheError::into_error)?;
        let mut settle: Vec<SettleItem> = Vec::new();
        let mut ready: Vec<(String, Cached, bool)> = Vec::new();
        for DirtyEntry { member, content } in entries {
            match content {
                // Deleted (or never there): only the dirty-set entry is left to remove.
                None => settle.push((member, String::new(), Settle::Drop, None)),
                Some(Err(why)) => self.fail(&member, why, report),
                Some(Ok(cached)) => match check(&member, &cached) {
                    Ok(()) => ready.push((member, cached, false)),
                    Err(why) => self.fail(&member, why, report),
                },
            }
        }
        // PostgreSQL cannot upsert one row twice in a statement: a second user with the same id
        // goes into a later round, as does a conversation to send again in full.
        while !ready.is_empty() {
            let mut ids = HashSet::new();
            let (round, mut later): (Vec<_>, Vec<_>) = ready
                .into_iter()
                .partition(|(m, _, _)| ids.insert(split_member(m).map_or("", |(_, id)| id).to_owned()));
            later.extend(self.write_round(round, &mut settle, report)?);
            ready = later;
        }
        self.redis.settle(&settle).map_err(CacheError::into_error)
    }

    /// Writes one round; returns the conversations to send again in full.
    fn write_round(
        &self,
        round: Vec<(String, Cached, bool)>,
        settle: &mut Vec<SettleItem>,
        report: &mut FlushReport,
    ) -> Result<Vec<(String, Cached, bool)>> {
        let writes: Vec<WriteBack<'_>> = round
            .iter()
            .map(|(member, cached, full)| {
                let (user_id, conversation_id) = split_member(member).expect("checked members split");
                let extends = if *full { None } else { stored_prefix(cached) };
                WriteBack {
                    conversation_id,
                    user_id,
                    conversation: &cached.conversation,
                    version: version_of(cached),
                    extends,
                }
            })
            .collect();
        let outcomes = match self.postgres.flush_batch(&writes) {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) if e.is_unavailable() => return Err(e),
            // One bad conversation must not block the others: write them one by one to find it.
            Err(batch_error) => {
                log::warn!("a write-back batch of {} failed ({batch_error}); retrying one by one", writes.len());
                let mut outcomes = Vec::with_capacity(writes.len());
                for write in &writes {
                    match self.postgres.flush_batch(std::slice::from_ref(write)) {
                        Ok(mut single) => outcomes.push(Ok(single.pop().unwrap_or(FlushOutcome::Stale))),
                        Err(e) if e.is_unavailable() => return Err(e),
                        Err(e) => outcomes.push(Err(e)),
                    }
                }
                outcomes
            }
        };
        drop(writes);
        let mut again = Vec::new();
        for ((member, cached, full), outcome) in round.into_iter().zip(outcomes) {
            let version = version_of(&cached);
            let stored = cached.version.map(|v| v.to_string()).unwrap_or_default();
            // What PostgreSQL holds once this version is there: recorded so the next flush of
            // this conversation sends only the messages added after these.
            let holds = || {
                Some(StoredPrefix {
                    messages: cached.conversation.messages.len(),
                    version,
                    fingerprint: messages_fingerprint(&cached.conversation.messages),
                })
            };
            match outcome {
                Ok(FlushOutcome::Written) => {
                    report.written += 1;
                    self.conversations_flushed.fetch_add(1, Ordering::Relaxed);
                    self.succeeded(&member);
                    settle.push((member, stored, Settle::Clean, holds()));
                }
                Ok(FlushOutcome::Current) => {
                    self.succeeded(&member);
                    settle.push((member, stored, Settle::Clean, holds()));
                }
                Ok(FlushOutcome::Rebase) if !full => again.push((member, cached, true)),
                Ok(FlushOutcome::Stale | FlushOutcome::Deleted | FlushOutcome::Rebase) => {
                    report.dropped += 1;
                    self.succeeded(&member);
                    settle.push((member, stored, Settle::Drop, None));
                }
                Ok(FlushOutcome::OtherOwner) => {
                    self.fail(&member, "the conversation id belongs to another user in PostgreSQL".to_owned(), report);
                }
                Err(e) => self.fail(&member, format!("PostgreSQL refused version {version}: {e}"), report),
            }
        }
        Ok(again)
    }

    fn succeeded(&self, member: &str) {
        if self.failures.lock().unwrap_or_else(PoisonError::into_inner).remove(member).is_some() {
            log::info!("write-back of {member} succeeded after earlier failures");
        }
    }

    fn fail(&self, member: &str, error: String, report: &mut FlushReport) {
        report.failed += 1;
        self.flush_failures.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let failure = failures.entry(member.to_owned()).or_insert(Failure {
            attempts: 0,
            next_attempt: Instant::now(),
            error: String::new(),
        });
        failure.attempts += 1;
        let backoff = Duration::from_secs(1u64 << failure.attempts.min(9)).min(MAX_RETRY_BACKOFF);
        failure.next_attempt = Instant::now() + backoff;
        log::error!(
            "write-back of {member} failed (attempt {}; kept dirty, retried in {backoff:?}): {error}",
            failure.attempts
        );
        failure.error = error;
    }
}

/// A settle instruction: member, the version the flush read, what to do, what PostgreSQL holds.
type SettleItem = (String, String, Settle, Option<StoredPrefix>);

/// `Some((n, version))` when PostgreSQL is known to hold this conversation's first `n` messages
/// (the fingerprint of the current first `n` still matches), so only the rest need sending.
fn stored_prefix(cached: &Cached) -> Option<(usize, i64)> {
    let p = cached.stored?;
    let messages = &cached.conversation.messages;
    (p.messages > 0 && p.messages <= messages.len() && messages_fingerprint(&messages[..p.messages]) == p.fingerprint)
        .then_some((p.messages, p.version))
}

/// The version a flush writes: Redis's, or for a hash the Python seed wrote (no version), the
/// instant of its `last_modified`.
fn version_of(cached: &Cached) -> i64 {
    cached.version.unwrap_or_else(|| cached.conversation.last_modified.as_datetime().timestamp_micros())
}

/// What PostgreSQL would refuse, found before a batch is sent (a hash the seed's Python wrote is
/// not validated on its way in).
fn check(member: &str, cached: &Cached) -> std::result::Result<(), String> {
    let (user_id, conversation_id) =
        split_member(member).ok_or_else(|| format!("{member:?} is not '<user>:<conversation>'"))?;
    validate::user_id(user_id).map_err(|e| e.to_string())?;
    validate::conversation_id(conversation_id).map_err(|e| e.to_string())?;
    validate::conversation(conversation_id, &cached.conversation).map_err(|e| e.to_string())
}

/// The background flusher thread: flushes every `interval` until stopped (SPEC section 4.5).
#[derive(Debug)]
pub struct BackgroundFlusher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl BackgroundFlusher {
    /// Starts the thread. It holds only a weak reference, so a dropped manager ends it.
    pub fn start(target: Weak<dyn Flush>, interval: Duration) -> Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("chat-history-flusher".into())
            .spawn(move || {
                let (lock, condvar) = &*signal;
                loop {
                    let stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                    let (stopped, _) =
                        condvar.wait_timeout_while(stopped, interval, |s| !*s).unwrap_or_else(PoisonError::into_inner);
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    let Some(target) = target.upgrade() else {
                        return;
                    };
                    target.background_flush();
                }
            })
            .map_err(|e| Error::config("cannot start the background flusher thread").with_source(e))?;
        Ok(BackgroundFlusher { stop, handle: Some(handle) })
    }

    /// Stops the thread and waits for a flush in progress to finish.
    pub fn stop(&mut self) {
        let (lock, condvar) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        condvar.notify_all();
        if let Some(handle) = self.handle.take() {
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for BackgroundFlusher {
    fn drop(&mut self) {
        let (lock, condvar) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        condvar.notify_all();
    }
}

/// What the background flusher drives.
pub trait Flush: Send + Sync + std::fmt::Debug {
    /// One periodic flush; reports its own failures.
    fn background_flush(&self);
}
