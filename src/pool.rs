//! The connection pool: r2d2's connection managers, without r2d2's threads.
//!
//! r2d2's `Pool` keeps three worker threads per pool (a `scheduled_thread_pool`), parked on a
//! `parking_lot` condition variable when idle. `parking_lot` records parked threads in one table
//! per process, inside the threads' own thread-local storage. A process forked from a parent with
//! parked workers inherits that table; glibc hands the dead threads' stacks to the child's new
//! threads, whose thread-local storage then lands on the records still linked into the table. The
//! child's next pool (its own workers parking, a `notify_all`) can then walk a list that loops:
//! 11 forked children in 12 hung for good that way in `test_forks_while_the_parent_is_busy_never_hang`
//! (docs/design.md, section 9). This pool keeps no thread: a connection is opened on a thread that
//! ends with the open (so a caller waits at most its timeout, even for a server that accepts and
//! never answers), a connection idle past its timeout is closed by the next checkout, and waiting
//! uses the standard library's `Mutex` and `Condvar`, whose state lives in the pool itself. It
//! keeps r2d2's [`ManageConnection`] and [`HandleError`] traits, and r2d2's behaviour where callers
//! rely on it: the Redis pool tries a failed connect again until the caller's wait runs out.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use r2d2::{HandleError, ManageConnection};

/// How a [`Pool`] behaves.
pub struct Builder<M: ManageConnection> {
    max_size: u32,
    connection_timeout: Duration,
    idle_timeout: Option<Duration>,
    retry_failed_connects: bool,
    error_handler: Box<dyn HandleError<M::Error>>,
}

impl<M: ManageConnection> Default for Builder<M> {
    fn default() -> Self {
        Builder {
            max_size: 10,
            connection_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(300)),
            retry_failed_connects: false,
            error_handler: Box::new(r2d2::NopErrorHandler),
        }
    }
}

impl<M: ManageConnection> Builder<M> {
    /// At most this many connections, checked out, idle or being opened (at least 1).
    #[must_use]
    pub fn max_size(mut self, max_size: u32) -> Self {
        self.max_size = max_size.max(1);
        self
    }

    /// How long [`Pool::get`] waits for a connection to be handed back when all are in use.
    #[must_use]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// An idle connection older than this is closed instead of handed out.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Whether [`Pool::get`] tries again, until its wait runs out, when a connection fails to
    /// open (off: the failure is returned at once).
    #[must_use]
    pub fn retry_failed_connects(mut self, retry: bool) -> Self {
        self.retry_failed_connects = retry;
        self
    }

    /// Told of every connection that could not be opened.
    #[must_use]
    pub fn error_handler(mut self, handler: Box<dyn HandleError<M::Error>>) -> Self {
        self.error_handler = handler;
        self
    }

    /// The pool. Opens nothing: the first [`Pool::get`] connects.
    pub fn build(self, manager: M) -> Pool<M> {
        Pool {
            shared: Arc::new(Shared {
                manager,
                max_size: self.max_size,
                connection_timeout: self.connection_timeout,
                idle_timeout: self.idle_timeout,
                retry_failed_connects: self.retry_failed_connects,
                error_handler: self.error_handler,
                state: Mutex::new(State { idle: Vec::new(), open: 0, waiting: 0 }),
                returned: Condvar::new(),
            }),
        }
    }
}

