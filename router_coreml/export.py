"""Export a torch router to a Core ML ML program (`router.mlpackage`).

The router is the torch module it is given: an `encoder` (HF BERT-like), `pool(hidden, mask)`,
a linear `head` and a `config` (backbone, max_length, pooling, outputs, target), as
convert/router_model.py's Router has; this package imports nothing from `convert`.

The package is self-describing for a Swift app: inputs `input_ids` and `attention_mask`
(int32, [1, L]), output `scores` ([1, n], one per candidate, in the router's output order),
and user metadata holding the tokenizer id and folder, max length, pooling and the
candidate table as JSON. The tokenizer files stay in the bundle's `router/` folder beside it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pudding_mlx.errors import PuddingError

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "scores"
# fp16-safe stand-in for -inf in the additive mask (HF uses finfo.min, which is -inf in fp16)
MASK_VALUE = -1e4
META_PREFIX = "pudding."


@dataclass
class ExportSettings:
    precision: str = "float16"  # or "float32"
    lengths: tuple[int, ...] = ()  # extra enumerated sequence lengths; max_length is always one
    tokenizer_dir: str = "router"  # where the tokenizer files sit, relative to the package's folder


class CoreMLRouter(nn.Module):
    """The router with the attention-mask preparation done in plain arithmetic.

    BERT's own 2-D mask handling emits `new_ones`, which coremltools cannot convert, so this
    wrapper hands the encoder a ready 4-D additive mask.
    """

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.to(torch.float32)
        additive = ((1.0 - m) * MASK_VALUE)[:, None, None, :]
        ids = input_ids.to(torch.int64)
        hidden = self.router.encoder(input_ids=ids, attention_mask=additive)[0]
        return self.router.head(self.router.pool(hidden, m))


def candidate_table(names: list[str], skips: list[list[int]]) -> list[dict]:
    return [{"name": n, "skip": list(s)} for n, s in zip(names, skips, strict=True)]


def export_coreml(
    router: nn.Module,
    out: str | Path,
    candidates: list[dict],
    settings: ExportSettings | None = None,
):
    """Trace `router`, convert it to an ML program and save it to `out` (a .mlpackage folder).

    `candidates` is the table [{"name", "skip"}] in the router's output order.
    Returns the coremltools MLModel.
    """
    import coremltools as ct

    settings = settings or ExportSettings()
    cfg = router.config
    if [c["name"] for c in candidates] != list(cfg.outputs):
        raise PuddingError(
            f"router outputs {cfg.outputs} differ from the candidate table "
            f"{[c['name'] for c in candidates]}"
        )
    if settings.precision not in ("float16", "float32"):
        raise PuddingError(
            f"Core ML precision must be float16 or float32, not {settings.precision}"
        )
    L = cfg.max_length
    lengths = sorted({L, *settings.lengths})
    if lengths[-1] > L or lengths[0] < 2:
        raise PuddingError(f"enumerated lengths {lengths} must lie in 2..max_length={L}")

    wrapper = CoreMLRouter(router.eval()).eval()
    example = (torch.ones(1, L, dtype=torch.int32), torch.ones(1, L, dtype=torch.int32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example)

    # Never RangeDim: a flexible length keeps the model off the Neural Engine.
    # Two enumerated inputs need the iOS 18 / macOS 15 opset; a fixed length runs on macOS 13.
    if len(lengths) == 1:
        shape, target = ct.Shape((1, L)), ct.target.macOS13
    else:
        shape = ct.EnumeratedShapes(shapes=[(1, n) for n in lengths], default=(1, L))
        target = ct.target.macOS15
    precision = ct.precision.FLOAT16 if settings.precision == "float16" else ct.precision.FLOAT32
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name=n, shape=shape, dtype=ct.converters.mil.mil.types.int32)
                for n in INPUTS],
        outputs=[ct.TensorType(name=OUTPUT)],
        convert_to="mlprogram",
        compute_precision=precision,
        minimum_deployment_target=target,
    )

    mlmodel.short_description = "PuDDing router: one score per candidate omission set"
    mlmodel.input_description["input_ids"] = f"token ids from the router tokenizer, padded to {L}"
    mlmodel.input_description["attention_mask"] = "1 for real tokens, 0 for padding"
    mlmodel.output_description[OUTPUT] = "candidate scores (higher = better), metadata order"
    meta = mlmodel.user_defined_metadata
    meta[META_PREFIX + "tokenizer"] = cfg.backbone
    meta[META_PREFIX + "tokenizer_dir"] = settings.tokenizer_dir
    meta[META_PREFIX + "max_length"] = str(L)
    meta[META_PREFIX + "lengths"] = json.dumps(lengths)
    meta[META_PREFIX + "pooling"] = cfg.pooling
    meta[META_PREFIX + "target"] = cfg.target
    meta[META_PREFIX + "precision"] = settings.precision
    meta[META_PREFIX + "candidates"] = json.dumps(candidates)
    mlmodel.save(str(out))
    return mlmodel
