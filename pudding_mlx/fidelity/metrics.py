"""How far a skip set moves the model from dense on generated text (`pudding fidelity`).

Per prompt (chat template applied): the dense model's greedy continuation of up to N tokens
(it ends early at an end-of-sequence token, which then counts as its last token). Then, for
every skip set S (dense included, as a check):

- teacher-forced: prompt + continuation run once through the model without S (fresh cache),
  log-softmax in float32; per continuation token t
  - KL(dense || S) = sum_v p_dense(v | <t) (log p_dense(v | <t) - log p_S(v | <t)),
  - top-1 agreement: argmax_v p_S(v | <t) == argmax_v p_dense(v | <t),
  - NLL = -log p_S(x_t | <t) of the dense token x_t (perplexity = exp of its mean);
- free-running: S decodes greedily from the prompt until its first token that differs from
  the dense continuation; the count is the number of tokens before it (the continuation's
  length when S reproduces it all).

Per prompt the token values are averaged, so every prompt weighs the same in the summaries
(`run.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

METRICS = ("kl", "agreement", "nll", "diverge")


def greedy_continuation(pm, prompt: Sequence[int], max_tokens: int,
                        skip: Sequence[int] = ()) -> list[int]:
    """Greedy decoding of up to `max_tokens` tokens (mlx-lm's generate_step, argmax sampler);
    stops after an end-of-sequence token, which is kept."""
    eos = set(pm.tokenizer.eos_token_ids)
    out: list[int] = []
    for token, _ in generate_step(mx.array(list(prompt)), pm.view(list(skip)),
                                  max_tokens=max_tokens, prompt_cache=pm.make_cache(list(skip))):
        out.append(int(token))
        if out[-1] in eos:
            break
    return out


def forced_logprobs(pm, skip: Sequence[int], prompt: Sequence[int],
                    continuation: Sequence[int]) -> mx.array:
    """log p(. | prompt, continuation[:t]) for every t, shape [T, V], float32: one forward of
    prompt + continuation[:-1] without the blocks `skip`."""
    ids = mx.array([*prompt, *continuation[:-1]])[None]
    logits = pm.view(list(skip))(ids, cache=pm.make_cache(list(skip)))[0, len(prompt) - 1:]
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kl_agreement(ref: mx.array, logprobs: mx.array) -> tuple[mx.array, mx.array]:
    """Per position of two [T, V] log-prob arrays: KL(ref || logprobs) and whether both put
    the same token first (also the parity gate of `pudding convert`)."""
    kl = mx.sum(mx.exp(ref) * (ref - logprobs), axis=-1)
    return kl, mx.argmax(logprobs, axis=-1) == mx.argmax(ref, axis=-1)


def compare(ref: mx.array, logprobs: mx.array, targets: Sequence[int]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token: KL(ref || logprobs), top-1 agreement (0/1), NLL of `targets` under logprobs."""
    kl, agree = kl_agreement(ref, logprobs)
    nll = -mx.take_along_axis(logprobs, mx.array(list(targets))[:, None], axis=-1)[:, 0]
    mx.eval(kl, agree, nll)
    return np.array(kl), np.array(agree).astype(np.int64), np.array(nll)


def first_divergence(logprobs: mx.array, continuation: Sequence[int]) -> int:
    """How many tokens the set's greedy decoding reproduces before it first differs from
    `continuation` (len(continuation) when it never does). Until then its context is the
    continuation itself, so its greedy token at t is the argmax of the teacher-forced
    `logprobs` [T, V] at t: no free-running decode is needed."""
    miss = np.flatnonzero(np.array(mx.argmax(logprobs, axis=-1)) != np.array(continuation))
    return int(miss[0]) if len(miss) else len(continuation)


@dataclass
class SetMetrics:
    """One skip set on one prompt: per-token values and the free-running count."""

    kl: list[float]
    agree: list[int]
    nll: list[float]
    diverge: int

    @property
    def tokens(self) -> int:
        return len(self.nll)

    def summary(self) -> dict[str, float]:
        """Per-prompt means (agreement as a fraction) and the free-running count."""
        return {"kl": float(np.mean(self.kl)), "agreement": float(np.mean(self.agree)),
                "nll": float(np.mean(self.nll)), "diverge": float(self.diverge)}

    def to_dict(self) -> dict:
        return {"kl": [round(float(x), 7) for x in self.kl], "agree": list(map(int, self.agree)),
                "nll": [round(float(x), 6) for x in self.nll], "diverge": int(self.diverge)}

    @classmethod
    def from_dict(cls, d: dict) -> SetMetrics:
        return cls(d["kl"], d["agree"], d["nll"], d["diverge"])


def measure(pm, skip: Sequence[int], prompt: Sequence[int], continuation: Sequence[int],
            ref: mx.array) -> SetMetrics:
    """All metrics of one set on one prompt; `ref` is the dense `forced_logprobs`."""
    logprobs = ref if not skip else forced_logprobs(pm, skip, prompt, continuation)
    kl, agree, nll = compare(ref, logprobs, continuation)
    # dense reproduces its own greedy output by definition
    diverge = len(continuation) if not skip else first_divergence(logprobs, continuation)
    return SetMetrics(kl.tolist(), agree.tolist(), nll.tolist(), diverge)
