"""``python -m chat_history_rs``: the ``chat-history`` command line (see chat_history_rs.cli)."""

import sys

from chat_history_rs.cli import main

if __name__ == "__main__":
    sys.exit(main())
