"""Fixtures: a tiny local BERT checkpoint and a small text corpus (built by .tiny)."""

from __future__ import annotations

import pytest

from .tiny import make_bert, make_text

pytest.importorskip("transformers")


@pytest.fixture
def bert_dir(tmp_path):
    return make_bert(tmp_path / "teacher")


@pytest.fixture
def text_file(tmp_path):
    return make_text(tmp_path / "text.txt")
