"""Long Range Arena data: readers for the official files and generators for ListOps/Pathfinder.

``load_split(task, data_dir, split, *, max_length=None)`` returns a torch Dataset of
``(input_ids, label)`` (retrieval: ``(input_ids_1, input_ids_2, label)``), ids >= 1 with 0 left
for padding, and the attributes ``vocab_size``, ``max_length`` and ``num_classes``.
``nystromer data listops`` and ``nystromer data pathfinder`` write new data in the release's
layout (:mod:`.listops`, :mod:`.pathfinder`).
"""

from .loaders import DEFAULT_MAX_LENGTH, NUM_CLASSES, SPLITS, TASKS, load_split

__all__ = ["TASKS", "SPLITS", "DEFAULT_MAX_LENGTH", "NUM_CLASSES", "load_split"]
