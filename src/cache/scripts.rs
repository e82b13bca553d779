//! The Lua scripts (one `.lua` file each, under `scripts/`) and the one way they are called: an
//! `EVALSHA` command in a pipeline, sent by [`query_loading`], which loads the scripts and sends the
//! pipeline again when the server does not know one (a `SCRIPT FLUSH`, a restart, a failover to a
//! node that never saw it). A call alone is a pipeline of one.
//!
//! Each script declares every key it touches in KEYS, so on a cluster it runs in the one hash slot
//! those keys share (docs/design.md, "Keys and rows").

use std::sync::LazyLock;

use redis::{Cmd, ConnectionLike, Script};

/// A script: its code and its SHA-1 (what `EVALSHA` names it by).
pub struct Lua {
    script: Script,
    code: &'static str,
}

impl Lua {
    fn new(code: &'static str) -> Self {
        Lua { script: Script::new(code), code }
    }

    /// The SHA-1 `EVALSHA` takes.
    #[must_use]
    pub fn hash(&self) -> &str {
        self.script.get_hash()
    }
}

macro_rules! script {
    ($name:ident, $file:literal, $doc:literal) => {
        #[doc = $doc]
        pub static $name: LazyLock<Lua> = LazyLock::new(|| Lua::new(include_str!(concat!("scripts/", $file))));
    };
}

script!(SAVE, "save.lua", "Stores a staged conversation as dirty: ownership, version, rename, dirty sets, list.");
script!(REFRESH_TTL, "refresh_ttl.lua", "Gives a clean hit its TTL back on servers without `EXPIRE ... GT`.");
script!(BACKFILL, "backfill.lua", "Caches a clean copy read from PostgreSQL unless something newer is there.");
script!(DELETE, "delete.lua", "Removes a conversation from every key of its slot; leaves a short tombstone.");
script!(LIST, "list.lua", "The user's cached list, or nil.");
script!(REBUILD_LIST, "rebuild_list.lua", "Rebuilds the user's list from PostgreSQL's rows and the dirty ids.");
script!(SETTLE, "settle.lua", "Compare-and-clear after a flush.");
script!(ADOPT, "adopt.lua", "Gives a hash another writer changed a version of its own.");
script!(CLAIM, "claim.lua", "Cluster: claims an id in its own slot before the save.");
script!(RELEASE, "release.lua", "Cluster: removes an id's owner record, or gives it a TTL.");
script!(FOLLOW, "follow.lua", "Brings Redis in line with a change PostgreSQL committed that bypassed this Redis.");
script!(FEED_CLAIM, "feed_claim.lua", "Takes or renews the change feed's lease; returns its mark.");
script!(FEED_MARK, "feed_mark.lua", "Records the change feed's mark, for the lease's holder only.");
script!(DROP_CLEAN, "drop_clean.lua", "Drops a conversation's copy unless it is dirty (a full resync).");

/// Every script, loaded on each new connection, so a pipeline rarely meets NOSCRIPT.
pub static ALL: [&LazyLock<Lua>; 14] = [
    &SAVE,
    &REFRESH_TTL,
    &BACKFILL,
    &DELETE,
    &LIST,
    &REBUILD_LIST,
    &SETTLE,
    &ADOPT,
    &CLAIM,
    &RELEASE,
    &FOLLOW,
    &FEED_CLAIM,
    &FEED_MARK,
    &DROP_CLEAN,
];

/// `EVALSHA` of `script` with its keys; the caller appends the arguments.
#[must_use]
pub fn call<K: AsRef<str>>(script: &Lua, keys: &[K]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.hash()).arg(keys.len());
    for key in keys {
        cmd.arg(key.as_ref());
    }
    cmd
}

/// Sends a pipeline; on NOSCRIPT loads every script and sends it once more. Every script here is
/// safe to run again, and on NOSCRIPT none of the pipeline's scripts ran.
pub fn query_loading<T: redis::FromRedisValue>(
    con: &mut dyn ConnectionLike,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<T> {
    match pipe.query(con) {
        Err(e) if e.kind() == redis::ServerErrorKind::NoScript.into() || e.to_string().contains("NOSCRIPT") => {
            load_scripts(con)?;
            pipe.query(con)
        }
        other => other,
    }
}

/// Loads the scripts the server does not have, with one `SCRIPT EXISTS` for all of them (this runs
/// for every new pooled connection).
pub fn load_scripts(con: &mut dyn ConnectionLike) -> redis::RedisResult<()> {
    let mut exists_cmd = redis::cmd("SCRIPT");
    exists_cmd.arg("EXISTS");
    for script in ALL {
        exists_cmd.arg(script.hash());
    }
    let exists: Vec<bool> = exists_cmd.query(con)?;
    for (script, loaded) in ALL.iter().zip(exists) {
        if !loaded {
            redis::cmd("SCRIPT").arg("LOAD").arg(script.code).query::<String>(con)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_has_a_distinct_hash() {
        let mut hashes: Vec<&str> = ALL.iter().map(|s| s.hash()).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), ALL.len());
    }

    /// No script builds a key name: every key a `redis.call` names is `KEYS[...]`, or a local the
    /// script bound to one (so a cluster can tell which slot the script runs in).
    #[test]
    fn every_key_a_script_touches_is_declared_in_keys() {
        const UNKEYED: [&str; 1] = ["TIME"];
        for script in ALL {
            let bound: Vec<&str> = script
                .code
                .lines()
                .filter(|l| l.trim_start().starts_with("local ") && l.contains("KEYS["))
                .flat_map(|l| l.trim_start()["local ".len()..].split('=').next().unwrap_or("").split(','))
                .map(str::trim)
                .collect();
            for (n, line) in script.code.lines().enumerate() {
                for call in line.split("redis.call(").skip(1) {
                    let mut args = call.split(',').map(str::trim);
                    let command = args.next().unwrap_or("").trim_matches('\'');
                    if UNKEYED.contains(&command) || command.ends_with(')') {
                        continue;
                    }
                    let key = args.next().unwrap_or("").split(')').next().unwrap_or("").trim();
                    assert!(
                        key.starts_with("KEYS[") || bound.contains(&key),
                        "line {}: {command} on {key:?}, which is not a declared key:\n{line}",
                        n + 1
                    );
                }
            }
        }
    }
}
