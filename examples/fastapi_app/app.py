"""A minimal async chat API on AsyncChatHistoryManager (FastAPI).

    GET    /conversations                 the user's chats, newest first (metadata)
    GET    /conversations/{id}            one chat with its messages (404 when it is not the user's)
    POST   /conversations/{id}/messages   {"content": "..."}: saves the user's turn, streams the stub
                                          assistant's reply as server-sent events, then saves the reply
    DELETE /conversations/{id}            deletes the chat (204)

The user is the `X-User-Id` header (a real deployment takes it from its authentication). The reply is
a deterministic stub (`stub_reply`) that echoes the user word by word; put the model call there.

    DATABASE_URL=postgresql://... REDIS_ENABLED=true REDIS_CONNECTION_STRING=redis://... \\
        .venv/bin/uvicorn app:app --app-dir examples/fastapi_app

Every call awaits the manager, so the event loop keeps serving other requests (and other streams)
while Redis or PostgreSQL answers. The manager is opened once at startup and closed (flushing what
is dirty) at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from chat_history_rs import (
    AsyncChatHistoryManager,
    ChatHistoryError,
    OwnershipError,
    UnavailableError,
    ValidationError,
)
from chat_history_rs.envfile import load_env_file

MODEL = "gpt-4o"
TOKEN_DELAY = 0.01  # seconds between the stub's words, so the stream is visibly a stream


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def stub_reply(conversation: Dict[str, Any]) -> List[str]:
    """The assistant's reply as tokens: an echo of the last user message. Replace with a model call."""
    last = conversation["messages"][-1]["content"]
    return [f"{word} " for word in f"You said: {last}".split()]


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class NewMessage(BaseModel):
    content: str = Field(min_length=1)


def create_app(open_manager: Callable[[], AsyncChatHistoryManager]) -> FastAPI:
    """The app around a manager made by `open_manager` at startup (tests pass their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_manager() as history:
            app.state.history = history
            yield

    app = FastAPI(title="chat_history_rs async example", lifespan=lifespan)

    @app.exception_handler(ChatHistoryError)
    async def chat_history_error(request: Request, exc: ChatHistoryError) -> JSONResponse:
        status = 500
        if isinstance(exc, OwnershipError):
            status = 403
        elif isinstance(exc, (ValidationError, ValueError, TypeError)):
            status = 422
        elif isinstance(exc, UnavailableError):
            status = 503
        return JSONResponse({"detail": str(exc)}, status_code=status)

    def history(request: Request) -> AsyncChatHistoryManager:
        return request.app.state.history  # type: ignore[no-any-return]

    @app.get("/conversations")
    async def list_conversations(request: Request, x_user_id: str = Header()) -> List[Dict[str, Any]]:
        items = await history(request).list_conversations(user_id=x_user_id)
        return [{"id": cid, **{k: v for k, v in conv.items() if k != "messages"}} for cid, conv in items]

    @app.get("/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, request: Request, x_user_id: str = Header()) -> Dict[str, Any]:
        conversation = await history(request).get_conversation(conversation_id, user_id=x_user_id)
        if conversation is None:
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        return dict(conversation)

    @app.post("/conversations/{conversation_id}/messages")
    async def post_message(
        conversation_id: str, message: NewMessage, request: Request, x_user_id: str = Header()
    ) -> StreamingResponse:
        store = history(request)
        conversation: Optional[Dict[str, Any]] = await store.get_conversation(conversation_id, user_id=x_user_id)
        if conversation is None:
            title = re.sub(r"\s+", " ", message.content).strip()[:40]
            conversation = {"title": title, "model": MODEL, "messages": [], "created_at": now()}
        conversation["messages"].append({"role": "user", "content": message.content, "time": now()})
        conversation["last_modified"] = now()
        # Saved before the reply starts: a refused id or content fails the request with its status
        # code, and the user's turn is kept even if the stream is cut.
        await store.save_conversation(conversation_id, conversation, user_id=x_user_id)

        async def stream() -> AsyncIterator[str]:
            tokens = stub_reply(conversation)
            for token in tokens:
                yield sse("token", token)
                await asyncio.sleep(TOKEN_DELAY)
            reply = "".join(tokens).strip()
            conversation["messages"].append({"role": "assistant", "content": reply, "time": now()})
            conversation["last_modified"] = now()
            await store.save_conversation(conversation_id, conversation, user_id=x_user_id)
            yield sse("done", {"content": reply, "messages": len(conversation["messages"])})

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.delete("/conversations/{conversation_id}", status_code=204)
    async def delete_conversation(conversation_id: str, request: Request, x_user_id: str = Header()) -> Response:
        await history(request).delete_conversation(conversation_id, user_id=x_user_id)
        return Response(status_code=204)

    return app


# `uvicorn app:app`: the manager from the environment (DATABASE_URL, REDIS_ENABLED, ...; see the README).
def open_from_environment() -> AsyncChatHistoryManager:
    """The manager `uvicorn app:app` serves with: the variables of ./.env first, when there is one (those
    already set win), then the environment, as ChatHistoryManager reads it."""
    load_env_file()
    return AsyncChatHistoryManager(mode="postgres")


app = create_app(open_from_environment)
