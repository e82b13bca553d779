"""``chat-history init-db``: create the PostgreSQL schema when missing."""

from __future__ import annotations

import argparse
from typing import Callable

from chat_history_rs.cli.common import EXIT_OK, open_manager, resolve_settings

DESCRIPTION = (
    "Create the tables (conversations, messages, conversation_tombstones, conversation_conflicts) and\n"
    "indexes when missing.\n"
    "Existing tables and rows are never altered destructively. Redis is not used."
)


def add_parser(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    init_db = add("init-db", "create the PostgreSQL schema when missing", DESCRIPTION)
    init_db.set_defaults(func=cmd_init_db)


def cmd_init_db(args: argparse.Namespace) -> int:
    settings = resolve_settings(args, redis="never")
    open_manager(args, settings).close()
    print(
        f"schema ready at {settings.postgres_url}: conversations, messages, conversation_tombstones,"
        " conversation_conflicts (created when missing;"
    )
    print("existing tables and rows are left as they were)")
    return EXIT_OK
