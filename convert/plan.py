"""`pudding plan`: what a `pudding build` of a checkpoint will cost, from its config.json alone.

A cost model, not a simulator. Each step's work is counted from the profile's settings the way
the step runs (convert/search.py, labels.py, train_router.py, to_bundle.py): block FLOPs of
packed rows (`pudding_mlx.bench.flops.Shape`), LM-head rows (a matmul plus element-wise passes
over the vocabulary), tokens decoded one at a time (dense continuations, bandwidth-bound), router
training steps, and bytes loaded and written. A device profile turns work into seconds: an
effective FLOP rate per torch dtype, a memory bandwidth, a cost per block call (Python and
kernel launches) and a load rate. Peak memory adds the weights, the search's kept hidden
states, a batch's activations and log-probs, and optimizer state.

Token counts per task come from the calibration questions (tokens per packed row after padding
to the longest of 16 rows, answer tokens per question), measured with SmolLM2's tokenizer;
Qwen2.5's gave the same counts within 3% (examples/results/planner/). The CPU profile is
fitted to this project's recorded builds on a 2-core machine; the Apple and CUDA profiles are
stated assumptions (examples/results/planner/README.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import click

from pudding_mlx.bench.flops import Shape
from pudding_mlx.errors import PuddingError

from .profiles import PROFILES, Profile, make_profile

GB = 1e9


@dataclass(frozen=True)
class TaskTokens:
    """One task's calibration/label questions as the scorer packs them."""

    rows: float  # packed rows per question (WinoGrande: one per option)
    row_tokens: float  # tokens per row, padded to the longest of its batch of 16
    answer_tokens: float  # scored (answer) tokens per question, all choices
    train_size: int  # questions in the train split (HellaSwag: the fixed holdout)


# Measured by benchmarks/plan_tokens.py (128 calibration questions per task, SmolLM2 tokenizer).
TASKS = {
    "arc_challenge": TaskTokens(1.0, 57.8, 21.6, 1119),
    "arc_easy": TaskTokens(1.0, 55.0, 19.9, 2251),
    "hellaswag": TaskTokens(1.0, 192.8, 123.7, 2000),
    "piqa": TaskTokens(1.0, 114.4, 48.2, 16113),
    "winogrande": TaskTokens(1.98, 22.6, 12.2, 40398),
    "openbookqa": TaskTokens(1.0, 29.0, 12.9, 4957),
}
CHAT_PROMPT_TOKENS = 52  # a packaged chat prompt with the chat template applied
CHAT_TRAIN_PROMPTS = 185  # the packaged set's train split
ROUTER_TOKENS = 24  # router input tokens per item (64 at most; 13-53 per task, 22 per prompt)
# dense continuations end at an end-of-sequence token before max_tokens: SmolLM2 40 of 64 and
# 22 of 32 tokens on average, Qwen2.5-Coder-0.5B 18 of 32
CONTINUATION = 0.65

# Measured ratios of the steps' own reuse (examples/results/*/: block_evals in the records).
STATE_REUSE = 0.75  # search phases after the first, vs prefix reuse alone
LABEL_SHARING = {"likelihood": 0.75, "fidelity": 0.56}  # trie walk vs each set from scratch
SOFTMAX_PASSES = 6  # float32 passes over a row of logits: cast, max, exp, sum, log, gather
KL_PASSES = 6  # more for KL(dense || set) and top-1 agreement
SEARCH_BATCH, LABEL_BATCH, FIDELITY_BATCH = 16, 16, 8
STATE_BUDGET = 4.0 * GB  # `pudding search --state-budget-gb` default
ENCODER_PARAMS = 22.7e6  # MiniLM-L6 (the default router backbone)
ENCODER_FLOPS = 2 * 10.6e6  # per token, forward (its 6 blocks without the embedding)
PROCESS_BYTES = 1.5 * GB  # Python, torch, transformers and the tokenizer
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Device:
    """What one machine does per second; `rate` per torch dtype for batched block passes."""

    name: str
    kind: str  # torch device: cpu, mps, cuda
    memory: float  # bytes the torch steps may use (GPU memory on CUDA)
    rate: dict  # dtype -> FLOP/s, all threads
    bandwidth: float  # bytes/s: decoded tokens' weights and element-wise passes
    call_seconds: float  # per block call on a batch (Python, kernel launches)
    load_rate: float  # bytes/s reading and casting a checkpoint, or writing one
    default_dtype: str  # what torch dtype "auto" picks there
    train_step_seconds: float  # router step overhead (optimizer, Python)
    fixed_seconds: float  # per step: imports, tokenizer, data
    host_memory: float = 0.0  # bytes for convert (torch float32 and MLX on the host); 0: memory


