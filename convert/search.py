"""Greedy SLEB-style search for candidate omission sets (METHOD.md, step 1).

For one task, every evaluated skip set S gets l_S(x, a) for every calibration example x and
choice a (mean answer-token log-prob, `scoring`). In each of k phases every remaining block b
(never the first or last) is tried on top of the current set C; the one with the lowest loss
joins C. The fidelity loss needs no task: on chat prompts (the packaged set's train split, or a
user file), L(S) is the mean over prompts of the mean KL(dense || S) per token over dense's
own greedy continuation (`convert/fidelity.py`, `pudding fidelity`'s definition), giving
candidates made for chat; its candidates are named after the task "chat". Every greedy
trajectory is nested, so `truncate_run` takes smaller k from a finished run.
Three speed-ups, none of which changes the result:
- prefix reuse: trial C+{b} equals C up to block b, so one pass of C stores the hidden state
  entering each trial block and every trial runs only the blocks after b;
- state reuse across phases: the hidden state entering block w depends only on the skipped
  blocks below w. Trials keep the state entering a few *watched* blocks (the runners-up of the
  previous phase, the likeliest next choices; as many as `state_budget_gb` holds); when w is
  chosen, the next phase's trials b < w start from the state entering w that the same trial
  stored, instead of from b;
- memoisation: per-set scores are kept, so the second loss of a task reuses every set the
  first one already evaluated (all of phase 1, and more while their choices agree).
Data-parallel: under torch.distributed each rank scores its shard of examples; per-example
losses are gathered and summed in the global example order, as a single process would.
The fidelity scorer recomputes dense's log-probs batch by batch in every phase (one dense pass
per phase, instead of holding tokens x vocabulary floats).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from pudding_mlx.bundle import Candidate
from pudding_mlx.errors import PuddingError
from pudding_mlx.files import read_json, write_json
from pudding_mlx.prompts import ChatPrompt
from pudding_mlx.tasks import Example, TokenRequest, encode_requests

from .dist import Dist
from .resume import read_run
from .scoring import BlockRunner

TASK_LOSSES = ("likelihood", "margin")
LOSSES = (*TASK_LOSSES, "fidelity")
CHAT = "chat"  # the task name of fidelity candidates


def example_losses(scores: np.ndarray, offsets: Sequence[int], gold: Sequence[int],
                   loss: str) -> np.ndarray:
    """Per-example loss terms from flat per-choice l_S values (for fidelity: per-prompt mean
    KL values); L(S) is their sum (fidelity: their mean).

    likelihood: -l(a_c); margin: -sum_{j != c} (l(a_c) - l(a_j)); fidelity: the KL.
    """
    out = np.empty(len(gold))
    for e, (start, c) in enumerate(zip(offsets, gold, strict=False)):
        end = offsets[e + 1] if e + 1 < len(offsets) else len(scores)
        ls = scores[start:end]
        if loss == "likelihood":
            out[e] = -ls[c]
        elif loss == "margin":
            out[e] = -(len(ls) * ls[c] - ls.sum())
        elif loss == "fidelity":
            out[e] = ls[0]
        else:
            raise PuddingError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    return out


@dataclass
class Phase:
    block: int  # the block chosen in this phase (0-based)
    loss: float  # L(S) after adding it
    seconds: float
    block_evals: int  # blocks applied to one packed row, summed over ranks
    cpu_seconds: float | None = None  # this process's CPU time (None in runs before it was kept)


@dataclass
class GreedyRun:
    """One greedy search: the candidate set it grows and the phases that chose its blocks."""

    candidate: Candidate
    trajectory: list[Phase] = field(default_factory=list)

    @classmethod
    def new(cls, name: str, task: str, loss: str, k: int) -> GreedyRun:
        return cls(Candidate(name, [], task, loss, k))

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def done(self) -> bool:
        return len(self.trajectory) >= self.candidate.k

    def to_json(self) -> dict:
        return {**asdict(self.candidate), "trajectory": [asdict(p) for p in self.trajectory]}

    @classmethod
    def from_json(cls, d: dict, where: str = "candidates.json") -> GreedyRun:
        return cls(Candidate.from_dict(d, where, strict=False),
                   [Phase(**p) for p in d["trajectory"]])


@dataclass
class TokenExample:
    requests: list[TokenRequest]  # (context ids, continuation ids) per choice
    gold: int


def tokenize_examples(tokenizer, examples: Sequence[Example]) -> list[TokenExample]:
    """The method's prompt requests of each example, tokenised."""
    return [TokenExample(encode_requests(tokenizer, ex.prompt), ex.gold) for ex in examples]


