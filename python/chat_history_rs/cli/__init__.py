"""``chat-history``: the operator's command line for chat_history_rs.

Pure Python over the public API (``ChatHistoryManager``, ``resolve_settings()``, ``stats()``,
``flush_dirty_conversations()`` and the exceptions); the standard library only. ``chat-history --help``
lists the commands; docs/monitoring.md and docs/deployment.md show them at work.

Exit codes (every command):

    0    done; for ``doctor``: every check OK
    1    the command failed: a server unreachable, a statement refused, bad settings, conversations
         that could not be written back; for ``doctor``: at least one WARN and no FAIL
    2    usage error (argparse: unknown option, missing command); for ``doctor``: at least one FAIL
    130  interrupted (Ctrl-C) outside ``flush --loop``

``doctor`` thus follows the Nagios plugin convention (0 OK, 1 WARNING, 2 CRITICAL), so a monitoring
agent can run it as a check as is.

The package holds a module per command (``init_db``, ``flush``, ``conflicts``, ``stats``, ``doctor``,
``config``), ``common`` for what they share, and ``main`` for the parser and ``main()``.
"""

from chat_history_rs.cli.common import CliError
from chat_history_rs.cli.main import build_parser, main
from chat_history_rs.cli.stats import format_human, format_prometheus

__all__ = ["CliError", "build_parser", "format_human", "format_prometheus", "main"]
