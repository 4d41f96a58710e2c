"""The Core ML package of an in-model router: mean pooling and the linear head, no encoder.

For an app that runs the LLM itself (in MLX) and hands the package the hidden states after the
router's first blocks: inputs `hidden` (float32 [1, L, D], the states of every prompt token but
the last) and `attention_mask` (int32 [1, L], 1 for the tokens to pool), output `scores`
([1, n], the router's output order); L may be 1 to MAX_TOKENS. Metadata: the blocks it reads,
the chat-template flag, the target and the candidate table, as `export.py` writes for encoders.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pudding_mlx.bundle import RouterConfig
from pudding_mlx.errors import PuddingError

from .export import META_PREFIX, OUTPUT
from .verify import load_program, run_program

INPUTS = ("hidden", "attention_mask")
MAX_TOKENS = 8192
TOLERANCE = 1e-4  # float32 program vs numpy, relative to the largest score


class PooledHead(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.linear = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(head.weight))
            self.linear.bias.copy_(torch.from_numpy(head.bias))
        self.register_buffer("center", torch.from_numpy(head.center))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.to(torch.float32)[..., None]
        return self.linear((hidden * m).sum(1) / m.sum(1).clamp(min=1.0) - self.center)


def export_head(head, out: str | Path, candidates: list[dict], config: RouterConfig) -> dict:
    """Convert the pooled head to `out` (float32) and check the saved program against numpy on
    random hidden states; returns {"max_abs_diff", "tolerance", "precision"}."""
    import coremltools as ct

    if [c["name"] for c in candidates] != list(config.outputs):
        raise PuddingError(f"router outputs {config.outputs} differ from the candidate table")
    d = head.weight.shape[1]
    example = (torch.zeros(1, 4, d), torch.ones(1, 4, dtype=torch.int32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(PooledHead(head).eval(), example)
    length = ct.RangeDim(1, MAX_TOKENS, default=4)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="hidden", shape=(1, length, d), dtype=np.float32),
                ct.TensorType(name="attention_mask", shape=(1, length), dtype=np.int32)],
        outputs=[ct.TensorType(name=OUTPUT)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.macOS13,
    )
    mlmodel.short_description = ("PuDDing in-model router head: mean-pooled LLM hidden states "
                                 "-> one score per candidate omission set")
    meta = mlmodel.user_defined_metadata
    meta[META_PREFIX + "kind"] = "in-model"
    meta[META_PREFIX + "blocks"] = str(config.blocks)
    meta[META_PREFIX + "chat_template"] = json.dumps(config.chat_template)
    meta[META_PREFIX + "target"] = config.target
    meta[META_PREFIX + "candidates"] = json.dumps(candidates)
    mlmodel.save(str(out))
    return verify_head(out, head)


def verify_head(package: str | Path, head) -> dict:
    """The saved program (run op by op in numpy, `verify.run_program`) against numpy pooling
    and `head` (convert.in_model.Head: weight, bias, center) on random hidden states of a few
    lengths, padding included."""
    spec, program = load_program(package)
    if [i.name for i in spec.description.input] != list(INPUTS):
        raise PuddingError(f"{package}: inputs are not {list(INPUTS)}")
    function = program.functions["main"]
    rng = np.random.default_rng(0)
    diff, tol = 0.0, 0.0
    for length, real in ((1, 1), (7, 7), (12, 9)):
        hidden = rng.normal(size=(1, length, head.weight.shape[1])).astype(np.float32)
        mask = (np.arange(length) < real).astype(np.int32)[None]
        ref = head.weight @ (hidden[0, :real].mean(0) - head.center) + head.bias
        got = run_program(function, {"hidden": hidden, "attention_mask": mask})
        got = got[function.outputs[0].name].astype(np.float32)[0]
        tol = max(tol, TOLERANCE * (1 + float(np.abs(ref).max())))
        diff = max(diff, float(np.abs(got - ref).max()))
    if not diff <= tol:
        raise PuddingError(f"{package}: Core ML head disagrees with numpy (max |diff| "
                           f"{diff:.3g} > {tol:.3g})")
    return {"max_abs_diff": diff, "tolerance": tol, "precision": "float32"}
