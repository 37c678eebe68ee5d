"""Rewriting one marked section of a Markdown file: the rest is kept, bad markers refused."""

from __future__ import annotations

import pytest

from nystromer._markdown import replace_section

B, E = "<!-- x:begin -->", "<!-- x:end -->"


def test_replaces_its_section_and_keeps_the_rest_byte_for_byte(tmp_path):
    f = tmp_path / "r.md"
    f.write_bytes(b"# T\n\nbefore\n" + f"{B}\nold\n{E}\n".encode() + b"after\n")
    replace_section(f, B, E, "new\n")
    assert f.read_bytes() == b"# T\n\nbefore\n" + f"{B}\nnew\n{E}\n".encode() + b"after\n"
    g = tmp_path / "missing" / "r.md"
    replace_section(g, B, E, "one", new_file="# R\n")
    replace_section(g, B, E, "two", new_file="# R\n")
    assert g.read_text() == f"# R\n\n{B}\ntwo\n{E}\n"


def test_windows_line_endings_are_kept(tmp_path):
    f = tmp_path / "r.md"
    f.write_bytes(f"# T\r\n\r\n{B}\r\nold\r\n{E}\r\ntail\r\n".encode())
    replace_section(f, B, E, "a\nb")
    assert f.read_bytes() == f"# T\r\n\r\n{B}\r\na\r\nb\r\n{E}\r\ntail\r\n".encode()


@pytest.mark.parametrize(
    "body",
    [
        f"{B}\nmine\n",  # begin without end: a later write would swallow what follows
        f"mine\n{E}\n",  # end without begin
        f"{E}\nmine\n{B}\n",  # in the wrong order
        f"{B}\na\n{E}\nmine\n{B}\nb\n{E}\n",  # twice
        f"{B}\n{B}\na\n{E}\nmine\n{E}\n",  # nested
    ],
)
def test_broken_markers_are_refused_and_the_file_is_untouched(tmp_path, body):
    f = tmp_path / "r.md"
    f.write_text("# T\n" + body + "other section\n")
    before = f.read_bytes()
    with pytest.raises(ValueError, match=r"r\.md.*<!-- x:begin -->.*file was not changed"):
        replace_section(f, B, E, "new")
    assert f.read_bytes() == before


def test_a_marker_quoted_inside_a_line_is_not_a_marker(tmp_path):
    f = tmp_path / "r.md"
    prose = f"The section sits between `{B}` and `{E}`.\n"
    f.write_text(prose)
    replace_section(f, B, E, "new")
    assert f.read_text() == f"{prose}\n{B}\nnew\n{E}\n"


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    f = tmp_path / "r.md"
    f.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"r\.md is not UTF-8"):
        replace_section(f, B, E, "new")
    assert f.read_bytes() == b"caf\xe9\n"
