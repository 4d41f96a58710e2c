"""The router label table on disk: parquet shards plus a meta.json that records the settings.

    meta.json             target ("likelihood" or "fidelity"; folders without one hold
                          likelihood labels), settings (model, candidates, ...), shard count
    shard-00000.parquet   rows of a fixed slice of the item list

Likelihood labels (`pudding label`): one row per (question, answer choice): task, qid, choice,
gold, text (the method's prompt + this choice), context (the question as the router reads it,
`router_text`), loglik (one float per candidate).
Fidelity labels (`pudding label --target fidelity`): one row per chat prompt: id, source,
split, text (the raw user prompt, what PuddingModel.route reads), continuation (dense's greedy
token ids), kl (mean KL(dense || candidate) in nats per continuation token, one float per
candidate), agreement (the share of continuation tokens where the candidate's top-1 is dense's).

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
TARGETS = ("likelihood", "fidelity")  # what a label folder can hold
COLUMNS = {
    "likelihood": ("task", "qid", "choice", "gold", "text", "context", "loglik"),
    "fidelity": ("id", "source", "split", "text", "continuation", "kl", "agreement"),
}
VALUES = {"likelihood": "loglik", "fidelity": "kl"}  # the column with one value per candidate


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.parquet"


def _schema(target: str):
    import pyarrow as pa

    if target == "fidelity":
        return pa.schema([
            ("id", pa.string()), ("source", pa.string()), ("split", pa.string()),
            ("text", pa.string()), ("continuation", pa.list_(pa.int32())),
            ("kl", pa.list_(pa.float32())), ("agreement", pa.list_(pa.float32())),
        ])
    return pa.schema([
        ("task", pa.string()), ("qid", pa.string()), ("choice", pa.int32()),
        ("gold", pa.int32()), ("text", pa.string()), ("context", pa.string()),
        ("loglik", pa.list_(pa.float32())),
    ])


def write_shard(folder: Path, index: int, rows: dict[str, list],
                target: str = "likelihood") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict(rows, schema=_schema(target))
    write_atomic(shard_path(folder, index), lambda tmp: pq.write_table(table, tmp))


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise PuddingError(f"{path}: no label meta file (run `pudding label` first)")
    return read_json(path)


def folder_target(meta: dict) -> str:
    """What a label folder holds, from its meta (older folders did not say: likelihood)."""
    target = meta.get("target", "likelihood")
    if target not in TARGETS:
        raise PuddingError(f"label target {target!r} unknown; expected one of {TARGETS}")
    return target


def per_candidate(table, column: str, num_c: int, where: Path) -> np.ndarray:
    """A list column with one float per candidate as a (rows, candidates) float32 array."""
    values = np.array(table[column].combine_chunks().flatten(), dtype=np.float32)
    if values.size != num_c * len(table):
        raise PuddingError(f"{where}: {column} rows do not all have {num_c} values")
    return values.reshape(len(table), num_c)


def _read_shards(folder: Path, target: str) -> tuple[dict, object]:
    """meta and all shards as one pyarrow table, in shard order; fails if the folder holds
    another target, or a shard is missing or malformed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = read_meta(folder)
    if (held := folder_target(meta)) != target:
        raise PuddingError(f"{folder}: holds {held} labels, not {target} labels")
    if not meta.get("complete"):
        raise PuddingError(f"{folder / META}: the labels are incomplete (rerun `pudding label`)")
    columns = COLUMNS[target]
    tables = []
    for i in range(meta["num_shards"]):
        path = shard_path(folder, i)
        if not path.is_file():
            raise PuddingError(f"{path}: missing shard (rerun `pudding label` to finish it)")
        try:
            t = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise PuddingError(f"{path}: unreadable parquet shard ({e})") from None
        if tuple(t.column_names) != columns:
            raise PuddingError(f"{path}: columns {t.column_names}, expected {list(columns)}")
        tables.append(t)
    return meta, pa.concat_tables(tables)


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
    """Likelihood labels: all shards, in shard order. A question labelled twice keeps its first
    rows: training splits hold exact duplicates (PIQA's), and a qid hashes the content."""
    folder = Path(folder)
    meta, t = _read_shards(folder, "likelihood")
    keys = zip(t["task"].to_pylist(), t["qid"].to_pylist(), t["choice"].to_pylist(), strict=True)
    first = {k: r for r, k in reversed(list(enumerate(keys)))}
    if len(first) < len(t):
        t = t.take(sorted(first.values()))
    return LabelTable(
        meta=meta,
        task=t["task"].to_pylist(),
        qid=t["qid"].to_pylist(),
        choice=t["choice"].to_numpy(),
        gold=t["gold"].to_numpy(),
        text=t["text"].to_pylist(),
        context=t["context"].to_pylist(),
        loglik=per_candidate(t, "loglik", len(meta["candidates"]), folder),
    )


@dataclass
class FidelityTable:
    meta: dict
    id: list[str]
    source: list[str]
    split: list[str]
    text: list[str]  # the raw user prompt (the router's input)
    continuation: list[list[int]]  # dense's greedy continuation
    kl: np.ndarray  # (prompts, candidates) float32, mean KL(dense || candidate) per token
    agreement: np.ndarray  # (prompts, candidates) float32, share of top-1 agreement

    @property
    def candidate_names(self) -> list[str]:
        return [c["name"] for c in self.meta["candidates"]]

    @property
    def candidate_sizes(self) -> np.ndarray:
        """Blocks each candidate skips."""
        return np.array([len(c["skip"]) for c in self.meta["candidates"]])

    def __len__(self) -> int:
        return len(self.id)


def read_fidelity_labels(folder: str | Path) -> FidelityTable:
    """Fidelity labels: all shards, in shard order."""
    folder = Path(folder)
    meta, t = _read_shards(folder, "fidelity")
    num_c = len(meta["candidates"])
    return FidelityTable(
        meta=meta,
        id=t["id"].to_pylist(),
        source=t["source"].to_pylist(),
        split=t["split"].to_pylist(),
        text=t["text"].to_pylist(),
        continuation=t["continuation"].to_pylist(),
        kl=per_candidate(t, "kl", num_c, folder),
        agreement=per_candidate(t, "agreement", num_c, folder),
    )
