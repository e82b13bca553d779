//! chat-history-rs: LLM chat conversations in local JSON files, PostgreSQL, or Redis over
//! PostgreSQL with write-back, behind the Phase 1 `ChatHistoryManager` API.
//!
//! The core (everything but [`bindings`]) is plain synchronous Rust over connection pools of its own ([`pool`]) and has no
//! Python in it; `cargo test` exercises it without an interpreter. The `python` feature adds the
//! pyo3 binding layer that maturin builds into `chat_history_rs._core`.
//!
//! - [`model`]: conversations, messages, canonical timestamps
//! - [`validate`]: what PostgreSQL would refuse, refused early
//! - [`config`]: settings from keyword arguments and the environment, connection strings, TLS
//! - [`credentials`]: credentials that expire, from a caller's provider
//! - [`pool`]: connection pools without threads, safe across a fork
//! - [`store`]: JSON files and PostgreSQL
//! - [`cache`]: the Redis tier
//! - [`writeback`]: flushing dirty conversations to PostgreSQL
//! - [`feed`]: every Redis tier following what PostgreSQL commits
//! - [`manager`]: the tiers composed

pub mod cache;
mod cached;
pub mod config;
pub mod credentials;
pub mod error;
pub mod feed;
pub mod manager;
pub mod model;
pub mod pool;
pub mod process;
pub mod stats;
pub mod store;
pub mod validate;
pub mod writeback;

#[cfg(feature = "python")]
mod bindings;

pub use config::{Mode, Settings};
pub use error::{Backend, Error, ErrorKind, Result};
pub use manager::{ChatHistory, Fetched};
pub use model::{Conversation, Message, Role, Timestamp};
pub use stats::{CacheStats, Stats};
