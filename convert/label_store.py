"""The router label table on disk: parquet shards plus a meta.json that records the settings.

    meta.json             settings (model, candidates, tasks, seed, ...) and the shard count
    shard-00000.parquet   rows of a fixed slice of the question list, one row per answer choice:
                          task, qid, choice, gold, text (the method's prompt + this choice),
                          context (the question as the router reads it, `router_text`),
                          loglik (one float per candidate)

Each shard is written whole (temporary file, then os.replace), so an interrupted run loses at
most the shard it was writing and a rerun with the same settings skips the finished ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pudding_mlx.errors import PuddingError
from pudding_mlx.files import read_json, write_atomic

META = "meta.json"
COLUMNS = ("task", "qid", "choice", "gold", "text", "context", "loglik")


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.parquet"


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("task", pa.string()), ("qid", pa.string()), ("choice", pa.int32()),
        ("gold", pa.int32()), ("text", pa.string()), ("context", pa.string()),
        ("loglik", pa.list_(pa.float32())),
    ])


def write_shard(folder: Path, index: int, rows: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict(rows, schema=_schema())
    write_atomic(shard_path(folder, index), lambda tmp: pq.write_table(table, tmp))


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise PuddingError(f"{path}: no label meta file (run `pudding label` first)")
    return read_json(path)


@dataclass
class LabelTable:
    meta: dict
    task: list[str]
    qid: list[str]
    choice: np.ndarray
    gold: np.ndarray
    text: list[str]
    context: list[str]
    loglik: np.ndarray  # (rows, candidates) float32

    @property
    def candidate_names(self) -> list[str]:
        return [c["name"] for c in self.meta["candidates"]]

    def __len__(self) -> int:
        return len(self.task)


def read_labels(folder: str | Path) -> LabelTable:
    """All shards, in shard order; fails if any shard is missing or malformed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    meta = read_meta(folder)
    if not meta.get("complete"):
        raise PuddingError(f"{folder / META}: the labels are incomplete (rerun `pudding label`)")
    tables = []
    for i in range(meta["num_shards"]):
        path = shard_path(folder, i)
        if not path.is_file():
            raise PuddingError(f"{path}: missing shard (rerun `pudding label` to finish it)")
        try:
            t = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise PuddingError(f"{path}: unreadable parquet shard ({e})") from None
        if tuple(t.column_names) != COLUMNS:
            raise PuddingError(f"{path}: columns {t.column_names}, expected {list(COLUMNS)}")
        tables.append(t)
    t = pa.concat_tables(tables)
    num_c = len(meta["candidates"])
    loglik = np.asarray(t["loglik"].combine_chunks().flatten(), dtype=np.float32)
    if loglik.size != num_c * len(t):
        raise PuddingError(f"{folder}: loglik rows do not all have {num_c} values")
    return LabelTable(
        meta=meta,
        task=t["task"].to_pylist(),
        qid=t["qid"].to_pylist(),
        choice=t["choice"].to_numpy(),
        gold=t["gold"].to_numpy(),
        text=t["text"].to_pylist(),
        context=t["context"].to_pylist(),
        loglik=loglik.reshape(len(t), num_c),
    )
