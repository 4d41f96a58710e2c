"""Batched answer log-likelihoods of an HF causal LM with a set of skipped blocks.

A request is (context, continuation); the scored span is exactly the continuation's tokens.
Context and continuation are tokenised separately (lm-eval's convention: trailing whitespace
of the context moves to the continuation; no special tokens), so the span is known from the
token counts and never searched for in the text.

Requests whose contexts tokenise identically are packed into one row: the context once, then
each continuation (minus its last token, whose prediction is never needed) with a tree mask
(a continuation sees the context and its own earlier tokens) and position ids restarting after
the context. That is the same computation as one row per request, with the context run once.

The blocks are run one by one (`BlockRunner`) instead of through `model.forward`, so callers
can keep hidden states between blocks (the search reuses shared prefixes). This follows the
LLaMA/Qwen2/Mistral/Gemma 3 decoder forward: embed_tokens, rotary_emb, blocks under the causal
mask, norm, lm_head (and Gemma's logit soft-capping). Gemma 3 blocks take the mask and RoPE of
their own type (`config.layer_types`): a sliding block sees the last `sliding_window` positions,
counted by position id, so a packed continuation sees what it would in a row of its own.
Other architectures are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pudding_mlx.bundle import check_skip_set
from pudding_mlx.errors import PuddingError
from pudding_mlx.tasks import TokenRequest, encode_requests

from .skip import decoder_layers


@dataclass
class Batch:
    input_ids: object  # [B, T]
    position_ids: object  # [B, T]
    masks: dict  # layer type -> [B, 1, T, T] additive mask, model dtype
    pred_index: object  # [P] flat index into B*T of the hidden state that predicts a target
    targets: object  # [P]
    pred_request: object  # [P] index into `requests`
    requests: list[int]  # global request indices scored in this batch
    counts: np.ndarray  # answer tokens per request in `requests`
    rows: int
    position_embeddings: dict | None = field(default=None, repr=False)  # layer type -> (cos, sin)


def _pack_rows(token_requests: list[TokenRequest], max_length: int) -> list[list[int]]:
    """Group request indices into rows: same context ids, total length within max_length."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(token_requests):
        groups.setdefault(tuple(ctx), []).append(i)
    rows = []
    for ctx, members in groups.items():
        row, length = [], len(ctx)
        for i in members:
            extra = len(token_requests[i][1]) - 1
            if row and length + extra > max_length:
                rows.append(row)
                row, length = [], len(ctx)
            row.append(i)
            length += extra
        rows.append(row)
    return rows


# The HF model types whose forward BlockRunner reproduces (tests/test_scoring.py checks each).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
FULL, SLIDING = "full_attention", "sliding_attention"