def cpu_device(threads: int = 1, memory_gb: float = 22.0) -> Device:
    """This project's 2-core machine (AMX bf16), fitted per thread to its recorded builds;
    a second thread is counted at 0.8 (the records were taken with 1-2 threads)."""
    scale = 1 + 0.8 * (threads - 1)
    return Device(f"cpu ({threads} thread{'s' if threads > 1 else ''})", "cpu",
                  memory_gb * GB, {"float32": 55e9 * scale, "bfloat16": 95e9 * scale},
                  12e9 * scale, 3e-4, 0.15 * GB, "bfloat16", 0.1, 15.0)


DEVICES = {
    # M3 Pro class: ~150 GB/s unified memory, ~7 TFLOPS fp16 GPU of which torch MPS reaches
    # about a third on these small batches; 36 GB of which macOS lets the GPU use ~75%.
    "m3pro-36": Device("Apple M3 Pro, 36 GB (MPS)", "mps", 0.75 * 36 * GB,
                       {"float32": 1.5e12, "float16": 2.5e12, "bfloat16": 2.0e12}, 120e9,
                       2e-3, 2 * GB, "float16", 0.05, 10.0),
    "m3pro-18": Device("Apple M3 Pro, 18 GB (MPS)", "mps", 0.75 * 18 * GB,
                       {"float32": 1.5e12, "float16": 2.5e12, "bfloat16": 2.0e12}, 120e9,
                       2e-3, 2 * GB, "float16", 0.05, 10.0),
    # One H100 80 GB: bf16 at ~30% of its 990 TFLOPS dense peak on 16-row batches, launch-bound
    # below that (the H200 figures of examples/results/cuda/ check it).
    "h100": Device("NVIDIA H100 80 GB (CUDA)", "cuda", 78 * GB,
                   {"float32": 50e12, "float16": 300e12, "bfloat16": 300e12}, 2.5e12, 0.8e-3,
                   2 * GB, "bfloat16", 0.03, 10.0, host_memory=128 * GB),
}


def get_device(name: str, threads: int = 1, memory_gb: float | None = None) -> Device:
    if name == "cpu":
        return cpu_device(threads, memory_gb or 22.0)
    if name not in DEVICES:
        raise PuddingError(f"--device {name!r}: expected cpu or {', '.join(DEVICES)}")
    device = DEVICES[name]
    return replace(device, memory=memory_gb * GB) if memory_gb else device


@dataclass
class Work:
    """What a step computes, in the units a device prices."""

    block_flops: float = 0.0  # block passes over packed rows
    block_calls: float = 0.0  # one block applied to one batch
    head_tokens: float = 0.0  # LM-head rows (log-softmax over the vocabulary)
    kl_tokens: float = 0.0  # of which also compared with dense (fidelity)
    decode_tokens: float = 0.0  # dense greedy continuations, one token at a time
    train_steps: float = 0.0  # router steps
    train_flops: float = 0.0  # router forward + backward
    train_dtype: str = "float32"  # bf16 autocast for a likelihood router where it is fast
    io_bytes: float = 0.0  # checkpoints loaded, converted and written


