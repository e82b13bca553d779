#!/usr/bin/env python3
"""Checks the crate's imports flow one way (docs/design.md, section 12, "The modules").

Every path a module names (`use crate::...`, `use super::...`, `crate::a::b::C` in code, `pub use`
re-exports) is an edge from that module to the module the path resolves to. Fails, naming the
edges, when

- two modules import each other, or any longer cycle closes (a folder's façade `mod.rs` counts as a
  module of its own, so a child that imports its façade closes a cycle with it); or
- a module imports one from a higher layer (LAYERS below: the core's top-level modules, lowest
  first).

A `#[cfg(test)]` module's imports count too. Also fails when the layer table of docs/design.md's module
map (section 12) names other top-level modules, or other layers, than LAYERS below. Run by `make lint`;
`--graph` prints the edges.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# The crate's top-level modules, lowest layer first; a module may import only from its own layer
# or a lower one. A top-level module missing here fails the check, so a new one is placed deliberately.
LAYERS: list[set[str]] = [
    {"error"},
    {"model", "credentials"},
    {"validate", "pool", "process"},
    {"config"},
    {"store", "cache"},
    {"writeback", "stats", "feed"},
    {"cached"},
    {"manager"},
    {"bindings"},
    {"lib"},
]

PATH = re.compile(r"(?<![\w:])(\w+)((?:\s*::\s*\w+)+)")
INLINE_MOD = re.compile(r"\bmod\s+(\w+)\s*\{")
USE = re.compile(r"\buse\s+([^;]*);")


def strip(text: str) -> str:
    """The source without comments, string and char literals (each replaced by a space)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
        elif (m := re.compile(r'(?:b|c)?r(#*)"').match(text, i)) and (i == 0 or not text[i - 1].isalnum()):
            end = text.find('"' + m.group(1), m.end())
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append(" ")
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append(" ")
        elif c == "'" and (m := re.compile(r"'(?:\\.[^']*|[^\\'\n])'").match(text, i)):
            i = m.end()
            out.append(" ")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(path: Path, src: Path) -> tuple[str, ...]:
    parts = path.relative_to(src).with_suffix("").parts
    if parts[-1] == "mod":
        parts = parts[:-1]
    return () if parts == ("lib",) else parts


def expand(tree: str) -> list[str]:
    """`a::{b, c::{d, e}}` as ["a::b", "a::c::d", "a::c::e"] (`self` in braces names the prefix)."""
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        return [re.sub(r"(::\*|as\w+)$", "", tree.replace("::self", ""))]
    head, _, rest = tree.partition("{")
    body = rest[: rest.rfind("}")]
    items, depth, start = [], 0, 0
    for k, ch in enumerate(body):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append(body[start:k])
            start = k + 1
    items.append(body[start:])
    paths = []
    for item in filter(None, items):
        paths += [head.rstrip(":") if p in ("self", "") else head + p for p in expand(item)]
    return paths


def resolve(names: list[str], here: tuple[str, ...], modules: set[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The module a path (split at `::`) lands in: the longest prefix that is a module. None for a path into
    another crate (or a local item), which is neither `crate::`, `super::`, `self::` nor a child module's name."""
    base: tuple[str, ...]
    if names[0] == "crate":
        base, names = (), names[1:]
    elif names[0] not in ("super", "self"):
        # A child module named without `self::` (edition 2018), e.g. a façade's `pub use store::PostgresStore`.
        real = tuple(part for part in here if part != "<inline>")
        if real + (names[0],) not in modules or len(real) != len(here):
            return None
        base = real
    else:
        base = here
        while names and names[0] in ("super", "self"):
            base = base[:-1] if names[0] == "super" else base
            names = names[1:]
    full = base + tuple(names)
    for k in range(len(full), -1, -1):
        if full[:k] in modules:
            return full[:k]
    return None


def edges(src: Path) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    files = {module_of(p, src): p for p in sorted(src.rglob("*.rs"))}
    modules = set(files)
    graph: dict[tuple[str, ...], set[tuple[str, ...]]] = {m: set() for m in modules}
    for module, path in files.items():
        text = strip(path.read_text())
        # Inline `mod x { ... }` blocks (tests): `super` inside one names the file's module.
        spans = []
        for m in INLINE_MOD.finditer(text):
            depth, k = 1, m.end()
            while k < len(text) and depth:
                depth += (text[k] == "{") - (text[k] == "}")
                k += 1
            spans.append((m.start(), k))

        found: list[tuple[int, str]] = []
        for m in USE.finditer(text):
            found += [(m.start(), p) for p in expand(m.group(1))]
        used = [(m.start(), m.end()) for m in USE.finditer(text)]
        for m in PATH.finditer(text):
            if not any(a <= m.start() < b for a, b in used):
                found.append((m.start(), m.group(1) + re.sub(r"\s+", "", m.group(2))))
        for pos, p in found:
            here = module + ("<inline>",) * sum(a <= pos < b for a, b in spans)
            target = resolve(p.split("::"), here, modules)
            if target is not None and target != module and target[: len(module)] != module + ("<inline>",):
                graph[module].add(target)
    return graph


def cycles(graph: dict[tuple[str, ...], set[tuple[str, ...]]]) -> list[list[tuple[str, ...]]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[tuple[str, ...], int] = {}
    low: dict[tuple[str, ...], int] = {}
    stack: list[tuple[str, ...]] = []
    out: list[list[tuple[str, ...]]] = []

    def visit(v: tuple[str, ...]) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(module: tuple[str, ...]) -> str:
    return "::".join(module) or "crate"


def documented_layers(design: Path) -> list[set[str]]:
    """The layers docs/design.md's module map lists: each row `| n | `a`, `b` | ... |` of section 12's table."""
    text = design.read_text(encoding="utf-8")
    section = text[text.index("## 12. The modules") :]
    section = section[: section.index("\n## ", 1)]
    rows = [line.split("|") for line in section.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    return [set(re.findall(r"`(\w+)`", cells[2])) for cells in rows]


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    src = root / "src"
    graph = edges(src)
    if "--graph" in sys.argv:
        for m in sorted(graph):
            print(f"{name(m)} -> {', '.join(name(t) for t in sorted(graph[m]))}")
    problems = []
    for component in cycles(graph):
        members = set(component)
        links = [f"{name(a)} -> {name(b)}" for a in component for b in sorted(graph[a]) if b in members]
        problems.append(f"import cycle among {', '.join(map(name, component))}: {'; '.join(links)}")
    rank = {top: k for k, layer in enumerate(LAYERS) for top in layer}
    for m in sorted(graph):
        top = m[0] if m else "lib"
        if top not in rank:
            problems.append(f"{name(m)}: top-level module {top!r} is in no layer of scripts/check_imports.py")
            continue
        for t in sorted(graph[m]):
            if t and rank.get(t[0], -1) > rank[top]:
                problems.append(f"{name(m)} imports {name(t)}, from a layer above it")
    documented = documented_layers(root / "docs" / "design.md")
    if documented != [layer for layer in LAYERS if layer != {"lib"}]:
        problems.append(f"docs/design.md's module map (section 12) lists the layers {documented}, not {LAYERS[:-1]}")
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"imports: {len(graph)} modules, no cycles, none upward")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
