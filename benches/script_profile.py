"""What `save.lua` spends inside Redis, command by command: the floor under a save.

    .venv/bin/python benches/script_profile.py            # about a minute
    .venv/bin/python benches/script_profile.py --quick    # a smoke run: few iterations, noisy numbers

A throwaway Redis (and PostgreSQL, for the manager that writes the first copy) pinned with this
process to one CPU, like run.py. Our manager saves a 20-message conversation of app-shaped data;
its hash is then the cached copy of every run below. Each run replays a save's own pipeline with
redis-py: the staging `HSET` of that conversation's fields, `EXPIRE`, then `EVALSHA` of the script
with the arguments a re-save of an id Redis holds sends (the user's list cached, so its branch
runs). The variants are `save.lua` cut short (`do return end`) before each step in turn, so
each row is the script's time up to that step and the step's own cost is the difference from the
row before; `INFO commandstats` (reset before each run) gives the µs per call inside Redis. Rows
alternate over several rounds; medians are printed. `backfill.lua` (a miss's copy) is timed the
same way, whole.

Prints a Markdown table and writes benches/results/script_profile.json. Not a test: nothing is
asserted beyond each variant answering as its cut says.
"""

from __future__ import annotations

import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Tuple

import redis

import chat_history_rs
from common import RESULTS, Corpus, Stack, new_conversation_id, new_user_id, parse_args, write_report

SCRIPTS = Path(__file__).resolve().parent.parent / "src" / "cache" / "scripts"

# (what the step does, the line of save.lua it starts at): the script is cut before each in turn.
STEPS: List[Tuple[str, str]] = [
    ("read the staged copy's fingerprints (HMGET)", "local local_owner = ARGV[9] == '1'"),
    ("owner record (GET)", "-- Everything the checks read of the cached copy"),
    ("the cached copy's fields and transcript length (HMGET, HSTRLEN)", "local function at(p, i)"),
    ("Redis's clock (TIME)", "if ARGV[10] ~= '' and now > tonumber(ARGV[10]) then"),
    ("deadline, guard and keep-aside checks (no command on this path)", "local deleted = redis.call('GET', KEYS[8])"),
    ("delete tombstone (GET) and the version", "redis.call('HSET', KEYS[9], unpack(fields))"),
    ("dirty flag and version into the staged copy (HSET)", "redis.call('RENAME', KEYS[9], KEYS[1])"),
    ("staged copy into place (RENAME)", "redis.call('PERSIST', KEYS[1])"),
    ("no TTL on a dirty copy (PERSIST)", "if local_owner then redis.call('SET', KEYS[6], ARGV[2]) end"),
    ("owner record (SET)", "redis.call('SADD', KEYS[2], ARGV[1])"),
    ("dirty set (SADD)", "local first = 0"),
    ("the user's dirty set (SADD)", "redis.call('ZADD', KEYS[7], 'NX', t[1], ARGV[1])"),
    ("dirty since (ZADD NX)", "if deleted then redis.call('DEL', KEYS[8]) end"),
    ("the user's cached list (EXISTS, ZADD, HSET)", "return {1, ver, created, first}"),
]


def usec_per_evalsha(client: redis.Redis, replay, sha: str, iterations: int, warmup: int) -> Tuple[float, object]:
    for _ in range(warmup):
        replay(sha)
    client.config_resetstat()
    reply = None
    for _ in range(iterations):
        reply = replay(sha)
    return float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]), reply


