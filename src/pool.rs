//! The connection pool: r2d2's connection managers, without r2d2's threads.
//!
//! r2d2's `Pool` keeps three worker threads per pool (a `scheduled_thread_pool`), parked on a
//! `parking_lot` condition variable when idle. `parking_lot` records parked threads in one table
//! per process, inside the threads' own thread-local storage. A process forked from a parent with
//! parked workers inherits that table; glibc hands the dead threads' stacks to the child's new
//! threads, whose thread-local storage then lands on the records still linked into the table. The
//! child's next pool (its own workers parking, a `notify_all`) can then walk a list that loops:
//! about one forked child in fifteen hung for good that way (docs/design.md, "Fork"). This pool
//! has no thread at all: a caller that needs a connection opens it, a connection idle past its
//! timeout is closed by the next checkout, and waiting uses the standard library's `Mutex` and
//! `Condvar`, whose state lives in the pool itself. It keeps r2d2's [`ManageConnection`] and
//! [`HandleError`] traits, so the redis crate's connection managers plug in unchanged.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use r2d2::{HandleError, ManageConnection};

/// How a [`Pool`] behaves.
pub struct Builder<M: ManageConnection> {
    max_size: u32,
    connection_timeout: Duration,
    idle_timeout: Option<Duration>,
    error_handler: Box<dyn HandleError<M::Error>>,
}

impl<M: ManageConnection> Default for Builder<M> {
    fn default() -> Self {
        Builder {
            max_size: 10,
            connection_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(300)),
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
                error_handler: self.error_handler,
                state: Mutex::new(State { idle: Vec::new(), open: 0 }),
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
}

impl<M: ManageConnection> Shared<M> {
    fn lock(&self) -> MutexGuard<'_, State<M::Connection>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives up a connection's slot (closed, broken, or never opened) and wakes one waiter.
    fn release_slot(&self) {
        self.lock().open -= 1;
        self.returned.notify_one();
    }
}

impl<M: ManageConnection> Pool<M> {
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

    /// A connection: an idle one, else a new one opened by this caller when the pool has room,
    /// else the first one handed back within `wait`. A failed open is returned at once (and
    /// given to the error handler) rather than retried until the wait runs out: the caller
    /// decides whether to try again.
    pub fn get_timeout(&self, wait: Duration) -> Result<Pooled<M>, PoolError> {
        let shared = &self.shared;
        let deadline = Instant::now() + wait;
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
            if state.open < shared.max_size {
                state.open += 1;
                drop(state);
                return match shared.manager.connect() {
                    Ok(conn) => Ok(Pooled { shared: Arc::clone(shared), conn: Some(conn) }),
                    Err(e) => {
                        shared.release_slot();
                        let why = e.to_string();
                        shared.error_handler.handle_error(e);
                        Err(PoolError::Connect(why))
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PoolError::Timeout(wait));
            }
            state = shared.returned.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
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
        self.shared.lock().idle.push((conn, Instant::now()));
        self.shared.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// Connections are numbers; `fail` makes the next opens fail; `broken` marks them broken.
    #[derive(Default)]
    struct Numbers {
        opened: AtomicU32,
        fail: AtomicBool,
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
            if self.fail.load(Ordering::SeqCst) {
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
