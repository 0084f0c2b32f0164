"""Paths named in input files stay inside their folder (pipeline.safe_paths)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from pipeline.config import InputDataError, StageError
from pipeline.safe_paths import PATH_RULES, UnsafePathError, inside


@pytest.fixture
def tree(tmp_path):
    """``root/`` with a file and a sub-folder, and a secret file beside it (outside)."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"inside")
    (tmp_path / "secret.txt").write_bytes(b"outside")
    return root


def test_relative_paths_inside_resolve_to_the_file(tree):
    assert inside(tree, "sub/a.jpg") == (tree / "sub" / "a.jpg").resolve()
    assert inside(tree, "sub/../sub/a.jpg") == (tree / "sub" / "a.jpg").resolve()  # '..' that stays inside
    assert inside(tree, "sub/not_yet.jpg") == (tree / "sub" / "not_yet.jpg").resolve()  # need not exist
    assert inside(tree, "./sub/a.jpg").read_bytes() == b"inside"


@pytest.mark.parametrize("relative,rule", [
    ("/etc/passwd", "absolute_path"),
    ("//server/share/x.jpg", "absolute_path"),
    ("../secret.txt", "parent_escape"),
    ("sub/../../secret.txt", "parent_escape"),
    ("..", "parent_escape"),
    ("../../../../outside/x.jpg", "parent_escape"),
    ("", "empty_name"),
    (".", "empty_name"),
    ("sub/..", "empty_name"),
    ("sub/a\0.jpg", "empty_name"),
])
def test_unsafe_names_are_refused_with_their_rule(tree, relative, rule):
    with pytest.raises(UnsafePathError) as info:
        inside(tree, relative, "mapping_file.json: entry '000000000001' image_path")
    message = str(info.value)
    assert info.value.rule == rule
    assert "entry '000000000001'" in message and str(tree) in message and rule in message
    assert PATH_RULES[rule] in message and "fix the entry or remove it" in message


def test_absolute_path_to_an_existing_file_inside_is_still_refused(tree):
    """An absolute name is refused by rule, not by where it lands."""
    with pytest.raises(UnsafePathError, match="absolute_path"):
        inside(tree, str(tree / "sub" / "a.jpg"))


def test_symlink_pointing_out_is_refused_and_one_pointing_in_is_followed(tree, tmp_path):
    os.symlink(tmp_path / "secret.txt", tree / "sub" / "link.jpg")
    os.symlink(tmp_path, tree / "up")
    os.symlink(tree / "sub" / "a.jpg", tree / "alias.jpg")
    for name in ("sub/link.jpg", "up/secret.txt", "up/root/sub/../../secret.txt"):
        with pytest.raises(UnsafePathError) as info:
            inside(tree, name)
        assert info.value.rule == "symlink_escape"
    assert inside(tree, "alias.jpg") == (tree / "sub" / "a.jpg").resolve()
    assert inside(tree, "up/root/sub/a.jpg") == (tree / "sub" / "a.jpg").resolve()  # out and back in


def test_a_sibling_folder_sharing_the_prefix_is_outside(tree, tmp_path):
    """``root2/`` starts with the characters of ``root`` but is not inside it."""
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "x.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "root2", tree / "sib")
    with pytest.raises(UnsafePathError, match="symlink_escape"):
        inside(tree, "sib/x.jpg")


def test_a_root_that_is_itself_a_link_is_followed(tree, tmp_path):
    link = tmp_path / "linked_root"
    os.symlink(tree, link)
    assert inside(link, "sub/a.jpg") == (tree / "sub" / "a.jpg").resolve()


def test_unsafe_path_error_is_an_input_error_that_loaders_catch():
    """The edit and piebench stages turn ValueError/InputDataError from a loader into a bad_input row."""
    assert issubclass(UnsafePathError, InputDataError) and issubclass(UnsafePathError, StageError)
    assert issubclass(UnsafePathError, ValueError)


def test_edit_rows_keep_an_unsafe_entry_as_a_bad_input_row(tree):
    from pipeline.editing import STATUS_BAD_INPUT, edit_rows

    def load(image_id, relative):
        inside(tree, relative, f"entry {image_id!r}")
        raise AssertionError("an unsafe path must not get past the check")

    editor = SimpleNamespace(image_seed=lambda image_id: 7)
    rows = edit_rows(editor, [("000000000001", "../secret.txt"), ("000000000002", "/etc/passwd")], load, 2)
    assert [r["status"] for r in rows] == [STATUS_BAD_INPUT, STATUS_BAD_INPUT]
    assert "parent_escape" in rows[0]["error"] and "absolute_path" in rows[1]["error"]
    assert all(r["image"] is None for r in rows)
