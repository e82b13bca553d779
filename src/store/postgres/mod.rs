//! PostgreSQL: the source of truth. A pool ([`crate::pool`]) of rust-postgres clients over rustls, the Phase 1
//! schema (the README, "Schema"), and one statement per operation so every save is atomic and costs one
//! round trip.
//!
//! - `changes`: the change feed's reads of `conversation_changes` (docs/design.md, "Every cache follows PostgreSQL")
//! - `connection`: opening, retiring and classifying connections; each one's prepared statements
//! - `schema`: the catalog check and `schema.sql`, the DDL's one copy
//! - `sql`: the statements, and the columns and rows they take and give
//! - `store`: [`PostgresStore`] and its reads, saves, deletes and conflict copies
//! - `write_back`: [`PostgresStore::flush_batch`], the cache's dirty conversations in one statement

mod changes;
mod connection;
mod schema;
mod sql;
mod store;
mod write_back;

pub use changes::{Change, ChangePage, Position};
pub use store::{Conflict, Expect, OwnerRow, PostgresStore};
pub use write_back::{FlushOutcome, WriteBack};
