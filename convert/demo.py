"""`pudding demo`: build the demo SmolLM2 bundle once (cached), then show the speed/quality
choice on a few prompts.

For each prompt, three settings: dense, the bundle's default route, and a faster one (the
largest candidates, or `--faster`). Each gets its greedy answer, how far it is from dense on
the dense answer (KL and top-1 agreement, teacher-forced: `pudding_mlx.fidelity.metrics`), and
its prefill and decoding speed against dense: interleaved warm trials
(`pudding_mlx.bench.timing`), the median of the per-round ratios with their range, beside the
ideal the skipped blocks allow (`pudding_mlx.bench.flops`). A range that includes 1.0 is
reported as "within noise".
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pudding_mlx.errors import PuddingError
from pudding_mlx.options import TOLERANCE_HELP, describe_route
from pudding_mlx.routing import Policy

PROMPTS = (
    ("science question", "Why do plants need sunlight to grow?"),
    ("physical common sense",
     "How can I keep a wet umbrella from making the floor wet when I come inside?"),
    ("reading comprehension",
     "The town library opens at nine on weekdays, but on Sundays it opens at noon and closes "
     "at five. Question: At what time does the library open on Sunday?"),
    ("small talk", "Hi! What is your favourite season of the year, and why?"),
)
if TYPE_CHECKING:
    from pudding_mlx.bench.flops import DecodeBytes, Shape
    from pudding_mlx.bench.timing import Trial
    from pudding_mlx.model import PuddingModel, Route

SETTINGS = ("dense", "default", "faster")
# measured on an idle 2-core machine (examples/results/first-run/README.md)
SHIPPED_MINUTES = 1
SCRATCH_MINUTES = 35
WARMUP = 1  # untimed rounds before the trials of each prompt


def cache_folder() -> Path:
    """$PUDDING_CACHE, else $XDG_CACHE_HOME/pudding-mlx, else ~/.cache/pudding-mlx."""
    if os.environ.get("PUDDING_CACHE"):
        return Path(os.environ["PUDDING_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pudding-mlx"


def demo_bundle(rebuild: bool, from_scratch: bool = False) -> Path:
    """The cached demo bundle, built (or rebuilt, or a crashed build continued) if needed.

    It is the `demo` profile's quality-aware bundle: an in-model router of KL to dense over
    nested sets of 1-4 blocks and dense, routed by its default tolerance, so the answers stay
    near dense's. The build takes the search, labels and router shipped with pudding where
    their inputs match (shipped.py) and converts; `from_scratch` computes everything. A bundle
    cached by an older pudding (another kind of router) is built again.
    """
    from pudding_mlx.bundle import read_manifest

    from .build import run_build
    from .profiles import PROFILES
    from .shipped import DEMO_PRODUCTS

    profile = PROFILES["demo"]
    root = cache_folder() / "demo"
    bundle, work = root / "bundle", root / "work"
    cached = (bundle / "pudding.json").is_file()
    rebuild = rebuild or from_scratch
    if cached and not rebuild and (read_manifest(bundle).router.kind != profile.router):
        click.echo(f"{bundle} was built by an older pudding (another router); building the "
                   "demo bundle again")
        rebuild = True
    if rebuild:
        for path in (bundle, work):
            shutil.rmtree(path, ignore_errors=True)
    elif cached:
        click.echo(f"Using the cached bundle {bundle} (--rebuild builds it again)")
        return bundle
    if (work / "steps").is_dir():
        click.echo(f"Continuing the demo build in {work} (its finished steps are reused)")
    else:
        how = (f"from scratch (about {SCRATCH_MINUTES} min" if from_scratch else
               "from the search, labels and router shipped with pudding (first run only; about "
               f"{SHIPPED_MINUTES} min")
        click.echo(f"Building the demo SmolLM2-135M bundle in {root} {how} on two CPU cores; "
                   "Ctrl-C stops it and the next `pudding demo` continues it)")
    click.echo(f"Where it stands: pudding build --status --work {work}")
    # The demo is built from packaged assets only: no hub look-ups.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    try:
        run_build(None, bundle, work, profile, shipped=None if from_scratch else DEMO_PRODUCTS)
    except KeyboardInterrupt:
        click.echo("\nThe build stopped; run `pudding demo` again to continue it.", err=True)
        raise
    click.echo(f"Built {bundle} in {time.perf_counter() - start:.0f} s")
    return bundle


# --- figures -------------------------------------------------------------------------------------


@dataclass
class Speedup:
    """A setting's speed against dense: per round of interleaved trials, its tokens/s over the
    dense request's in the same round; the median, the range, and the ideal."""

    median: float
    low: float
    high: float
    ideal: float  # what skipping the blocks allows (flops.py)
    within_noise: bool  # the range includes 1.0
    ratios: list[float]

    @classmethod
    def from_ratios(cls, ratios: list[float], ideal: float) -> Speedup:
        low, high = min(ratios), max(ratios)
        return cls(statistics.median(ratios), low, high, ideal, low <= 1.0 <= high, ratios)

    def text(self) -> str:
        return "within noise" if self.within_noise else f"{self.median:.2f}x"