@dataclass
class StepPlan:
    name: str
    seconds: float
    peak_bytes: float
    work: Work
    advice: str = ""  # what to change when it does not fit


@dataclass
class Plan:
    model: str
    device: Device
    torch_dtype: str
    bundle_dtype: str
    steps: list[StepPlan]
    bundle_bytes: float
    params: int


def model_params(shape: Shape) -> int:
    """Every weight: blocks, embedding, final norm and an untied LM head."""
    head = 0 if shape.tied else shape.vocab * shape.hidden
    return shape.layers * shape.block_params() + shape.embedding_params() + shape.hidden + head


def search_trials(layers: int, k: int) -> list[int]:
    """Trials per greedy phase: every block but the first and last, less those chosen."""
    return [layers - 2 - p for p in range(k)]


def phase_block_evals(trials: int, first: bool) -> float:
    """Blocks applied per packed row in one phase with prefix reuse: one pass of the current
    set up to the last trial block (`trials` blocks), then trial i (of n, in block order) runs
    the n - i + 1 kept blocks after it; later phases start deeper (STATE_REUSE)."""
    evals = trials * (trials + 1) / 2 + trials
    return evals if first else evals * STATE_REUSE


def _likelihood_search(shape: Shape, p: Profile, work: Work) -> float:
    """Returns the largest packed row (tokens) for the memory estimate."""
    for task in p.tasks:
        t = TASKS[task]
        rows = p.samples * t.rows
        for loss_index, _ in enumerate(p.losses):
            for phase, n in enumerate(search_trials(shape.layers, p.k)):
                if loss_index and phase == 0:
                    continue  # the second loss reuses every set of the first's first phase
                evals = rows * phase_block_evals(n, phase == 0)
                work.block_flops += evals * t.row_tokens * shape.block_flops(t.row_tokens / 2)
                work.block_calls += evals / SEARCH_BATCH
                work.head_tokens += n * p.samples * t.answer_tokens
    return max(TASKS[task].row_tokens for task in p.tasks)


def _fidelity_search(shape: Shape, p: Profile, work: Work) -> float:
    continuation = CONTINUATION * p.max_tokens
    row = CHAT_PROMPT_TOKENS + continuation
    work.decode_tokens += p.samples * continuation
    work.block_flops += p.samples * CHAT_PROMPT_TOKENS * shape.layers * shape.block_flops(
        CHAT_PROMPT_TOKENS / 2)  # the continuations' prefills
    for phase, n in enumerate(search_trials(shape.layers, p.k)):
        evals = p.samples * (phase_block_evals(n, phase == 0) + shape.layers)  # + dense
        work.block_flops += evals * row * shape.block_flops(row / 2)
        work.block_calls += evals / SEARCH_BATCH
        work.head_tokens += (n + 1) * p.samples * continuation
        work.kl_tokens += n * p.samples * continuation
    return row


def label_questions(p: Profile) -> dict[str, int]:
    """Questions labelled per task (likelihood)."""
    limits = dict(v.split("=") for v in p.label_limits)
    out = {}
    for task in p.label_tasks or p.tasks:
        cap = int(limits[task]) if task in limits else p.max_examples_per_task
        out[task] = min(TASKS[task].train_size, cap or TASKS[task].train_size)
    return out


def candidate_sizes(p: Profile) -> list[int]:
    """Blocks skipped by each candidate (fidelity: the nested sizes and dense)."""
    if p.target == "fidelity":
        return [*p.sizes, 0]
    return [p.k] * (len(p.tasks) * len(p.losses))


