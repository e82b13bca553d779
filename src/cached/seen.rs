//! The version of each conversation this process last read or saved. A save carries it as its
//! base: a copy Redis holds at another version (another instance saved meanwhile, and this
//! process read an older copy, from its near cache say) is replaced only if the new messages
//! extend it; otherwise it is kept aside first (docs/design.md, "Divergence").

use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};

use lru::LruCache;

/// At most this many conversations are remembered, the least recently used forgotten first.
const MAX_SEEN: usize = 100_000;

/// (user, id) -> version, bounded.
#[derive(Debug)]
pub(crate) struct Seen(Mutex<LruCache<(String, String), i64>>);

impl Default for Seen {
    fn default() -> Self {
        Seen(Mutex::new(LruCache::new(NonZeroUsize::new(MAX_SEEN).expect("a positive bound"))))
    }
}

impl Seen {
    /// Records the version read or saved; `None` (a copy without one) forgets the conversation.
    pub(crate) fn record(&self, user_id: &str, conversation_id: &str, version: Option<i64>) {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (user_id.to_owned(), conversation_id.to_owned());
        match version {
            Some(version) => {
                seen.put(key, version);
            }
            None => {
                seen.pop(&key);
            }
        }
    }

    /// The version last read or saved, when remembered.
    pub(crate) fn get(&self, user_id: &str, conversation_id: &str) -> Option<i64> {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        seen.get(&(user_id.to_owned(), conversation_id.to_owned())).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_version_and_forgets_on_none() {
        let seen = Seen::default();
        assert_eq!(seen.get("u", "c"), None);
        seen.record("u", "c", Some(5));
        seen.record("u", "c", Some(7));
        assert_eq!(seen.get("u", "c"), Some(7));
        assert_eq!(seen.get("v", "c"), None);
        seen.record("u", "c", None);
        assert_eq!(seen.get("u", "c"), None);
    }
}
