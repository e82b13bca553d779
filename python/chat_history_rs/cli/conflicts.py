"""``chat-history conflicts``: list, show or restore the copies kept aside when Redis and PostgreSQL
diverged."""

from __future__ import annotations

import argparse
import json
from typing import Callable

from chat_history_rs.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    close_quietly,
    open_manager,
    resolve_settings,
    shorten,
)

DESCRIPTION = (
    "When a copy in Redis and one in PostgreSQL diverge (a write made while Redis was unreachable,\n"
    "a seed-design writer, an id PostgreSQL gives to another user), the newer stays the\n"
    "conversation and the other is kept in the table conversation_conflicts, unless all its\n"
    'messages are already in the one that stays (docs/design.md, "Divergence"). This lists them,\n'
    "shows one with its messages, or makes one the conversation again (the copy it replaces is\n"
    "kept aside in turn, so a restore loses nothing). Long titles and messages are shortened in the\n"
    "listing (--json has them whole). Only --restore writes."
)


def add_parser(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    conflicts = add(
        "conflicts", "list, show or restore copies kept aside when Redis and PostgreSQL diverged", DESCRIPTION
    )
    conflicts.add_argument("--user", metavar="USER_ID", default=None, help="only this user's copies")
    conflicts.add_argument("--limit", metavar="N", type=int, default=100, help="at most N copies (default 100)")
    conflicts.add_argument("--json", action="store_true", help="as a JSON array, titles and messages whole")
    action = conflicts.add_mutually_exclusive_group()
    action.add_argument("--show", metavar="ID", type=int, default=None, help="one copy, with its messages")
    action.add_argument("--restore", metavar="ID", type=int, default=None, help="make copy ID the conversation again")
    conflicts.set_defaults(func=cmd_conflicts, close_timeout=30.0)


def cmd_conflicts(args: argparse.Namespace) -> int:
    """Lists kept conflict copies, shows one with its messages (--show), or restores one (--restore)."""
    settings = resolve_settings(args, redis="optional")
    # Listing and showing only look: no table made, nothing written back. A restore is a save.
    manager = open_manager(args, settings, inspect=args.restore is None)
    try:
        if args.restore is not None:
            conversation_id, user_id = manager.restore_conflict(args.restore)
            print(f"restored copy {args.restore} as conversation {conversation_id} of user {user_id}")
            return EXIT_OK
        conflict_id = args.show
        kept = manager.list_conflicts(args.user, conflict_id=conflict_id, limit=args.limit)
    finally:
        close_quietly(manager, args.verbose > 0)
    if conflict_id is not None and not kept:
        raise CliError(f"no kept copy has conflict_id {conflict_id}", EXIT_FAILED)
    if args.json:
        print(json.dumps(kept))
        return EXIT_OK
    if not kept:
        print("no conflict copies kept")
        return EXIT_OK
    for c in kept:
        conv = c["conversation"]
        restored = f", restored {c['restored_at']}" if c["restored_at"] else ""
        print(
            f"{c['conflict_id']}  conversation {c['conversation_id']}  user {c['user_id']}  "
            f"{len(conv['messages'])} messages  kept {c['kept_at']}{restored}"
        )
        # A title or a message may be a megabyte: the listing shows the start of each; --json has them whole.
        print(f"    {shorten(c['reason'], 200)}; title {shorten(conv['title'])!r}")
        if conflict_id is not None:
            for m in conv["messages"]:
                print(f"    [{m['time']}] {m['role']}: {shorten(m['content'], 400)}")
    return EXIT_OK
