//! What a page of recorded changes does: which changes are applied, and where the mark goes.
//!
//! Change ids are handed out in the order statements run, not the order transactions commit, so
//! a reader that kept "the highest id seen" would skip a transaction that took its id early and
//! committed late. The mark is kept in transaction ids instead, and moves only up to the horizon
//! (the oldest transaction still running): every transaction below it has ended, so every change
//! below it that will ever exist is visible now. Changes above the horizon that are already
//! committed are applied at once too (a long transaction elsewhere must not hold the feed up), and
//! remembered so they are not applied twice; applying one twice would be harmless anyway.

use std::collections::{HashMap, HashSet};

use crate::cache::Bypass;
use crate::store::postgres::{Change, ChangePage, Position};

/// How many changes above the horizon are remembered; past that they wait for the horizon.
const MAX_EARLY: usize = 100_000;

/// The mark as stored in Redis: the position, when it was reached (Unix milliseconds), which says
/// whether the changes after it may have been pruned, and PostgreSQL's timeline then, which says
/// whether its transaction ids still mean the same transactions (a promoted replica or a restore
/// starts a new timeline, and may hand out again ids the mark has passed). A mark an earlier build
/// wrote has no timeline: it takes the one it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mark {
    pub(super) at: Position,
    pub(super) reached_ms: i64,
    pub(super) timeline: Option<i64>,
}

impl Mark {
    pub(super) fn parse(text: &str) -> Option<Mark> {
        let parts: Vec<i64> = text.split(':').map(str::parse::<i64>).collect::<Result<_, _>>().ok()?;
        let (txid, change_id, reached_ms, timeline) = match parts[..] {
            [txid, change_id, reached_ms] => (txid, change_id, reached_ms, None),
            [txid, change_id, reached_ms, timeline] => (txid, change_id, reached_ms, Some(timeline)),
            _ => return None,
        };
        Some(Mark { at: Position { txid, change_id }, reached_ms, timeline })
    }

    pub(super) fn render(self) -> String {
        let Mark { at, reached_ms, timeline } = self;
        match timeline {
            Some(timeline) => format!("{}:{}:{reached_ms}:{timeline}", at.txid, at.change_id),
            None => format!("{}:{}:{reached_ms}", at.txid, at.change_id),
        }
    }
}

/// Changes applied above the horizon, by change id, with their transaction id.
#[derive(Debug, Default)]
pub(super) struct Early(HashMap<i64, i64>);

/// What to do with a page.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    /// The Redis-side changes to apply (one per conversation and user).
    pub(super) apply: Vec<Bypass>,
    /// The position every change up to which has been applied once `apply` is.
    pub(super) next: Position,
    /// The page was full and the mark moved: read the next one now.
    pub(super) more: bool,
}

/// Plans `page`, read after `from` with `limit`, given the changes applied early before.
pub(super) fn plan(page: &ChangePage, from: Position, limit: usize, early: &mut Early) -> Plan {
    let mut apply: Vec<Bypass> = Vec::new();
    // The first change of each conversation and user in the page is applied (what PostgreSQL
    // holds now answers for the rest); a set, since a page holds thousands.
    let mut planned: HashSet<(String, String)> = HashSet::new();
    let mut next = from;
    for change in &page.changes {
        let settled = change.at.txid < page.horizon;
        if settled {
            next = next.max(change.at);
            if early.0.remove(&change.at.change_id).is_some() {
                continue;
            }
        } else if early.0.contains_key(&change.at.change_id) || early.0.len() >= MAX_EARLY {
            continue;
        } else {
            early.0.insert(change.at.change_id, change.at.txid);
        }
        for bypass in bypasses(change) {
            if planned.insert((bypass.user_id.clone(), bypass.conversation_id.clone())) {
                apply.push(bypass);
            }
        }
    }
    let full = page.changes.len() >= limit;
    if !full {
        // Every settled change after `from` was in the page.
        next = next.max(Position { txid: page.horizon, change_id: -1 });
    }
    early.0.retain(|_, txid| *txid >= next.txid);
    Plan { apply, next, more: full && next > from }
}