def _labels(shape: Shape, p: Profile, work: Work) -> tuple[float, int]:
    """Returns (largest row, labelled items) for the memory and router estimates."""
    sizes = candidate_sizes(p)
    if p.target == "fidelity":
        prompts = min(p.label_limit or CHAT_TRAIN_PROMPTS, CHAT_TRAIN_PROMPTS)
        continuation = CONTINUATION * p.max_tokens
        row = CHAT_PROMPT_TOKENS + continuation
        work.decode_tokens += prompts * continuation
        work.block_flops += prompts * CHAT_PROMPT_TOKENS * shape.layers * shape.block_flops(
            CHAT_PROMPT_TOKENS / 2)
        evals = prompts * LABEL_SHARING["fidelity"] * sum(shape.layers - s for s in sizes)
        work.block_flops += evals * row * shape.block_flops(row / 2)
        work.block_calls += evals / FIDELITY_BATCH
        work.head_tokens += prompts * continuation * len(sizes)
        work.kl_tokens += prompts * continuation * (len(sizes) - 1)
        return row, prompts
    items, row = 0, 0.0
    for task, n in label_questions(p).items():
        t = TASKS[task]
        evals = n * t.rows * LABEL_SHARING["likelihood"] * sum(shape.layers - s for s in sizes)
        work.block_flops += evals * t.row_tokens * shape.block_flops(t.row_tokens / 2)
        work.block_calls += evals / LABEL_BATCH
        work.head_tokens += n * t.answer_tokens * len(sizes)
        items += round(n * t.rows)
        row = max(row, t.row_tokens)
    return row, items


def _router(shape: Shape, p: Profile, items: int, work: Work) -> None:
    if p.router == "in-model":  # features from the first blocks, then a closed-form ridge fit
        work.block_flops += items * ROUTER_TOKENS * p.router_blocks * shape.block_flops(
            ROUTER_TOKENS / 2)
        work.block_calls += items / 16 * p.router_blocks
        return
    steps = p.epochs * math.ceil(0.8 * items / p.batch_size)
    work.train_steps += steps
    # forward + backward (3x forward) of the training rows, and each epoch's held-out pass
    rows = steps * p.batch_size * 3 + p.epochs * 0.2 * items
    work.train_flops += rows * ROUTER_TOKENS * ENCODER_FLOPS
    work.io_bytes += p.epochs * ENCODER_PARAMS * 12  # a checkpoint (weights, Adam) per epoch


def _seconds(work: Work, device: Device, dtype: str, shape: Shape, load_bytes: float) -> float:
    rate = device.rate[dtype]
    vocab_bytes = shape.vocab * 4
    weights = model_params(shape) * BYTES[dtype]
    return (device.fixed_seconds + load_bytes / device.load_rate
            + (work.block_flops + work.head_tokens * shape.head_flops()) / rate
            + work.block_calls * device.call_seconds
            + (work.head_tokens * SOFTMAX_PASSES + work.kl_tokens * KL_PASSES) * vocab_bytes
            / device.bandwidth
            + work.decode_tokens * (weights / device.bandwidth
                                    + shape.layers * device.call_seconds)
            + work.train_flops / device.rate[work.train_dtype]
            + work.train_steps * device.train_step_seconds
            + work.io_bytes / device.load_rate)


def _activations(shape: Shape, rows: int, tokens: float, scored: float, dtype: str,
                 kl: bool) -> float:
    """One batch through a block (hidden, q/k/v, MLP, scores) and its log-probs."""
    per_token = 4 * shape.hidden + 3 * shape.intermediate + 2 * shape.kv_values()
    hidden = rows * tokens * per_token * BYTES[dtype]
    scores = rows * shape.heads * tokens * tokens * BYTES[dtype]
    logprobs = scored * shape.vocab * 4 * (4 if kl else 2)
    return hidden + scores + logprobs


