"""Local mode: one JSON file per conversation in <base_dir>/.chat_history/, as Phase 1 wrote them."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from chat_history_rs import ValidationError

UNICODE_TEXT = "Grüße aus Zürich — 你好，世界 — こんにちは — 🚀✨ — naïve café — Ελληνικά"


def history_dir(base: Path) -> Path:
    return base / ".chat_history"


def tree(root: Path) -> set[str]:
    """Every file and folder under root, relative, as strings."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def phase1_write(base: Path, conversation_id: str, conversation: dict) -> Path:
    """What the Phase 1 Python code did: json.dump(conv, f, ensure_ascii=False, indent=2)."""
    folder = history_dir(base)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{conversation_id}.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(conversation, f, ensure_ascii=False, indent=2)
    return path


# --------------------------------------------------------------------------------------------------
# File format
# --------------------------------------------------------------------------------------------------


def test_save_writes_one_file_named_after_the_id(local_manager, tmp_path, conv_id, sample_conversation):
    conv = sample_conversation(3)
    local_manager.save_conversation(conv_id, conv)

    path = history_dir(tmp_path) / f"{conv_id}.json"
    assert path.is_file()
    assert json.loads(path.read_text(encoding="utf-8")) == conv
    assert sorted(os.listdir(history_dir(tmp_path))) == [f"{conv_id}.json"]


def test_file_is_utf8_with_non_ascii_as_is_and_indented_two(local_manager, tmp_path, conv_id, sample_conversation):
    conv = sample_conversation(title=f"Titel: {UNICODE_TEXT}", contents=[UNICODE_TEXT, "Antwort: " + UNICODE_TEXT])
    local_manager.save_conversation(conv_id, conv)

    raw = (history_dir(tmp_path) / f"{conv_id}.json").read_bytes()
    text = raw.decode("utf-8")  # strict: raises on anything that is not UTF-8
    assert json.loads(text) == conv
    # Non-ASCII written as is, not as \uXXXX escapes.
    assert UNICODE_TEXT in text
    assert "\\u" not in text
    # json.dumps(..., indent=2) layout: top-level keys at 2 spaces, message keys at 6, no tabs.
    assert "\t" not in text
    lines = text.splitlines()
    assert lines[0] == "{"
    assert lines[-1] == "}"
    for key in ("title", "model", "messages", "created_at", "last_modified"):
        assert any(line.startswith(f'  "{key}": ') for line in lines), key
    for key in ("role", "content", "time"):
        assert any(line.startswith(f'      "{key}": ') for line in lines), key
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, repr(line)


def test_phase1_file_reads_back_equal(local_manager, tmp_path, conv_id, sample_conversation):
    conv = sample_conversation(4, title=UNICODE_TEXT, contents=["a", UNICODE_TEXT, "c", 'quotes " and \\ backslash'])
    phase1_write(tmp_path, conv_id, conv)

    assert local_manager.get_conversation(conv_id) == conv
    assert local_manager.list_conversations() == [(conv_id, conv)]


def test_phase1_file_with_old_timestamps_is_listed(local_manager, tmp_path, conv_id, sample_conversation):
    # Local mode lists every readable file, whatever its age (history_days is a PostgreSQL filter).
    old = (datetime.now(timezone.utc) - timedelta(days=400)).isoformat()
    conv = sample_conversation(created_at=old, last_modified=old)
    phase1_write(tmp_path, conv_id, conv)

    assert local_manager.list_conversations() == [(conv_id, conv)]


def test_product_file_reads_back_in_plain_python(local_manager, tmp_path, conv_id, sample_conversation):
    conv = sample_conversation(5, contents=["1", "2 " + UNICODE_TEXT, "3", "4", "5"])
    local_manager.save_conversation(conv_id, conv)

    with open(history_dir(tmp_path) / f"{conv_id}.json", encoding="utf-8") as f:
        assert json.load(f) == conv


def test_save_then_get_round_trip(local_manager, conv_id, sample_conversation):
    conv = sample_conversation(6)
    local_manager.save_conversation(conv_id, conv)
    got = local_manager.get_conversation(conv_id)
    assert got == conv
    assert [m["content"] for m in got["messages"]] == [m["content"] for m in conv["messages"]]


def test_empty_message_list_round_trip(local_manager, conv_id, sample_conversation):
    conv = sample_conversation(0)
    assert conv["messages"] == []
    local_manager.save_conversation(conv_id, conv)
    assert local_manager.get_conversation(conv_id) == conv


def test_resave_replaces_the_file(local_manager, tmp_path, conv_id, sample_conversation):
    first = sample_conversation(2, title="first")
    second = sample_conversation(5, title="second")
    local_manager.save_conversation(conv_id, first)
    local_manager.save_conversation(conv_id, second)

    assert local_manager.get_conversation(conv_id) == second
    assert json.loads((history_dir(tmp_path) / f"{conv_id}.json").read_text(encoding="utf-8")) == second


