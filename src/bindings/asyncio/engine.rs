//! The threads behind `AsyncChatHistoryManager`: a tokio runtime whose blocking pool runs core calls,
//! and the glue that lets pyo3-async-runtimes resolve futures through it (the general path of
//! `PyPendingCall::start`; selector event loops take `dispatch`'s faster one).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, Mutex, Once, PoisonError};
use std::task::{Context, Poll};

use pyo3::prelude::*;
use pyo3_async_runtimes::generic::{self, ContextExt};
use pyo3_async_runtimes::TaskLocals;
use tokio::runtime::{Builder, Runtime};

/// Threads that run core calls for every `AsyncChatHistoryManager` of the process. A thousand
/// calls in flight queue for them rather than taking a thread each. Eight match the default Redis
/// pool, and concurrent Redis reads on them share round trips (`cache::combine`); why not more:
/// docs/benchmarks.md. `CHAT_HISTORY_ASYNC_THREADS` overrides it (read once, when the first call
/// starts the pool).
pub(super) const BLOCKING_THREADS: usize = 8;

fn blocking_threads() -> usize {
    std::env::var("CHAT_HISTORY_ASYNC_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(BLOCKING_THREADS)
}

/// What this module runs on in one process: a tokio runtime (one worker, `blocking_threads()` for
/// core calls), and, once the general path is used, one thread that resolves its futures.
pub(super) struct Engine {
    pub(super) runtime: Runtime,
    completions: Completions,
}

/// The engine of this process. A forked child cannot use its parent's (the threads did not come
/// along, docs/design.md, "Processes"), so it is keyed by process id and a child builds its own.
static ENGINE: Mutex<Option<(u32, &'static Engine)>> = Mutex::new(None);

pub(super) fn engine() -> &'static Engine {
    let pid = std::process::id();
    let mut slot = ENGINE.lock().unwrap_or_else(PoisonError::into_inner);
    match *slot {
        Some((owner, engine)) if owner == pid => engine,
        // Leaked on purpose: one per process; a parent's copy in a child must never be dropped,
        // since dropping joins threads that do not exist there.
        _ => {
            let runtime = Builder::new_multi_thread()
                // The async side only awaits a blocking task and hands its result on.
                .worker_threads(1)
                .max_blocking_threads(blocking_threads())
                .thread_name("chat-history-async")
                .build()
                .expect("a tokio runtime without I/O or timer drivers only fails if a thread cannot start");
            let engine: &'static Engine = Box::leak(Box::new(Engine { runtime, completions: Completions::new() }));
            *slot = Some((pid, engine));
            engine
        }
    }
}

type Completion = Box<dyn FnOnce() + Send>;

/// The queue of finished calls whose Python futures are to be resolved. pyo3-async-runtimes
/// resolves each future in a job that takes the GIL; run on many threads at once, those jobs
/// fight the event loop's thread for the GIL and stall it (tens of milliseconds with a thousand
/// calls in flight). One thread runs them instead, many under one GIL acquisition, releasing it
/// between batches so the loop runs.
struct Completions {
    queue: Mutex<VecDeque<Completion>>,
    ready: Condvar,
    worker: Once,
}

/// Completions run under one GIL acquisition; small enough that the loop waits at most a few
/// milliseconds for the GIL, large enough that a burst costs few acquisitions.
const COMPLETION_BATCH: usize = 64;

impl Completions {
    const fn new() -> Self {
        Completions { queue: Mutex::new(VecDeque::new()), ready: Condvar::new(), worker: Once::new() }
    }

    fn push(&'static self, job: Completion) {
        self.worker.call_once(|| {
            std::thread::Builder::new()
                .name("chat-history-complete".to_owned())
                .spawn(|| self.run())
                .expect("cannot start the thread that completes asyncio futures");
        });
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).push_back(job);
        self.ready.notify_one();
    }

    fn run(&self) {
        loop {
            let batch: Vec<Completion> = {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                while queue.is_empty() {
                    queue = self.ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
                }
                let n = queue.len().min(COMPLETION_BATCH);
                queue.drain(..n).collect()
            };
            // Each job attaches again itself; that is a cheap check once this thread holds the GIL.
            Python::attach(|_| batch.into_iter().for_each(|job| job()));
        }
    }
}

/// A task spawned by pyo3-async-runtimes: a tokio task, or a completion job nobody waits for.
pub(super) enum Spawned {
    Task(tokio::task::JoinHandle<()>),
    Queued,
}

impl Future for Spawned {
    type Output = Result<(), tokio::task::JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Spawned::Task(handle) => Pin::new(handle).poll(cx),
            Spawned::Queued => Poll::Ready(Ok(())),
        }
    }
}

/// The pyo3-async-runtimes glue for [`engine`].
pub(super) struct CoreRuntime;

impl generic::Runtime for CoreRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle = Spawned;

    fn spawn<F>(fut: F) -> Self::JoinHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Spawned::Task(engine().runtime.spawn(fut))
    }

    // pyo3-async-runtimes spawns as blocking tasks only the jobs that resolve Python futures.
    fn spawn_blocking<F>(f: F) -> Self::JoinHandle
    where
        F: FnOnce() + Send + 'static,
    {
        engine().completions.push(Box::new(f));
        Spawned::Queued
    }
}

impl ContextExt for CoreRuntime {
    // Task locals serve Rust code that awaits Python coroutines; core calls never do, so there is
    // nothing to scope and the running loop is looked up from Python at each call.
    fn scope<F, R>(_locals: TaskLocals, fut: F) -> Pin<Box<dyn Future<Output = R> + Send>>
    where
        F: Future<Output = R> + Send + 'static,
    {
        Box::pin(fut)
    }

    fn get_task_locals() -> Option<TaskLocals> {
        None
    }
}