def plan_build(config: dict, profile: Profile, device: Device, torch_dtype: str = "auto",
               source_bytes_per_param: float = 2.0, model: str = "") -> Plan:
    """Each step's seconds and peak bytes, and the bundle's size, for `config` (an HF
    config.json dict) built with `profile` on `device`."""
    shape = Shape.from_config(config)
    dtype = device.default_dtype if torch_dtype == "auto" else torch_dtype
    if profile.target == "fidelity" and profile.torch_dtype != "auto":
        dtype = profile.torch_dtype
    if dtype not in device.rate:
        raise PuddingError(f"--torch-dtype {dtype}: {device.name} has no rate for it")
    params = model_params(shape)
    weights = params * BYTES[dtype]
    load = params * source_bytes_per_param
    base = PROCESS_BYTES
    steps = []

    work = Work()
    if profile.target == "fidelity":
        row = _fidelity_search(shape, profile, work)
        scored = SEARCH_BATCH * profile.max_tokens
    else:
        row = _likelihood_search(shape, profile, work)
        scored = SEARCH_BATCH * max(TASKS[t].answer_tokens for t in profile.tasks)
    state = min(STATE_BUDGET, profile.samples * row * shape.hidden * BYTES[dtype]
                * (shape.layers - 2) ** 2)
    peak = base + weights + state + _activations(shape, SEARCH_BATCH, row, scored, dtype,
                                                 profile.target == "fidelity")
    steps.append(StepPlan("search", _seconds(work, device, dtype, shape, load), peak, work))

    work = Work()
    row, items = _labels(shape, profile, work)
    batch = FIDELITY_BATCH if profile.target == "fidelity" else LABEL_BATCH
    scored = batch * (profile.max_tokens if profile.target == "fidelity"
                      else max(TASKS[t].answer_tokens for t in label_questions(profile)))
    peak = base + weights + _activations(shape, batch, row, scored, dtype,
                                         profile.target == "fidelity")
    steps.append(StepPlan("labels", _seconds(work, device, dtype, shape, load), peak, work))

    work = Work(train_dtype="float32" if profile.target == "fidelity" else dtype)
    _router(shape, profile, items, work)
    if profile.router == "in-model":  # loads the LLM in float32
        router_load, peak = load, base + params * 4
    else:
        router_load, peak = ENCODER_PARAMS * 4, base + ENCODER_PARAMS * 16 + 2 * GB
    steps.append(StepPlan("router", _seconds(work, device, dtype, shape, router_load), peak,
                          work))

    # convert: the torch reference in float32, mlx-lm's conversion (read, cast, write), the
    # MLX model loaded, and the parity gate's forwards (4 short prompts, dense and one set)
    bundle_weights = params * BYTES[profile.dtype]
    work = Work(block_flops=2 * 2 * 4 * 24 * shape.layers * shape.block_flops(12),
                io_bytes=params * 4 + 2 * bundle_weights)
    peak = base + params * 4 + 2 * bundle_weights
    steps.append(StepPlan("convert", _seconds(work, device, "float32", shape, load), peak,
                          work))

    router_bytes = (len(candidate_sizes(profile)) * shape.hidden * 4 + 0.1e6
                    if profile.router == "in-model" else ENCODER_PARAMS * 4 + 1e6)
    if profile.coreml and profile.router != "in-model":
        router_bytes += ENCODER_PARAMS * 2
    for s in steps:
        s.advice = advice(s, device, dtype, profile.dtype, params)
    return Plan(model, device, dtype, profile.dtype, steps, bundle_weights + router_bytes,
                params)