def test_aware_datetime_values_are_stored_as_iso_strings(local_manager, tmp_path, conv_id, sample_conversation):
    # A datetime object is accepted (`ConversationInput` in chat_history_rs/_core.pyi); JSON can only hold it as
    # its ISO 8601 text.
    when = datetime(2025, 11, 26, 0, 35, 21, 123456, tzinfo=timezone.utc)
    conv = sample_conversation(1, created_at=when, last_modified=when)
    conv["messages"][0]["time"] = when
    local_manager.save_conversation(conv_id, conv)

    expected = dict(conv, created_at=when.isoformat(), last_modified=when.isoformat())
    expected["messages"] = [dict(conv["messages"][0], time=when.isoformat())]
    assert local_manager.get_conversation(conv_id) == expected
    on_disk = json.loads((history_dir(tmp_path) / f"{conv_id}.json").read_text(encoding="utf-8"))
    assert on_disk["created_at"] == "2025-11-26T00:35:21.123456+00:00"


# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------


def test_list_is_sorted_by_file_name_with_full_conversations(local_manager, sample_conversation):
    ids = ["c0ffee00", "0badf00d", "deadbeef", "9a9a9a9a", "a0000001", "10000000"]
    convs = {cid: sample_conversation(i + 1, title=f"chat {cid}") for i, cid in enumerate(ids)}
    for cid in ids:  # saved in an order that is not the sorted one
        local_manager.save_conversation(cid, convs[cid])

    listed = local_manager.list_conversations()
    assert [cid for cid, _ in listed] == sorted(ids)
    for cid, conv in listed:
        assert conv == convs[cid]  # full conversation, messages included
        assert len(conv["messages"]) == len(convs[cid]["messages"])
    assert all(isinstance(item, tuple) and len(item) == 2 for item in listed)


def test_list_of_empty_or_missing_folder_is_empty(tmp_path, make_manager):
    manager = make_manager(mode="local", base_dir=str(tmp_path / "does-not-exist-yet"))
    assert manager.list_conversations() == []
    assert manager.get_conversation("abcd1234") is None


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="truncated"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x00garbage\x80", id="not-utf8"),
        pytest.param(b"[1, 2, 3]", id="json-array"),
        pytest.param(b'"just a string"', id="json-string"),
    ],
)
def test_corrupt_files_are_skipped_and_read_as_none(local_manager, tmp_path, sample_conversation, content):
    good = sample_conversation(2)
    local_manager.save_conversation("aaaa0001", good)
    (history_dir(tmp_path) / "bbbb0002.json").write_bytes(content)
    later_good = sample_conversation(3)
    local_manager.save_conversation("cccc0003", later_good)

    assert local_manager.list_conversations() == [("aaaa0001", good), ("cccc0003", later_good)]
    assert local_manager.get_conversation("bbbb0002") is None


def test_files_without_json_suffix_are_ignored(local_manager, tmp_path, conv_id, sample_conversation):
    conv = sample_conversation(1)
    local_manager.save_conversation(conv_id, conv)
    (history_dir(tmp_path) / "notes.txt").write_text("hello")
    (history_dir(tmp_path) / "README").write_text(json.dumps(conv))

    assert local_manager.list_conversations() == [(conv_id, conv)]


# --------------------------------------------------------------------------------------------------
# user_id, base_dir
# --------------------------------------------------------------------------------------------------


def test_user_id_is_ignored(local_manager, conv_id, user_id, other_user_id, sample_conversation):
    conv = sample_conversation(2)
    local_manager.save_conversation(conv_id, conv, user_id=user_id)

    assert local_manager.get_conversation(conv_id, user_id=other_user_id) == conv
    assert local_manager.get_conversation(conv_id) == conv
    assert local_manager.list_conversations() == [(conv_id, conv)]
    assert local_manager.list_conversations(user_id=other_user_id) == [(conv_id, conv)]

    local_manager.delete_conversation(conv_id, user_id=other_user_id)
    assert local_manager.get_conversation(conv_id) is None


def test_positional_arguments_match_phase1(local_manager, conv_id, user_id, sample_conversation):
    conv = sample_conversation(1)
    local_manager.save_conversation(conv_id, conv, user_id)
    assert local_manager.get_conversation(conv_id, user_id) == conv
    assert local_manager.list_conversations(user_id) == [(conv_id, conv)]
    local_manager.delete_conversation(conv_id, user_id)
    assert local_manager.get_conversation(conv_id, user_id) is None


def test_default_base_dir_is_current_working_directory(
    make_manager, tmp_path, monkeypatch, conv_id, sample_conversation
):
    monkeypatch.chdir(tmp_path)
    manager = make_manager()  # mode="local" is the default
    conv = sample_conversation(2)
    manager.save_conversation(conv_id, conv)

    path = tmp_path / ".chat_history" / f"{conv_id}.json"
    assert path.is_file()
    assert json.loads(path.read_text(encoding="utf-8")) == conv
    assert manager.get_conversation(conv_id) == conv


def test_base_dir_accepts_pathlib_path(make_manager, tmp_path, conv_id, sample_conversation):
    manager = make_manager(mode="local", base_dir=tmp_path)
    conv = sample_conversation(1)
    manager.save_conversation(conv_id, conv)
    assert (tmp_path / ".chat_history" / f"{conv_id}.json").is_file()


