//! The Redis tier: the seed's key layout, and Lua scripts that make every multi-key change atomic.

pub mod combine;
pub mod messages_json;
pub mod redis;
