"""The ``chat-history`` parser and ``main()``: the connection flags every command takes, one subcommand per
module of this package, logging to stderr for the run, and the exit code for each way a command ends."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import chat_history_rs
from chat_history_rs import ChatHistoryError, ConfigurationError
from chat_history_rs.cli import conflicts, doctor, flush, init_db, stats
from chat_history_rs.cli import config as config_command
from chat_history_rs.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    FLAG_KEYWORDS,
    MODES,
    PROG,
    CliError,
    print_error,
)
from chat_history_rs.envfile import load_env_file

DESCRIPTION = """\
Operator tools for chat_history_rs: create the schema, write Redis back to PostgreSQL (once, or as
a standalone worker), report stats (text, JSON, Prometheus), check a deployment (doctor) and show
the resolved settings (config).

Settings come from the flags, else from the environment the library reads: CHAT_HISTORY_MODE,
DATABASE_URL (else the example app's POSTGRES_HOST, POSTGRES_PORT, POSTGRES_ADMIN_LOGIN,
POSTGRES_ADMIN_PASSWORD, POSTGRES_DATABASE, POSTGRES_SSLMODE), REDIS_CONNECTION_STRING (or REDIS_HOST,
REDIS_PORT, REDIS_PASSWORD, REDIS_SSL), REDIS_CA_FILE, REDIS_CLUSTER, resolved by the library itself (a
flag wins over a variable, a variable over the default); `chat-history config` shows the result and
where each setting came from. A ./.env file is read first when present (--env-file names another);
variables already set win over it. stats and doctor look at Redis whenever one is configured, even with
REDIS_ENABLED=false: during a rollback that is where unsaved chats are. stats and doctor never write:
no write-back, no table created; only flush, init-db and conflicts --restore write.
"""

EPILOG = """\
exit codes: 0 done (doctor: all OK); 1 failed, e.g. a server unreachable (doctor: warnings);
2 usage error (doctor: a check failed); 130 interrupted. Passwords are never printed.
"""


def build_parser() -> argparse.ArgumentParser:
    # The connection options are accepted before or after the command. SUPPRESS keeps a subparser from
    # overwriting a value given before the command with its default (an argparse quirk).
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connections")
    group.add_argument(
        "--mode",
        choices=MODES,
        default=argparse.SUPPRESS,
        help="the mode, as mode=... sets it for ChatHistoryManager (default: $CHAT_HISTORY_MODE; unset, the"
        " commands use the servers that are configured)",
    )
    group.add_argument(
        "--env-file",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="read variables from this file first, those already set winning (default: ./.env when present)",
    )
    group.add_argument(
        "--database-url",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="PostgreSQL URL or key=value string (default: $DATABASE_URL)",
    )
    group.add_argument(
        "--redis-url",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="redis:// or rediss:// URL (default: $REDIS_CONNECTION_STRING, or $REDIS_HOST and friends)",
    )
    group.add_argument(
        "--connect-timeout",
        metavar="S",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds to connect to PostgreSQL (default 5)",
    )
    group.add_argument(
        "--redis-timeout",
        metavar="S",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds for a Redis connect or command (default 0.5; more for a distant cache)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more (logger chat_history_rs): -v INFO, -vv DEBUG",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {chat_history_rs.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=EPILOG,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    # The order of the subcommands is the order `chat-history --help` lists them in.
    for command in (init_db, flush, conflicts, stats, doctor, config_command):
        command.add_parser(add)
    return parser


@contextlib.contextmanager
def _logging_to_stderr(verbose: int, worker: bool) -> Iterator[None]:
    """A handler on the ``chat_history_rs`` logger for this run, removed afterwards (main() may be called
    more than once in a process). -v INFO, -vv DEBUG; the worker logs its runs at INFO by default."""
    logger = logging.getLogger("chat_history_rs")
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 or worker else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


@contextlib.contextmanager
def _env_file(path: str | None) -> Iterator[None]:
    """The variables of `path` (default: ./.env when present) that the environment lacks, for this run:
    set before the library reads the environment, removed afterwards (main() may be called more than
    once in a process)."""
    added = load_env_file(".env" if path is None else path)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env_file = getattr(args, "env_file", None)
    if env_file is not None and not os.path.isfile(env_file):
        parser.error(f"--env-file {env_file}: no such file")
    with _env_file(env_file):
        return _run(parser, args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # The flags given on the command line are keyword arguments to the library; the others are not.
    args.flags_given = frozenset(flag for flag in FLAG_KEYWORDS if hasattr(args, flag))
    for name, default in (("mode", None), ("database_url", None), ("redis_url", None), ("verbose", 0)):
        if not hasattr(args, name):
            setattr(args, name, default)
    args.connect_timeout = getattr(args, "connect_timeout", 5.0)
    args.redis_timeout = getattr(args, "redis_timeout", 0.5)
    if not args.connect_timeout > 0 or not args.redis_timeout > 0:
        parser.error("--connect-timeout and --redis-timeout must be more than 0 seconds")
    worker = args.command == "flush" and args.loop
    with _logging_to_stderr(args.verbose, worker):
        try:
            return args.func(args)
        except CliError as exc:
            if exc.code == EXIT_USAGE:
                parser.error(str(exc))
            print_error(str(exc))
            return exc.code
        except ConfigurationError as exc:
            print_error(f"configuration: {exc}")
            return EXIT_FAILED
        except ChatHistoryError as exc:
            # UnavailableError names the server and never holds a password (the library redacts).
            print_error(str(exc))
            return EXIT_FAILED
        except KeyboardInterrupt:
            print_error("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # `chat-history stats | head`: the reader left. Python would complain again at exit while
            # flushing stdout, so point stdout at /dev/null first.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_FAILED
