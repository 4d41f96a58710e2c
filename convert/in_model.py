"""`pudding train-router --router in-model`: a linear head on the LLM's own hidden state.

The features of a prompt are the LLM's hidden states after its first `blocks` blocks (before
the final norm), mean-pooled over the tokens `pudding_mlx.in_model` pools at run time; they
are computed once per label folder and cached. The head is a ridge regression on the
standardised features, fitted in closed form for each strength on a grid; the strength with
the lowest held-out MSE is kept (as a trained router keeps its best epoch). The head stores
the train features' mean (head.center) and folds their scale into head.weight: folding the
mean into the bias too would cancel large terms in float32.

Output folder, like `pudding train-router`'s:
    router/          router_config.json (kind "in-model") and model.safetensors (the head)
    metrics.json     the same metrics as an encoder router's, plus the ridge curve
    features.npz     the cached features and what they were computed from
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from pudding_mlx.bundle import ROUTER_CONFIG, RouterConfig
from pudding_mlx.errors import PuddingError
from pudding_mlx.files import write_atomic, write_json
from pudding_mlx.prompts import encode_chat, pooled_tokens

from .router_model import WEIGHTS

FEATURES = "features.npz"
# ridge strengths tried, on features standardised to unit variance
RIDGE_GRID = (0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)


@dataclass
class InModelConfig:
    model: str = ""  # the LLM ("": the one the labels were made with)
    blocks: int = 1  # the first blocks whose output the head reads (all candidates keep them)
    # read a prompt through the chat template, as generate does (None: for fidelity labels)
    chat_template: bool | None = None
    batch_size: int = 16


def llm_features(model, tokenizer, texts: list[str], blocks: int, chat_template: bool,
                 batch_size: int = 16) -> np.ndarray:
    """[n, D] float32: each text's hidden states after the first `blocks` blocks (before the
    final norm), mean-pooled over `pooled_tokens` of its ids. Only those blocks run."""
    import torch
    from tqdm.auto import tqdm

    from .skip import decoder_layers, skipped

    layers = decoder_layers(model)
    if not 1 <= blocks < len(layers):
        raise PuddingError(f"--blocks {blocks}: the model has {len(layers)} blocks")
    ids = [pooled_tokens(encode_chat(tokenizer, t, chat_template)) for t in texts]
    captured: list = []
    hook = layers[blocks - 1].register_forward_hook(
        lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    device = next(model.parameters()).device
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths batched
    try:
        with skipped(model, range(blocks, len(layers))), torch.no_grad():
            for s in tqdm(range(0, len(order), batch_size), desc="LLM features", leave=False):
                rows = order[s:s + batch_size]
                n = max(len(ids[r]) for r in rows)
                x = torch.zeros((len(rows), n), dtype=torch.long)
                mask = torch.zeros((len(rows), n), dtype=torch.long)
                for j, r in enumerate(rows):
                    x[j, :len(ids[r])], mask[j, :len(ids[r])] = torch.tensor(ids[r]), 1
                captured.clear()
                model.model(input_ids=x.to(device), attention_mask=mask.to(device),
                            use_cache=False)
                h, m = captured[-1].float(), mask.to(device)[..., None].float()
                out[rows] = ((h * m).sum(1) / m.sum(1)).cpu().numpy()
    finally:
        hook.remove()
    return out


@dataclass
class Head:
    """scores = weight @ (features - center) + bias"""

    weight: np.ndarray  # [C, D] float32
    bias: np.ndarray  # [C]
    center: np.ndarray  # [D]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.center) @ self.weight.T + self.bias


def fit_ridge(x: np.ndarray, y: np.ndarray, train: np.ndarray, held: np.ndarray,
              grid: tuple[float, ...] = RIDGE_GRID) -> tuple[Head, list]:
    """Ridge regression of y on standardised x, its strength chosen by held-out MSE.

    Returns the head acting on raw features and the curve
    [{"ridge", "train_mse", "eval_mse"}] over `grid`."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mu, sd = x64[train].mean(0), x64[train].std(0) + 1e-6
    z = (x64 - mu) / sd
    y_mean = y64[train].mean(0)
    gram, cross = z[train].T @ z[train], z[train].T @ (y64[train] - y_mean)
    curve, fits = [], []
    for lam in grid:
        w = np.linalg.solve(gram + lam * np.eye(len(gram)), cross)  # [D, C]
        fits.append(w)
        curve.append({"ridge": lam,
                      "train_mse": float(np.mean((z[train] @ w + y_mean - y64[train]) ** 2)),
                      "eval_mse": float(np.mean((z[held] @ w + y_mean - y64[held]) ** 2))})
    best = min(range(len(grid)), key=lambda i: (curve[i]["eval_mse"], -grid[i]))
    head = Head(np.ascontiguousarray((fits[best] / sd[:, None]).T, dtype=np.float32),
                y_mean.astype(np.float32), mu.astype(np.float32))
    return head, curve


