//! Flat combining: threads that call the same operation at the same time share one round trip.
//!
//! Up to `max_in_flight` round trips run at once (one per CPU the process may use, so reads still
//! run in parallel on several cores). A caller that finds fewer in flight leads: it sends its
//! request and every request queued meanwhile as one pipeline, hands each waiter its reply, and
//! passes the lead to the first caller that queued while it was busy. A caller alone pays nothing
//! but two uncontended locks; eight Python threads reading at once through one CPU cost Redis one
//! read and one write per batch instead of one each, which is what lets reads scale when the
//! client, Redis and PostgreSQL share a CPU.
//! Each caller leads at most one batch, so no caller waits for more than the batch in flight and
//! its own; and when a batch finds the server gone, the callers queued behind it get the same
//! answer at once instead of each waiting out another timeout. A process forked while a batch was
//! in flight starts over: the batch's leader is not in the child, so nothing would hand it on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, Thread};

enum State<R> {
    Waiting,
    /// This caller sends the next batch.
    Lead,
    Done(R),
}

struct Pending<Q, R> {
    request: Q,
    thread: Thread,
    state: Mutex<State<R>>,
}

struct Queue<Q, R> {
    /// Batches in flight, counting callers handed the lead and about to send one.
    in_flight: usize,
    waiting: VecDeque<Arc<Pending<Q, R>>>,
}

/// Combines concurrent requests of type `Q` into batches; each gets its own `R`.
pub struct Combiner<Q, R> {
    queue: Mutex<Queue<Q, R>>,
    max_in_flight: usize,
    /// The fork generation the queue's state belongs to ([`crate::process::FORK_GENERATION`], moved
    /// in a forked child), and how to read the current one: an atomic load, where asking the process
    /// id was a system call per read.
    generation: AtomicU64,
    current_generation: fn() -> u64,
    /// What a request gets when the batch carrying it could not produce its reply (a panic).
    abandoned: fn() -> R,
    /// Whether a reply says the server is gone; the callers queued meanwhile then get it too.
    outage: fn(&R) -> bool,
    batches: AtomicU64,
    shared: AtomicU64,
}

impl<Q, R> std::fmt::Debug for Combiner<Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combiner")
            .field("batches", &self.batches.load(Ordering::Relaxed))
            .field("shared", &self.shared.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<Q, R: Clone> Combiner<Q, R> {
    /// `max_in_flight` is at least 1.
    pub fn new(max_in_flight: usize, abandoned: fn() -> R, outage: fn(&R) -> bool) -> Self {
        Combiner {
            queue: Mutex::new(Queue { in_flight: 0, waiting: VecDeque::new() }),
            max_in_flight: max_in_flight.max(1),
            generation: AtomicU64::new(crate::process::fork_generation()),
            current_generation: crate::process::fork_generation,
            abandoned,
            outage,
            batches: AtomicU64::new(0),
            shared: AtomicU64::new(0),
        }
    }

    /// Batches sent so far, and requests that shared theirs with another caller's.
    pub fn counts(&self) -> (u64, u64) {
        (self.batches.load(Ordering::Relaxed), self.shared.load(Ordering::Relaxed))
    }

    /// Runs `request` in the next batch. `execute` gets the batch's requests in order and returns
    /// one reply each; whichever caller leads runs its own `execute`, so every caller must pass
    /// the same operation.
    pub fn run(&self, request: Q, execute: impl FnOnce(&[&Q]) -> Vec<R>) -> R {
        let me = Arc::new(Pending { request, thread: thread::current(), state: Mutex::new(State::Waiting) });
        let lead = {
            let mut queue = lock(&self.queue);
            let generation = (self.current_generation)();
            if self.generation.load(Ordering::Relaxed) != generation {
                // Forked: the batches in flight and the callers waiting are the parent's.
                queue.in_flight = 0;
                queue.waiting.clear();
                self.generation.store(generation, Ordering::Relaxed);
            }
            if queue.in_flight < self.max_in_flight {
                queue.in_flight += 1;
                true
            } else {
                queue.waiting.push_back(Arc::clone(&me));
                false
            }
        };
        if !lead {
            loop {
                let mut state = lock(&me.state);
                match std::mem::replace(&mut *state, State::Waiting) {
                    State::Waiting => {
                        drop(state);
                        thread::park();
                    }
                    State::Lead => break,
                    State::Done(reply) => return reply,
                }
            }
        }
        // The caller handed the lead was taken off the queue by the one that handed it.
        let mut batch = vec![Arc::clone(&me)];
        batch.extend(lock(&self.queue).waiting.drain(..));
        let mut lead = Lead { combiner: self, batch, me: &me, mine: None, outage: None };
        let requests: Vec<&Q> = lead.batch.iter().map(|p| &p.request).collect();
        let replies = execute(&requests);
        lead.deliver(replies);
        lead.mine.take().unwrap_or_else(self.abandoned)
    }
}

/// The leader's batch. Dropping it (also by a panic in `execute`) answers every waiter in it and
/// passes the lead on, so no caller is left parked.
struct Lead<'a, Q, R: Clone> {
    combiner: &'a Combiner<Q, R>,
    batch: Vec<Arc<Pending<Q, R>>>,
    me: &'a Arc<Pending<Q, R>>,
    mine: Option<R>,
    /// The batch found the server gone: the reply for everyone queued behind it.
    outage: Option<R>,
}

