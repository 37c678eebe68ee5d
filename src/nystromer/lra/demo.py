"""A few-minute ListOps run on a small generated set: the training machinery end to end.

:func:`run_listops_demo` writes small ListOps splits in the official format
(``basic_{train,val,test}.tsv``), trains the authors' LRA model with Nyström attention on
them (sequences of 64–160 tokens, so that the 64 landmarks really approximate), shows the
progress bar and returns the test accuracy. What it reaches, and in how long, is in
docs/results.md ("`make demo`: what it prints").
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .recipes import load_recipe
from .run import train_task

__all__ = ["run_listops_demo", "DEMO_SIZES", "DEMO_SETTINGS"]

# Shallow expressions (max_depth 3 with the root at depth 1: an operator whose arguments are
# digits or one more operator over digits) are learnable in minutes; the LRA set nests up to
# depth 10 and takes hours.
DEMO_SIZES = {"train": 5000, "val": 500, "test": 500}
DEMO_SETTINGS = {"min_length": 64, "max_length": 160, "max_depth": 3, "max_args": 10}

WriteData = Callable[[Path, Mapping[str, int], int], None]


def _write_with_data_package(data_dir: Path, sizes: Mapping[str, int], seed: int) -> None:
    """Write the demo splits with the ListOps generator of :mod:`nystromer.lra.data`."""
    import shutil

    from .data import listops

    if (data_dir / listops.SETTINGS_FILE).is_file():
        # The demo's own set from an earlier call (perhaps of other sizes or seed): replace
        # it, as the run folder is. A folder of other data is refused by write_splits.
        shutil.rmtree(data_dir)
    listops.write_splits(data_dir, sizes, seed=seed, progress=False, **DEMO_SETTINGS)


def run_listops_demo(
    workdir: str | os.PathLike[str],
    *,
    steps: int = 700,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    progress: bool = True,
    write_data: WriteData | None = None,
) -> float:
    """Generate a small ListOps set in ``workdir``, train on it, return the test accuracy.

    Args:
        workdir: scratch directory (``data/`` and ``run/`` are created inside; an earlier
            demo run there is replaced).
        steps: training steps at batch 32.
        sizes: examples per split (default :data:`DEMO_SIZES`).
        seed: seeds the data and the training.
        progress: show the progress bar.
        write_data: ``write_data(data_dir, sizes, seed)`` writes ``basic_{split}.tsv`` files;
            the default uses :mod:`nystromer.lra.data`'s ListOps generator.

    Returns:
        Test accuracy of the best validation checkpoint, in [0, 1].
    """
    import shutil

    workdir = Path(workdir)
    data_dir, run_dir = workdir / "data", workdir / "run"
    sizes = dict(sizes or DEMO_SIZES)
    t0 = time.perf_counter()
    (write_data or _write_with_data_package)(data_dir, sizes, seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    # The paper's model and schedule shape; a larger peak rate suits a run this short.
    recipe = load_recipe(
        "listops",
        max_length=DEMO_SETTINGS["max_length"],
        steps=steps,
        lr=2e-3,
        eval_every=max(1, steps // 7),
        seed=seed,
    )
    print(
        f"ListOps demo: {sizes['train']} training expressions of "
        f"{DEMO_SETTINGS['min_length']}–{DEMO_SETTINGS['max_length']} tokens, Nyström "
        f"attention with {recipe.model.num_landmarks} landmarks, {steps} steps of batch "
        f"{recipe.training.batch_size}",
        flush=True,
    )
    result = train_task(recipe, data_dir, run_dir, device="auto", progress=progress)
    accuracy = float(result.test["accuracy"])
    print(
        f"ListOps demo: test accuracy {accuracy:.3f} after {steps} steps "
        f"({time.perf_counter() - t0:.0f} s); run files in {run_dir}",
        flush=True,
    )
    return accuracy