def check_supported(model) -> int | None:
    """Refuse a model whose forward BlockRunner does not reproduce (it would score it wrongly);
    returns the sliding window every block applies (Mistral), if any."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PuddingError(
            f"{type(model).__name__} (model_type {model_type!r}): block-by-block scoring "
            f"follows the LLaMA decoder forward and supports only model types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; it would score this model wrongly")
    if model_type != "gemma3_text" and SLIDING in (getattr(config, "layer_types", None) or ()):
        raise PuddingError(
            f"{type(model).__name__}: config.layer_types has sliding-window layers; "
            "block-by-block scoring applies one causal mask to every block")
    if model_type == "gemma3_text" and getattr(config, "use_bidirectional_attention", False):
        raise PuddingError(f"{type(model).__name__}: bidirectional attention is not causal "
                           "language modelling; block-by-block scoring refuses it")
    return getattr(config, "sliding_window", None) if model_type == "mistral" else None


def layer_types(model) -> list[str]:
    """Each block's attention type: Gemma 3's `config.layer_types`, else full attention."""
    n = len(decoder_layers(model))
    if model.config.model_type != "gemma3_text":
        return [FULL] * n
    types = list(model.config.layer_types)
    if len(types) != n or not set(types) <= {FULL, SLIDING}:
        raise PuddingError(f"{type(model).__name__}: config.layer_types {types} does not give "
                           f"one of {FULL!r} / {SLIDING!r} per block")
    return types


class BlockRunner:
    """Runs an HF decoder block by block on packed request batches."""

    def __init__(self, model):
        self.window = check_supported(model)
        self.model = model
        self.inner = model.model
        self.layers = list(decoder_layers(model))
        self.num_blocks = len(self.layers)
        self.types = layer_types(model)
        self.sliding_window = model.config.sliding_window if SLIDING in self.types else None
        self.evals = 0  # block evaluations: one block applied to one row
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def prepare(self, token_requests: list[TokenRequest], batch_size: int = 16,
                max_length: int | None = None) -> list[Batch]:
        """Pack requests into rows and rows into right-padded batches (longest first)."""
        import torch

        max_length = max_length or getattr(self.model.config, "max_position_embeddings", 2048)
        reqs = []
        for ctx, cont in token_requests:
            if len(cont) > max_length:
                raise PuddingError(f"a continuation of {len(cont)} tokens exceeds max_length")
            reqs.append((ctx[-(max_length - len(cont) + 1):], cont))
        rows = _pack_rows(reqs, max_length)
        lengths = [len(reqs[r[0]][0]) + sum(len(reqs[i][1]) - 1 for i in r) for r in rows]
        order = sorted(range(len(rows)), key=lambda j: (-lengths[j], rows[j][0]))
        batches = []
        for start in range(0, len(order), batch_size):
            chunk = [rows[j] for j in order[start:start + batch_size]]
            T = max(lengths[j] for j in order[start:start + batch_size])
            if self.window is not None and self.window < T:
                raise PuddingError(
                    f"a packed row of {T} tokens is longer than the model's sliding window "
                    f"({self.window}), which block-by-block scoring does not apply; "
                    f"use max_length <= {self.window}")
            ids = np.zeros((len(chunk), T), dtype=np.int64)
            pos = np.zeros((len(chunk), T), dtype=np.int64)
            seg = np.full((len(chunk), T), -1, dtype=np.int64)
            pred_index, targets, pred_request, requests, counts = [], [], [], [], []
            for b, row in enumerate(chunk):
                ctx = reqs[row[0]][0]
                n = len(ctx)
                ids[b, :n], pos[b, :n], seg[b, :n] = ctx, np.arange(n), 0
                at = n
                for s, i in enumerate(row, start=1):
                    cont = reqs[i][1]
                    m = len(cont) - 1
                    ids[b, at:at + m], pos[b, at:at + m], seg[b, at:at + m] = (
                        cont[:-1], np.arange(n, n + m), s)
                    pred_index += [b * T + n - 1] + [b * T + at + t for t in range(m)]
                    targets += cont
                    pred_request += [len(requests)] * len(cont)
                    requests.append(i)
                    counts.append(len(cont))
                    at += m
            causal = np.tril(np.ones((T, T), dtype=bool))
            allowed = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
            allowed &= (seg[:, :, None] >= 0) & (seg[:, None, :] >= 0)
            allowed |= np.eye(T, dtype=bool)  # padding rows attend to themselves: no empty rows
            allowed_by_type = {FULL: allowed}
            if self.sliding_window is not None:
                near = pos[:, :, None] - pos[:, None, :] < self.sliding_window
                allowed_by_type[SLIDING] = allowed & near
            dev = self.device
            batches.append(Batch(
                input_ids=torch.from_numpy(ids).to(dev),
                position_ids=torch.from_numpy(pos).to(dev),
                masks={t: self._additive(a).to(dev) for t, a in allowed_by_type.items()},
                pred_index=torch.tensor(pred_index, device=dev),
                targets=torch.tensor(targets, device=dev),
                pred_request=torch.tensor(pred_request, device=dev),
                requests=requests, counts=np.array(counts, dtype=np.float64), rows=len(chunk)))
        return batches

    def _additive(self, allowed: np.ndarray):
        """[B, 1, T, T] additive mask in the model's dtype from a boolean [B, T, T] one."""
        import torch

        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(torch.from_numpy(~allowed), torch.finfo(self.dtype).min)
        return mask[:, None]

    def embed(self, batch: Batch):
        h = self.inner.embed_tokens(batch.input_ids)  # Gemma's embedding applies its scale
        if batch.position_embeddings is None:
            rope = self.inner.rotary_emb
            if self.model.config.model_type == "gemma3_text":  # one RoPE base per layer type
                batch.position_embeddings = {t: rope(h, batch.position_ids, t)
                                             for t in set(self.types)}
            else:
                batch.position_embeddings = {FULL: rope(h, position_ids=batch.position_ids)}
        return h

    def run(self, h, batch: Batch, blocks: Iterable[int]):
        """Apply the given blocks, in order, to hidden states h."""
        for i in blocks:
            t = self.types[i]
            out = self.layers[i](h, attention_mask=batch.masks[t], position_ids=batch.position_ids,
                                 position_embeddings=batch.position_embeddings[t], use_cache=False)
            h = out[0] if isinstance(out, tuple) else out
            self.evals += batch.rows
        return h

    def logprobs(self, h, batch: Batch):
        """log p(. | earlier tokens) at every answer token of the batch: [P, V], float32."""
        import torch

        hs = h.reshape(-1, h.shape[-1])[batch.pred_index]
        logits = self.model.lm_head(self.inner.norm(hs)).float()
        if cap := getattr(self.model.config, "final_logit_softcapping", None):
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)

    @staticmethod
    def per_request(values, batch: Batch) -> np.ndarray:
        """Per-answer-token values [P] summed per request of the batch (float64)."""
        import torch

        sums = torch.zeros(len(batch.requests), dtype=torch.float64, device=values.device)
        sums.index_add_(0, batch.pred_request, values.double())
        return sums.cpu().numpy()

    def head(self, h, batch: Batch) -> np.ndarray:
        """Summed answer-token log-probs per request of the batch (float64)."""
        lp = self.logprobs(h, batch).gather(1, batch.targets[:, None])[:, 0]
        return self.per_request(lp, batch)