/// Why [`Pool::get`] returned no connection.
#[derive(Debug)]
pub enum PoolError {
    /// Every connection stayed in use for the whole wait.
    Timeout(Duration),
    /// Opening a connection failed; the text is the manager's error (also given to the handler).
    Connect(String),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Timeout(wait) => {
                write!(f, "every pooled connection stayed in use for {} ms", wait.as_millis())
            }
            PoolError::Connect(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for PoolError {}

/// Connections opened by `M`, shared by the threads of one process.
pub struct Pool<M: ManageConnection> {
    shared: Arc<Shared<M>>,
}

struct Shared<M: ManageConnection> {
    manager: M,
    max_size: u32,
    connection_timeout: Duration,
    idle_timeout: Option<Duration>,
    retry_failed_connects: bool,
    error_handler: Box<dyn HandleError<M::Error>>,
    state: Mutex<State<M::Connection>>,
    /// Signalled when a connection is handed back or a slot freed.
    returned: Condvar,
}

struct State<C> {
    /// Oldest first: a checkout takes the newest (warm, least likely to have been dropped by a
    /// server's idle timeout) and closes the old ones past the pool's idle timeout.
    idle: Vec<(C, Instant)>,
    /// Connections idle, checked out, or being opened.
    open: u32,
    /// Callers waiting on `returned`: a connection handed back wakes one only when there is one
    /// (the standard library's `notify_one` makes a system call whether or not anyone waits, which
    /// every call paid when it handed its connection back).
    waiting: u32,
}

impl<M: ManageConnection> Shared<M> {
    fn lock(&self) -> MutexGuard<'_, State<M::Connection>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives up a connection's slot (closed, broken, or never opened) and wakes one waiter.
    fn release_slot(&self) {
        let mut state = self.lock();
        state.open -= 1;
        self.wake_one(state);
    }

    /// Releases the lock and wakes one caller waiting in [`Pool::get_timeout`], if one waits.
    fn wake_one(&self, state: MutexGuard<'_, State<M::Connection>>) {
        let waiting = state.waiting > 0;
        drop(state);
        if waiting {
            self.returned.notify_one();
        }
    }

    /// Waits on `returned` until `wait` has passed at most, counted among the waiters.
    fn wait<'a>(
        &self,
        mut state: MutexGuard<'a, State<M::Connection>>,
        wait: Duration,
    ) -> MutexGuard<'a, State<M::Connection>> {
        state.waiting += 1;
        let mut state = self.returned.wait_timeout(state, wait).unwrap_or_else(PoisonError::into_inner).0;
        state.waiting -= 1;
        state
    }

    /// A connection that could not be opened: frees its slot, tells the handler; returns why.
    fn open_failed(&self, e: M::Error) -> String {
        self.release_slot();
        let why = e.to_string();
        self.error_handler.handle_error(e);
        why
    }
}

/// Between two tries of a connection that failed to open.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What became of a connection being opened.
enum Opened<C> {
    Ready(C),
    /// It could not be opened (the error went to the handler; its slot is free again).
    Failed(String),
    /// Still opening when the caller's wait ran out; the opening thread pools it or frees its slot.
    Pending,
}

/// The result of an open, handed from its thread to the caller who waits for it.
enum Handoff<C, E> {
    Waiting,
    Done(Result<C, E>),
    /// The caller stopped waiting: the opening thread settles the result itself.
    Abandoned,
}