@dataclass
class Row:
    """One setting on one prompt."""

    setting: str  # "dense", "default" or "faster"
    policy: str  # how the set was chosen: "dense", "routed" (the bundle's rule), "routed:k4", ...
    name: str  # the chosen candidate
    route: str  # the route line, as `pudding generate` prints it
    skip: list[int]
    answer: str
    tokens: int  # in the answer, end-of-sequence included
    kl: float  # mean KL(dense || setting) over the dense answer, nats/token
    agreement: float  # share of its tokens where both put the same token first
    router_ms: float | None = None
    predicted: float | None = None  # fidelity routers: the set's predicted KL to dense
    prefill: Speedup | None = None  # None for dense, the reference
    decode: Speedup | None = None


@dataclass
class PromptResult:
    kind: str
    prompt: str
    prompt_tokens: int
    timed_tokens: int  # tokens decoded by every timed request (end-of-sequence disabled)
    dense_prefill_tps: float = 0.0  # medians of the dense trials (`time_prompt`)
    dense_decode_tps: float = 0.0
    rows: list[Row] = field(default_factory=list)


@dataclass
class DemoResult:
    bundle: str
    base_model: str
    num_blocks: int
    max_tokens: int
    trials: int
    warmup: int
    prompts: list[PromptResult] = field(default_factory=list)
    seconds: float = 0.0


def settings_routes(pm: PuddingModel, prompt: str, tolerance: float | None,
                    faster: Policy) -> dict[str, Route]:
    """Setting -> Route: dense, the bundle's rule (at `tolerance`), and the `faster` Policy."""
    return {"dense": pm.route(prompt, "dense"),
            "default": pm.route(prompt, tolerance=tolerance),
            "faster": pm.route(prompt, tolerance=faster.tolerance, k=faster.k)}


@contextmanager
def no_eos(pm: PuddingModel) -> Iterator[None]:
    """Every timed request decodes exactly as many tokens (like mlx_lm.benchmark)."""
    eos = set(pm.tokenizer.eos_token_ids)
    pm.tokenizer.eos_token_ids = set()
    try:
        yield
    finally:
        pm.tokenizer.eos_token_ids = eos


def time_settings(pm: PuddingModel, ids: list[int], skips: dict[str, list[int]], tokens: int,
                  trials: int) -> list[dict[str, Trial]]:
    """Rounds of interleaved, warm requests, one per setting in a rotating order: per round,
    setting -> Trial (routes given, so no router time)."""
    from pudding_mlx.bench.timing import measure, run_request

    def request(setting: str) -> Trial:
        return run_request(pm, setting, ids, "", tokens, skip=skips[setting])

    with no_eos(pm):
        done = measure(request, list(skips), trials, WARMUP)
    rounds = [done[i:i + len(skips)] for i in range(0, len(done), len(skips))]
    return [{t.kind: t for t in r} for r in rounds]


def answer_rows(pm: PuddingModel, prompt: str, max_tokens: int, tolerance: float | None,
                faster: Policy) -> Iterator[Row]:
    """Route `prompt` for every setting, answer it and compare with dense (no timing yet),
    one row at a time as each answer is ready."""
    from pudding_mlx.fidelity import metrics as fidelity

    routes = settings_routes(pm, prompt, tolerance, faster)
    ids = pm.encode(prompt)
    dense = fidelity.greedy_continuation(pm, ids, max_tokens)
    ref = fidelity.forced_logprobs(pm, [], ids, dense)
    eos = set(pm.tokenizer.eos_token_ids)
    policies = {"dense": "dense", "default": str(Policy(tolerance)), "faster": str(faster)}
    for setting, route in routes.items():
        answer = (fidelity.greedy_continuation(pm, ids, max_tokens, route.skip) if route.skip
                  else dense)
        m = fidelity.measure(pm, route.skip, ids, dense, ref).summary()
        row = Row(setting, policies[setting], route.name,
                  describe_route(route, pm.manifest.num_blocks),
                  route.skip, pm.tokenizer.decode([t for t in answer if t not in eos]).strip(),
                  len(answer), m["kl"], m["agreement"])
        if setting != "dense":
            row.router_ms = route.seconds * 1e3
            row.predicted = route.predicted
        yield row


