//! The Redis tier: the key layouts, the Lua scripts that make every multi-key change atomic, and
//! the cache's reads, writes and write-back side.

pub mod clock;
mod codec;
pub mod combine;
mod error;
mod flush;
pub mod keys;
pub mod messages_json;
pub mod near;
pub mod nodes;
mod pool;
pub mod redis;
pub mod scripts;
pub mod tracking;
mod writes;
