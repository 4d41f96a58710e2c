"""The fidelity metric's inputs on the torch side (fidelity labels and search): each chat prompt
as the model sees it and dense's greedy continuation of it.

The definition is `pudding fidelity`'s (pudding_mlx/fidelity/metrics.py): the prompt with the chat
template applied (`encode_chat`, the ids PuddingModel.encode makes), then dense's greedy
continuation of up to N tokens, ending early after an end-of-sequence token (kept). A set's
fidelity loss on the prompt is the mean over the continuation's tokens of KL(dense || set),
teacher-forced: BlockRunner scores the request (prompt ids, continuation) with the set's blocks
skipped and `scoring.kl_to_reference` compares its log-probs with dense's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pudding_mlx.errors import PuddingError
from pudding_mlx.prompts import ChatPrompt, encode_chat
from pudding_mlx.tasks import TokenRequest


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a continuation, as mlx-lm gathers them: the checkpoint's eos ids
    (generation_config.json's, else config.json's) plus the tokenizer's."""
    ids = (getattr(model.generation_config, "eos_token_id", None)
           or getattr(model.config, "eos_token_id", None))
    out = set([ids] if isinstance(ids, int) else ids or [])
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out


def greedy_continuation(model, ids: Sequence[int], max_tokens: int, eos: set[int]) -> list[int]:
    """Dense greedy decoding of up to `max_tokens` tokens after `ids`, stopping after an eos.

    Not HF `generate`: it merges the checkpoint's generation_config (repetition penalty,
    suppressed tokens, ...) into whatever is passed; mlx-lm's generate_step with the argmax
    sampler, which `pudding fidelity` uses, applies none of them."""
    import inspect

    import torch

    # transformers 5 renamed the KV cache argument and output field past_key_values -> cache
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else (
        "past_key_values")
    device = next(model.parameters()).device
    x, past, out = torch.tensor([list(ids)], device=device), None, []
    with torch.inference_mode():
        while len(out) < max_tokens:
            step = model(input_ids=x, use_cache=True, **{name: past})
            past = getattr(step, name)
            out.append(int(step.logits[0, -1].argmax()))
            if out[-1] in eos:
                break
            x = torch.tensor([[out[-1]]], device=device)
    return out


def chat_requests(model, tokenizer, prompts: Sequence[ChatPrompt], max_tokens: int,
                  system_prompt: str | None = None, bar=None,
                  known: dict[str, list[int]] | None = None,
                  on_new: Callable[[str, list[int]], None] | None = None) -> list[TokenRequest]:
    """(prompt ids, dense continuation) per prompt; `bar` (tqdm) advances per prompt.
    Continuations in `known` (by prompt id) are reused; `on_new` sees each one generated."""
    if max_tokens < 1:
        raise PuddingError(f"--max-tokens {max_tokens}: need at least one token")
    eos = eos_token_ids(model, tokenizer)
    known = known or {}
    out = []
    for p in prompts:
        ids = encode_chat(tokenizer, p.text, True, system_prompt)
        continuation = known.get(p.id)
        if continuation is None:
            continuation = greedy_continuation(model, ids, max_tokens, eos)
            if on_new is not None:
                on_new(p.id, continuation)
        out.append((ids, continuation))
        if bar is not None:
            bar.update(1)
    return out
