"""The questions `pudding eval` scores: the split of each task and a seeded subset of it."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ..data import default_data_dirs, find_split, load_examples

TEST_SPLIT_TASKS = ("arc_challenge", "arc_easy", "openbookqa")


def eval_split(task: str, data_dir: str | None) -> str:
    """"test" for ARC and OpenBookQA when a local test split exists, else "validation"."""
    if task in TEST_SPLIT_TASKS:
        dirs = [Path(data_dir)] if data_dir else default_data_dirs()
        if any(find_split(d, task, "test") for d in dirs):
            return "test"
    return "validation"


def eval_examples(task: str, data_dir: str | None, limit: int | None, seed: int):
    """(split, examples): the evaluation rows of a task, a seeded subset of `limit` of them."""
    split = eval_split(task, data_dir)
    examples = load_examples(task, split, data_dir)  # HellaSwag: minus the holdout
    if limit is not None and limit < len(examples):
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        # a prefix of one permutation: a larger --limit extends a smaller one (cache reuse)
        keep = np.sort(rng.permutation(len(examples))[:limit])
        examples = [examples[i] for i in keep]
    return split, examples
