"""Reads a ``.env`` file into the environment, as python-dotenv's ``load_dotenv()`` does by default.

The library itself never reads a file it was not given: ``ChatHistoryManager`` reads keyword arguments
and the process's environment only. The ``chat-history`` command and the example apps call
:func:`load_env_file` first, so a ``.env`` copied from ``.env.example`` works for them as it did for
the seed's app (which called ``load_dotenv()``).

The format is python-dotenv's common subset: ``NAME=value`` lines, blank lines and ``#`` comments,
an optional ``export`` in front, values in single quotes (taken as they are) or double quotes
(``\\n``, ``\\t``, ``\\"`` and ``\\\\`` escapes), and a `` #`` comment after an unquoted value. A variable
already set in the environment wins over the file (python-dotenv's ``override=False``). ``${VAR}``
references are not expanded.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Optional, Union

__all__ = ["load_env_file", "parse_env_file"]

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _value(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), raw[1:-1])
    # An unquoted value ends at a " #" comment.
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip()


def parse_env_file(path: Union[str, os.PathLike[str]]) -> dict[str, str]:
    """The variables a ``.env`` file sets, in order. Lines that are not ``NAME=value`` are skipped."""
    found: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match:
            found[match.group(1)] = _value(match.group(2))
    return found


def load_env_file(
    path: Union[str, os.PathLike[str]] = ".env", environ: Optional[MutableMapping[str, str]] = None
) -> list[str]:
    """Sets the variables of the file at ``path`` that ``environ`` (default: ``os.environ``) lacks;
    returns their names. A missing file sets nothing."""
    target = os.environ if environ is None else environ
    if not Path(path).is_file():
        return []
    added = []
    for name, value in parse_env_file(path).items():
        if name not in target:
            target[name] = value
            added.append(name)
    return added
