//! The flusher: streams the dirty set in batches, writes each batch to PostgreSQL in one
//! transaction, settles Redis, and retries what PostgreSQL refused with backoff (docs/design.md,
//! sections 3 to 5). What it decides for one copy is in [`super::resolution`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::resolution::{
    check, is_superseded, known_row, resolution, version_of, write_back, Resolution, REASON_LATE, REASON_OLDER,
    REASON_OVERWRITTEN, REASON_OWNER, REASON_REPLACED,
};
use crate::cache::{
    split_late_member, split_member, CacheError, Cached, DirtyEntry, RedisCache, Settle, SettleItem, StoredPrefix,
};
use crate::error::{Backend, Error, ErrorKind, Result};
use crate::model::{is_prefix, messages_fingerprint, Conversation};
use crate::store::postgres::{FlushOutcome, PostgresStore, WriteBack};

/// Longest wait before a conversation PostgreSQL refused is tried again.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);
/// A flush reads the dirty hashes of a batch in one pipeline; that may take longer than a call.
const FLUSH_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Every this many flushes (and on a process's first), a flusher on a cluster checks the dirty index
/// for users missing from it (see [`RedisCache::reindex_dirty_users`]).
const REINDEX_EVERY: u64 = 30;

/// Times a divergence is looked at again when PostgreSQL's row keeps changing under it.
const RESOLVE_ATTEMPTS: usize = 3;

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
    /// Copies kept aside in `conversation_conflicts`.
    pub conflicts: usize,
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
    /// Copies kept aside in `conversation_conflicts`, all runs.
    pub conflicts_kept: AtomicU64,
    /// Set by [`Flusher::cancel`]: a flush in progress stops after its batch.
    cancelled: std::sync::atomic::AtomicBool,
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
            conflicts_kept: AtomicU64::new(0),
            cancelled: std::sync::atomic::AtomicBool::new(false),
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
    /// says so) at `deadline`, or when [`Flusher::cancel`] is called. Fails only when Redis or
    /// PostgreSQL cannot be reached; what was written until then stays written, the rest stays dirty.
    pub fn flush(&self, deadline: Option<Instant>) -> Result<FlushReport> {
        self.run(deadline, false)
    }

    /// [`Flusher::flush`] that also stops after the batch in progress once [`Flusher::cancel`] is
    /// called: the background flusher's, so `close()` does not wait for a whole flush.
    pub fn flush_cancellable(&self, deadline: Option<Instant>) -> Result<FlushReport> {
        self.run(deadline, true)
    }

    fn run(&self, deadline: Option<Instant>, cancellable: bool) -> Result<FlushReport> {
        let Some(_running) = self.wait_turn(deadline) else {
            return Ok(FlushReport { incomplete: true, ..FlushReport::default() });
        };
        let started = Instant::now();
        let mut report = FlushReport::default();
        // On a cluster, now and then: users a crashed process left out of the dirty index.
        if self.flushes.load(Ordering::Relaxed) % REINDEX_EVERY == 0 {
            if let Err(e) = self.redis.reindex_dirty_users() {
                log::debug!("the dirty index could not be checked this time: {}", e.into_error());
            }
        }
        // One node: the late copies have a set of their own (a cluster's are in the dirty sets).
        let late = self.redis.late_members().map_err(CacheError::into_error)?;
        self.flush_late(&late.iter().map(String::as_str).collect::<Vec<_>>(), &mut report)?;
        let mut cursor = 0;
        let mut batches = 0u64;
        loop {
            // SSCAN may return a member twice; the second write finds PostgreSQL current and only
            // settles Redis, so no set of seen members (memory growing with the dirty count) is kept.
            let (next, members) = self.redis.scan_dirty(cursor, self.batch_size).map_err(CacheError::into_error)?;
            let stop = || {
                deadline.is_some_and(|d| Instant::now() >= d) || (cancellable && self.cancelled.load(Ordering::Acquire))
            };
            for chunk in members.chunks(self.batch_size) {
                self.flush_batch(chunk, &mut report)?;
                batches += 1;
                fail::fail_point!("flush.between_batches");
                if batches % 20 == 0 {
                    log::info!(
                        "write-back in progress: {} conversations written, {} failed",
                        report.written,
                        report.failed
                    );
                }
                if stop() {
                    report.incomplete = true;
                    break;
                }
            }
            cursor = next;
            if cursor == 0 || report.incomplete {
                break;
            }
            if stop() {
                report.incomplete = true;
                break;
            }
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if report.written > 0 || report.failed > 0 || report.conflicts > 0 {
            log::info!(
                "write-back: {} conversations written to PostgreSQL, {} failed, {} stale copies dropped, {} copies \
                 kept aside as conflicts in {:.0?}",
                report.written,
                report.failed,
                report.dropped,
                report.conflicts,
                started.elapsed()
            );
        }
        Ok(report)
    }

    /// Flushes the given members now (after Redis came back, the ones whose dirty copy is older
    /// than a write that went straight to PostgreSQL).
    pub fn flush_members(&self, members: &[String]) -> Result<FlushReport> {
        let mut report = FlushReport::default();
        let Some(_running) = self.wait_turn(None) else {
            return Ok(report);
        };
        for chunk in members.chunks(self.batch_size) {
            self.flush_batch(chunk, &mut report)?;
        }
        Ok(report)
    }

    /// One flush at a time per process. Waits for the one in progress, until `deadline`.
    fn wait_turn(&self, deadline: Option<Instant>) -> Option<std::sync::MutexGuard<'_, ()>> {
        loop {
            match self.running.try_lock() {
                Ok(guard) => return Some(guard),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Makes a flush in progress stop after its current batch (`close()` uses it).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Late copies (saves that ran after their deadline, see `save.lua`) into
    /// `conversation_conflicts`, unless PostgreSQL's row holds all their messages; then out of
    /// Redis. One that cannot be read or kept stays, counted as a failure.
    fn flush_late(&self, members: &[&str], report: &mut FlushReport) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        let copies = self.redis.fetch_late(members).map_err(CacheError::into_error)?;
        let mut done = Vec::with_capacity(members.len());
        for (member, copy) in members.iter().zip(copies) {
            let Some((user_id, conversation_id, _)) = split_late_member(member) else { continue };
            let copy = match copy {
                None => {
                    done.push(*member);
                    continue;
                }
                Some(Err(why)) => {
                    self.fail(member, why, report);
                    continue;
                }
                Some(Ok(copy)) => copy,
            };
            // A copy that was live and dirty is one an unguarded save replaced without extending it
            // (see `save.lua`); the others are late saves.
            let (reason, version) = if copy.dirty { (REASON_OVERWRITTEN, copy.version) } else { (REASON_LATE, None) };
            let conv = &copy.conversation;
            let kept = self.postgres.get_any(conversation_id).and_then(|row| {
                let held = row
                    .is_some_and(|(owner, stored, _)| owner == user_id && is_prefix(&conv.messages, &stored.messages));
                if held {
                    Ok(())
                } else {
                    self.keep(conversation_id, user_id, conv, version, reason, report)
                }
            });
            match kept {
                Ok(()) => {
                    self.succeeded(member);
                    done.push(*member);
                }
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => self.fail(member, format!("could not keep the late copy aside: {e}"), report),
            }
        }
        self.redis.drop_late(&done).map_err(CacheError::into_error)
    }

    fn flush_batch(&self, members: &[String], report: &mut FlushReport) -> Result<()> {
        let (late, members): (Vec<&String>, Vec<&String>) =
            members.iter().partition(|m| split_late_member(m).is_some());
        self.flush_late(&late.iter().map(|m| m.as_str()).collect::<Vec<_>>(), report)?;
        let now = Instant::now();
        let due: Vec<String> = {
            let failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
            members.into_iter().filter(|m| failures.get(*m).is_none_or(|f| f.next_attempt <= now)).cloned().collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        let entries = self.redis.fetch_dirty(&due, FLUSH_READ_TIMEOUT).map_err(CacheError::into_error)?;
        fail::fail_point!("flush.after_read");
        let mut settle: Vec<SettleItem> = Vec::new();
        let mut ready: Vec<(String, Cached, bool)> = Vec::new();
        for DirtyEntry { member, content } in entries {
            match content {
                // Deleted (or never there): only the dirty-set entry is left to remove.
                None => settle.push(SettleItem {
                    member,
                    version: String::new(),
                    action: Settle::Drop,
                    stored: None,
                    mark: None,
                }),
                Some(Err(why)) => self.fail(&member, why, report),
                Some(Ok(mut cached)) => match check(&member, &cached) {
                    Ok(()) if cached.foreign => {
                        // Another writer changed the hash: it gets a version of its own first, so
                        // PostgreSQL can tell it from what it already holds (docs/design.md).
                        let (user_id, conversation_id) = split_member(&member).expect("checked members split");
                        match self.redis.adopt(user_id, conversation_id, &cached).map_err(CacheError::into_error)? {
                            Some(version) => {
                                cached.version = Some(version);
                                ready.push((member, cached, true));
                            }
                            None => log::debug!("{member} changed while being flushed; the next flush writes it"),
                        }
                    }
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
        fail::fail_point!("flush.before_settle");
        self.redis.settle(&settle).map_err(CacheError::into_error)
    }

    /// Writes one round; returns the conversations to send again in full.
    fn write_round(
        &self,
        round: Vec<(String, Cached, bool)>,
        settle: &mut Vec<SettleItem>,
        report: &mut FlushReport,
    ) -> Result<Vec<(String, Cached, bool)>> {
        let writes: Vec<WriteBack<'_>> =
            round.iter().map(|(member, cached, full)| write_back(member, cached, *full, known_row(cached))).collect();
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
            let to_resolve = match &outcome {
                Ok(FlushOutcome::Diverged | FlushOutcome::Stale) => true,
                Ok(FlushOutcome::Rebase) => full,
                _ => false,
            };
            let outcome = match outcome {
                _ if to_resolve && self.superseded(&member, &cached) => continue,
                _ if to_resolve => self.resolve(&member, &cached, report),
                other => other,
            };
            let version = version_of(&cached);
            let item = |action, stored| SettleItem {
                member: member.clone(),
                version: cached.version.map(|v| v.to_string()).unwrap_or_default(),
                action,
                stored,
                mark: Some(cached.mark.clone()),
            };
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
                    settle.push(item(Settle::Clean, holds()));
                }
                Ok(FlushOutcome::Current) => {
                    self.succeeded(&member);
                    settle.push(item(Settle::Clean, holds()));
                }
                Ok(FlushOutcome::Rebase) => again.push((member, cached, true)),
                Ok(FlushOutcome::Stale | FlushOutcome::Deleted | FlushOutcome::Diverged) => {
                    report.dropped += 1;
                    self.succeeded(&member);
                    settle.push(item(Settle::Drop, None));
                }
                Ok(FlushOutcome::OtherOwner) => {
                    // Kept aside rather than retried forever: PostgreSQL gave the id to another user.
                    let (user_id, conversation_id) = split_member(&member).expect("checked members split");
                    match self.keep(conversation_id, user_id, &cached.conversation, Some(version), REASON_OWNER, report)
                    {
                        Ok(()) => {
                            report.dropped += 1;
                            self.succeeded(&member);
                            settle.push(item(Settle::Drop, None));
                        }
                        Err(e) if e.is_unavailable() => return Err(e),
                        Err(e) => self.fail(&member, format!("could not keep the copy aside: {e}"), report),
                    }
                }
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) => self.fail(&member, format!("PostgreSQL refused version {version}: {e}"), report),
            }
        }
        Ok(again)
    }

    /// Resolves a copy PostgreSQL would not take as is, against the row PostgreSQL holds: the
    /// newer version stays the conversation, and the other is kept aside in
    /// `conversation_conflicts` unless all its messages are the first messages of the one that
    /// stays (docs/design.md, "Divergence"). Returns what happened to the Redis copy: `Written`,
    /// `Current`, `Stale` (PostgreSQL's row stays; drop it), `Deleted` or `OtherOwner`.
    fn resolve(&self, member: &str, cached: &Cached, report: &mut FlushReport) -> Result<FlushOutcome> {
        let (user_id, conversation_id) = split_member(member).expect("checked members split");
        let version = version_of(cached);
        // Optimistic: each write below is conditional on the row read here; a writer that changed
        // it in between makes the statement say so, and this looks again.
        for _ in 0..RESOLVE_ATTEMPTS {
            let row = self.postgres.get_any(conversation_id)?;
            let row_ref = row.as_ref().map(|(owner, stored, v)| (owner.as_str(), stored.messages.as_slice(), *v));
            let known = match resolution(user_id, version, &cached.conversation.messages, row_ref) {
                Resolution::OtherOwner => return Ok(FlushOutcome::OtherOwner),
                Resolution::Current => return Ok(FlushOutcome::Current),
                Resolution::Older { keep } => {
                    if keep {
                        self.keep(conversation_id, user_id, &cached.conversation, Some(version), REASON_OLDER, report)?;
                    }
                    return Ok(FlushOutcome::Stale);
                }
                Resolution::Newer { keep_row, known } => {
                    if let (true, Some((_, stored, row_version))) = (keep_row, &row) {
                        self.keep(conversation_id, user_id, stored, *row_version, REASON_REPLACED, report)?;
                    }
                    known
                }
            };
            let write = write_back(member, cached, true, known);
            match self.postgres.flush_batch(std::slice::from_ref(&write))?.pop() {
                Some(FlushOutcome::Diverged | FlushOutcome::Stale | FlushOutcome::Rebase) | None => {}
                Some(outcome) => return Ok(outcome),
            }
        }
        Err(Error::new(
            ErrorKind::Database(Backend::Postgres),
            format!("{member} kept changing in PostgreSQL while its divergence was resolved"),
        ))
    }

    /// Whether Redis holds a newer version than the copy this flush read (see [`is_superseded`]).
    /// (and another flusher may have written that save already). Then the copy read is history
    /// the app replaced itself, not a divergence to resolve: nothing is kept aside, nothing
    /// settled, and the next flush writes what Redis holds now. A hash that is gone (a Redis that
    /// restarted empty) or a Redis that does not answer is not that: the copy read may be the only
    /// one left, and is resolved as read.
    fn superseded(&self, member: &str, cached: &Cached) -> bool {
        let (user_id, conversation_id) = split_member(member).expect("checked members split");
        let now = self.redis.version_now(user_id, conversation_id);
        if let Err(e) = &now {
            log::debug!(
                "{member}: could not tell whether Redis still holds the copy read ({})",
                e.clone().into_error()
            );
        }
        let superseded = is_superseded(cached.version, &now);
        if superseded {
            log::debug!("{member} changed in Redis while being flushed; the next flush writes it");
        }
        superseded
    }

    /// Keeps a losing copy in `conversation_conflicts`, counted and logged.
    fn keep(
        &self,
        conversation_id: &str,
        user_id: &str,
        conv: &Conversation,
        version: Option<i64>,
        reason: &str,
        report: &mut FlushReport,
    ) -> Result<()> {
        if self.postgres.keep_conflict(conversation_id, user_id, conv, version, reason)? {
            report.conflicts += 1;
            self.conflicts_kept.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "conversation {conversation_id:?} of user {user_id:?}: a copy with {} messages {reason}; kept in \
                 conversation_conflicts (`chat-history conflicts` lists and restores it)",
                conv.messages.len()
            );
        }
        Ok(())
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