def time_prompt(pm: PuddingModel, p: PromptResult, trials: int,
                facts: tuple[Shape, DecodeBytes]) -> None:
    """Time `p`'s settings against dense (interleaved rounds) and fill in their speeds."""
    from pudding_mlx.bench.flops import decode_ideal, prefill_ideal

    shape, weights = facts
    ids = pm.encode(p.prompt)
    rounds = time_settings(pm, ids, {r.setting: r.skip for r in p.rows}, p.timed_tokens,
                           trials)
    p.dense_prefill_tps = statistics.median(r["dense"].prompt_tps for r in rounds)
    p.dense_decode_tps = statistics.median(r["dense"].decode_tps for r in rounds)
    for row in p.rows[1:]:
        row.prefill = Speedup.from_ratios(
            [r[row.setting].prompt_tps / r["dense"].prompt_tps for r in rounds],
            prefill_ideal(shape, len(ids), len(row.skip)))
        row.decode = Speedup.from_ratios(
            [r[row.setting].decode_tps / r["dense"].decode_tps for r in rounds],
            decode_ideal(weights, len(ids) + p.timed_tokens // 2, row.skip))


# --- output --------------------------------------------------------------------------------------


def _vs_dense(s: Speedup) -> str:
    return f"{s.text()} ({s.low:.2f}-{s.high:.2f}x, ideal {s.ideal:.2f}x)"


def answer_text(row: Row) -> str:
    """A setting's route and answer, printed as soon as it is answered (before any timing)."""
    return f"{row.setting:<8} {row.route}\n{'':<8} answer: {row.answer}"


def speeds_text(p: PromptResult, trials: int) -> str:
    """Each setting's KL and speed against dense, once the rounds are timed."""
    lines = [f"{'':<8} ({trials} timed rounds)"]
    for row in p.rows:
        if row.prefill is None:
            lines.append(f"{row.setting:<8} prefill {p.dense_prefill_tps:.1f} tokens/s, decode "
                         f"{p.dense_decode_tps:.1f} tokens/s (medians)")
        else:
            lines.append(f"{row.setting:<8} vs dense: KL {row.kl:.3f} nats/token, top-1 "
                         f"{100 * row.agreement:.0f}%; prefill {_vs_dense(row.prefill)}; "
                         f"decode {_vs_dense(row.decode)}")
    return "\n".join(lines)


HEADER = ("prompt", "setting", "skipped", "KL", "top-1", "prefill", "range", "ideal", "decode",
          "range", "ideal")
WIDTHS = (22, 8, 7, 6, 5, 13, 10, 6, 13, 10, 6)


# Measured in examples/results/scaling/ (held-out KL to dense of the cheapest block).
NEXT_MODEL = (
    "\nThis demo's 135M model pays 0.16-0.18 nats/token of KL to dense for its cheapest "
    "block; Qwen2.5-Coder-0.5B pays 0.09 (Gemma 3 270M: 0.21; examples/results/scaling/). To see "
    "routing on one: `make setup-qwen`, then `pudding build --profile demo --model <its GGUF>` "
    "(`pudding plan` predicts about half an hour on two CPU cores) and "
    "`pudding demo --bundle <bundle>`.")


def summary_table(result: DemoResult) -> str:
    """One line per prompt and setting: blocks skipped, KL and top-1 to dense, and prefill and
    decoding speed against dense (dense's row: its own tokens/s)."""
    def line(cells) -> str:
        return "  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}"
                         for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True))).rstrip()

    lines = [line(HEADER)]
    for p in result.prompts:
        for row in p.rows:
            cells = [p.kind, row.setting, str(len(row.skip))]
            if row.prefill is None:
                cells += ["-", "-", f"{p.dense_prefill_tps:.1f} tok/s", "", "",
                          f"{p.dense_decode_tps:.1f} tok/s", "", ""]
            else:
                cells += [f"{row.kl:.3f}", f"{100 * row.agreement:.0f}%"]
                for s in (row.prefill, row.decode):
                    cells += [s.text(), f"{s.low:.2f}-{s.high:.2f}", f"{s.ideal:.2f}x"]
            lines.append(line(cells))
    lines.append(f"Speed: medians of {result.trials} interleaved warm rounds per prompt, as "
                 "ratios to dense in the same round; range = lowest-highest round; "
                 "\"within noise\" when the range includes 1.0; ideal = what skipping the "
                 "blocks allows (FLOPs for prefill, bytes read for decoding).")
    return "\n".join(lines)


def faster_policy(pm: PuddingModel, spec: str | None) -> Policy:
    """The faster setting's Policy: `spec` ("routed@X" or "routed:kN"), or the best-predicted
    of the largest candidates."""
    if spec is None:
        return Policy(k=max(pm.sizes))
    policy = Policy.parse(spec)
    if policy is None or policy == Policy():
        raise PuddingError(f"--faster {spec!r}: expected routed@X (tolerance X) or routed:kN "
                           "(the best of the N-block sets)")
    pm.check_policy(policy)
    return policy


