//! Reads this process served from PostgreSQL while Redis did not answer: the next save of those
//! conversations is guarded (docs/design.md, "Divergence").

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Conversations whose last read this process served from PostgreSQL because Redis did not answer:
/// Redis may hold a newer dirty copy that the caller did not see, so the caller's next save of them
/// must not silently replace it. Bounded, oldest forgotten first.
#[derive(Debug, Default)]
pub(crate) struct Tainted {
    count: AtomicU64,
    state: Mutex<TaintedReads>,
}

/// (user, id) -> the read, and the pairs in the order they were added.
type TaintedReads = (HashMap<(String, String), TaintedRead>, VecDeque<(String, String)>);

/// A read PostgreSQL served while Redis did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TaintedRead {
    /// The version of the row it served.
    pub(crate) version: Option<i64>,
}

/// At most this many tainted reads are remembered.
const MAX_TAINTED: usize = 100_000;

impl Tainted {
    pub(crate) fn add(&self, user_id: &str, conversation_id: &str, version: Option<i64>) {
        let key = (user_id.to_owned(), conversation_id.to_owned());
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, order) = &mut *state;
        if set.insert(key.clone(), TaintedRead { version }).is_none() {
            order.push_back(key);
            if order.len() > MAX_TAINTED {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
        self.count.store(set.len() as u64, Ordering::Release);
    }

    /// The read, when the last read of the conversation was tainted.
    pub(crate) fn get(&self, user_id: &str, conversation_id: &str) -> Option<TaintedRead> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0.get(&(user_id.to_owned(), conversation_id.to_owned())).copied()
    }

    pub(crate) fn remove(&self, user_id: &str, conversation_id: &str) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, order) = &mut *state;
        if set.remove(&(user_id.to_owned(), conversation_id.to_owned())).is_some() {
            order.retain(|(u, c)| !(u == user_id && c == conversation_id));
        }
        self.count.store(set.len() as u64, Ordering::Release);
    }
}
