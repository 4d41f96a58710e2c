"""The torch backend of `pudding eval` (registered as the `torch` eval-backend plugin)."""

from __future__ import annotations

from collections.abc import Sequence

from pudding_mlx.eval_scoring import QuestionScores, source_id
from pudding_mlx.tasks import Request, encode_requests

from .assets import load_causal_lm
from .device import choose_dtype, resolve_device
from .scoring import answer_logprobs


class TorchScorer:
    """Scores with an HF torch model (`scoring.answer_logprobs`), e.g. on a CUDA machine; the
    `pudding eval --backend torch` plugin, with the interface of eval_scoring.MLXScorer."""

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

    def score(self, questions: Sequence[Sequence[Request]],
              skip: Sequence[int]) -> list[QuestionScores]:
        flat = [r for q in questions for r in q]
        sums = answer_logprobs(self.model, self.tokenizer, flat, skip=skip,
                               batch_size=self.batch_size, reduce="sum")
        counts = [len(c) for _, c in encode_requests(self.tokenizer, flat)]
        out, at = [], 0
        for q in questions:
            out.append(([float(s) for s in sums[at:at + len(q)]], counts[at:at + len(q)]))
            at += len(q)
        return out