/// What a change means for a Redis copy: PostgreSQL's row (its version) or its delete (the
/// tombstone's version).
fn bypasses(change: &Change) -> Vec<Bypass> {
    let id = &change.conversation_id;
    match (&change.row, &change.user_id) {
        (Some((owner, version)), user) => {
            // A row without a version predates the triggers, which give every write one.
            let mut out = vec![Bypass {
                user_id: owner.clone(),
                conversation_id: id.clone(),
                version: version.unwrap_or(0),
                deleted: false,
            }];
            if let Some(user) = user.as_ref().filter(|u| *u != owner) {
                // Given to another user: the old owner's clean copy goes, a dirty one is flushed
                // (and kept aside, the id being another's).
                out.push(Bypass {
                    user_id: user.clone(),
                    conversation_id: id.clone(),
                    version: i64::MAX,
                    deleted: false,
                });
            }
            out
        }
        (None, Some(user)) => vec![Bypass {
            user_id: user.clone(),
            conversation_id: id.clone(),
            // A tombstone pruned since: nothing saved before the delete may stay.
            version: change.tombstone.unwrap_or(i64::MAX),
            deleted: true,
        }],
        (None, None) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(txid: i64, change_id: i64, id: &str, version: Option<i64>) -> Change {
        Change {
            at: Position { txid, change_id },
            conversation_id: id.into(),
            user_id: Some("u".into()),
            row: version.map(|v| ("u".into(), Some(v))),
            tombstone: if version.is_none() { Some(99) } else { None },
        }
    }

    fn start() -> Position {
        Position { txid: 10, change_id: -1 }
    }

    #[test]
    fn marks_round_trip_and_junk_is_refused() {
        let mark = Mark { at: Position { txid: 12, change_id: 7 }, reached_ms: 1_700_000_000_000, timeline: Some(2) };
        assert_eq!(Mark::parse(&mark.render()), Some(mark));
        let earlier = Mark { timeline: None, ..mark };
        assert_eq!(Mark::parse("12:7:1700000000000"), Some(earlier));
        assert_eq!(Mark::parse(&earlier.render()), Some(earlier));
        for junk in ["", "1:2", "1:2:3:4:5", "a:2:3", "1:2:3:x"] {
            assert_eq!(Mark::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn an_empty_page_moves_the_mark_to_the_horizon() {
        let page = ChangePage { horizon: 15, timeline: 1, changes: vec![] };
        let plan = plan(&page, start(), 100, &mut Early::default());
        assert_eq!(plan.next, Position { txid: 15, change_id: -1 });
        assert!(plan.apply.is_empty() && !plan.more);
    }

    /// The outbox trap: transaction 12 took change id 5 and is still running while 13 (change id
    /// 6) committed. The mark may not pass 12, or 12's change would never be read.
    #[test]
    fn a_transaction_that_commits_late_is_not_skipped() {
        let mut early = Early::default();
        let page = ChangePage {
            horizon: 12,
            timeline: 1,
            changes: vec![change(11, 4, "a", Some(1)), change(13, 6, "b", Some(2))],
        };
        let first = plan(&page, start(), 100, &mut early);
        assert_eq!(first.next, Position { txid: 12, change_id: -1 });
        // Both applied now: "b" early, since it is committed.
        assert_eq!(first.apply.len(), 2);
        // Transaction 12 commits; the horizon passes both.
        let page = ChangePage {
            horizon: 14,
            timeline: 1,
            changes: vec![change(12, 5, "c", Some(3)), change(13, 6, "b", Some(2))],
        };
        let second = plan(&page, first.next, 100, &mut early);
        let ids: Vec<&str> = second.apply.iter().map(|b| b.conversation_id.as_str()).collect();
        assert_eq!(ids, ["c"], "12's change is applied, 13's not again");
        assert_eq!(second.next, Position { txid: 14, change_id: -1 });
        assert!(early.0.is_empty());
    }

    #[test]
    fn a_full_page_moves_the_mark_to_its_last_settled_change_and_asks_for_more() {
        let page = ChangePage {
            timeline: 1,
            horizon: 20,
            changes: vec![change(11, 1, "a", Some(1)), change(11, 2, "a", Some(1)), change(12, 3, "b", Some(2))],
        };
        let plan = plan(&page, start(), 3, &mut Early::default());
        assert_eq!(plan.next, Position { txid: 12, change_id: 3 });
        assert!(plan.more);
        assert_eq!(plan.apply.len(), 2, "one per conversation");
    }

    #[test]
    fn a_full_page_above_the_horizon_waits_for_it() {
        let mut early = Early::default();
        let page = ChangePage {
            horizon: 11,
            timeline: 1,
            changes: vec![change(12, 1, "a", Some(1)), change(13, 2, "b", Some(1))],
        };
        let plan = plan(&page, start(), 2, &mut early);
        assert_eq!(plan.next, start());
        assert!(!plan.more);
        assert_eq!(early.0.len(), 2);
    }

    #[test]
    fn deletes_carry_the_tombstone_and_a_row_given_away_drops_the_old_owners_copy() {
        let page = ChangePage { horizon: 20, timeline: 1, changes: vec![change(11, 1, "gone", None)] };
        let apply = plan(&page, start(), 10, &mut Early::default()).apply;
        assert_eq!(apply, [Bypass { user_id: "u".into(), conversation_id: "gone".into(), version: 99, deleted: true }]);
        let mut moved = change(11, 1, "x", Some(5));
        moved.row = Some(("v".into(), Some(5)));
        let page = ChangePage { horizon: 20, timeline: 1, changes: vec![moved] };
        let apply = plan(&page, start(), 10, &mut Early::default()).apply;
        assert_eq!(apply.len(), 2);
        assert_eq!((apply[1].user_id.as_str(), apply[1].version), ("u", i64::MAX));
    }
}
