"""examples/fastapi_app: the async chat API on AsyncChatHistoryManager, driven through httpx's AsyncClient
(ASGITransport, no server socket) with the app's lifespan, against the throwaway Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import httpx
import pytest

from chat_history_rs import AsyncChatHistoryManager
from support.redis_support import dirty_set

APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "fastapi_app"
sys.path.insert(0, str(APP_DIR))
import app as fastapi_example  # noqa: E402 - after the sys.path.insert above


def parse_sse(text: str) -> List[Tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@pytest.fixture
def make_app(pg_url, rdb):
    def make():
        return fastapi_example.create_app(
            lambda: AsyncChatHistoryManager(
                mode="postgres",
                connection_string=pg_url,
                redis_enabled=True,
                redis_connection_string=rdb.url,
                background_flush=False,
            )
        )

    return make


async def post(client: httpx.AsyncClient, user: str, cid: str, content: str) -> Tuple[httpx.Response, list]:
    async with client.stream(
        "POST", f"/conversations/{cid}/messages", json={"content": content}, headers={"X-User-Id": user}
    ) as response:
        body = "".join([chunk async for chunk in response.aiter_text()])
    return response, parse_sse(body) if response.status_code == 200 else json.loads(body)


def test_chat_api_end_to_end(make_app, rdb, pg_conn, user_id, other_user_id):
    app = make_app()
    me: Dict[str, str] = {"X-User-Id": user_id}

    async def go() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert (await client.get("/conversations", headers=me)).json() == []

                response, events = await post(client, user_id, "a1b2c3d4", "hello  async world")
                assert response.headers["content-type"].startswith("text/event-stream")
                tokens = [data for event, data in events if event == "token"]
                assert "".join(tokens).strip() == "You said: hello async world"
                assert events[-1] == ("done", {"content": "You said: hello async world", "messages": 2})

                got = (await client.get("/conversations/a1b2c3d4", headers=me)).json()
                assert [m["role"] for m in got["messages"]] == ["user", "assistant"]
                assert got["messages"][1]["content"] == "You said: hello async world"
                assert got["title"] == "hello async world"

                response, events = await post(client, user_id, "a1b2c3d4", "again")
                assert events[-1][1]["messages"] == 4

                listing = (await client.get("/conversations", headers=me)).json()
                assert [c["id"] for c in listing] == ["a1b2c3d4"] and listing[0]["title"] == "hello async world"

                # Another user sees nothing of it and cannot write to it.
                other = {"X-User-Id": other_user_id}
                assert (await client.get("/conversations/a1b2c3d4", headers=other)).status_code == 404
                response, body = await post(client, other_user_id, "a1b2c3d4", "mine now")
                assert response.status_code == 403, body
                response, body = await post(client, user_id, "bad:id", "hi")
                assert response.status_code == 422, body

                # Twenty chats at once: every stream completes and every chat is whole.
                ids = [f"e{i:07x}" for i in range(20)]
                results = await asyncio.gather(*(post(client, user_id, cid, f"question {cid}") for cid in ids))
                assert all(events[-1][1]["messages"] == 2 for _, events in results)
                listing = (await client.get("/conversations", headers=me)).json()
                assert {c["id"] for c in listing} == {"a1b2c3d4", *ids}

                assert (await client.delete("/conversations/a1b2c3d4", headers=me)).status_code == 204
                assert (await client.get("/conversations/a1b2c3d4", headers=me)).status_code == 404

    asyncio.run(go())
    # The lifespan's exit closed the manager, which wrote back what was dirty.
    assert dirty_set(rdb.client) == set()
    with pg_conn.cursor() as cur:
        cur.execute("SELECT conversation_id FROM conversations WHERE user_client_id = %s", (user_id,))
        assert {row[0] for row in cur.fetchall()} == {f"e{i:07x}" for i in range(20)}
        cur.execute("SELECT count(*) FROM messages WHERE conversation_id = 'e0000000'")
        assert cur.fetchone()[0] == 2
