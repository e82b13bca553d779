//! Every setting of a manager resolved once, with where its value came from: the keyword argument
//! when one was given, else the environment variable, else the default (the README,
//! "Configuration"). The binding's constructors, `chat-history` and the example app all read their
//! settings through [`Resolved`], so they cannot drift apart.
//!
//! A façade over private modules: the table of [`KEYWORDS`] (the public surface, declared once) and
//! the [`Keywords`] a caller gives, the [`Source`] of each value
//! and how one is read (`source`), the [`Resolved`] settings, and the [`Entry`] lines
//! `chat-history config` shows.

mod entries;
mod keywords;
mod resolved;
mod source;

pub use entries::{Entry, Shown};
pub use keywords::{
    DefaultValue, Given, Keyword, Keywords, Kind, DEFAULT_NEAR_CACHE_BYTES, DEFAULT_REDIS_PORT, DEFAULT_REDIS_TTL,
    ENVIRONMENT, KEYWORDS, KEYWORD_NAMES, POSITIONAL, POSTGRES_PARTS, PROVIDER_NAMES,
};
pub use resolved::Resolved;
pub use source::{parse_mode, postgres_from_parts, Environment, ProcessEnv, Source, Sourced};