def main() -> None:
    args = parse_args(__doc__)
    iterations, warmup, rounds = (200, 20, 1) if args.quick else (1500, 200, 5)
    stack = Stack().start()
    manager = None
    try:
        manager = chat_history_rs.ChatHistoryManager(
            mode="postgres",
            connection_string=stack.database_url("script_profile"),
            redis_enabled=True,
            redis_connection_string=stack.redis_url(0),
            background_flush=False,
            near_cache_bytes=0,
        )
        user, cid = new_user_id(), new_conversation_id()
        manager.save_conversation(cid, Corpus().conversation(20), user_id=user)
        manager.list_conversations(user_id=user)  # the user's list is cached: the save's list branch runs
        client = redis.Redis(host="127.0.0.1", port=stack.redis.port)
        conv_key = f"conv:{user}:{cid}"
        cached = client.hgetall(conv_key)
        staged_fields = {k: v for k, v in cached.items() if k.decode() not in ("dirty", "ver", "pgn", "pgv", "pgh")}
        staged, token = f"staged:conv:{user}:{cid}:profile", "profile"
        keys = [
            conv_key, "dirty:convs", f"user:{user}:convlist", f"user:{user}:convmeta", f"user:{user}:dirty",
            f"owner:{cid}", "dirty:since", f"deleted:{user}:{cid}", staged, f"late:{user}:{cid}:{token}", "late:convs",
        ]  # fmt: skip
        created_at = cached[b"created_at"].decode()
        entry = client.hget(f"user:{user}:convmeta", cid)
        argv = [
            f"{user}:{cid}", user, created_at, entry, "0", cid, "0", "0", "1", "",
            f"{user}:{cid}:late:{token}", "", "", cached[b"score"].decode(),
        ]  # fmt: skip
        pipe = client.pipeline(transaction=False)

        def replay_save(sha: str) -> object:
            pipe.hset(staged, mapping=staged_fields).expire(staged, 60).evalsha(sha, len(keys), *keys, *argv)
            return pipe.execute()[-1]

        source = (SCRIPTS / "save.lua").read_text()
        variants = [("(the script's call itself: an empty script, the same arguments)", "do return {9} end")]
        for what, line in STEPS:
            if source.count(line) != 1:
                raise SystemExit(f"save.lua changed: the step line {line!r} is not there once; update STEPS")
            variants.append((what, source.replace(line, "do return {9} end\n" + line)))
        variants.append(("the whole script", source))
        shas = [(what, client.script_load(body)) for what, body in variants]
        times: Dict[str, List[float]] = {what: [] for what, _ in variants}
        for _ in range(rounds):
            for i, (what, sha) in enumerate(shas):
                us, reply = usec_per_evalsha(client, replay_save, sha, iterations, warmup)
                expected = 1 if i == len(shas) - 1 else 9
                if not isinstance(reply, list) or reply[0] != expected:
                    raise SystemExit(f"{what}: the script answered {reply!r}")
                times[what].append(us)

        # backfill.lua: a miss's copy, the key deleted before each (no tombstone, no newer row).
        bf_cid = new_conversation_id()
        bf_keys = [
            f"conv:{user}:{bf_cid}", f"owner:{bf_cid}", f"deleted:{user}:{bf_cid}", f"staged:conv:{user}:{bf_cid}:p",
            f"changed:{user}:{bf_cid}",
        ]  # fmt: skip
        bf_sha = client.script_load((SCRIPTS / "backfill.lua").read_text())

        def replay_backfill(sha: str) -> object:
            pipe.delete(bf_keys[0]).hset(bf_keys[3], mapping=staged_fields).expire(bf_keys[3], 3600)
            pipe.evalsha(sha, len(bf_keys), *bf_keys, user, "1", "", "0")
            return pipe.execute()[-1]

        backfill = []
        for _ in range(rounds):
            us, reply = usec_per_evalsha(client, replay_backfill, bf_sha, iterations, warmup)
            if reply != 1:
                raise SystemExit(f"backfill.lua answered {reply!r}")
            backfill.append(us)
    finally:
        if manager is not None:
            manager.close()
        stack.remove()

    rows = []
    before = 0.0
    for i, (what, _) in enumerate(variants):
        median = statistics.median(times[what])
        # The whole script is a total, not a step: no difference from the row before.
        step = None if i == len(variants) - 1 else round(median - before, 2)
        rows.append({"step": what, "cumulative_us": round(median, 2), "step_us": step})
        before = median
    print(f"# save.lua inside Redis, step by step (median of {rounds} rounds of {iterations} calls)\n")
    print("| step | µs inside Redis up to and with it | the step's own µs |")
    print("|---|---:|---:|")
    for row in rows:
        own = "—" if row["step_us"] is None else f"{row['step_us']:.1f}"
        print(f"| {row['step']} | {row['cumulative_us']:.1f} | {own} |")
    print(f"\nbackfill.lua (a miss's copy), whole: {statistics.median(backfill):.1f} µs inside Redis")
    write_report(
        str(RESULTS / "script_profile.json"),
        {
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rounds": rounds,
            "iterations": iterations,
            "save_steps": rows,
            "backfill_us": round(statistics.median(backfill), 2),
        },
    )


if __name__ == "__main__":
    main()