impl<Q, R: Clone> Lead<'_, Q, R> {
    fn deliver(&mut self, replies: Vec<R>) {
        self.combiner.batches.fetch_add(1, Ordering::Relaxed);
        if self.batch.len() > 1 {
            self.combiner.shared.fetch_add(self.batch.len() as u64, Ordering::Relaxed);
        }
        let mut replies = replies.into_iter();
        for pending in std::mem::take(&mut self.batch) {
            let reply = replies.next().unwrap_or_else(self.combiner.abandoned);
            if self.outage.is_none() && (self.combiner.outage)(&reply) {
                self.outage = Some(reply.clone());
            }
            if Arc::ptr_eq(&pending, self.me) {
                self.mine = Some(reply);
            } else {
                *lock(&pending.state) = State::Done(reply);
                pending.thread.unpark();
            }
        }
    }
}

impl<Q, R: Clone> Drop for Lead<'_, Q, R> {
    fn drop(&mut self) {
        for pending in std::mem::take(&mut self.batch) {
            if !Arc::ptr_eq(&pending, self.me) {
                *lock(&pending.state) = State::Done((self.combiner.abandoned)());
                pending.thread.unpark();
            }
        }
        let mut queue = lock(&self.combiner.queue);
        if let Some(outage) = &self.outage {
            for pending in queue.waiting.drain(..) {
                *lock(&pending.state) = State::Done(outage.clone());
                pending.thread.unpark();
            }
        }
        if let Some(next) = queue.waiting.pop_front() {
            *lock(&next.state) = State::Lead;
            next.thread.unpark();
        } else {
            // Saturating: after a fork reset the count, a batch of the old process may end here.
            queue.in_flight = queue.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::time::Duration;

    #[test]
    fn a_caller_alone_runs_its_own_batch() {
        let combiner: Combiner<u32, u32> = Combiner::new(1, || 0, |_| false);
        assert_eq!(combiner.run(7, |qs| qs.iter().map(|q| **q * 2).collect()), 14);
        assert_eq!(combiner.counts(), (1, 0));
    }

    #[test]
    fn concurrent_callers_share_batches_and_each_gets_its_own_reply() {
        let combiner: Arc<Combiner<u32, u32>> = Arc::new(Combiner::new(1, || u32::MAX, |r| *r == 0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let threads = 8;
        let start = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (combiner, sizes, start) = (Arc::clone(&combiner), Arc::clone(&sizes), Arc::clone(&start));
                thread::spawn(move || {
                    start.wait();
                    for i in 0..200 {
                        let request = u32::try_from(t * 1000 + i).unwrap();
                        let reply = combiner.run(request, |qs| {
                            lock(&sizes).push(qs.len());
                            // A round trip's worth of waiting, so others queue meanwhile.
                            thread::sleep(Duration::from_micros(200));
                            qs.iter().map(|q| **q + 1).collect()
                        });
                        assert_eq!(reply, request + 1, "a reply went to the wrong caller");
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        let sizes = lock(&sizes);
        assert_eq!(sizes.iter().sum::<usize>(), threads * 200, "every request ran exactly once");
        assert!(sizes.iter().any(|&n| n > 1), "no batch was shared: {sizes:?}");
        let (batches, shared) = combiner.counts();
        assert_eq!(batches, sizes.len() as u64);
        assert_eq!(shared, sizes.iter().filter(|&&n| n > 1).sum::<usize>() as u64);
    }

    /// A caller leading a batch that takes 100 ms (a waiter queues meanwhile) and ends with
    /// `finish` of its size; returns once the batch is in flight.
    fn slow_leader(combiner: &Arc<Combiner<u32, u32>>, finish: fn(usize) -> Vec<u32>) -> thread::JoinHandle<u32> {
        let entered = Arc::new(Barrier::new(2));
        let leader = {
            let (combiner, entered) = (Arc::clone(combiner), Arc::clone(&entered));
            thread::spawn(move || {
                combiner.run(1, |qs| {
                    entered.wait();
                    thread::sleep(Duration::from_millis(100));
                    finish(qs.len())
                })
            })
        };
        entered.wait();
        leader
    }

    #[test]
    fn a_panicking_batch_answers_its_waiters_and_passes_the_lead_on() {
        let combiner: Arc<Combiner<u32, u32>> = Arc::new(Combiner::new(1, || u32::MAX, |r| *r == 0));
        let leader = slow_leader(&combiner, |_| panic!("the batch failed"));
        let waiter = {
            let combiner = Arc::clone(&combiner);
            thread::spawn(move || combiner.run(2, |qs| qs.iter().map(|q| **q + 1).collect()))
        };
        assert!(leader.join().is_err(), "the leader's panic reaches its caller");
        // Queued behind the failed batch, so it leads the next one and gets its real reply.
        assert_eq!(waiter.join().unwrap(), 3);
        // And the combiner still works.
        assert_eq!(combiner.run(5, |qs| qs.iter().map(|q| **q + 1).collect()), 6);
    }

    #[test]
    fn callers_queued_behind_an_outage_get_it_at_once() {
        // Reply 0 means "the server is gone"; the slow batch is a timeout.
        let combiner: Arc<Combiner<u32, u32>> = Arc::new(Combiner::new(1, || u32::MAX, |r| *r == 0));
        let leader = slow_leader(&combiner, |n| vec![0; n]);
        let ran = Arc::new(AtomicU64::new(0));
        let waiter = {
            let (combiner, ran) = (Arc::clone(&combiner), Arc::clone(&ran));
            thread::spawn(move || {
                combiner.run(2, |qs| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    qs.iter().map(|q| **q + 1).collect()
                })
            })
        };
        assert_eq!(leader.join().unwrap(), 0);
        assert_eq!(waiter.join().unwrap(), 0, "the queued caller shares the outage");
        assert_eq!(ran.load(Ordering::Relaxed), 0, "and sends nothing to the gone server");
        assert_eq!(combiner.run(5, |qs| qs.iter().map(|q| **q + 1).collect()), 6);
    }

    #[test]
    fn up_to_max_in_flight_batches_run_at_once() {
        let combiner: Arc<Combiner<u32, u32>> = Arc::new(Combiner::new(2, || u32::MAX, |_| false));
        let (running, most) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let handles: Vec<_> = (0..8u32)
            .map(|t| {
                let (combiner, running, most) = (Arc::clone(&combiner), Arc::clone(&running), Arc::clone(&most));
                thread::spawn(move || {
                    for i in 0..50 {
                        let request = t * 100 + i;
                        let reply = combiner.run(request, |qs| {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            thread::sleep(Duration::from_micros(300));
                            running.fetch_sub(1, Ordering::SeqCst);
                            qs.iter().map(|q| **q + 1).collect()
                        });
                        assert_eq!(reply, request + 1);
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2, "two batches overlap, never three");
        let (batches, shared) = combiner.counts();
        assert!(shared > 0 && batches < 400, "batches {batches}, shared {shared}");
    }

    #[test]
    fn a_forked_process_does_not_wait_for_the_parents_batch() {
        // A fork, seen from the combiner: the fork generation moves while a batch is in flight.
        static GENERATION: AtomicU64 = AtomicU64::new(1);
        let mut combiner: Combiner<u32, u32> = Combiner::new(1, || u32::MAX, |_| false);
        combiner.current_generation = || GENERATION.load(Ordering::SeqCst);
        combiner.generation.store(1, Ordering::SeqCst);
        let combiner = Arc::new(combiner);
        let (entered, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let parent = {
            let (combiner, entered, release) = (Arc::clone(&combiner), Arc::clone(&entered), Arc::clone(&release));
            thread::spawn(move || {
                combiner.run(1, |qs| {
                    entered.wait();
                    release.wait(); // in flight until the "child" has read
                    qs.iter().map(|q| **q + 1).collect()
                })
            })
        };
        entered.wait();
        GENERATION.store(2, Ordering::SeqCst);
        let (done, got) = std::sync::mpsc::channel();
        {
            let combiner = Arc::clone(&combiner);
            thread::spawn(move || done.send(combiner.run(5, |qs| qs.iter().map(|q| **q + 1).collect())).unwrap());
        }
        let reply = got.recv_timeout(Duration::from_secs(10));
        release.wait();
        assert_eq!(reply, Ok(6), "the child's read waited for a batch that only the parent had");
        assert_eq!(parent.join().unwrap(), 2);
    }
}