def kl_to_reference(ref, logprobs):
    """Per token: KL(ref || logprobs) = sum_v p_ref(v) (log p_ref(v) - log p(v)) and top-1
    agreement (1.0 where both argmaxes agree), from log-prob rows [P, V] (float32)."""
    kl = (ref.exp() * (ref - logprobs)).sum(-1)
    agree = (logprobs.argmax(-1) == ref.argmax(-1)).float()
    return kl, agree


def answer_logprobs(model, tokenizer, requests: Sequence[tuple[str, str]], skip: Iterable[int] = (),
                    batch_size: int = 16, reduce: str = "mean", max_length: int | None = None,
                    progress: bool = False) -> list[float]:
    """Log-probability of each request's continuation given its context, with the blocks in
    `skip` (0-based) treated as the identity: the mean over answer tokens (reduce="mean", the
    method's l_S) or the sum (reduce="sum", lm-eval's loglikelihood)."""
    import torch
    from tqdm.auto import tqdm

    if reduce not in ("mean", "sum"):
        raise PuddingError(f"reduce={reduce!r}: expected 'mean' or 'sum'")
    runner = BlockRunner(model)
    keep = [i for i in range(runner.num_blocks) if i not in check_skip_set(skip, runner.num_blocks)]
    batches = runner.prepare(encode_requests(tokenizer, requests), batch_size, max_length)
    out = np.zeros(len(requests))
    with torch.inference_mode():
        for batch in tqdm(batches, desc="scoring", disable=not progress):
            sums = runner.head(runner.run(runner.embed(batch), batch, keep), batch)
            out[batch.requests] = sums / batch.counts if reduce == "mean" else sums
    return out.tolist()


def choice_decisions(scores: Sequence[float], examples) -> list[int]:
    """Argmax choice per example from flat per-choice scores (examples' `prompt` order)."""
    out, at = [], 0
    for ex in examples:
        k = len(ex.prompt)
        out.append(int(np.argmax(scores[at:at + k])))
        at += k
    return out


@dataclass
class DtypeCheck:
    examples: int
    changed: int  # examples whose argmax choice differs between float32 and the dtype
    max_abs_diff: float  # largest |l(fp32) - l(dtype)| over all choices
    changed_gaps: list[float]  # fp32 score gap between the two choices of each changed example


def dtype_check(model, tokenizer, examples, dtype, batch_size: int = 16) -> DtypeCheck:
    """Score the examples' method prompts with a float32 copy and a `dtype` copy of `model` and
    count changed decisions (the bf16-on-CPU check)."""
    import copy

    import torch

    requests = [r for ex in examples for r in ex.prompt]
    scores = []
    for dt in (torch.float32, dtype):
        m = copy.deepcopy(model).to(dt)
        scores.append(np.array(answer_logprobs(m, tokenizer, requests, batch_size=batch_size)))
        del m
    ref, low = (choice_decisions(s, examples) for s in scores)
    starts = np.cumsum([0] + [len(ex.prompt) for ex in examples])
    gaps = [float(scores[0][starts[i] + a] - scores[0][starts[i] + b])
            for i, (a, b) in enumerate(zip(ref, low, strict=True)) if a != b]
    return DtypeCheck(len(examples), len(gaps), float(np.abs(scores[0] - scores[1]).max()), gaps)


def _walk(runner, batch, h, start: int, group: list[tuple[int, frozenset]], leaf, out: dict
          ) -> None:
    """Run blocks from `start` for candidates that agree on every block before it (sharing
    hidden state h); split the group at the first block they disagree on. At the last block,
    out[c] = leaf(h, members) for every member c. The group that runs the block goes first, so
    a candidate that skips nothing reaches its leaf before every other."""
    b = start
    while b < runner.num_blocks and len({b in s for _, s in group}) == 1:
        b += 1
    h = runner.run(h, batch, [i for i in range(start, b) if i not in group[0][1]])
    if b == runner.num_blocks:
        value = leaf(h, [c for c, _ in group])
        for c, _ in group:
            out[c] = value
        return
    _walk(runner, batch, runner.run(h, batch, [b]), b + 1, [g for g in group if b not in g[1]],
          leaf, out)
    _walk(runner, batch, h, b + 1, [g for g in group if b in g[1]], leaf, out)


def walk_candidates(runner, batch, skips: list[list[int]], leaf, share_prefix: bool = True
                    ) -> dict:
    """candidate index -> leaf(final hidden state, members) for one batch, each candidate
    skipping its blocks; with share_prefix, shared block prefixes run once."""
    sets = [(c, frozenset(s)) for c, s in enumerate(skips)]
    out: dict = {}
    h = runner.embed(batch)
    for group in [sets] if share_prefix else [[s] for s in sets]:
        _walk(runner, batch, h, 0, group, leaf, out)
    return out