def chat_examples(model, tokenizer, prompts: Sequence[ChatPrompt], max_tokens: int,
                  dist: Dist | None = None, progress: bool = False,
                  known: dict[str, list[int]] | None = None,
                  on_new: Callable[[str, list[int]], None] | None = None) -> list[TokenExample]:
    """One example per prompt: the request (chat ids, dense's greedy continuation). Each rank
    generates the continuations of the prompts it will score (SetScorer's shard) and the
    ranks exchange them; `known` and `on_new` as in `fidelity.chat_requests`."""
    from tqdm.auto import tqdm

    from .fidelity import chat_requests

    dist = dist or Dist()
    ids = list(range(dist.rank, len(prompts), dist.world))
    with tqdm(total=len(ids), desc="dense continuations", unit="prompt",
              disable=not progress or dist.rank != 0) as bar:
        mine = chat_requests(model, tokenizer, [prompts[i] for i in ids], max_tokens, bar=bar,
                             known=known, on_new=on_new)
    out: list = [None] * len(prompts)
    for part_ids, part in dist.gather((ids, mine)):
        for i, request in zip(part_ids, part, strict=True):
            out[i] = TokenExample([request], 0)
            if known is not None:  # the other ranks' too, written with the next phase
                known[prompts[i].id] = request[1]
    return out