def cached_features(path: Path, identity: dict, compute) -> np.ndarray:
    """The features in `path` when they were computed from `identity`, else `compute()`d and
    saved there."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    if path.is_file():
        with np.load(path) as f:
            if str(f["key"]) == key:
                click.echo(f"{path}: reusing the cached LLM features")
                return f["x"]
    x = compute()

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, x=x, key=np.array(key))

    write_atomic(path, save)
    return x


def save_head(folder: Path, head: Head, config: RouterConfig) -> None:
    """router/ of an in-model router: the head as safetensors and router_config.json."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # safetensors writes an array's buffer as is: a transposed view would be scrambled
    tensors = {f"head.{k}": np.ascontiguousarray(getattr(head, k))
               for k in ("weight", "bias", "center")}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "np"})
    write_json(folder / ROUTER_CONFIG, asdict(config))


def train_in_model(labels_dir: Path, out_dir: Path, data, target: str, inputs: str,
                   settings: dict, cfg: InModelConfig) -> dict:
    """Fit, save and report an in-model router on `data` (train_router.TrainData)."""
    from .assets import load_causal_lm
    from .identity import source_identity
    from .label_store import read_meta

    source = cfg.model or read_meta(labels_dir)["settings"].get("model", "")
    if not source:
        raise PuddingError(f"{labels_dir}: the labels do not name their model; pass --model")
    t0 = time.perf_counter()
    identity = {"model": source_identity(source), "blocks": cfg.blocks,
                "chat_template": cfg.chat_template, "texts": data.texts}

    def compute() -> np.ndarray:
        model, tokenizer = load_causal_lm(source)
        return llm_features(model.eval(), tokenizer, data.texts, cfg.blocks, cfg.chat_template,
                            cfg.batch_size)

    x = cached_features(out_dir / FEATURES, identity, compute)
    head, curve = fit_ridge(x, data.y, data.train_items, data.eval_items)
    config = RouterConfig(backbone=Path(source).name, num_outputs=len(data.names),
                          max_length=0, pooling="mean", outputs=list(data.names), target=target,
                          inputs=inputs, kind="in-model", blocks=cfg.blocks,
                          chat_template=cfg.chat_template)
    save_head(out_dir / "router", head, config)
    selected = min(curve, key=lambda c: (c["eval_mse"], -c["ridge"]))
    click.echo(f"in-model router: ridge {selected['ridge']:g} kept (held-out MSE "
               f"{selected['eval_mse']:.4f}) of {len(curve)} strengths")
    metrics = data.report(head(x[data.eval_items]))
    metrics.update(settings=settings, ridge=curve, selected_ridge=selected["ridge"],
                   train_seconds=round(time.perf_counter() - t0, 1))
    return metrics


def load_head(folder: Path) -> Head:
    from safetensors.numpy import load_file

    t = load_file(str(Path(folder) / WEIGHTS))
    return Head(t["head.weight"], t["head.bias"], t["head.center"])
