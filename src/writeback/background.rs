//! The background flusher thread and what it drives.

use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The background flusher thread: flushes every `interval` until stopped (docs/design.md, "Write-back").
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
                    let _call = crate::process::CallGuard::enter();
                    let Some(target) = target.upgrade() else {
                        return;
                    };
                    target.background_flush();
                }
            })
            .map_err(|e| Error::config("cannot start the background flusher thread").with_source(e))?;
        Ok(BackgroundFlusher { stop, handle: Some(handle) })
    }

    /// Stops the thread and waits for a flush in progress to finish, until `deadline`; returns
    /// whether it finished (if not, it is left to end on its own).
    pub fn stop_until(&mut self, deadline: Instant) -> bool {
        let (lock, condvar) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        condvar.notify_all();
        let Some(handle) = self.handle.take() else {
            return true;
        };
        if handle.thread().id() == std::thread::current().id() {
            return true;
        }
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = handle.join();
        true
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