class SetScorer:
    """Per-choice scores l_S of one task's calibration examples (this rank's shard), memoised
    per skip set, computed with prefix and state reuse (or naively, for comparison). With
    `fidelity`, the examples are `chat_examples` and the scores are each prompt's mean
    KL(dense || S) over its continuation."""

    def __init__(self, model, examples: Sequence[TokenExample], batch_size: int = 16,
                 reuse_prefix: bool = True, max_length: int | None = None,
                 dist: Dist | None = None, state_budget_gb: float = 2.0,
                 fidelity: bool = False):
        self.fidelity = fidelity
        self.dist = dist or Dist()
        self.global_ids = list(range(self.dist.rank, len(examples), self.dist.world))
        mine = [examples[i] for i in self.global_ids]
        self.n_examples = len(examples)
        requests = [r for ex in mine for r in ex.requests]
        self.offsets = list(np.cumsum([0] + [len(ex.requests) for ex in mine[:-1]]))
        self.gold = [ex.gold for ex in mine]
        self.runner = BlockRunner(model)
        self.num_blocks = self.runner.num_blocks
        self.batches = self.runner.prepare(requests, batch_size, max_length) if requests else []
        self.n_requests = len(requests)
        self.reuse_prefix = reuse_prefix
        self.cache: dict[frozenset, np.ndarray] = {}
        # (batch index, the blocks applied to it in order) -> hidden state
        self.states: dict[tuple[int, tuple[int, ...]], object] = {}
        self.states_for: frozenset = frozenset()  # the `current` set the states were kept for
        itemsize = next(model.parameters()).element_size()
        self.state_bytes = sum(b.input_ids.numel() for b in self.batches) * itemsize * (
            model.config.hidden_size)
        self.state_budget = state_budget_gb * 2**30

    def watch_count(self, trials: int) -> int:
        """How many blocks' entering states every trial can keep within the memory budget."""
        if not self.reuse_prefix or not self.state_bytes or not trials:
            return 0
        # one state per trial may survive from the previous phase (the one entering its choice)
        return max(0, int(self.state_budget // (self.state_bytes * trials)) - 1)

    def scores(self, current: Sequence[int], trials: Sequence[int],
               watch: Sequence[int] = ()) -> dict[int, np.ndarray]:
        """l_S per request for S = current + {b}, b in trials (memoised); trials keep the
        hidden state entering each `watch` block for later phases."""
        import torch

        key = {b: frozenset(current) | {b} for b in trials}
        todo = [b for b in trials if key[b] not in self.cache]
        self._drop_states(frozenset(current))
        if todo:
            out = {b: np.zeros(self.n_requests) for b in todo}
            with torch.inference_mode():
                for n, batch in enumerate(self.batches):
                    for b, sums in self._batch_trials(n, batch, current, todo,
                                                      set(watch)).items():
                        out[b][batch.requests] = sums / batch.counts
            for b in todo:
                self.cache[key[b]] = out[b]
        return {b: self.cache[key[b]] for b in trials}

    def _drop_states(self, current: frozenset) -> None:
        """Forget the states no set containing `current` can reach (all of them when a new
        search starts: its sets do not contain the old one's)."""
        if not self.states_for <= current:
            self.states.clear()
        self.states = {key: h for key, h in self.states.items() if not current & set(key[1])}
        self.states_for = current

    def _batch_trials(self, n: int, batch, current: list[int], trials: list[int],
                      watch: set[int]) -> dict[int, np.ndarray]:
        run = self.runner
        keep = [i for i in range(self.num_blocks) if i not in set(current)]
        head = run.head
        if self.fidelity:
            from .scoring import kl_to_reference

            ref = run.logprobs(run.run(run.embed(batch), batch, range(self.num_blocks)), batch)

            def head(h, batch):
                return run.per_request(kl_to_reference(ref, run.logprobs(h, batch))[0], batch)
        if not self.reuse_prefix:
            return {b: head(run.run(run.embed(batch), batch, [i for i in keep if i != b]), batch)
                    for b in trials}
        # One pass of the current set, up to the last trial block, keeping the hidden state
        # that enters each trial block; each trial then runs only the blocks after it.
        entering, h, last = {}, run.embed(batch), max(trials)
        for i in keep:
            if i in trials:
                entering[i] = h
            if i == last:
                break
            h = run.run(h, batch, [i])
        out = {}
        for b in trials:
            blocks = [i for i in keep if i > b]
            applied = tuple(i for i in keep if i < b)  # a hidden state is its blocks applied
            # Start from the deepest state a trial of an earlier phase stored for these blocks.
            h, start = entering[b], 0
            for at in range(len(blocks) - 1, 0, -1):
                state = self.states.get((n, applied + tuple(blocks[:at])))
                if state is not None:
                    h, start = state, at
                    break
            for at in range(start, len(blocks)):
                if blocks[at] in watch:
                    self.states.setdefault((n, applied + tuple(blocks[:at])), h)
                h = run.run(h, batch, [blocks[at]])
            out[b] = head(h, batch)
        return out

    def losses(self, current: Sequence[int], trials: Sequence[int], loss: str,
               watch: Sequence[int] = ()) -> dict[int, float]:
        """L(current + {b}) per trial, summed (fidelity: averaged) over all ranks' examples in
        global order."""
        if (loss == "fidelity") != self.fidelity:
            raise PuddingError(f"the {loss} loss needs a {'task' if self.fidelity else 'chat'}"
                               " scorer")
        scores = self.scores(current, trials, watch)
        local = np.stack([example_losses(scores[b], self.offsets, self.gold, loss)
                          for b in trials]) if self.gold else np.zeros((len(trials), 0))
        full = np.zeros((len(trials), self.n_examples))
        for ids, part in self.dist.gather((self.global_ids, local)):
            full[:, ids] = part
        reduce = np.mean if loss == "fidelity" else np.sum
        return {b: float(reduce(full[t])) for t, b in enumerate(trials)}

    def total_evals(self) -> int:
        return int(sum(self.dist.gather(self.runner.evals)))


def greedy_search(scorer: SetScorer, run: GreedyRun,
                  on_phase: Callable[[GreedyRun], None] | None = None,
                  progress: bool = False) -> GreedyRun:
    """Extend `run` (possibly resumed mid-way) to k blocks, one greedy phase at a time."""
    from tqdm.auto import tqdm

    candidate = run.candidate
    allowed = range(1, scorer.num_blocks - 1)
    if candidate.k > len(allowed):
        raise PuddingError(f"k={candidate.k}: only {len(allowed)} blocks may be removed")
    bar = tqdm(total=candidate.k, initial=len(run.trajectory), desc=candidate.name,
               disable=not progress or scorer.dist.rank != 0)
    ranking: list[int] = []  # the previous phase's trials, best first
    while not run.done:
        start, cpu, evals = time.perf_counter(), time.process_time(), scorer.total_evals()
        current = [p.block for p in run.trajectory]
        trials = [b for b in allowed if b not in current]
        # the previous phase's runners-up; before any ranking, the deepest blocks (which
        # greedy depth pruning removes most often)
        order = ranking or sorted(trials, reverse=True)
        watch = [b for b in order if b in trials][:scorer.watch_count(len(trials))]
        losses = scorer.losses(current, trials, candidate.loss, watch)
        ranking = sorted(trials, key=lambda b: (losses[b], b))
        best = ranking[0]
        run.trajectory.append(Phase(best, losses[best], time.perf_counter() - start,
                                    scorer.total_evals() - evals, time.process_time() - cpu))
        candidate.skip = sorted(current + [best])
        bar.update(1)
        if on_phase is not None:
            on_phase(run)
    bar.close()
    return run


def candidate_name(task: str, loss: str, k: int) -> str:
    return f"{task}-{loss}-k{k}"


def run_search(model, tokenizer, examples: dict[str, list[Example]], settings: dict, out,
               k: int, losses: Sequence[str] = TASK_LOSSES, batch_size: int = 16,
               reuse_prefix: bool = True, restart: bool = False, progress: bool = True,
               max_length: int | None = None, state_budget_gb: float = 2.0,
               chat: Sequence[ChatPrompt] = (), max_tokens: int = 64) -> dict:
    """Search one candidate per (task, task loss), and one per fidelity loss on the `chat`
    prompts (dense continuations of `max_tokens`), and write `out` (candidates.json) after
    every phase; a rerun with the same settings continues from the last finished phase, and
    one with a larger k extends a finished run (as SLEB's does).

    `settings` records what the result depends on (model, seed, samples, dtype, ...; the
    chat prompts' selection for fidelity); it is stored with tasks, losses and k, and compared
    on resume.
    """
    from pathlib import Path

    dist = Dist()
    settings = {**settings, "tasks": list(examples), "losses": list(losses), "k": k}
    task_losses = [loss for loss in losses if loss in TASK_LOSSES]
    groups = [(task, task_losses, lambda exs=exs: tokenize_examples(tokenizer, exs), False)
              for task, exs in examples.items() if task_losses]
    if "fidelity" in losses:
        if not chat:
            raise PuddingError("the fidelity loss needs chat prompts")
        groups.append((CHAT, ["fidelity"], lambda: chat_examples(
            model, tokenizer, chat, max_tokens, dist, progress, doc["continuations"],
            keep_continuation), True))
    doc = None
    if dist.rank == 0 and Path(out).exists() and not restart:
        doc = extend_run(read_run(out, settings, ignore=["k"]), k, out)
    doc = dist.broadcast(doc)
    if doc is None:
        calibration = {t: [e.qid for e in exs] for t, exs in examples.items()}
        if "fidelity" in losses:
            calibration[CHAT] = [p.id for p in chat]
        doc = {"settings": settings, "complete": False, "candidates": [],
               "calibration": calibration, "setup_seconds": {}}
    done = {c["name"]: GreedyRun.from_json(c, str(out)) for c in doc["candidates"]}
    # dense's continuations are kept in `out` as they are made: a resumed search (every new
    # session of a long one) does not decode them again
    doc.setdefault("continuations", {})

    def keep_continuation(prompt_id: str, tokens: list[int]) -> None:
        doc["continuations"][prompt_id] = tokens
        if dist.rank == 0:
            write_json(out, doc)

    def save(run: GreedyRun) -> None:
        done[run.name] = run
        doc["candidates"] = [c.to_json() for c in done.values()]
        if dist.rank == 0:
            write_json(out, doc)

    for task, group_losses, make_examples, fidelity in groups:
        todo = [GreedyRun.new(candidate_name(task, loss, k), task, loss, k)
                for loss in group_losses]
        todo = [done.get(r.name, r) for r in todo]
        if all(r.done for r in todo):
            continue
        start = time.perf_counter()
        scorer = SetScorer(model, make_examples(), batch_size, reuse_prefix, max_length, dist,
                           state_budget_gb, fidelity)
        doc["setup_seconds"][task] = time.perf_counter() - start
        for run in todo:
            greedy_search(scorer, run, on_phase=save, progress=progress)
    doc["complete"] = True
    doc["candidates"] = [c.to_json() for c in done.values()]
    if dist.rank == 0:
        write_json(out, doc)
    dist.barrier()  # every rank returns with `out` written, as make_labels does
    return doc


def merge_runs(paths: Sequence, out, tasks: Sequence[str]) -> dict:
    """Merge candidates.json files of runs that split the tasks between them (same settings
    otherwise) into the file one run over `tasks` would write; each task's candidates are
    taken from the first file where they are finished."""
    docs = [read_json(p) for p in paths]

    def rest(settings: dict) -> dict:
        return {key: v for key, v in settings.items() if key != "tasks"}

    if any(rest(d["settings"]) != rest(docs[0]["settings"]) for d in docs):
        raise PuddingError(f"{', '.join(map(str, paths))}: runs with different settings")
    merged = {"settings": {**docs[0]["settings"], "tasks": list(tasks)}, "complete": True,
              "candidates": [], "calibration": {}, "setup_seconds": {}}
    losses = merged["settings"]["losses"]
    for task in [*tasks, *([CHAT] if "fidelity" in losses else [])]:
        names = [candidate_name(task, loss, merged["settings"]["k"]) for loss in losses
                 if (loss == "fidelity") == (task == CHAT)]
        for d in docs:
            found = {c["name"]: c for c in d["candidates"]}
            if all(n in found and len(found[n]["trajectory"]) == found[n]["k"] for n in names):
                merged["candidates"] += [found[n] for n in names]
                merged["calibration"][task] = d["calibration"][task]
                merged["setup_seconds"][task] = d["setup_seconds"].get(task)
                break
        else:
            merged["complete"] = False
    write_json(out, merged)
    return merged


def extend_run(doc: dict, k: int, out) -> dict:
    """An earlier run of this search as the start of one for `k` >= its k blocks: its phases
    under the new k's names, left to be extended (greedy phases never look ahead)."""
    old_k = doc["settings"]["k"]
    if k < old_k:
        raise PuddingError(f"{out} was made with k={old_k}; pass --restart to start over, or "
                           f"take its first {k} phases with --from-run")
    if k == old_k:
        return doc
    candidates = [{**c, "name": candidate_name(c["task"], c["loss"], k), "k": k}
                  for c in doc["candidates"]]
    return {**doc, "settings": {**doc["settings"], "k": k}, "complete": False,
            "candidates": candidates}


def truncate_run(doc: dict, k: int, out) -> dict:
    """Write `first_phases(doc, k)` to `out`."""
    short = first_phases(doc, k)
    write_json(out, short)
    return short


def first_phases(doc: dict, k: int) -> dict:
    """The candidates.json a search for `k` blocks would write, from a finished run with a
    larger k: greedy phases never look ahead, so its first k phases are that search."""
    old_k = doc["settings"]["k"]
    if not doc.get("complete") or k > old_k or k < 1:
        raise PuddingError(f"--from-run: need a complete run with k >= {k} (it has k={old_k}, "
                           f"complete={doc.get('complete')})")
    candidates = []
    for c in doc["candidates"]:
        trajectory = c["trajectory"][:k]
        candidates.append({**c, "name": candidate_name(c["task"], c["loss"], k), "k": k,
                           "skip": sorted(p["block"] for p in trajectory),
                           "trajectory": trajectory})
    return {**doc, "settings": {**doc["settings"], "k": k}, "candidates": candidates}
