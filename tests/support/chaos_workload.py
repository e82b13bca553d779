"""The workload of the randomized fault checker (test_chaos.py): app-shaped sessions that record every call.

A worker plays several users' browser tabs. Each conversation has one writing tab at a time (its worker); the
same users are played by workers in several threads and processes. A worker in the test process reaches both app
instances: a tab's request goes to its home instance, and now and then (SWITCH_CHANCE) to the other one, as a
load balancer without sticky sessions sends it, so one conversation is saved through two instances. Per step a
worker does one of:

    turn     get_conversation -> append a user message and an assistant reply (unique content) -> save
    rename   get_conversation -> change the title -> save
    delete   delete_conversation (after an acknowledged delete the id is never used again)
    (a conversation of MAX_MESSAGES is left as it is, and the tab moves on to a new one)
    flush    flush_dirty_conversations()
    list     list_conversations(user)
    intrude  (the intruder worker only) read, save or delete another user's id

Every call is recorded as an Op: kind, user, id, instance, start and end (time.time()), outcome ("ok" or the
exception), and for saves the messages acknowledged for the first time, the title, and a digest of the whole
transcript saved (so the checker can tell which save the final conversation is). A read or list that returns
content tagged for another user is kept with what leaked (`foreign`), for the checker's LEAK rule.

Run as a script (`python chaos_workload.py CONFIG.json`) it is a worker process: it opens its own manager,
runs its workers until the stop file appears or the time is up, and writes its ops as JSON lines, then one
line with its call counts, hung threads and its manager's stats().
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

# Ops per kind the workers choose from (weights); the intruder adds "intrude".
STEP_WEIGHTS = {"turn": 60, "rename": 8, "delete": 3, "flush": 5, "list": 10}
READ_KINDS = ("get", "list", "intrude-get")
SLOW_SECONDS = 1.0  # a read this slow is kept in the history even when it succeeded (the checker times it)
MAX_MESSAGES = 24  # a conversation this long is left alone (kept) and a new one begun
LIVE_PER_WORKER = 3  # conversations a worker keeps going at once
INTRUDER_INDEX = 0xEE  # the worker index in the intruder's own ids
SWITCH_CHANCE = 0.25  # a tab's request served by another instance than its home one


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def user_tag(user_id: str) -> str:
    """The prefix of every message content written for this user: a read holding another tag is a leak."""
    return f"<{user_id}>"


def utc_iso(value: str) -> str:
    """A message time as the product stores it (`Timestamp` in src/model.rs): the UTC instant's isoformat()."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat()


