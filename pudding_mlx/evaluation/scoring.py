"""Per-question answer log-likelihoods for `pudding eval`: the two backends and the resumable
on-disk cache of their results.

A backend scores questions, each a list of (context, continuation) requests, with a skip set
and returns per question the summed log-prob and the token count of every continuation. The
MLX backend runs the bundle's model (`loglik`); other backends are plugins (`plugins.py`: the
torch side registers `torch`, an HF model on CUDA/CPU). All tokenise the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from ..errors import PuddingError
from ..files import read_json, write_json
from ..tasks import Request, encode_requests
from .sets import set_key

QuestionScores = tuple[list[float], list[int]]  # summed log-prob, token count per request


class MLXScorer:
    """Scores with the bundle's mlx-lm model, running only the kept blocks.

    `dequantize` replaces a quantised model's layers by float ones holding the dequantised
    weights (mlx-lm's `dequantize_model`), once: the same function up to float rounding, for
    CPUs, where MLX's quantised matmul is about 20x slower than a float one with OpenBLAS.
    """

    chunk = 64  # questions scored between two cache saves

    def __init__(self, pm, dequantize: bool = False):
        self.pm = pm
        self.max_length = int(pm.config.get("max_position_embeddings", 2048))
        model_files = sorted((k, v) for k, v in pm.manifest.files.items()
                             if k.startswith("model/"))
        self.fingerprint = {"backend": "mlx", "model": digest(model_files)}
        self.description = "mlx"
        if dequantize:
            if "quantization" not in pm.config:
                raise PuddingError(f"--dequantize: {pm.path / 'model'} is not quantised")
            from mlx_lm.utils import dequantize_model

            dequantize_model(pm.model)
            self.fingerprint["dequantized"] = True
            self.description = "mlx, quantised weights dequantised to float at load"

    def score(self, questions: Sequence[Sequence[Request]],
              skip: Sequence[int]) -> list[QuestionScores]:
        from .loglik import score_requests  # MLX: the torch side imports this module without it

        view = self.pm.view(list(skip))

        def make_cache():
            return self.pm.make_cache(list(skip))

        tok = self.pm.tokenizer
        return [score_requests(view, make_cache, encode_requests(tok, q), self.max_length)
                for q in questions]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def source_id(source: str) -> str:
    """A model source's identity: a digest of its path and its files' names and sizes."""
    path = Path(source)
    if not path.exists():
        return str(source)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return digest([(p.name, p.stat().st_size) for p in files] + [str(path.resolve())])


class ScoreCache:
    """Resumable results under `folder`: one JSON file per (task, name), qid -> value.

    A file is reused only when its fingerprint (backend, model, request format) matches;
    writes are atomic (temporary file, then os.replace).
    """

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def path(self, task: str, name: str) -> Path:
        return self.folder / task / f"{name}.json"

    def load(self, task: str, name: str, extra: dict | None = None) -> dict:
        path = self.path(task, name)
        if not path.is_file():
            return {}
        d = read_json(path, "an unreadable cached result: delete it")
        if d.get("fingerprint") != {**self.fingerprint, **(extra or {})}:
            click.echo(f"{path}: made with other settings ({d.get('fingerprint')}); "
                       "recomputing", err=True)
            return {}
        return d["values"]

    def save(self, task: str, name: str, values: dict, extra: dict | None = None) -> None:
        path = self.path(task, name)
        write_json(path, {"fingerprint": {**self.fingerprint, **(extra or {})},
                          "values": values}, indent=None)

    def fill(self, task: str, name: str, qids: Sequence[str],
             compute: Callable[[list[int]], list], chunk: int = 128, desc: str = "",
             extra: dict | None = None) -> dict:
        """Values for every qid: cached ones reused, the rest computed `chunk` at a time
        (`compute` gets indices into `qids`) and saved after each chunk."""
        from tqdm.auto import tqdm

        values = self.load(task, name, extra)
        todo = [i for i, q in enumerate(qids) if q not in values]
        todo = list({qids[i]: i for i in todo}.values())  # a repeated qid is scored once
        with tqdm(total=len(set(qids)), initial=len(set(qids)) - len(todo), desc=desc,
                  unit="q", leave=False) as bar:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                for i, v in zip(part, compute(part), strict=True):
                    values[qids[i]] = v
                self.save(task, name, values, extra)
                bar.update(len(part))
        return values


def unscored(cache, task: str, examples, skips: Sequence[Sequence[int]]) -> list:
    """The sets whose cached eval-format scores miss some of the examples."""
    out = []
    for skip in skips:
        done = cache.load(task, set_key(skip), {"format": "eval"})
        if any(e.qid not in done for e in examples):
            out.append(skip)
    return out


def set_scores(scorer, cache, task: str, examples, skip: Sequence[int], fmt: str = "eval",
               gold_only: bool = False) -> dict[str, list]:
    """qid -> [summed log-probs, token counts] of a question's requests under one skip set."""
    qids = [e.qid for e in examples]

    def requests(e):
        reqs = e.eval if fmt == "eval" else e.prompt
        return [reqs[e.gold]] if gold_only else list(reqs)

    def compute(idx: list[int]) -> list:
        return [list(r) for r in scorer.score([requests(examples[i]) for i in idx], skip)]

    name = set_key(skip) + ("-gold" if gold_only else "")
    return cache.fill(task, name, qids, compute, scorer.chunk, f"{task} {set_key(skip)}",
                      extra={"format": fmt})
