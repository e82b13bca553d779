"""The public surface against its one declaration: the keyword table (``config::resolve::KEYWORDS`` in
src/config/resolve/keywords.rs, exposed as ``_core._KEYWORDS``) against the pyo3 signatures, the binding's
conversions, ``ResolvedSettings``, the stubs and the README's configuration table; and ``stats()`` against
its TypedDict in ``_core.pyi``. The resolver's defaults and variables are held to the table by a Rust unit
test (``the_resolver_follows_the_keyword_table``)."""

from __future__ import annotations

import ast
import inspect
import os
import re
from pathlib import Path

import pytest

import chat_history_rs
from chat_history_rs import ChatHistoryManager, ConfigurationError, InvalidTypeError, resolve_settings
from chat_history_rs._core import _KEYWORDS, _MANAGER_KEYWORDS, _POSITIONAL_KEYWORDS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(chat_history_rs.__file__).parent
NAMES = [row[0] for row in _KEYWORDS]
PROVIDERS = [row[0] for row in _KEYWORDS if row[1] == "CredentialProvider"]
SETTINGS = [row for row in _KEYWORDS if row[1] != "CredentialProvider"]
# What the binding says a value of the wrong type should have been, by the table's annotation.
WANTED = {
    "Mode": "a str",
    "str": "a str",
    "Union[str, os.PathLike[str]]": "a str or an os.PathLike",
    "int": "an int",
    "float": "a number of seconds (int or float)",
    "bool": "True or False",
    "Union[bool, str]": "True, False or a str",
}
# A value of each kind that every setting of that kind takes from the environment.
SAMPLE = {
    "Mode": "postgres",
    "str": "x",
    "Union[str, os.PathLike[str]]": "/tmp/x",
    "int": "3",
    "bool": "true",
    "Union[bool, str]": "zlib",
}


def _function(stub: Path, owner: str | None, name: str) -> ast.FunctionDef:
    for node in ast.parse(stub.read_text(encoding="utf-8")).body:
        body = node.body if owner is not None and isinstance(node, ast.ClassDef) and node.name == owner else None
        for item in body if body is not None else ([node] if owner is None else []):
            if isinstance(item, ast.FunctionDef) and item.name == name:
                return item
    raise AssertionError(f"{owner}.{name} not in {stub.name}")


