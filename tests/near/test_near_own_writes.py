"""A process reads its own writes at once, and what it is handed is its own (docs/design.md, section 10).

Own writes: a save or delete followed by a read in the same manager (or in another manager of the
same process) returns the new state with no wait at all, while another thread reads the same keys
the whole time, so its fills race the writes (a fill that read Redis before the write must not land
after it). Fresh dicts: changing a returned conversation or list entry never changes what the next
read returns.
"""

from __future__ import annotations

import threading

from support.near_support import near_stats, read_until_near_hit, conversation_read
from support.redis_support import make_conversation, metadata

CID = "0e1f0001"
ITERATIONS = 1000


def version(base: dict, n: int) -> dict:
    """Version n of a conversation: the title, the message count and the last message all carry n."""
    messages = [dict(m) for m in base["messages"][:2]]
    for i in range(n % 5):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"extra {i}", "time": base["created_at"]})
    messages.append({"role": "user", "content": f"version {n}", "time": base["last_modified"]})
    return {**base, "title": f"v{n}", "messages": messages}


class Hammer(threading.Thread):
    """Calls fn in a loop until stopped, keeping the first exception and every distinct result key."""

    def __init__(self, fn, key=lambda value: value):
        super().__init__(daemon=True)
        self.fn, self.key = fn, key
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.calls = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.fn()
                self.calls += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the reading thread hung"
        assert self.error is None, f"the reading thread failed: {self.error!r}"
        assert self.calls > 0


def test_own_saves_are_read_at_once_while_another_thread_fills(make_redis_manager, user_id):
    manager = make_redis_manager()
    base = make_conversation(2, title="v0")
    manager.save_conversation(CID, version(base, 0), user_id=user_id)
    read_until_near_hit(manager, lambda: manager.get_conversation(CID, user_id=user_id))
    before = near_stats(manager)
    reader = Hammer(lambda: manager.get_conversation(CID, user_id=user_id))
    lister = Hammer(lambda: manager.list_conversations(user_id))
    reader.start()
    lister.start()
    try:
        for n in range(1, ITERATIONS + 1):
            expected = version(base, n)
            manager.save_conversation(CID, expected, user_id=user_id)
            got = manager.get_conversation(CID, user_id=user_id)
            assert got == expected, f"iteration {n}: read {got and got['title']!r} right after saving v{n}"
            if n % 10 == 0:
                listed = dict(manager.list_conversations(user_id))
                assert listed[CID]["title"] == f"v{n}", f"iteration {n}: the list shows {listed[CID]['title']!r}"
            if n % 50 == 0:  # a clean copy too: the settle's invalidation races the reading thread's fills
                manager.flush_dirty_conversations()
                assert manager.get_conversation(CID, user_id=user_id) == expected
    finally:
        reader.finish()
        lister.finish()
    after = near_stats(manager)
    assert after["hits"] > before["hits"], f"the near cache never served: {after}"


def test_another_manager_of_the_process_reads_its_saves_at_once(make_redis_manager, user_id):
    """Two managers in one process (two instances of the app's class, a Streamlit rerun that built a
    new one): what one saves or deletes, the other reads at once, never its own older copy, while a
    thread of the reader keeps filling its near cache."""
    writer, reader = make_redis_manager(), make_redis_manager()
    base = make_conversation(2, title="v0")
    writer.save_conversation(CID, version(base, 0), user_id=user_id)
    read_until_near_hit(reader, lambda: reader.get_conversation(CID, user_id=user_id))
    before = near_stats(reader)
    filler = Hammer(lambda: reader.get_conversation(CID, user_id=user_id))
    filler.start()
    try:
        for n in range(1, 301):
            expected = version(base, n)
            writer.save_conversation(CID, expected, user_id=user_id)
            got = reader.get_conversation(CID, user_id=user_id)
            assert got == expected, f"iteration {n}: the other manager read {got and got['title']!r} after v{n}"
            listed = dict(reader.list_conversations(user_id))
            assert listed[CID]["title"] == f"v{n}", f"iteration {n}: its list shows {listed[CID]['title']!r}"
    finally:
        filler.finish()
    writer.delete_conversation(CID, user_id=user_id)
    assert reader.get_conversation(CID, user_id=user_id) is None
    assert CID not in dict(reader.list_conversations(user_id))
    assert near_stats(reader)["hits"] > before["hits"], "the reader's near cache never served"


def test_own_saves_and_deletes_show_in_the_list_at_once(make_redis_manager, user_id):
    manager = make_redis_manager()
    conversations = {}
    lister = Hammer(lambda: manager.list_conversations(user_id))
    first = f"{0:08x}"
    conversations[first] = make_conversation(1, title="kept")
    manager.save_conversation(first, conversations[first], user_id=user_id)
    read_until_near_hit(manager, lambda: manager.list_conversations(user_id))
    hits = near_stats(manager)["hits"]
    lister.start()
    try:
        for n in range(1, 61):
            cid = f"{n:08x}"
            conversations[cid] = make_conversation(1, title=f"new {n}")
            manager.save_conversation(cid, conversations[cid], user_id=user_id)
            listed = dict(manager.list_conversations(user_id))
            assert listed.get(cid) == metadata(conversations[cid]), f"iteration {n}: the list misses the saved {cid}"
            if n % 2 == 0:
                manager.delete_conversation(cid, user_id=user_id)
                del conversations[cid]
                listed = dict(manager.list_conversations(user_id))
                assert cid not in listed, f"iteration {n}: the list still holds the deleted {cid}"
                assert manager.get_conversation(cid, user_id=user_id) is None
            if n % 3 == 0:
                renamed = {**conversations[first], "title": f"kept, renamed {n}"}
                manager.save_conversation(first, renamed, user_id=user_id)
                conversations[first] = renamed
                listed = dict(manager.list_conversations(user_id))
                assert listed[first]["title"] == renamed["title"], f"iteration {n}: the rename is not listed"
        assert dict(manager.list_conversations(user_id)) == {cid: metadata(c) for cid, c in conversations.items()}
    finally:
        lister.finish()
    assert near_stats(manager)["hits"] > hits, "the near cache never served a list"


def test_returned_dicts_are_fresh(make_redis_manager, user_id):
    manager = make_redis_manager()
    original = make_conversation(3, title="untouched")
    manager.save_conversation(CID, original, user_id=user_id)

    read = conversation_read(manager, CID, user_id)

    def spoil(conversation: dict) -> None:
        conversation["title"] = "changed by the caller"
        conversation["messages"][0]["content"] = "changed by the caller"
        conversation["messages"][1]["role"] = "system"
        conversation["messages"].append({"role": "user", "content": "appended by the caller", "time": "x"})
        conversation["model"] = "changed"
        conversation["extra"] = 1

    spoil(read())  # the read that filled the copy
    served = read_until_near_hit(manager, read)
    assert served == original
    spoil(served)  # a copy served from the process
    hits = near_stats(manager)["hits"]
    again = read()
    assert near_stats(manager)["hits"] > hits, "the check read did not come from the near cache"
    assert again == original

    def listing():
        return manager.list_conversations(user_id)

    entries = read_until_near_hit(manager, listing)
    assert entries == [(CID, metadata(original))]
    entries[0][1]["title"] = "changed by the caller"
    entries[0][1]["messages"].append({"role": "user", "content": "x", "time": "x"})
    entries.append(("deadbeef", {}))
    hits = near_stats(manager)["hits"]
    assert listing() == [(CID, metadata(original))]
    assert near_stats(manager)["hits"] > hits, "the check list did not come from the near cache"
