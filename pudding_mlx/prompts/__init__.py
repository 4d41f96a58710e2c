"""Chat-style prompts for `pudding fidelity` (and the torch side's fidelity labels and search):
the packaged set, user files, the train/held-out split, and the token ids a prompt becomes
(`encode_chat`).

The packaged set, `pudding_mlx/prompts/chat_prompts.jsonl`, is built by
`benchmarks/build_chat_prompts.py` (sources and licences in `pudding_mlx/prompts/README.md`).
One JSON object per line: id, source, split ("train" or "heldout"), text. The split is fixed by
`assign_splits`: within each source, the prompts whose sha1(seed:id) is smallest are "train"
(for fitting anything, e.g. a router), the rest "heldout" (every reported number).

A user file is JSONL (a `.jsonl` name, or a first line that is a JSON object) with a "text"
field and optional id / source / split, or plain text with one prompt per line. Rows without a
split count as held-out.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PuddingError

PACKAGED = Path(__file__).resolve().parent / "chat_prompts.jsonl"
SPLITS = ("heldout", "train", "all")
SPLIT_SEED = 1234
TRAIN_FRACTION = 0.5
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class ChatPrompt:
    id: str
    source: str
    split: str  # "train" or "heldout"
    text: str

    @property
    def key(self) -> str:
        """Cache key: the text's digest (a prompt's results depend on its text, not its id)."""
        return hashlib.sha1(self.text.encode()).hexdigest()[:16]


def _split_key(prompt_id: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{prompt_id}".encode()).hexdigest()


def assign_splits(ids_by_source: dict[str, Sequence[str]], train_fraction: float = TRAIN_FRACTION,
                  seed: int = SPLIT_SEED) -> dict[str, str]:
    """id -> "train" | "heldout": within each source, the round(fraction * n) ids with the
    smallest sha1(seed:id) are "train". Depends only on the ids, not on their order."""
    out = {}
    for ids in ids_by_source.values():
        ranked = sorted(ids, key=lambda i: _split_key(i, seed))
        n_train = round(train_fraction * len(ranked))
        out.update({i: "train" if r < n_train else "heldout" for r, i in enumerate(ranked)})
    return out


def read_prompts(path: str | Path | None = None) -> list[ChatPrompt]:
    """The prompts in `path` (see the module docstring), or the packaged set when None."""
    path = Path(path) if path is not None else PACKAGED
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PuddingError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PuddingError(f"{path}: cannot read the prompts file ({e})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise PuddingError(f"{path}: no prompts in the file")
    first = numbered[0][1].lstrip()
    prompts = (_jsonl(path, numbered) if path.suffix == ".jsonl" or first.startswith("{")
               else [ChatPrompt(f"line-{n}", "user", "heldout", line) for n, line in numbered])
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise PuddingError(f"{path}: prompt id {p.id!r} appears twice")
        seen.add(p.id)
    return prompts


def _jsonl(path: Path, numbered: list[tuple[int, str]]) -> list[ChatPrompt]:
    out = []
    for n, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PuddingError(f"{path}:{n}: not a JSON object ({e})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise PuddingError(f"{path}:{n}: expected a JSON object with a non-empty \"text\"")
        split = row.get("split", "heldout")
        if split not in ("train", "heldout"):
            raise PuddingError(f"{path}:{n}: split must be \"train\" or \"heldout\", "
                               f"got {split!r}")
        out.append(ChatPrompt(str(row.get("id", f"line-{n}")), str(row.get("source", "user")),
                              split, text))
    return out


def select(prompts: Sequence[ChatPrompt], split: str = "heldout", limit: int | None = None,
           seed: int = 0) -> list[ChatPrompt]:
    """The prompts of a split ("heldout", "train" or "all"), a seeded subset of `limit` of them
    kept in file order; a larger limit extends a smaller one (so cached results are reused)."""
    if split not in SPLITS:
        raise PuddingError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    chosen = [p for p in prompts if split == "all" or p.split == split]
    if not chosen:
        raise PuddingError(f"no prompts in the {split!r} split")
    if limit is not None and limit < len(chosen):
        rng = np.random.default_rng([seed, zlib.crc32(b"fidelity")])
        keep = np.sort(rng.permutation(len(chosen))[:limit])
        chosen = [chosen[i] for i in keep]
    return chosen


def clean_text(text: str) -> str:
    """`text` with each lone surrogate (how Python passes on undecodable bytes from argv or
    stdin) replaced by U+FFFD: tokenizers reject them."""
    return _SURROGATE.sub("\ufffd", text)


def encode_chat(tokenizer, prompt: str, chat_template: bool = True,
                system_prompt: str | None = None) -> list[int]:
    """Prompt token ids as mlx_lm.generate makes them: the chat template (optional system
    message, the user message, the generation prompt) rendered to text, then encoded without
    special tokens; without a template, the text encoded as is. `tokenizer` is mlx-lm's
    TokenizerWrapper (PuddingModel.encode) or an HF tokenizer (the torch side's fidelity labels
    and search), so both sides feed the model the same ids."""
    prompt = clean_text(prompt)
    system_prompt = clean_text(system_prompt) if system_prompt else system_prompt
    has_template = getattr(tokenizer, "has_chat_template", None)  # mlx-lm's wrapper only
    if has_template is None:
        has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template and has_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


def pooled_tokens(tokens: Sequence[int]) -> list[int]:
    """What an in-model router pools: the prompt's tokens but the last (which generation feeds
    one step later), or the only one. Both sides (in_model.py, convert/in_model.py) use it."""
    return list(tokens[:-1]) if len(tokens) > 1 else list(tokens)