def _parameters(function: ast.FunctionDef) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(positional, keyword-only) parameters as (name, annotation, default), without self or cls."""
    args = function.args
    positional = [a for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)

    def row(arg: ast.arg, default: ast.expr | None) -> tuple[str, str, str]:
        return arg.arg, ast.unparse(arg.annotation) if arg.annotation else "", ast.unparse(default) if default else ""

    return (
        [row(a, d) for a, d in zip(positional, defaults)],
        [row(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults)],
    )


def _rows(names: list[str]) -> list[tuple[str, str, str]]:
    """What the stubs should say of these keyword arguments: ``Optional[annotation] = None`` each."""
    annotation = {row[0]: row[1] for row in _KEYWORDS}
    return [(name, f"Optional[{annotation[name]}]", "None") for name in names]


# pyo3's constructor is __new__; the Python class's is __init__.
@pytest.mark.parametrize(
    ("stub", "owner", "constructor"),
    [("_core.pyi", "ChatHistoryManager", "__new__"), ("_asyncio.pyi", "AsyncChatHistoryManager", "__init__")],
)
def test_the_managers_stubs_follow_the_keyword_table(stub, owner, constructor):
    positional, keyword_only = _parameters(_function(PACKAGE / stub, owner, constructor))
    assert positional == _rows(NAMES[:_POSITIONAL_KEYWORDS])
    assert keyword_only == _rows(NAMES[_POSITIONAL_KEYWORDS:])


def test_resolve_settings_stub_follows_the_keyword_table():
    positional, keyword_only = _parameters(_function(PACKAGE / "_core.pyi", None, "resolve_settings"))
    assert positional == [("environ", "Optional[Mapping[str, str]]", "None")]
    assert keyword_only == _rows([row[0] for row in SETTINGS])


def test_the_pyo3_signatures_follow_the_keyword_table():
    parameters = list(inspect.signature(ChatHistoryManager).parameters.values())
    assert [(p.name, p.kind, p.default) for p in parameters[:-1]] == [
        (name, inspect.Parameter.POSITIONAL_OR_KEYWORD, None) for name in NAMES[:_POSITIONAL_KEYWORDS]
    ]
    assert (parameters[-1].name, parameters[-1].kind) == ("kwargs", inspect.Parameter.VAR_KEYWORD)
    assert list(inspect.signature(resolve_settings).parameters) == ["environ", "kwargs"]
    assert list(_MANAGER_KEYWORDS) == NAMES
    assert NAMES[-len(PROVIDERS) :] == PROVIDERS, "the credential providers come last"


@pytest.mark.parametrize("row", SETTINGS, ids=[row[0] for row in SETTINGS])
def test_the_binding_converts_each_keyword_by_its_kind(row, tmp_path):
    name, annotation = row[0], row[1]
    with pytest.raises(InvalidTypeError, match=f"^{name} must be {re.escape(WANTED[annotation])}, got object$"):
        ChatHistoryManager(**{"mode": "local", "base_dir": str(tmp_path), name: object()})
    with pytest.raises(InvalidTypeError, match=f"^{name} must be "):
        resolve_settings(environ={}, **{name: object()})


def test_a_credential_provider_must_be_callable(tmp_path):
    for name in PROVIDERS:
        with pytest.raises(ConfigurationError, match=name):
            ChatHistoryManager(mode="local", base_dir=str(tmp_path), **{name: object()})


def test_resolved_settings_follow_the_keyword_table():
    resolved = resolve_settings(environ={})
    assert [entry["name"] for entry in resolved.entries()] == [row[0] for row in SETTINGS]
    for name, _, default, _, _ in SETTINGS:
        # base_dir defaults to the current directory, a value the table cannot hold (it says None).
        expected = os.getcwd() if name == "base_dir" else default
        assert (resolved.value(name), resolved.source(name)) == (expected, "default"), name
    for name, annotation, _, variables, _ in SETTINGS:
        for k, variable in enumerate(variables):
            # Every later variable is set too: the first set one wins.
            environ = {later: SAMPLE[annotation] for later in variables[k:]}
            assert resolve_settings(environ=environ).source(name) == f"env {variable}", (name, variable)


def test_the_readme_table_follows_the_keyword_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ", 5)]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells
    assert set(rows) == set(NAMES), set(NAMES) ^ set(rows)
    for name, annotation, default, variables, _ in _KEYWORDS:
        _, environment, shown, _ = rows[name]
        assert set(variables) <= set(re.findall(r"`(\w+)`", environment)), name
        if annotation in ("int", "float") or (annotation == "Mode" and default is not None):
            literal = f'"{default}"' if isinstance(default, str) else f"{default}"
            assert f"`{literal}`" in shown, (name, shown)


def _typed_dict_keys(name: str) -> set[str]:
    for node in ast.parse((PACKAGE / "_core.pyi").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError(f"{name} not in _core.pyi")


def test_stats_keys_are_the_typed_dicts_keys(make_manager, tmp_path, pg_url, redis_url):
    always = _typed_dict_keys("_CallStats")
    with_redis = always | _typed_dict_keys("Stats")
    assert set(make_manager(mode="local", base_dir=str(tmp_path)).stats()) == always
    assert set(make_manager(mode="postgres", connection_string=pg_url).stats()) == always
    manager = make_manager(
        mode="redis", connection_string=pg_url, redis_connection_string=redis_url, background_flush=False
    )
    stats = manager.stats()
    assert set(stats) == with_redis
    assert stats["redis_nodes"] == [], "one node: no cluster nodes to list"


def test_redis_node_keys_are_the_typed_dicts_keys():
    """The keys of each ``redis_nodes`` entry, as the binding builds them (src/bindings/manager.rs), are the
    RedisNode TypedDict's (tests/cluster checks the values on a real cluster)."""
    source = (ROOT / "src" / "bindings" / "manager.rs").read_text(encoding="utf-8")
    built = set(re.findall(r'entry\.set_item\("(\w+)"', source))
    assert built == _typed_dict_keys("RedisNode")
