"""``chat-history flush``: write dirty conversations back to PostgreSQL once, or as a standalone
write-back worker (``--loop``) that stops cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

from chat_history_rs import ChatHistoryError, ChatHistoryManager, UnavailableError
from chat_history_rs.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    close_quietly,
    human_age,
    library_log_level,
    log,
    open_manager,
    print_error,
    resolve_settings,
)

HELP = """\
Write conversations that are dirty in Redis back to PostgreSQL, once (prints how many; exit 1 if
some could not be written), or with --loop as a standalone write-back worker: flushes every
--interval seconds, logs each run, and on SIGTERM or SIGINT finishes the batch in flight, makes a
final flush and exits 0 (a second signal ends it at once; what is dirty stays in Redis)."""


def add_parser(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    flush = add("flush", "write dirty conversations back to PostgreSQL (once, or --loop)", HELP)
    flush.add_argument("--loop", action="store_true", help="run as a write-back worker until SIGTERM/SIGINT")
    flush.add_argument(
        "--interval", metavar="S", type=float, default=None, help="seconds between runs with --loop (default 10)"
    )
    flush.add_argument(
        "--close-timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="seconds the final flush may take (default 30)",
    )
    flush.set_defaults(func=cmd_flush)


def cmd_flush(args: argparse.Namespace) -> int:
    if args.loop:
        return run_flush_worker(args)
    if args.interval is not None:
        raise CliError("--interval needs --loop", EXIT_USAGE)
    settings = resolve_settings(args, redis="required")
    manager = open_manager(args, settings)
    verbose = args.verbose > 0
    try:
        redis_where = manager.stats().get("redis_url", "Redis")
        # WARNINGs from a flush that fails say what the one-line error below says; ERRORs still show.
        with library_log_level(logging.ERROR, verbose):
            written = manager.flush_dirty_conversations()
        stats = manager.stats()
    except UnavailableError as exc:
        close_quietly(manager, verbose)  # its flush would fail the same way, and say so twice
        message = str(exc)
        if message.startswith("Redis") and redis_where not in message:
            message += f" (Redis at {redis_where})"
        raise CliError(f"flush failed; nothing is lost, dirty conversations stay in Redis: {message}") from None
    except BaseException:
        close_quietly(manager, verbose)
        raise
    manager.close()
    print(f"wrote {written} conversation{'s' if written != 1 else ''} back to PostgreSQL")
    stuck = stats.get("stuck_conversations") or []
    dirty = stats.get("dirty_count")
    if dirty:
        print(f"{dirty} still dirty in Redis (saved since the flush began, or refused by PostgreSQL)")
    if stuck:
        shown = ", ".join(map(str, stuck[:10])) + (" ..." if len(stuck) > 10 else "")
        print_error(f"{len(stuck)} could not be written and stay dirty in Redis (see the log above): {shown}")
        return EXIT_FAILED
    return EXIT_OK


class StopSignals:
    """SIGTERM and SIGINT ask the worker to stop after the current batch; a second one ends it at once.

    The handler only records the request: the flush runs in Rust with the GIL released, and Python
    runs the handler once the call returns, so a batch in flight is always finished.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), signal.SIGINT) if s is not None)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum
            # A second signal takes the default action: an operator can always end it at once (what is
            # dirty then simply stays in Redis for the next flush).
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            raise CliError("flush --loop must run in the main thread (it handles SIGTERM and SIGINT)")
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def sleep(self, seconds: float) -> None:
        """Sleep until `seconds` pass or a stop is requested (checked every 0.2 s)."""
        deadline = time.monotonic() + seconds
        while self.received is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.2))

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


def _flush_run(manager: ChatHistoryManager, interval: float) -> None:
    """One write-back run of the worker, logged; errors are logged and the next run retries."""
    started = time.monotonic()
    try:
        written = manager.flush_dirty_conversations()
    except UnavailableError as exc:
        log.warning("flush run failed, retrying in %g s; nothing is lost (it stays dirty in Redis): %s", interval, exc)
        return
    except ChatHistoryError as exc:
        log.error("flush run failed, retrying in %g s: %s", interval, exc)
        return
    stats = manager.stats()
    log.info(
        "flush run: %d written in %.3f s; %s dirty (oldest %s); %d stuck",
        written,
        time.monotonic() - started,
        stats.get("dirty_count"),
        human_age(stats.get("oldest_dirty_age_seconds")),
        len(stats.get("stuck_conversations") or []),
    )


def run_flush_worker(args: argparse.Namespace) -> int:
    interval = 10.0 if args.interval is None else args.interval
    if not interval > 0 or math.isinf(interval):
        raise CliError(f"--interval must be a positive number of seconds, got {interval}", EXIT_USAGE)
    settings = resolve_settings(args, redis="required")
    stop = StopSignals()
    with stop.installed():
        manager = open_manager(args, settings)
        stats = manager.stats()
        log.info(
            "flush worker started: PostgreSQL %s, Redis %s, every %g s (stop with SIGTERM or Ctrl-C)",
            settings.postgres_url,
            stats.get("redis_url"),
            interval,
        )
        try:
            while stop.received is None:
                _flush_run(manager, interval)
                stop.sleep(interval)
            log.info("received %s: final flush, then exit", stop.name)
        finally:
            manager.close()  # the final flush; it logs what it could not write
    log.info("flush worker stopped")
    return EXIT_OK