def test_two_managers_on_one_folder_see_each_others_files(make_manager, tmp_path, conv_id, sample_conversation):
    writer = make_manager(mode="local", base_dir=str(tmp_path))
    reader = make_manager(mode="local", base_dir=str(tmp_path))
    conv = sample_conversation(2)
    writer.save_conversation(conv_id, conv)
    assert reader.get_conversation(conv_id) == conv


# --------------------------------------------------------------------------------------------------
# Ids that would escape the folder
# --------------------------------------------------------------------------------------------------

ESCAPING_IDS = ["../x", "a/b", "/etc/passwd", "..\\x", "../../../../tmp/evil", "sub/../../x"]


@pytest.mark.parametrize("bad_id", ESCAPING_IDS)
def test_escaping_ids_are_refused_on_save_and_nothing_is_written(tmp_path, make_manager, sample_conversation, bad_id):
    base = tmp_path / "app"
    base.mkdir()
    manager = make_manager(mode="local", base_dir=str(base))
    before = tree(tmp_path)
    with pytest.raises(ValueError):
        manager.save_conversation(bad_id, sample_conversation(1))
    after = tree(tmp_path)
    # Creating the empty .chat_history folder is fine; any file is not.
    assert {p for p in after - before if p != "app/.chat_history"} == set()
    assert not Path("/etc/passwd.json").exists()


@pytest.mark.parametrize(
    ("bad_id", "planted"),
    [
        ("../x", "x.json"),  # relative to base_dir
        ("a/b", ".chat_history/a/b.json"),
        ("..\\x", ".chat_history/..\\x.json"),  # a plain file name on POSIX, a path on Windows
    ],
)
def test_escaping_ids_are_refused_on_get_and_delete(tmp_path, make_manager, sample_conversation, bad_id, planted):
    base = tmp_path / "app"
    manager = make_manager(mode="local", base_dir=str(base))
    # Plant a valid conversation where the id would point if it were used as a path.
    target = base / planted
    target.parent.mkdir(parents=True, exist_ok=True)
    conv = sample_conversation(1)
    target.write_text(json.dumps(conv), encoding="utf-8")

    with pytest.raises(ValueError):
        manager.get_conversation(bad_id)
    with pytest.raises(ValueError):
        manager.delete_conversation(bad_id)
    assert json.loads(target.read_text(encoding="utf-8")) == conv


# --------------------------------------------------------------------------------------------------
# Delete, atomic replace
# --------------------------------------------------------------------------------------------------


def test_delete_removes_the_file(local_manager, tmp_path, conv_id, sample_conversation):
    keep = sample_conversation(1, title="keep")
    local_manager.save_conversation(conv_id, sample_conversation(2))
    local_manager.save_conversation("keep0000", keep)

    local_manager.delete_conversation(conv_id)

    assert not (history_dir(tmp_path) / f"{conv_id}.json").exists()
    assert local_manager.get_conversation(conv_id) is None
    assert local_manager.list_conversations() == [("keep0000", keep)]


def test_delete_of_missing_id_is_a_noop(local_manager, tmp_path, sample_conversation):
    keep = sample_conversation(1)
    local_manager.save_conversation("keep0000", keep)
    assert local_manager.delete_conversation("00000000") is None
    assert local_manager.list_conversations() == [("keep0000", keep)]


def test_no_temp_files_left_after_saves(local_manager, tmp_path, sample_conversation):
    ids = [f"{i:08x}" for i in range(5)]
    for round_ in range(3):
        for cid in ids:
            local_manager.save_conversation(cid, sample_conversation(round_ + 1))

    assert sorted(os.listdir(history_dir(tmp_path))) == sorted(f"{cid}.json" for cid in ids)
    assert tree(tmp_path) == {".chat_history"} | {f".chat_history/{cid}.json" for cid in ids}


def test_save_replaces_by_rename_not_in_place(local_manager, tmp_path, conv_id, sample_conversation):
    # An atomic replace (temp file + rename) gives the path a new inode; an in-place rewrite keeps it,
    # and a reader could then see a half-written file.
    local_manager.save_conversation(conv_id, sample_conversation(1))
    path = history_dir(tmp_path) / f"{conv_id}.json"
    first_inode = path.stat().st_ino
    held_open = open(path, encoding="utf-8")  # pins the old inode so it cannot be reused
    try:
        second = sample_conversation(3)
        local_manager.save_conversation(conv_id, second)
        assert path.stat().st_ino != first_inode
        assert json.loads(path.read_text(encoding="utf-8")) == second
    finally:
        held_open.close()


def test_refused_save_leaves_file_byte_identical(local_manager, tmp_path, conv_id, sample_conversation):
    good = sample_conversation(2)
    local_manager.save_conversation(conv_id, good)
    path = history_dir(tmp_path) / f"{conv_id}.json"
    before = path.read_bytes()

    bad = sample_conversation(2)
    bad["messages"][1]["role"] = "system"
    with pytest.raises(ValidationError):
        local_manager.save_conversation(conv_id, bad)

    assert path.read_bytes() == before
    assert sorted(os.listdir(history_dir(tmp_path))) == [f"{conv_id}.json"]
