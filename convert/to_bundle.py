"""`pudding convert`: an HF checkpoint + candidates.json + a trained router -> a PuDDing bundle.

The bundle (pudding_mlx/bundle.py) is written atomically: model/ through mlx-lm's conversion,
checked against torch (dense and with a candidate set skipped); router/ copied as safetensors
(checked against the MLX router port); router.mlpackage exported and checked against torch.
Any failed check leaves no bundle behind (and an existing one untouched).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np

from pudding_mlx.bundle import (
    MANIFEST,
    ROUTER_CONFIG,
    Candidate,
    Manifest,
    RouterConfig,
    RouterInfo,
    read_candidates,
    write_manifest,
)
from pudding_mlx.errors import BundleError, PuddingError
from pudding_mlx.files import read_json

from .router_metrics import TARGETS
from .to_mlx import DTYPES, MLXSettings

ROUTER_TOLERANCE = 1e-4  # MLX router vs torch router, max |score diff| (both fp32)
# in-model router through a float32 MLX model vs torch, relative to the largest score (the
# LLM's own parity gate bounds the models' differences; lower precisions are reported only)
IN_MODEL_TOLERANCE = 1e-3


@dataclass
class ConvertSettings:
    mlx: MLXSettings = field(default_factory=MLXSettings)
    static: str | None = None  # a candidate name or a JSON file; None: the first candidate
    coreml: bool = True
    coreml_precision: str = "float16"
    coreml_lengths: tuple[int, ...] = ()
    max_kl: float | None = None  # override the parity gate: mean KL <= max_kl only
    tolerance: float | None = None  # a fidelity router's default tolerance (nats/token)


def resolve_static(value: str | None, candidates: list[Candidate]) -> Candidate:
    """The static fallback: a candidate's name, a JSON file (a skip list or an object with
    'skip'), or by default the first candidate."""
    if value is None:
        return candidates[0]
    for c in candidates:
        if c.name == value:
            return c
    path = Path(value)
    if not path.is_file():
        raise PuddingError(f"--static {value!r}: neither a candidate name nor a file")
    static = Candidate.from_dict(read_json(path), str(path), default_name="static",
                                 strict=False)
    for c in candidates:
        if c.name == static.name and c.skip != static.skip:
            raise PuddingError(f"{path}: static set is named {c.name!r} like a different candidate")
    return static


def read_router_config(router_dir: str | Path, candidates: list[Candidate]):
    """The router's RouterConfig, checked against the candidates (the same names, in any order:
    the manifest keeps the router's output order). Its target (likelihood, margin: higher is
    better; fidelity: predicted KL to dense, lower is better) goes into the manifest."""
    from .router_model import WEIGHTS

    router_dir = Path(router_dir)
    for name in (ROUTER_CONFIG, WEIGHTS):
        if not (router_dir / name).is_file():
            raise PuddingError(f"{router_dir / name}: missing (not a trained router folder)")
    path = router_dir / ROUTER_CONFIG
    cfg = RouterConfig.from_dict(read_json(path), str(path))
    if cfg.kind == "encoder" and not (router_dir / "config.json").is_file():
        raise PuddingError(f"{router_dir / 'config.json'}: missing (not a trained router "
                           "folder)")
    if cfg.target not in TARGETS:
        raise PuddingError(f"{path}: router target {cfg.target!r} unknown; expected one of "
                           f"{', '.join(TARGETS)}")
    names = [c.name for c in candidates]
    if sorted(cfg.outputs) != sorted(names) or cfg.num_outputs != len(names):
        raise PuddingError(
            f"{router_dir / ROUTER_CONFIG}: router outputs {cfg.outputs} must name the "
            f"candidates {names}"
        )
    return cfg


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def estimate_bytes(num_params: int, settings: ConvertSettings, source, router_dir: Path) -> int:
    """Disk needed while converting: the MLX model, a temporary fp32 HF folder for GGUF
    sources, the router copy and its Core ML package, plus 10 %."""
    from .to_mlx import needs_hf_folder

    need = num_params * settings.mlx.bytes_per_param()
    if needs_hf_folder(source):
        need += num_params * 4
    need += _folder_bytes(router_dir) * (2 if settings.coreml else 1)
    return int(need * 1.1) + (16 << 20)


def check_router_mlx(router_dir: Path, torch_router, outputs: list[str], prompts) -> float:
    """Max |score diff| of the MLX router port vs the torch router on `prompts`."""
    import torch

    from pudding_mlx.router import MLXRouter

    cfg = torch_router.config
    mlx_router = MLXRouter(router_dir, outputs, cfg.max_length, cfg.pooling)
    enc = mlx_router.encode(list(prompts))
    got = mlx_router.forward(enc)
    with torch.no_grad():
        ref = torch_router(torch.from_numpy(enc.input_ids).long(),
                           torch.from_numpy(enc.attention_mask).long()).numpy()
    return float(np.abs(got - ref).max())


def parity_skip(manifest: Manifest) -> list[int]:
    """The set the parity gate skips: the static set, else the first non-empty candidate."""
    for c in [manifest.static, *manifest.candidates]:
        if c.skip:
            return list(c.skip)
    return []


def write_bundle(
    source: str,
    candidates_path: str | Path,
    router_dir: str | Path,
    out: str | Path,
    settings: ConvertSettings | None = None,
) -> Manifest:
    """Convert everything into the bundle folder `out` (atomically); returns its manifest."""
    from pudding_mlx.files import atomic_folder
    from pudding_mlx.masking import num_blocks, protected_blocks
    from pudding_mlx.model import load_lm

    from .assets import load_causal_lm
    from .router_model import Router
    from .skip import decoder_layers
    from .to_mlx import PROMPTS, check_parity, convert_llm_to_mlx, parity_prompts, tolerance_for

    settings = settings or ConvertSettings()
    router_dir = Path(router_dir)
    candidates, search_settings = read_candidates(candidates_path)
    static = resolve_static(settings.static, candidates)
    rcfg = read_router_config(router_dir, candidates)
    dest = _destination(out, settings)
    torch_model, tokenizer = load_causal_lm(source)
    manifest = Manifest(
        base_model=str(source),
        num_blocks=len(decoder_layers(torch_model)),
        candidates=candidates,
        static=static,
        router=RouterInfo(backbone=rcfg.backbone, max_length=rcfg.max_length,
                          outputs=list(rcfg.outputs), pooling=rcfg.pooling, target=rcfg.target,
                          tolerance=settings.tolerance, kind=rcfg.kind, blocks=rcfg.blocks),
    )
    _validate(manifest, candidates_path)  # indices in range before any work
    try:
        router = Router.load(router_dir) if rcfg.kind == "encoder" else None
    except (RuntimeError, OSError, ValueError) as e:
        raise PuddingError(f"{router_dir}: cannot load the router ({e})") from None
    num_params = sum(p.numel() for p in torch_model.parameters())

    with atomic_folder(dest, estimate_bytes(num_params, settings, source, router_dir)) as tmp:
        fixes = convert_llm_to_mlx(source, tmp / "model", settings.mlx, torch_model, tokenizer)
        mlx_model, mlx_tokenizer, _ = load_lm(tmp / "model")
        if num_blocks(mlx_model) != manifest.num_blocks:
            raise PuddingError(f"{source}: MLX model has {num_blocks(mlx_model)} blocks, torch "
                               f"{manifest.num_blocks}")
        manifest.protected = sorted(protected_blocks(mlx_model))
        _validate(manifest, candidates_path)
        parity = check_parity(torch_model, tokenizer, mlx_model, mlx_tokenizer,
                              [[], parity_skip(manifest)], settings.mlx.kind,
                              parity_prompts(torch_model, tokenizer),
                              tolerance_for(settings.mlx.kind, settings.max_kl))
        if not parity.passed:
            raise PuddingError(f"{source}: MLX model disagrees with torch "
                               f"({'; '.join(parity.failures)}); bundle not written")
        shutil.copytree(router_dir, tmp / "router",
                        ignore=shutil.ignore_patterns(".*", "__pycache__"))
        if router is None:
            router_extra = _in_model_checks(tmp, rcfg, torch_model, tokenizer, mlx_model,
                                            mlx_tokenizer, settings, manifest)
        else:
            del mlx_model
            router_extra = _router_checks(tmp, router, rcfg.outputs, PROMPTS, settings,
                                          manifest)

        manifest.extra = {
            "mlx": {**asdict(settings.mlx), "config_fixes": fixes},
            "parity": parity.to_dict(),
            "router": router_extra,
            "search_settings": search_settings,
        }
        write_manifest(tmp, manifest)
    return manifest


def _destination(out: str | Path, settings: ConvertSettings) -> Path:
    """The bundle folder, checked before any work: writable, empty or a bundle; coremltools
    present when the Core ML export is asked for."""
    from pudding_mlx.files import check_writable

    dest = check_writable(out)
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).is_file():
        raise PuddingError(f"{dest}: not empty and not a bundle; refusing to replace it")
    if settings.coreml:
        import importlib.util

        if importlib.util.find_spec("coremltools") is None:
            raise PuddingError("the Core ML export needs coremltools: pip install "
                               "'pudding-mlx[coreml]', or pass --no-coreml")
    return dest


def _validate(manifest: Manifest, candidates_path: str | Path) -> None:
    try:
        manifest.validate(str(candidates_path))
    except BundleError as e:
        raise PuddingError(str(e)) from None


def _router_checks(tmp: Path, router, outputs, prompts, settings: ConvertSettings,
                   manifest: Manifest) -> dict:
    """Check the copied router in MLX and export + check the Core ML package."""
    extra: dict = {}
    try:
        diff = check_router_mlx(tmp / "router", router, outputs, prompts)
    except BundleError as e:
        if not settings.coreml:
            raise PuddingError(f"the MLX runtime cannot run this router ({e})") from None
        extra["mlx_unsupported"] = str(e)
    else:
        if not diff <= ROUTER_TOLERANCE:
            raise PuddingError(f"MLX router disagrees with torch (max |diff| {diff:.3g} > "
                               f"{ROUTER_TOLERANCE:g}); bundle not written")
        extra["mlx_max_abs_diff"] = diff
    if settings.coreml:
        from transformers import AutoTokenizer

        from router_coreml.export import ExportSettings, candidate_table, export_coreml
        from router_coreml.verify import verify_mlpackage

        ordered = manifest.ordered_candidates()
        table = candidate_table([c.name for c in ordered], [c.skip for c in ordered])
        package = tmp / "router.mlpackage"
        export_coreml(router, package, table,
                      ExportSettings(settings.coreml_precision, settings.coreml_lengths, "router"))
        rtok = AutoTokenizer.from_pretrained(tmp / "router", trust_remote_code=False)
        report = verify_mlpackage(package, router, rtok)
        extra["coreml"] = report.to_dict()
    return extra


def _in_model_checks(tmp: Path, rcfg: RouterConfig, torch_model, tokenizer, mlx_model,
                     mlx_tokenizer, settings: ConvertSettings, manifest: Manifest) -> dict:
    """The in-model router's scores through the converted MLX model against the torch model's
    features and the same head; then the head's Core ML package (pooling + head)."""
    from pudding_mlx.in_model import InModelRouter

    from .in_model import llm_features, load_head
    from .to_mlx import PROMPTS

    head = load_head(tmp / "router")
    ref = head(llm_features(torch_model, tokenizer, list(PROMPTS), rcfg.blocks,
                            rcfg.chat_template))
    got = InModelRouter(tmp / "router", rcfg, mlx_model, mlx_tokenizer).scores_batch(
        list(PROMPTS))
    diff = float(np.abs(got - ref).max())
    bound = IN_MODEL_TOLERANCE * (1 + float(np.abs(ref).max()))
    if settings.mlx.kind == "float32" and not diff <= bound:
        raise PuddingError(f"in-model router: MLX scores disagree with torch (max |diff| "
                           f"{diff:.3g} > {bound:.3g}); bundle not written")
    extra: dict = {"mlx_max_abs_diff": diff}
    if settings.coreml:
        from router_coreml.export import candidate_table
        from router_coreml.head import export_head

        ordered = manifest.ordered_candidates()
        table = candidate_table([c.name for c in ordered], [c.skip for c in ordered])
        extra["coreml"] = export_head(head, tmp / "router.mlpackage", table, rcfg)
    return extra