/// Opens a connection for a slot already counted in `open`, waiting until `deadline` at most.
/// The opening thread is a plain thread that ends with the open: nothing of it stays parked in
/// the process (see the module's notes on fork).
fn open<M: ManageConnection>(shared: &Arc<Shared<M>>, deadline: Instant) -> Opened<M::Connection>
where
    M::Error: Send,
{
    let handoff = Arc::new((Mutex::new(Handoff::Waiting), Condvar::new()));
    let spawned = {
        let (shared, handoff) = (Arc::clone(shared), Arc::clone(&handoff));
        std::thread::Builder::new().name("chat-history-connect".into()).spawn(move || {
            let result = shared.manager.connect();
            let mut slot = handoff.0.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(*slot, Handoff::Abandoned) {
                drop(slot);
                match result {
                    Ok(conn) => {
                        let mut state = shared.lock();
                        state.idle.push((conn, Instant::now()));
                        shared.wake_one(state);
                    }
                    Err(e) => {
                        shared.open_failed(e);
                    }
                }
            } else {
                *slot = Handoff::Done(result);
                handoff.1.notify_one();
            }
        })
    };
    let result = if spawned.is_ok() {
        let mut slot = handoff.0.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Handoff::Done(_) = &*slot {
                let Handoff::Done(result) = std::mem::replace(&mut *slot, Handoff::Waiting) else { unreachable!() };
                break result;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *slot = Handoff::Abandoned;
                return Opened::Pending;
            }
            slot = handoff.1.wait_timeout(slot, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    } else {
        // No thread to be had (a process limit): open it here, unbounded by the wait.
        shared.manager.connect()
    };
    match result {
        Ok(conn) => Opened::Ready(conn),
        Err(e) => Opened::Failed(shared.open_failed(e)),
    }
}

impl<M: ManageConnection> Pool<M>
where
    M::Error: Send,
{
    /// The defaults: 10 connections, a 30 s wait, idle connections closed after 5 min.
    #[must_use]
    pub fn builder() -> Builder<M> {
        Builder::default()
    }

    /// The most connections this pool opens.
    #[must_use]
    pub fn max_size(&self) -> u32 {
        self.shared.max_size
    }

    /// A connection, waiting at most the pool's connection timeout for one to be handed back.
    pub fn get(&self) -> Result<Pooled<M>, PoolError> {
        self.get_timeout(self.shared.connection_timeout)
    }

    /// A connection: an idle one, else a new one when the pool has room, else the first one
    /// handed back within `wait`. A new connection is opened on a thread of its own while the
    /// caller waits at most until `wait` runs out, so a server that accepts and never answers
    /// (a stalled link, a PostgreSQL stuck in its startup) costs the wait and no more; a
    /// connection that opens after the caller gave up is pooled. A failed open is returned at
    /// once, or, with [`Builder::retry_failed_connects`], tried again until the wait runs out
    /// (a server restarting within it costs the caller nothing but the wait).
    pub fn get_timeout(&self, wait: Duration) -> Result<Pooled<M>, PoolError> {
        let shared = &self.shared;
        let deadline = Instant::now() + wait;
        let mut failed: Option<String> = None;
        let mut state = shared.lock();
        loop {
            let expired = match shared.idle_timeout {
                Some(limit) => {
                    let now = Instant::now();
                    let count = state.idle.iter().take_while(|(_, since)| now.duration_since(*since) >= limit).count();
                    state.open -= u32::try_from(count).unwrap_or(u32::MAX);
                    state.idle.drain(..count).map(|(conn, _)| conn).collect()
                }
                None => Vec::new(),
            };
            if !expired.is_empty() {
                // Closing may write to the socket (PostgreSQL's Terminate): not under the lock.
                drop(state);
                drop(expired);
                shared.returned.notify_all();
                state = shared.lock();
                continue;
            }
            if let Some((conn, _)) = state.idle.pop() {
                return Ok(Pooled { shared: Arc::clone(shared), conn: Some(conn) });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.open < shared.max_size && !(failed.is_some() && left.is_zero()) {
                state.open += 1;
                drop(state);
                match open(shared, deadline) {
                    Opened::Ready(conn) => return Ok(Pooled { shared: Arc::clone(shared), conn: Some(conn) }),
                    Opened::Failed(why) if !shared.retry_failed_connects => return Err(PoolError::Connect(why)),
                    Opened::Failed(why) => {
                        failed = Some(why);
                        state = shared.lock();
                        let pause = deadline.saturating_duration_since(Instant::now()).min(CONNECT_RETRY_PAUSE);
                        if !pause.is_zero() {
                            state = shared.wait(state, pause);
                        }
                        continue;
                    }
                    // A connection still opening when the wait ran out: the server accepted and did
                    // not finish the handshake (a plain server behind TLS, say), which is not a pool
                    // whose connections all stayed in use.
                    Opened::Pending => {
                        return Err(PoolError::Connect(failed.unwrap_or_else(|| {
                            format!("a new connection did not finish opening within {} ms", wait.as_millis())
                        })))
                    }
                }
            }
            if left.is_zero() {
                return Err(failed.map_or(PoolError::Timeout(wait), PoolError::Connect));
            }
            state = shared.wait(state, left);
        }
    }

    /// Connections idle and open (checked out, idle or being opened), for tests and stats.
    #[must_use]
    pub fn counts(&self) -> (usize, u32) {
        let state = self.shared.lock();
        (state.idle.len(), state.open)
    }
}

/// A checked-out connection; dropped, it goes back to the pool, or is closed when the manager
/// says it is broken.
pub struct Pooled<M: ManageConnection> {
    shared: Arc<Shared<M>>,
    conn: Option<M::Connection>,
}

impl<M: ManageConnection> std::ops::Deref for Pooled<M> {
    type Target = M::Connection;

    fn deref(&self) -> &M::Connection {
        self.conn.as_ref().expect("a pooled connection is present until dropped")
    }
}

impl<M: ManageConnection> std::ops::DerefMut for Pooled<M> {
    fn deref_mut(&mut self) -> &mut M::Connection {
        self.conn.as_mut().expect("a pooled connection is present until dropped")
    }
}

impl<M: ManageConnection> Drop for Pooled<M> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        if self.shared.manager.has_broken(&mut conn) {
            drop(conn);
            self.shared.release_slot();
            return;
        }
        let mut state = self.shared.lock();
        state.idle.push((conn, Instant::now()));
        self.shared.wake_one(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// Connections are numbers. Each open takes `delay`; `fail` makes opens fail, and so does a
    /// positive `failures`, counting down; `broken` marks connections broken.
    #[derive(Default)]
    struct Numbers {
        opened: AtomicU32,
        delay: Duration,
        fail: AtomicBool,
        failures: AtomicU32,
        broken: AtomicBool,
    }

    #[derive(Debug)]
    struct Refused;

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connection refused")
        }
    }

    impl std::error::Error for Refused {}

    impl ManageConnection for Numbers {
        type Connection = u32;
        type Error = Refused;

        fn connect(&self) -> Result<u32, Refused> {
            std::thread::sleep(self.delay);
            let counted = self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            if self.fail.load(Ordering::SeqCst) || counted {
                return Err(Refused);
            }
            Ok(self.opened.fetch_add(1, Ordering::SeqCst))
        }

        fn is_valid(&self, _: &mut u32) -> Result<(), Refused> {
            Ok(())
        }

        fn has_broken(&self, _: &mut u32) -> bool {
            self.broken.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn an_open_that_outlasts_the_wait_times_out_and_its_connection_is_pooled_later() {
        let pool =
            Pool::builder().max_size(1).build(Numbers { delay: Duration::from_millis(300), ..Numbers::default() });
        let started = Instant::now();
        let error = pool.get_timeout(Duration::from_millis(50)).err().expect("the open outlasts the wait");
        assert_eq!(error.to_string(), "a new connection did not finish opening within 50 ms");
        assert!(started.elapsed() < Duration::from_millis(250), "the caller waited for the open");
        assert_eq!(pool.counts(), (0, 1), "the slot stays taken while the open runs");
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(pool.counts(), (1, 1), "the late connection is pooled");
        assert_eq!(*pool.get_timeout(Duration::from_millis(10)).unwrap(), 0);
    }

    #[test]
    fn failed_opens_are_tried_again_until_the_wait_runs_out_when_asked() {
        let retrying = Pool::builder()
            .max_size(1)
            .retry_failed_connects(true)
            .build(Numbers { failures: AtomicU32::new(2), ..Numbers::default() });
        assert_eq!(*retrying.get_timeout(Duration::from_secs(5)).unwrap(), 0, "the third open succeeds");

        let failing = Pool::builder()
            .max_size(1)
            .retry_failed_connects(true)
            .build(Numbers { failures: AtomicU32::new(1000), ..Numbers::default() });
        let started = Instant::now();
        let error = failing.get_timeout(Duration::from_millis(300)).err().expect("every open fails");
        assert!(started.elapsed() >= Duration::from_millis(300), "gave up before the wait ran out");
        assert_eq!(error.to_string(), "connection refused", "the last open's error, not a bare timeout");
        assert_eq!(failing.counts(), (0, 0));
    }

    fn pool(max: u32) -> Pool<Numbers> {
        Pool::builder().max_size(max).connection_timeout(Duration::from_millis(50)).build(Numbers::default())
    }

    #[test]
    fn a_returned_connection_is_handed_out_again() {
        let pool = pool(2);
        let first = *pool.get().unwrap();
        assert_eq!(*pool.get().unwrap(), first);
        assert_eq!(pool.counts(), (1, 1));
    }

    #[test]
    fn never_more_than_max_size_and_a_full_pool_times_out() {
        let pool = pool(2);
        let a = pool.get().unwrap();
        let b = pool.get().unwrap();
        assert_ne!(*a, *b);
        assert!(matches!(pool.get(), Err(PoolError::Timeout(_))));
        drop(a);
        assert_eq!(pool.counts(), (1, 2));
        let c = pool.get().unwrap();
        assert_eq!(pool.counts(), (0, 2));
        drop((b, c));
    }

    #[test]
    fn a_waiter_gets_the_connection_handed_back() {
        let pool =
            Arc::new(Pool::builder().max_size(1).connection_timeout(Duration::from_secs(5)).build(Numbers::default()));
        let held = pool.get().unwrap();
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || *pool.get().unwrap())
        };
        std::thread::sleep(Duration::from_millis(50));
        let number = *held;
        drop(held);
        assert_eq!(waiter.join().unwrap(), number);
    }

    #[test]
    fn a_broken_connection_is_closed_and_its_slot_freed() {
        let pool = pool(1);
        let conn = pool.get().unwrap();
        pool.shared.manager.broken.store(true, Ordering::SeqCst);
        drop(conn);
        assert_eq!(pool.counts(), (0, 0));
        pool.shared.manager.broken.store(false, Ordering::SeqCst);
        assert_eq!(*pool.get().unwrap(), 1, "a new connection, not the broken one");
    }

    #[test]
    fn a_failed_open_returns_at_once_frees_its_slot_and_is_reported() {
        #[derive(Default, Clone)]
        struct Count(Arc<AtomicU32>);
        impl HandleError<Refused> for Count {
            fn handle_error(&self, _: Refused) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        impl std::fmt::Debug for Count {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("Count")
            }
        }
        let reported = Count::default();
        let pool = Pool::builder()
            .max_size(1)
            .connection_timeout(Duration::from_secs(30))
            .error_handler(Box::new(reported.clone()))
            .build(Numbers::default());
        pool.shared.manager.fail.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let error = pool.get().err().expect("the open fails");
        assert!(started.elapsed() < Duration::from_secs(10), "waited out the timeout instead of returning");
        assert_eq!(error.to_string(), "connection refused");
        assert_eq!(reported.0.load(Ordering::SeqCst), 1);
        assert_eq!(pool.counts(), (0, 0));
        pool.shared.manager.fail.store(false, Ordering::SeqCst);
        assert!(pool.get().is_ok());
    }

    #[test]
    fn idle_connections_past_the_idle_timeout_are_closed_by_the_next_checkout() {
        let pool = Pool::builder().max_size(3).idle_timeout(Some(Duration::from_millis(30))).build(Numbers::default());
        let (a, b) = (pool.get().unwrap(), pool.get().unwrap());
        drop((a, b));
        assert_eq!(pool.counts(), (2, 2));
        std::thread::sleep(Duration::from_millis(60));
        let fresh = pool.get().unwrap();
        assert_eq!(*fresh, 2, "both idle connections were past their timeout");
        assert_eq!(pool.counts(), (0, 1));
    }

    #[test]
    fn many_threads_share_a_small_pool_without_exceeding_it() {
        let pool =
            Arc::new(Pool::builder().max_size(3).connection_timeout(Duration::from_secs(10)).build(Numbers::default()));
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let conn = pool.get().unwrap();
                        assert!(pool.counts().1 <= 3);
                        drop(conn);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        assert!(pool.shared.manager.opened.load(Ordering::SeqCst) <= 3);
        let (idle, open) = pool.counts();
        assert_eq!(u32::try_from(idle).unwrap(), open, "every connection is back");
    }
}
