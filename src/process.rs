//! The process's concerns: the fork gate (a fork waits for the calls in flight, and a forked child
//! opens its own pools; docs/design.md, "Processes").

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Bumped in a forked child (the Python package registers [`after_fork_in_child`] with
/// `os.register_at_fork`): a manager whose pools belong to an older generation shares its sockets
/// with the parent, and opens its own before its next call.
pub(crate) static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

/// The current [`FORK_GENERATION`].
pub(crate) fn fork_generation() -> u64 {
    FORK_GENERATION.load(Ordering::Acquire)
}

/// Calls of any manager in progress in this process (the background flushes included).
static CALLS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// Set while a fork is being prepared: new calls wait until it is done.
static FORKING: AtomicBool = AtomicBool::new(false);

/// Held for the length of a call: a fork waits for the calls in flight to end, so no thread of
/// the parent is inside the product (holding one of its locks, half-way through a pool's
/// bookkeeping) at the instant the child is copied from it.
pub(crate) struct CallGuard(());

impl CallGuard {
    pub(crate) fn enter() -> CallGuard {
        loop {
            while FORKING.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            CALLS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            if !FORKING.load(Ordering::SeqCst) {
                return CallGuard(());
            }
            CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// As [`CallGuard::enter`], but `None` instead of waiting while a fork is prepared: for a
    /// caller holding the GIL, which the forking thread needs to go on.
    pub(crate) fn try_enter() -> Option<CallGuard> {
        CALLS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        if FORKING.load(Ordering::SeqCst) {
            CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(CallGuard(()))
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs in the parent before a fork (`os.register_at_fork`, without the GIL): new calls wait,
/// and the calls in flight get up to `wait` to end. Returns how many were still in flight.
pub fn before_fork(wait: Duration) -> usize {
    FORKING.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + wait;
    loop {
        let in_flight = CALLS_IN_FLIGHT.load(Ordering::SeqCst);
        if in_flight == 0 || Instant::now() >= deadline {
            return in_flight;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs in the parent after a fork: the calls that waited go on.
pub fn after_fork_in_parent() {
    FORKING.store(false, Ordering::SeqCst);
}

/// Runs in a child process right after a fork. Only resets counters: the child has one thread,
/// and any lock another thread of the parent held at the fork stays held in the child.
pub fn after_fork_in_child() {
    CALLS_IN_FLIGHT.store(0, Ordering::SeqCst);
    FORKING.store(false, Ordering::SeqCst);
    FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
}