@click.command("demo")
@click.option("--bundle", "-b", type=click.Path(exists=True, file_okay=False), default=None,
              help="Use this bundle instead of building the demo one.")
@click.option("--rebuild", is_flag=True, help="Build the cached demo bundle again.")
@click.option("--from-scratch", is_flag=True,
              help="Build it again without the search, labels and router shipped with pudding.")
@click.option("--max-tokens", "-m", type=click.IntRange(2), default=48, show_default=True,
              help="Tokens per answer (and per timed request).")
@click.option("--tolerance", type=float, default=None, metavar="X", help=TOLERANCE_HELP)
@click.option("--faster", default=None, metavar="routed@X|routed:kN",
              help="The faster setting: a tolerance, or the best of the N-block sets "
              "[default: the largest candidates].")
@click.option("--trials", "-n", type=click.IntRange(3), default=5, show_default=True,
              help="Timed rounds per prompt (dense and both settings, interleaved; after one "
              "warm-up round).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every figure (and each round's ratio) to this JSON file.")
def demo(bundle, rebuild, from_scratch, max_tokens, tolerance, faster, trials, json_path):
    """Show the speed/quality choice on prompts of four kinds: dense, the bundle's default
    route and a faster setting, each with its answer, KL and top-1 agreement to dense, and
    prefill and decoding speed against dense (medians of interleaved rounds, their range and
    the ideal of the skipped blocks).

    With no --bundle, the demo bundle (SmolLM2-135M-Instruct, an in-model router of KL to
    dense, packaged prompts) is built on the first run from the products shipped with pudding
    (an interrupted build continues) and cached under $PUDDING_CACHE or
    ~/.cache/pudding-mlx/demo."""
    from pudding_mlx.bench.flops import Shape
    from pudding_mlx.bench.summary import decode_bytes
    from pudding_mlx.model import load

    if bundle is not None and (rebuild or from_scratch):
        raise PuddingError("--rebuild and --from-scratch rebuild the cached bundle; they cannot "
                           "go with --bundle")
    began = time.perf_counter()
    own = bundle is None
    bundle = Path(bundle) if bundle else demo_bundle(rebuild, from_scratch)
    start = time.perf_counter()
    pm = load(bundle)
    n_blocks = pm.manifest.num_blocks
    click.echo(f"Loaded {bundle} in {time.perf_counter() - start:.1f} s: "
               f"{pm.manifest.base_model}, {n_blocks} blocks, "
               f"{len(pm.candidates)} candidate omission sets, router {type(pm.router).__name__}")
    pm.check_policy(Policy(tolerance))
    fast = faster_policy(pm, faster)
    click.echo(f"Settings: dense; default = the bundle's rule ({_rule(pm, tolerance)}); "
               f"faster = {_describe(fast)}. {trials} timed rounds per prompt.")
    shape = Shape.from_config(pm.config, str(pm.path / "model" / "config.json"))
    facts = (shape, decode_bytes(pm.model, shape))
    result = DemoResult(str(bundle), pm.manifest.base_model, n_blocks, max_tokens, trials,
                        WARMUP)
    pm.route("Hello")  # a warm router, so its times are those of later requests
    for i, (kind, prompt) in enumerate(PROMPTS, 1):
        click.echo(f"\n[{i}/{len(PROMPTS)}] {kind}\n> {prompt}")
        p = PromptResult(kind, prompt, len(pm.encode(prompt)), max_tokens)
        for row in answer_rows(pm, prompt, max_tokens, tolerance, fast):
            p.rows.append(row)
            click.echo(answer_text(row))  # the answers first, then the timing
        time_prompt(pm, p, trials, facts)
        result.prompts.append(p)
        click.echo(speeds_text(p, trials))
    click.echo("\n" + summary_table(result))
    result.seconds = round(time.perf_counter() - began, 1)
    if json_path:
        Path(json_path).write_text(json.dumps(asdict(result), indent=1) + "\n")
        click.echo(f"Wrote {json_path}")
    click.echo(f"demo done in {result.seconds:.0f} s")
    if own:
        click.echo(NEXT_MODEL)


def _rule(pm: PuddingModel, tolerance: float | None) -> str:
    x = pm.check_policy() if tolerance is None else tolerance
    return "the best-predicted set" if x is None else f"most blocks within predicted KL {x:g}"


def _describe(policy: Policy) -> str:
    if policy.k is not None:
        return f"the best-predicted of the {policy.k}-block sets ({policy})"
    return f"most blocks within predicted KL {policy.tolerance:g} ({policy})"
