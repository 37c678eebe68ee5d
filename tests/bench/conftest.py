"""A tiny trained LRA run, shared by the tests that read one (a few seconds to build)."""

from __future__ import annotations

import pytest

from nystromer.lra.demo import run_listops_demo


@pytest.fixture(scope="session")
def lra_run(tmp_path_factory):
    """A ListOps run directory (config.json, best/, last/) from two training steps.

    Built by the demo's own code, so it has the layout `nystromer train` writes; its
    validation expressions are 64–75 tokens long (the demo's generator on 24 examples).
    """
    workdir = tmp_path_factory.mktemp("lra")
    run_listops_demo(workdir, steps=2, sizes={"train": 64, "val": 24, "test": 8}, progress=False)
    return workdir / "run"
