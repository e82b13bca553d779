"""``chat-history config``: the settings a manager opens with, resolved by the library exactly as
``ChatHistoryManager`` resolves them (a flag or keyword argument, else the environment variable, else the
default), each with where it came from. Passwords are never printed: connection strings appear without
them, and a password that is set shows as ``<redacted>``."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from chat_history_rs import ConfigurationError
from chat_history_rs.cli.common import EXIT_OK, CliError, library_settings

DESCRIPTION = """\
Print every setting a ChatHistoryManager would open with here, and where each came from: keyword (a
flag of this command), env NAME (the environment variable that set it) or default. The connection
flags (--mode, --database-url, --redis-url, --connect-timeout, --redis-timeout) count as keyword
arguments. The mode is --mode, else CHAT_HISTORY_MODE, else local; the effective mode also applies
REDIS_ENABLED (true adds Redis to postgres, false removes it from redis).
Connection strings are shown without their passwords; a password that is set shows as <redacted>.
Exit 1 when a value is not valid (the message names the variable or flag)."""


def add_parser(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    config = add("config", "print the resolved settings and where each came from", DESCRIPTION)
    config.add_argument("--json", action="store_true", help="as a JSON object: {name: {value, source}}")
    config.set_defaults(func=cmd_config)


def _text(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def cmd_config(args: argparse.Namespace) -> int:
    resolved = library_settings(args)
    try:
        mode = resolved.mode
        resolved.check()
        problem = None
    except ConfigurationError as exc:
        mode, problem = None, str(exc)
    entries = resolved.entries()
    if args.json:
        print(
            json.dumps(
                {
                    "settings": {e["name"]: {"value": e["value"], "source": e["source"]} for e in entries},
                    "effective_mode": mode,
                    "problem": problem,
                }
            )
        )
    else:
        width = max(len(e["name"]) for e in entries)
        value_width = min(60, max(len(_text(e["value"])) for e in entries))
        for e in entries:
            print(f"{e['name']:<{width}}  {_text(e['value']):<{value_width}}  {e['source']}")
        if mode is not None:
            print(f"\neffective mode: {mode} (mode {resolved.value('mode')}, {resolved.source('mode')})")
    if problem is not None:
        raise CliError(f"a manager would refuse these settings: {problem}")
    return EXIT_OK