def _lengths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 32,64") from None


@click.command("convert")
@click.option("--model", "source", required=True,
              help="The base LLM: HF hub id, HF folder, or GGUF file.")
@click.option("--candidates", "candidates_path", required=True,
              type=click.Path(exists=True, dir_okay=False), help="candidates.json from the search.")
@click.option("--router", "router_dir", required=True,
              type=click.Path(exists=True, file_okay=False), help="Trained router folder.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True,
              help="MLX weight dtype (float32 runs faster on Linux CPUs).")
@click.option("--quantize", "-q", is_flag=True, help="Quantize the MLX weights.")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--q-group-size", type=int, default=64, show_default=True)
@click.option("--static", default=None,
              help="Static fallback set: a candidate name or a JSON file with a skip list "
                   "(default: the first candidate).")
@click.option("--max-kl", type=float, default=None,
              help="Accept a lossier MLX model: gate only on mean KL(torch||mlx) <= this "
                   "(nats) instead of the dtype's built-in bounds.")
@click.option("--tolerance", type=float, default=None,
              help="A fidelity router's default tolerance (predicted KL to dense, nats/token) "
                   "for generate, chat, eval and the rest [default: none; they then need "
                   "--tolerance].")
@click.option("--coreml/--no-coreml", default=True, show_default=True,
              help="Also export and check router.mlpackage.")
