"""The torch backend of `pudding eval` (registered as the `torch` eval-backend plugin)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pudding_mlx.evaluation.scoring import QuestionScores, source_id
from pudding_mlx.tasks import Request, encode_requests

from .assets import load_causal_lm
from .device import choose_dtype, resolve_device
from .scoring import BlockRunner, answer_logprobs, walk_candidates


class TorchScorer:
    """Scores with an HF torch model (`scoring.answer_logprobs`), e.g. on a CUDA machine; the
    `pudding eval --backend torch` plugin, with the interface of evaluation.scoring.MLXScorer.

    `plan(skips)` names the sets a task is about to score one after another on the same
    question chunks: the first `score` of a chunk then runs all of them at once, each shared
    block prefix once (the labels' candidate trie), and the other sets take their share."""

    chunk = 512  # questions per answer_logprobs call (packed and batched inside it)

    def __init__(self, source: str, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 16):
        dev = resolve_device(device)
        torch_dtype = choose_dtype(dev, dtype)
        self.model, self.tokenizer = load_causal_lm(source, dtype=torch_dtype, device=dev)
        self.batch_size = batch_size
        self.description = f"torch {dev} {str(torch_dtype).removeprefix('torch.')}"
        self.fingerprint = {"backend": "torch", "source": source_id(source),
                            "dtype": str(torch_dtype)}
        self.planned: list[tuple[int, ...]] = []
        self.ready: dict[tuple, list[QuestionScores]] = {}  # (chunk, set) -> its scores

    def plan(self, skips: Sequence[Sequence[int]]) -> None:
        self.planned = [tuple(sorted(s)) for s in skips]
        self.ready.clear()

    def score(self, questions: Sequence[Sequence[Request]],
              skip: Sequence[int]) -> list[QuestionScores]:
        flat = [r for q in questions for r in q]
        key = tuple(sorted(skip))
        if len(self.planned) < 2 or key not in self.planned:
            sums = answer_logprobs(self.model, self.tokenizer, flat, skip=skip,
                                   batch_size=self.batch_size, reduce="sum")
            return self._per_question(questions, sums, encode_requests(self.tokenizer, flat))
        chunk = tuple(flat)
        if (chunk, key) not in self.ready:
            tokens = encode_requests(self.tokenizer, flat)
            for s, sums in zip(self.planned, self._sums_of_sets(tokens, self.planned),
                               strict=True):
                self.ready[(chunk, s)] = self._per_question(questions, sums, tokens)
        return self.ready.pop((chunk, key))

    def _sums_of_sets(self, tokens, skips: list[tuple[int, ...]]) -> np.ndarray:
        """(sets, requests) summed answer log-probs, the sets walked together per batch."""
        import torch

        runner = BlockRunner(self.model)
        out = np.zeros((len(skips), len(tokens)))
        with torch.inference_mode():
            for batch in runner.prepare(tokens, self.batch_size):
                sums = walk_candidates(runner, batch, [list(s) for s in skips],
                                       lambda h, _, b=batch: runner.head(h, b))
                for c in range(len(skips)):
                    out[c, batch.requests] = sums[c]
        return out

    @staticmethod
    def _per_question(questions, sums, tokens) -> list[QuestionScores]:
        counts = [len(c) for _, c in tokens]
        out, at = [], 0
        for q in questions:
            out.append(([float(s) for s in sums[at:at + len(q)]], counts[at:at + len(q)]))
            at += len(q)
        return out