def transcript_digest(messages) -> str:
    """A short fingerprint of a whole transcript: [(role, content, time)] with times in the stored form."""
    text = json.dumps([[role, content, utc_iso(at)] for role, content, at in messages], separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def make_id(worker_index: int, user_index: int, counter: int) -> str:
    """8 hex characters, like the app's ids: worker (2), user (1), counter (5). Never reused within a run."""
    return f"{worker_index:02x}{user_index:01x}{counter:05x}"


@dataclass
class Op:
    worker: str
    kind: str
    user: str
    cid: Optional[str]
    t0: float
    t1: float = 0.0
    ok: bool = False
    error: Optional[str] = None  # "TypeName: message"
    saved: Optional[list] = None  # saves: [[role, content, time], ...] acknowledged here for the first time
    size: Optional[int] = None  # saves: how many messages the saved conversation held
    title: Optional[str] = None
    note: Optional[str] = None  # e.g. "read returned None", "stale read: 4 < 6 messages"
    digest: Optional[str] = None  # saves: transcript_digest of every message the saved conversation held
    via: Optional[str] = None  # the instance (manager) that served the call
    foreign: Optional[list] = None  # reads and lists: what they returned that belongs to another user

    @property
    def error_type(self) -> Optional[str]:
        return self.error.split(":", 1)[0] if self.error else None


@dataclass
class Tab:
    """One conversation a worker writes: what its last acknowledged save held."""

    user_index: int
    cid: str
    messages_acked: int = 0
    turns: int = 0
    acked_keys: set = field(default_factory=set)  # (role, content, time) of every message acknowledged so far


@dataclass
class Worker:
    name: str
    index: int
    instances: dict[str, Any]  # instance name -> manager; the first is the worker's home instance
    users: list[str]
    seed: int
    intruder: Optional[str] = None  # this worker's user id when it plays the intruder
    ops: list[Op] = field(default_factory=list)
    counter: int = 0
    tabs: list[Tab] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    victim_ids: Any = None  # the intruder's view: a callable returning ids other workers have saved
    counts: Counter = field(default_factory=Counter)  # (kind, ok) -> calls, including those not kept in ops

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}/{self.name}")
        self.home = next(iter(self.instances))
        self.via = self.home  # the instance serving the current request
        self.manager = self.instances[self.home]

    def _route(self) -> None:
        """Picks the instance that serves the next request: home, or now and then another one."""
        names = list(self.instances)
        if len(names) > 1 and self.rng.random() < SWITCH_CHANCE:
            self.via = self.rng.choice([n for n in names if n != self.home])
        else:
            self.via = self.home
        self.manager = self.instances[self.via]

    # -- recording -----------------------------------------------------------------------------------

    def _call(self, kind: str, user: str, cid: Optional[str], fn, *, record: bool = True, **extra) -> tuple[Op, Any]:
        op = Op(self.name, kind, user, cid, time.time(), via=self.via, **extra)
        result = None
        try:
            result = fn()
            op.ok = True
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded, none swallowed unseen
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            op.error = f"{type(exc).__name__}: {exc}"
        op.t1 = time.time()
        if record:
            self._record(op)
        return op, result

    def _record(self, op: Op) -> None:
        """Counts every call; keeps what the checker needs (a successful plain read or list only when it is
        noteworthy or slow, so a long soak's history stays small)."""
        self.counts[(op.kind, op.ok)] += 1
        if op.kind in READ_KINDS and op.ok and op.note is None and not op.foreign and op.t1 - op.t0 < SLOW_SECONDS:
            return
        with self.lock:
            self.ops.append(op)

    def _check_read(self, op: Op, user: str, conversation: Optional[dict]) -> None:
        """Keeps what a read returned that was written for another user (the checker's LEAK rule)."""
        if conversation is None:
            return
        tag = user_tag(user)
        foreign = [m["content"] for m in conversation.get("messages", []) if not m["content"].startswith(tag)]
        if foreign:
            op.foreign = foreign[:3]

    # -- the app's calls -----------------------------------------------------------------------------

    def _new_tab(self) -> Tab:
        user_index = self.rng.randrange(len(self.users))
        self.counter += 1
        tab = Tab(user_index, make_id(self.index, user_index, self.counter))
        self.tabs.append(tab)
        return tab

    def _message(self, user: str, cid: str, role: str, turn: int) -> dict:
        content = f"{user_tag(user)} {cid} turn {turn} {role} {self.rng.getrandbits(32):08x}"
        return {"role": role, "content": content, "time": now_iso()}

    def _save(self, kind: str, user: str, tab: Tab, conversation: dict) -> Op:
        keys = [(m["role"], m["content"], m["time"]) for m in conversation["messages"]]
        op, _ = self._call(
            kind,
            user,
            tab.cid,
            lambda: self.manager.save_conversation(tab.cid, conversation, user_id=user),
            saved=[list(k) for k in keys if k not in tab.acked_keys],
            size=len(keys),
            title=conversation["title"],
            digest=transcript_digest(keys),
        )
        if op.ok:
            tab.messages_acked = len(keys)
            tab.acked_keys.update(keys)
        return op

    def _read(self, user: str, tab: Tab) -> tuple[Op, Optional[dict]]:
        op, got = self._call(
            "get", user, tab.cid, lambda: self.manager.get_conversation(tab.cid, user_id=user), record=False
        )
        if op.ok:
            self._check_read(op, user, got)
            if got is None and tab.messages_acked:
                op.note = f"read returned None after an acknowledged save of {tab.messages_acked} messages"
            elif got is not None and len(got["messages"]) < tab.messages_acked:
                op.note = f"stale read: {len(got['messages'])} < {tab.messages_acked} messages acknowledged"
        self._record(op)
        return op, got

    def turn(self, tab: Tab, *, rename: bool = False) -> None:
        user = self.users[tab.user_index]
        self._route()
        read, conversation = self._read(user, tab)
        if not read.ok:
            return  # the app shows the error; the user tries again later
        if conversation is None:  # a new chat, or (after a fault) one the app can no longer see: start afresh
            now = now_iso()
            conversation = {"title": "New chat", "model": "gpt-4o", "messages": [], "created_at": now,
                            "last_modified": now}  # fmt: skip
        tab.turns += 1
        if rename:
            conversation["title"] = f"renamed {self.rng.getrandbits(24):06x}"
        else:
            conversation["messages"].append(self._message(user, tab.cid, "user", tab.turns))
            conversation["messages"].append(self._message(user, tab.cid, "assistant", tab.turns))
        conversation["last_modified"] = now_iso()
        self._save("rename" if rename else "save", user, tab, conversation)

    def delete(self, tab: Tab) -> None:
        user = self.users[tab.user_index]
        self._route()
        op, _ = self._call("delete", user, tab.cid, lambda: self.manager.delete_conversation(tab.cid, user_id=user))
        if op.ok:
            self.tabs.remove(tab)

    def flush(self) -> None:
        self._route()
        self._call("flush", "", None, self.manager.flush_dirty_conversations)

    def list_conversations(self) -> None:
        user = self.users[self.rng.randrange(len(self.users))]
        self._route()
        op, items = self._call("list", user, None, lambda: self.manager.list_conversations(user), record=False)
        if op.ok:
            foreign = [cid for cid, _ in items if not self._may_belong(cid, user)]
            if foreign:
                op.foreign = foreign[:3]
        self._record(op)

    def _may_belong(self, cid: str, user: str) -> bool:
        """Ids encode the user index they were made for; the intruder's claims are its own ids."""
        if user == self.intruder:
            return True
        if cid.startswith(f"{INTRUDER_INDEX:02x}"):
            return False
        try:
            return self.users[int(cid[2], 16)] == user
        except (ValueError, IndexError):
            return False

    def intrude(self, victims: list[str], victim_workers: list[int]) -> None:
        """Reads, saves or deletes another user's id, one that another worker has saved."""
        user = self.intruder
        assert user is not None
        # Only ids a victim has saved (an id nobody has is free to claim, and the victim's later save of it
        # would then rightly be refused).
        with_saves = self.victim_ids() if self.victim_ids is not None else []
        if not with_saves:
            return
        cid = self.rng.choice(with_saves)
        action = self.rng.choice(["get", "get", "save", "delete"])
        if action == "get":
            op, got = self._call(
                "intrude-get", user, cid, lambda: self.manager.get_conversation(cid, user_id=user), record=False
            )
            if op.ok:
                self._check_read(op, user, got)
            self._record(op)
        elif action == "save":
            conversation = {"title": "intruder", "model": "gpt-4o",
                            "messages": [self._message(user, cid, "user", 0)],
                            "created_at": now_iso(), "last_modified": now_iso()}  # fmt: skip
            saved = [[m["role"], m["content"], m["time"]] for m in conversation["messages"]]
            self._call(
                "intrude-save", user, cid, lambda: self.manager.save_conversation(cid, conversation, user_id=user),
                saved=saved,
            )  # fmt: skip
        else:
            self._call("intrude-delete", user, cid, lambda: self.manager.delete_conversation(cid, user_id=user))

    # -- the loop ------------------------------------------------------------------------------------

    def step(self, victims: list[str], victim_workers: list[int]) -> None:
        while len(self.tabs) < LIVE_PER_WORKER:
            self._new_tab()
        weights = dict(STEP_WEIGHTS)
        if self.intruder is not None:
            weights["intrude"] = 40
        kind = self.rng.choices(list(weights), weights=list(weights.values()))[0]
        tab = self.rng.choice(self.tabs)
        if kind in ("turn", "rename") and tab.messages_acked >= MAX_MESSAGES:
            self.tabs.remove(tab)  # the user starts a new chat; this one stays, and is checked at the end
            return
        if kind == "turn":
            self.turn(tab)
        elif kind == "rename":
            self.turn(tab, rename=True)
        elif kind == "delete":
            self.delete(tab)
        elif kind == "flush":
            self.flush()
        elif kind == "list":
            self.list_conversations()
        else:
            self.intrude(victims, victim_workers)

    def run(self, stop: threading.Event, deadline: float, victims: list[str], victim_workers: list[int]) -> None:
        while not stop.is_set() and time.time() < deadline:
            self.step(victims, victim_workers)
            time.sleep(self.rng.random() * 0.01)


