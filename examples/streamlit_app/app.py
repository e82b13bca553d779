"""Example chat app on chat_history_rs: a sidebar of the user's chats, a transcript, a stubbed LLM.

    streamlit run examples/streamlit_app/app.py      (or `make demo` for a full local stack)

Configured by environment variables (README.md beside this file), read from a `.env` file too when
there is one in the current directory or beside this file (variables already set win, as with
python-dotenv's load_dotenv()). The assistant is a deterministic stand-in (conversations.stub_reply);
swap in your Azure OpenAI call there.
"""

from __future__ import annotations

import functools
from pathlib import Path

import chat_config
import chat_store
import conversations
import streamlit as st
from chat_history_rs import ChatHistoryError, ChatHistoryManager
from chat_history_rs.envfile import load_env_file

st.set_page_config(page_title="Chat history demo", page_icon="💬", layout="wide")
chat_store.configure_logging()
for env_file in (Path(".env"), Path(__file__).with_name(".env")):
    load_env_file(env_file)

try:
    settings = chat_config.load_settings()
    user = chat_config.current_user(settings, st.context.headers)
    history = chat_store.history_for_session(settings, user) if user else None
except (chat_config.SettingsError, ChatHistoryError) as exc:
    st.error(f"The chat history is not available: {exc}")
    st.stop()
if user is None or history is None:
    st.error(
        f"Not signed in: CHAT_HISTORY_MODE={settings.mode} takes the user from App Service's "
        f"{chat_config.PRINCIPAL_ID_HEADER} header, and this request had none. Enable App Service "
        "authentication, or use local_psql / local_redis with LOCAL_TEST_CLIENT_ID to try it locally."
    )
    st.stop()


# -- actions (widget callbacks: they run before the script, so the whole page shows their result) --


def notify(level: str, text: str) -> None:
    st.session_state.notice = (level, text)


def reports_failure(what: str):
    """A failed store call (PostgreSQL down, say) becomes a message on the page, not a traceback."""

    def wrap(action):
        @functools.wraps(action)
        def run(*args) -> None:
            try:
                action(*args)
            except ChatHistoryError as exc:
                notify("error", f"{what}: {exc}")

        return run

    return wrap


def open_chat(chat_id: str | None, model: str | None = None) -> None:
    st.session_state.chat_id = chat_id
    if model:
        st.session_state.model = model
    if chat_id:
        st.query_params["chat"] = chat_id  # a reload of the page reopens this chat
    else:
        st.query_params.pop("chat", None)


@reports_failure("Your message was not saved")
def send(history: ChatHistoryManager, user: chat_config.User, chat_id: str | None) -> None:
    chat = history.get_conversation(chat_id, user_id=user.id) if chat_id else None
    chat = chat or conversations.new_conversation(st.session_state.model)
    chat["model"] = st.session_state.model
    conversations.add_message(chat, "user", st.session_state.prompt)
    # Saved before the model is asked (slow and fallible in real life), so the question is never lost.
    if chat_id:
        history.save_conversation(chat_id, chat, user_id=user.id)
    else:
        chat_id = chat_store.save_new(history, chat, user)
        open_chat(chat_id)
    conversations.add_message(chat, "assistant", conversations.stub_reply(chat))
    history.save_conversation(chat_id, chat, user_id=user.id)


@reports_failure("Could not rename the chat")
def rename(history: ChatHistoryManager, user: chat_config.User, chat_id: str) -> None:
    title = st.session_state[f"title-{chat_id}"].strip()
    chat = history.get_conversation(chat_id, user_id=user.id)
    if chat is not None and title:
        chat["title"] = title
        history.save_conversation(chat_id, chat, user_id=user.id)


@reports_failure("Could not delete the chat")
def delete(history: ChatHistoryManager, user: chat_config.User, chat_id: str) -> None:
    history.delete_conversation(chat_id, user_id=user.id)
    open_chat(None)
    notify("success", "Chat deleted.")


@reports_failure("Could not change the chat's model")
def change_model(history: ChatHistoryManager, user: chat_config.User, chat_id: str | None) -> None:
    chat = history.get_conversation(chat_id, user_id=user.id) if chat_id else None
    if chat is not None:
        chat["model"] = st.session_state.model
        history.save_conversation(chat_id, chat, user_id=user.id)


# -- state: the open chat comes from the store on every run (Redis serves it), never from a copy --

if "chat_id" not in st.session_state:
    st.session_state.chat_id = st.query_params.get("chat")
try:
    chats = conversations.by_recency(history.list_conversations(user_id=user.id))
    chat_id = st.session_state.chat_id
    chat = chat_store.find_chat(history, user, chat_id)
except ChatHistoryError as exc:
    st.error(f"Could not load your chats: {exc}")
    st.stop()
if chat_id and chat is None:  # start a new chat instead
    open_chat(None)
    chat_id = None
if "model" not in st.session_state:
    st.session_state.model = chat["model"] if chat else conversations.MODELS[0]
models = list(conversations.MODELS)
if st.session_state.model not in models:
    models.append(st.session_state.model)  # a Phase 1 chat may name a model no longer offered

# -- sidebar: chats, the model, the open chat's title, the cache --

with st.sidebar:
    st.caption(f"Signed in as **{user.name}** · {settings.description}")
    st.button("New chat", icon=":material/add:", width="stretch", on_click=open_chat, args=(None,), key="new-chat")
    for cid, listed in chats:
        current = cid == chat_id
        st.button(
            listed["title"],
            key=f"open-{cid}",
            width="stretch",
            type="primary" if current else "tertiary",
            on_click=open_chat,
            args=(cid, listed["model"]),
        )
    if not chats:
        st.caption(
            "No chats yet." if settings.mode == "local" else f"No chats in the last {settings.history_days} days."
        )
    st.divider()
    st.selectbox("Model", models, key="model", on_change=change_model, args=(history, user, chat_id))
    if chat is not None:
        with st.expander("Rename or delete this chat"):
            st.text_input("Title", value=chat["title"], key=f"title-{chat_id}", max_chars=200)
            left, right = st.columns(2)
            left.button("Rename", key="rename", on_click=rename, args=(history, user, chat_id), width="stretch")
            right.button("Delete", key="delete", on_click=delete, args=(history, user, chat_id), width="stretch")

    if history.redis_enabled:
        st.divider()
        if st.button("Save all to database", icon=":material/save:", key="flush", width="stretch"):
            try:
                saved = history.flush_dirty_conversations()
                st.success(f"Saved {saved} conversation{'' if saved == 1 else 's'} to the database.")
            except ChatHistoryError as exc:
                st.error(f"Saving failed; the chats stay in Redis and are retried: {exc}")
        stats = history.stats()
        with st.expander("Cache and write-back", expanded=True):
            for level, text in chat_store.cache_alerts(stats):
                getattr(st, level)(text)
            st.caption("  \n".join(f"{name}: **{value}**" for name, value in chat_store.health_lines(stats)))

# -- transcript --

notice = st.session_state.pop("notice", None)
if notice:
    getattr(st, notice[0])(notice[1])
st.subheader(chat["title"] if chat else conversations.NEW_CHAT_TITLE)
if chat is None or not chat["messages"]:
    st.caption("Ask anything. The assistant here is a stub that echoes you, so the demo needs no API key.")
for message in chat["messages"] if chat else []:
    with st.chat_message(message["role"]):
        st.markdown(message["content"])
st.chat_input("Message", key="prompt", on_submit=send, args=(history, user, chat_id))
