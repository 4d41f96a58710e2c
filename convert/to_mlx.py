"""The LLM to MLX: mlx-lm's own conversion, config fixes, and a parity gate against torch.

mlx-lm converts hub ids and HF folders; other sources `assets.load_causal_lm` reads (GGUF
files) are first saved as a plain HF folder from the dequantised torch model.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pudding_mlx.errors import PuddingError
from pudding_mlx.files import scratch_folder

DTYPES = ("float16", "bfloat16", "float32")
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

PROMPTS = (
    "Question: Which gas do plants absorb from the air to make their food?\nAnswer:",
    "How do you separate egg whites from the yolk without any special tools?",
    "The capital of France is Paris. The capital of Italy is",
    "Hi! How was your weekend? Mine was great, we went hiking in the mountains and",
)


def sliding_window(config) -> int | None:
    """The window of a model whose `config.layer_types` has sliding-window blocks (Gemma 3)."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return config.sliding_window
    return None


def long_prompt(tokenizer, tokens: int) -> str:
    """The packaged chat prompts joined, in file order, into a text of at least `tokens`
    tokens: the parity gate's prompt longer than a sliding window, so the windowed masks (and
    the rotating caches' wrap-around) are compared too."""
    from pudding_mlx.prompts import read_prompts

    parts: list[str] = []
    for p in read_prompts():
        parts.append(p.text)
        if len(tokenizer.encode("\n\n".join(parts))) >= tokens:
            return "\n\n".join(parts)
    raise PuddingError(f"the packaged prompts are shorter than {tokens} tokens")


def parity_prompts(torch_model, tokenizer) -> tuple[str, ...]:
    """PROMPTS, plus one 64 tokens longer than the model's sliding window if it has one."""
    window = sliding_window(torch_model.config)
    return PROMPTS if window is None else (*PROMPTS, long_prompt(tokenizer, window + 64))


@dataclass
class MLXSettings:
    dtype: str = "float16"
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise PuddingError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantize and self.q_bits not in (4, 8):
            raise PuddingError(f"--q-bits must be 4 or 8, got {self.q_bits}")
        if self.quantize and self.q_group_size not in (32, 64, 128):
            raise PuddingError(f"--q-group-size must be 32, 64 or 128, got {self.q_group_size}")

    @property
    def kind(self) -> str:
        return f"q{self.q_bits}" if self.quantize else self.dtype

    def bytes_per_param(self) -> float:
        if self.quantize:  # packed weights plus a scale and a bias (in `dtype`) per group
            return self.q_bits / 8 + 2 * BYTES[self.dtype] / self.q_group_size
        return BYTES[self.dtype]


@dataclass
class Tolerance:
    """Bounds on MLX vs torch (fp32) next-token distributions, over every prompt position.

    max_abs_logprob: max |log_softmax difference| over the whole vocabulary (None: unused);
    max_kl: mean KL(torch || mlx) per position, in nats; min_top1: share of the positions
    where torch's top token leads by more than CONFIDENT_MARGIN at which MLX picks it too.
    """

    max_abs_logprob: float | None
    max_kl: float
    min_top1: float


# fp32 differs from torch only by summation order. Half precision and quantisation change
# every matmul, so they get distribution-level bounds: per-token KL to the float torch model and
# top-1 agreement where it is confident, dense and with a set skipped. Measured on SmolLM2-135M
# (dense / 4 or 5 of 30 blocks skipped): fp32 max |dlogprob| 7e-5 / 2e-4; mean KL fp16 3e-5 /
# 5e-4, bf16 1.4e-3 / 1.4e-2, q8 2e-3 / 3e-3, q4 0.64 / 0.64. Quantisation must move the model
# less than removing one block does (SmolLM2's least important block: KL 0.106), or the sets
# searched and routed on the float model stop describing the model that runs: q4 may cost up to
# about one block (0.1), q8 (near-lossless, 2e-3) 5x less. SmolLM2 ships as Q4_1, and 4 bits
# again cost as much as its whole 4-block static set (0.66): refused unless --max-kl.
# Gemma 3 270M's larger activations amplify fp32 summation-order noise when blocks are removed:
# max |dlogprob| 1.3e-4 dense, 1.3e-3 with 6 of 18 skipped (mean KL <= 2e-9), hence 5e-3; a
# wrong embedding scale gave 0.2-2.7.
TOLERANCES = {
    "float32": Tolerance(5e-3, 1e-5, 0.99),
    "float16": Tolerance(None, 5e-3, 0.95),
    "bfloat16": Tolerance(None, 5e-2, 0.90),
    "q8": Tolerance(None, 0.02, 0.95),
    "q4": Tolerance(None, 0.1, 0.85),
}