def op_from_json(data: dict) -> Op:
    return Op(**data)


def op_to_json(op: Op) -> str:
    return json.dumps(asdict(op))


# --------------------------------------------------------------------------------------------------
# Worker process
# --------------------------------------------------------------------------------------------------


def main(config_path: str) -> int:
    from chat_history_rs import ChatHistoryManager

    with open(config_path) as f:
        config = json.load(f)
    manager = ChatHistoryManager(
        mode="postgres",
        connection_string=config["pg_url"],
        redis_enabled=True,
        redis_connection_string=config["redis_url"],
        **config["manager_kwargs"],
    )
    stop = threading.Event()
    deadline = time.time() + config["seconds"]
    workers = [
        Worker(name, index, {config["instance"]: manager}, config["users"], config["seed"])
        for name, index in zip(config["worker_names"], config["worker_indexes"])
    ]
    threads = [threading.Thread(target=w.run, args=(stop, deadline, [], [])) for w in workers]
    for thread in threads:
        thread.start()
    while time.time() < deadline and not os.path.exists(config["stop_file"]):
        time.sleep(0.1)
    stop.set()
    join_deadline = time.monotonic() + config["join_seconds"]
    for thread in threads:
        thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
    hung = [w.name for w, t in zip(workers, threads) if t.is_alive()]
    try:
        stats = {k: v for k, v in manager.stats().items() if isinstance(v, (int, float, str, bool, type(None)))}
    except Exception as exc:  # noqa: BLE001 - reported with the rest
        stats = {"error": f"{type(exc).__name__}: {exc}"}
    with open(config["log_path"], "w") as out:
        for worker in workers:
            with worker.lock:
                for op in worker.ops:
                    out.write(op_to_json(op) + "\n")
        counts = [[kind, ok, n] for w in workers for (kind, ok), n in w.counts.items()]
        out.write(json.dumps({"hung": hung, "counts": counts, "stats": stats}) + "\n")
    try:
        manager.close()
    finally:
        os._exit(0 if not hung else 3)  # a hung worker thread would keep the process alive
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