@click.option("--coreml-precision", type=click.Choice(["float16", "float32"]),
              default="float16", show_default=True)
@click.option("--coreml-lengths", default="", callback=_lengths,
              help="Extra enumerated router input lengths besides max_length, e.g. 32,64.")
def convert(source, candidates_path, router_dir, out, dtype, quantize, q_bits, q_group_size,
            static, max_kl, tolerance, coreml, coreml_precision, coreml_lengths):
    """Turn an HF checkpoint, candidates.json and a trained router into a PuDDing bundle."""
    settings = ConvertSettings(
        mlx=MLXSettings(dtype, quantize, int(q_bits), q_group_size),
        static=static, coreml=coreml, coreml_precision=coreml_precision,
        coreml_lengths=coreml_lengths, max_kl=max_kl, tolerance=tolerance,
    )
    m = write_bundle(source, candidates_path, router_dir, out, settings)
    for r in m.extra["parity"]["results"]:
        where = f"skip {r['skip']}" if r["skip"] else "dense"
        click.echo(f"parity {where}: max |logit diff| {r['max_abs_logit']:.3g}, "
                   f"mean KL {r['mean_kl']:.3g}, top-1 {r['top1']:.3f} (where torch leads by "
                   f"> 1 nat: {r['top1_confident']:.3f})")
    if "coreml" in m.extra["router"]:
        c = m.extra["router"]["coreml"]
        click.echo(f"router.mlpackage: max |diff| {c['max_abs_diff']:.3g} "
                   f"(tolerance {c['tolerance']:.3g}, {c['precision']})")
    click.echo(f"wrote {out}: {m.num_blocks} blocks, {len(m.candidates)} candidates, "
               f"static {m.static.name!r}, protected {m.protected}")
