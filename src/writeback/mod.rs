//! Write-back: dirty conversations in Redis written to PostgreSQL in batches, safely.
//!
//! The argument for why nothing is lost or reordered is in docs/design.md (sections 3 to 5; section 14
//! names the test behind each guarantee).
//! In short: every save gets a version from Redis's clock bumped past the previous one; a flush
//! writes a version to PostgreSQL only when it is newer than the row's and no tombstone is as new;
//! and it marks the Redis copy clean only if the copy still holds the version it wrote.
//!
//! A façade over private modules: [`Flusher`] (batches, transactions, retries), the decisions it
//! takes for one copy without the servers (`resolution`), and the [`BackgroundFlusher`] thread.

mod background;
mod flusher;
mod resolution;

pub use background::{BackgroundFlusher, Flush};
pub use flusher::{Failure, FlushReport, Flusher};
pub use resolution::{REASON_LATE, REASON_OLDER, REASON_OVERWRITTEN, REASON_OWNER, REASON_REPLACED, REASON_SAVED_OVER};