def tolerance_for(kind: str, max_kl: float | None = None) -> Tolerance:
    """The bound for `kind`; `max_kl` (a user override) replaces it by mean KL <= max_kl."""
    if max_kl is not None:
        return Tolerance(None, max_kl, 0.0)
    return TOLERANCES[kind]


CONFIDENT_MARGIN = 1.0  # nats


@dataclass
class ParityResult:
    skip: list[int]
    positions: int
    max_abs_logit: float
    max_abs_logprob: float
    mean_kl: float
    top1: float  # share of positions with the same most likely token
    top1_confident: float  # the same, over positions where torch's top token leads by > 1 nat


@dataclass
class ParityReport:
    kind: str
    tolerance: Tolerance
    results: list[ParityResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    reference: str = "HF torch float32"

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"kind": self.kind, "passed": self.passed, "tolerance": asdict(self.tolerance),
                "reference": self.reference, "results": [asdict(r) for r in self.results],
                "failures": self.failures}


def needs_hf_folder(source: str | Path) -> bool:
    """True for a local source mlx-lm cannot read itself (a GGUF file or folder)."""
    path = Path(source)
    return path.exists() and not (path / "config.json").is_file()


def fix_mlx_config(folder: str | Path) -> dict:
    """Write the keys mlx-lm reads at the top level of config.json; returns what was added.

    transformers 5 keeps rope_theta (and the scaling) under `rope_parameters` (Gemma 3: one
    entry per attention type); mlx-lm 0.32 reads `rope_theta` / `rope_scaling` (Gemma 3 also
    `rope_local_base_freq`) and silently falls back to its defaults / no scaling.
    """
    from pudding_mlx.model import rope_theta_fix

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    added = rope_theta_fix(config)
    params = config.get("rope_parameters")
    if isinstance(params, dict):  # Gemma 3: mlx-lm scales the full-attention blocks only
        params = params.get("full_attention", params)
    if (isinstance(params, dict) and params.get("rope_type", "default") != "default"
            and not config.get("rope_scaling")):
        added["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    if added:
        path.write_text(json.dumps({**config, **added}, indent=4) + "\n")
    return added


def convert_llm_to_mlx(
    source: str | Path,
    out: str | Path,
    settings: MLXSettings,
    torch_model=None,
    tokenizer=None,
) -> dict:
    """Convert `source` (hub id, HF folder or GGUF) with mlx-lm into the new folder `out`.

    For a GGUF source, `torch_model`/`tokenizer` (as from `assets.load_causal_lm`) are saved
    as an HF folder first; they are loaded here when not given. Returns the config fixes.
    """
    from mlx_lm.convert import convert as mlx_convert

    out = Path(out)
    q = settings.quantize
    kwargs = {"mlx_path": str(out), "dtype": settings.dtype, "quantize": q,
              "q_bits": settings.q_bits if q else None,
              "q_group_size": settings.q_group_size if q else None}
    if needs_hf_folder(source):
        if torch_model is None or tokenizer is None:
            from .assets import load_causal_lm

            torch_model, tokenizer = load_causal_lm(source)
        with scratch_folder(out, "hf") as hf:
            torch_model.save_pretrained(hf)
            tokenizer.save_pretrained(hf)
            mlx_convert(hf, **kwargs)
    else:
        mlx_convert(str(source), **kwargs)
    return fix_mlx_config(out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(skip: list[int], ref: np.ndarray, got: np.ndarray) -> ParityResult:
    """Compare two [positions, vocab] logit arrays (ref: torch fp32)."""
    import mlx.core as mx

    from pudding_mlx.fidelity.metrics import kl_agreement

    lp_ref, lp_got = _log_softmax(ref), _log_softmax(got)
    with mx.stream(mx.cpu):  # float64 (CPU only): fp32 KLs of 1e-9 are below float32's noise
        kl, same = kl_agreement(mx.array(lp_ref, mx.float64), mx.array(lp_got, mx.float64))
        kl, same = np.array(kl), np.array(same)
    top2 = np.sort(lp_ref, axis=-1)[:, -2:]
    confident = top2[:, 1] - top2[:, 0] > CONFIDENT_MARGIN
    return ParityResult(
        skip=list(skip),
        positions=int(ref.shape[0]),
        max_abs_logit=float(np.abs(ref.astype(np.float64) - got).max()),
        max_abs_logprob=float(np.abs(lp_ref - lp_got).max()),
        mean_kl=float(kl.mean()),
        top1=float(same.mean()),
        top1_confident=float(same[confident].mean()) if confident.any() else 1.0,
    )


@contextmanager
def embed_scale_as_mlx_lm(torch_model):
    """Gemma 3 scales its embeddings by sqrt(hidden_size); mlx-lm always rounds that factor to
    bfloat16 (as Gemma's own code does in bf16), HF torch in float32 does not (270M: 25.25 vs
    25.298). Within this context the torch model rounds it too, so that the parity gate
    measures the conversion rather than this choice of mlx-lm's. Yields what it did, or None."""
    import torch

    embed = getattr(getattr(torch_model, "model", None), "embed_tokens", None)
    scale = getattr(embed, "embed_scale", None)
    if torch_model.config.model_type != "gemma3_text" or not isinstance(scale, torch.Tensor):
        yield None
        return
    saved = scale.clone()
    rounded = scale.to(torch.bfloat16).to(scale.dtype)
    scale.copy_(rounded)
    try:
        yield (f"embedding scale rounded to bfloat16 as mlx-lm does ({saved.item():.6g} -> "
               f"{rounded.item():.6g})" if rounded != saved else None)
    finally:
        scale.copy_(saved)


def torch_logits(model, ids: list[int], skip: list[int]) -> np.ndarray:
    import torch

    from .skip import skipped

    with torch.no_grad(), skipped(model, skip):
        out = model(input_ids=torch.tensor([ids]), use_cache=False).logits
    return out[0].float().numpy()


def mlx_logits(model, ids: list[int], skip: list[int]) -> np.ndarray:
    import mlx.core as mx

    from pudding_mlx.masking import skip_view

    logits = skip_view(model, skip)(mx.array([ids]))
    return np.array(logits[0].astype(mx.float32))


def check_parity(
    torch_model,
    tokenizer,
    mlx_model,
    mlx_tokenizer,
    skip_sets: list[list[int]],
    kind: str,
    prompts: tuple[str, ...] = PROMPTS,
    tolerance: Tolerance | None = None,
) -> ParityReport:
    """Compare the MLX model with the torch model on `prompts` for each skip set."""
    report = ParityReport(kind, tolerance or TOLERANCES[kind])
    tol = report.tolerance
    encoded = [tokenizer.encode(p) for p in prompts]
    if [list(mlx_tokenizer.encode(p)) for p in prompts] != encoded:
        report.failures.append("the MLX tokenizer encodes the prompts differently from torch's")
    for skip in skip_sets:
        with embed_scale_as_mlx_lm(torch_model) as note:
            ref = np.concatenate([torch_logits(torch_model, ids, skip) for ids in encoded])
        if note:
            report.reference = f"HF torch float32, {note}"
        got = np.concatenate([mlx_logits(mlx_model, ids, skip) for ids in encoded])
        if ref.shape != got.shape:
            raise PuddingError(f"MLX logits have shape {got.shape}, torch {ref.shape}")
        r = compare_logits(skip, ref, got)
        report.results.append(r)
        where = f"skip {skip}" if skip else "dense"
        if tol.max_abs_logprob is not None and not r.max_abs_logprob <= tol.max_abs_logprob:
            report.failures.append(
                f"{where}: max |log-prob diff| {r.max_abs_logprob:.3g} > {tol.max_abs_logprob:g}")
        if not r.mean_kl <= tol.max_kl:
            report.failures.append(f"{where}: mean KL {r.mean_kl:.3g} > {tol.max_kl:g}")
        if not r.top1_confident >= tol.min_top1:
            report.failures.append(
                f"{where}: top-1 agreement {r.top1_confident:.3f} < {tol.min_top1:g}")
    return report
