"""The near cache behind AsyncChatHistoryManager (its hits are answered on the event loop's thread):
copies are served, another manager's save drops them within SEEN_WITHIN, the manager reads its own
saves at once, and returned dicts are fresh."""

from __future__ import annotations

import asyncio
import time

from chat_history_rs import AsyncChatHistoryManager
from support.near_support import SEEN_WITHIN, near_stats
from support.redis_support import grown, make_conversation

CID = "a5a50001"


def test_the_async_manager_serves_copies_and_drops_them(make_redis_manager, pg_url, rdb, user_id):
    writer = make_redis_manager()
    v1 = make_conversation(2, title="v1")
    writer.save_conversation(CID, v1, user_id=user_id)

    async def main() -> None:
        reader = AsyncChatHistoryManager(
            mode="postgres", connection_string=pg_url, redis_enabled=True, redis_connection_string=rdb.url,
            background_flush=False,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 5
            while True:
                hits = near_stats(reader)["hits"]
                got = await reader.get_conversation(CID, user_id=user_id)
                if near_stats(reader)["hits"] > hits:
                    break
                assert time.monotonic() < deadline, f"no near-cache hit: {near_stats(reader)}"
                await asyncio.sleep(0.01)
            assert got == v1
            got["messages"].append({"role": "user", "content": "changed by the caller", "time": "x"})
            assert await reader.get_conversation(CID, user_id=user_id) == v1

            v2 = {**grown(v1, 2), "title": "v2"}
            writer.save_conversation(CID, v2, user_id=user_id)
            started = time.monotonic()
            while (got := await reader.get_conversation(CID, user_id=user_id)) != v2:
                assert got == v1, got
                assert time.monotonic() - started < SEEN_WITHIN, "the other manager's save was not read"
                await asyncio.sleep(0.005)

            for n in range(3, 103):
                version = {**grown(v2, n % 3), "title": f"v{n}"}
                await reader.save_conversation(CID, version, user_id=user_id)
                assert await reader.get_conversation(CID, user_id=user_id) == version, f"own save v{n} not read"
        finally:
            await reader.close()

    asyncio.run(main())