def advice(step: StepPlan, device: Device, dtype: str, bundle_dtype: str, params: int) -> str:
    """'' when the step fits the device's memory, else what to change."""
    memory = device.host_memory if step.name == "convert" and device.host_memory else (
        device.memory)
    if step.peak_bytes <= memory:
        return ""
    over = (step.peak_bytes - memory) / GB
    if step.name in ("search", "labels") and BYTES[dtype] == 4:
        return (f"does not fit ({over:.1f} GB over): --torch-dtype bfloat16 halves the "
                f"weights ({params * 2 / GB:.1f} GB saved)")
    if step.name in ("search", "labels") and PROCESS_BYTES + params * BYTES[dtype] > memory:
        return (f"does not fit: the {dtype} weights alone take {params * BYTES[dtype] / GB:.1f}"
                f" GB; run the torch steps on a larger device (`pudding build --until router`)")
    if step.name == "convert":
        smaller = ", or a float16 bundle (--dtype float16)" if bundle_dtype == "float32" else ""
        return (f"does not fit ({over:.1f} GB over): the parity gate holds a float32 torch "
                f"copy ({params * 4 / GB:.1f} GB) beside the MLX weights; run `pudding build "
                f"--until router` here and convert on a machine with "
                f"{step.peak_bytes / GB:.0f} GB{smaller}")
    if step.name == "router":
        return (f"does not fit ({over:.1f} GB over): the in-model router loads the LLM in "
                f"float32; use --router encoder")
    return (f"does not fit ({over:.1f} GB over): the search keeps up to "
            f"{STATE_BUDGET / GB:.0f} GB of hidden states; `pudding search --state-budget-gb "
            f"0` keeps none (slower, same sets; a likelihood build then takes its file with "
            f"--from-run), or a device with {step.peak_bytes / GB:.0f} GB"
            if step.name == "search" else
            f"does not fit ({over:.1f} GB over): a smaller `pudding label --batch-size`, or a "
            f"device with {step.peak_bytes / GB:.0f} GB")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    total = sum(s.seconds for s in plan.steps)
    lines = [f"{plan.model or 'model'}: {plan.params / 1e9:.2f} B parameters on "
             f"{plan.device.name}, torch {plan.torch_dtype}, bundle {plan.bundle_dtype} "
             f"(memory {plan.device.memory / GB:.0f} GB)",
             f"{'step':<9} {'time':>8} {'peak memory':>12}"]
    for s in plan.steps:
        note = f"  {s.advice}" if s.advice else ""
        lines.append(f"{s.name:<9} {_duration(s.seconds):>8} {s.peak_bytes / GB:>9.1f} GB"
                     f"{note}")
    lines.append(f"{'total':<9} {_duration(total):>8}")
    lines.append(f"bundle    {plan.bundle_bytes / GB:.2f} GB")
    return "\n".join(lines)


@click.command("plan")
@click.argument("config", type=click.Path(exists=True))
@click.option("--profile", "profile_name", type=click.Choice(list(PROFILES)), default="quick",
              show_default=True)
@click.option("--device", default="cpu", show_default=True,
              help=f"cpu (this project's 2-core machine, per --threads) or one of "
                   f"{', '.join(DEVICES)}.")
@click.option("--threads", type=int, default=1, show_default=True, help="CPU threads.")
@click.option("--memory-gb", type=float, help="Memory the build may use [device's].")
@click.option("--torch-dtype", default="auto", show_default=True,
              help="Search/label dtype: auto (the device's), float32, bfloat16, float16.")
@click.option("--dtype", type=click.Choice(list(BYTES)), help="MLX weights in the bundle.")
@click.option("--router", type=click.Choice(["encoder", "in-model"]), help="[profile]")
@click.option("-k", "--k", "k", type=int, help="Blocks skipped per candidate [profile].")
@click.option("--samples", type=int, help="Calibration examples per task [profile].")
@click.option("--max-tokens", type=int, help="Fidelity profiles: continuation length.")
@click.option("--label-limit", type=int, help="Fidelity profiles: train prompts labelled.")
@click.option("--source-bytes", type=float, default=2.0, show_default=True,
              help="Bytes per parameter of the checkpoint read (2: bf16 safetensors).")
def plan(config, profile_name, device, threads, memory_gb, torch_dtype, source_bytes,
         **overrides):
    """Predict a build's time and memory per step, and its bundle size, from CONFIG (a
    config.json file or the folder holding it; no weights needed)."""
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    profile = make_profile(profile_name, **overrides)
    result = plan_build(json.loads(path.read_text()), profile,
                        get_device(device, threads, memory_gb), torch_dtype, source_bytes,
                        path.parent.name)
    click.echo(format_plan(result))
