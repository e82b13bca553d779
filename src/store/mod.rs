//! The durable stores: JSON files (local mode) and PostgreSQL. The Redis cache sits in front of
//! PostgreSQL in [`crate::cache`]; the manager composes them.

pub mod local;
pub mod postgres;
