"""``python -m chat_history_rs.cli``: the same as ``chat-history`` and ``python -m chat_history_rs``."""

import sys

from chat_history_rs.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
