//! The change feed: every Redis tier follows what PostgreSQL commits, whoever commits it (this
//! tier's write-back, another region's, a postgres-mode or Phase 1 instance, an operator's SQL).
//! docs/design.md, "Every cache follows PostgreSQL", argues the design.
//!
//! - `plan`: which recorded changes a page applies and how far the mark moves (pure, tested here)
//! - `follower`: the thread that holds a Redis's lease, reads the changes and applies them
//!
//! PostgreSQL's side is `store::postgres` (`conversation_changes`, filled by `schema.sql`'s
//! triggers); Redis's is `cache` (`follow.lua`, the lease and the mark).

mod follower;
mod plan;

pub use follower::{FeedFigures, Follower, Resolve};
