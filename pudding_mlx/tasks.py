"""The benchmark tasks: one definition each, shared by search, labels and eval (no torch).

Every row becomes an `Example` holding two request lists, one (context, continuation) pair per
answer choice:
- `prompt`: the method's scoring format (METHOD.md), used for calibration and router labels;
  the scored span is the continuation, e.g. ("Question: {q}\\nAnswer:", " {choice}").
- `eval`: lm-evaluation-harness's zero-shot context and continuation (target delimiter " "),
  scored with the task's `metric` ("acc": summed log-likelihood; "acc_norm": divided by the
  choice's length in characters).
WinoGrande has no "Answer:" to score after, so both formats use lm-eval's partial scoring: each
option fills the blank in its own context and only the shared rest of the sentence is scored.
`router_text` is what the router reads for the question, when labels are made and when it is
evaluated alike: the question without any answer (WinoGrande: the sentence with its blank). A
router trained with `--inputs choices` reads the question and then each answer choice
(`Example.router_input`, built from the same fields on both sides).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import PuddingError

Request = tuple[str, str]
TokenRequest = tuple[list[int], list[int]]  # (context ids, continuation ids)
ROUTER_INPUTS = ("context", "choices")  # what a router reads per question


def with_choices(question: str, texts: Sequence[str]) -> str:
    """The question, then one line per choice: what follows the question in that choice's
    method text (WinoGrande, whose texts fill the blank: what follows their shared words)."""
    if all(t.startswith(question) for t in texts):
        cut = len(question)
    else:
        shared = os.path.commonprefix(list(texts))
        cut = max(shared.rfind(" "), shared.rfind("\n")) + 1
    return "\n".join([question, *(t[cut:].strip() for t in texts)])


@dataclass(frozen=True)
class Example:
    task: str
    qid: str  # stable across data sources: the row's own id, else a hash of its content
    choices: tuple[str, ...]  # raw answer texts; acc_norm divides by len(choice)
    gold: int
    prompt: tuple[Request, ...]  # the method's (context, continuation) per choice
    eval: tuple[Request, ...]  # lm-eval's (context, continuation) per choice
    router_text: str  # the question as the router reads it

    @property
    def texts(self) -> list[str]:
        """The method's full text per choice (a label row's text)."""
        return [c + a for c, a in self.prompt]

    def router_input(self, inputs: str = "context") -> str:
        """What a router trained on `inputs` (one of ROUTER_INPUTS) reads for this question."""
        return with_choices(self.router_text, self.texts) if inputs == "choices" \
            else self.router_text


@dataclass(frozen=True)
class Task:
    name: str
    hub: tuple[str, str | None]  # datasets.load_dataset(path, name)
    metric: str  # "acc" or "acc_norm", as the paper reports it
    splits: tuple[str, ...]  # splits offered (hellaswag "train" is a holdout of validation)
    build: Callable[[dict], tuple]  # row -> (id or None, choices, gold, prompt, eval, router)
    # > 0: no train split offline, so "train" is this many validation questions held out
    # (`split_holdout`) and "validation" is the rest, whatever the source.
    holdout: int = 0

    def example(self, row: dict) -> Example:
        rid, choices, gold, prompt, ev, router = self.build(row)
        return Example(self.name, f"{self.name}:{rid or content_id(row)}", tuple(choices), gold,
                       tuple(prompt), tuple(ev), router)


def content_id(row: dict) -> str:
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _qa(context: str, choices: list[str]) -> list[Request]:
    return [(context, " " + c) for c in choices]


def _arc(row):
    choices = list(row["choices"]["text"])
    gold = list(row["choices"]["label"]).index(row["answerKey"].strip())
    ctx = f"Question: {row['question']}\nAnswer:"
    return row["id"], choices, gold, _qa(ctx, choices), _qa(ctx, choices), ctx


def _openbookqa(row):
    choices = list(row["choices"]["text"])
    gold = list(row["choices"]["label"]).index(row["answerKey"].strip())
    method = f"Question: {row['question_stem']}\nAnswer:"
    return (row["id"], choices, gold, _qa(method, choices), _qa(row["question_stem"], choices),
            method)


def _piqa(row):
    choices = [row["sol1"], row["sol2"]]
    ctx = f"Question: {row['goal']}\nAnswer:"
    return None, choices, int(row["label"]), _qa(ctx, choices), _qa(ctx, choices), ctx


def _boolq(row):
    choices = ["no", "yes"]
    ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    gold = int(row["answer"]) if "answer" in row else int(row["label"])
    return None, choices, gold, _qa(ctx, choices), _qa(ctx, choices), ctx


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag cleaning: WikiHow "[title]" markers and bracketed artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row):
    query = hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    choices = [hellaswag_clean(e) for e in row["endings"]]
    gold, method = int(row["label"]), f"Question: {query}\nAnswer:"
    return None, choices, gold, _qa(method, choices), _qa(query, choices), method


def _winogrande(row):
    sentence = row["sentence"]
    blank = sentence.index("_")
    choices = [row["option1"], row["option2"]]
    rest = " " + sentence[blank + 1:].strip()
    partial = [(sentence[:blank] + option, rest) for option in choices]
    gold = int(row["answer"]) - 1
    return None, choices, gold, partial, partial, sentence


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge"), "acc_norm",
             ("train", "validation", "test"), _arc),
        Task("arc_easy", ("allenai/ai2_arc", "ARC-Easy"), "acc", ("train", "validation", "test"),
             _arc),
        Task("boolq", ("google/boolq", None), "acc", ("train", "validation"), _boolq),
        Task("hellaswag", ("Rowan/hellaswag", None), "acc_norm", ("train", "validation"),
             _hellaswag, holdout=2000),
        Task("piqa", ("ybisk/piqa", None), "acc", ("train", "validation"), _piqa),
        Task("winogrande", ("allenai/winogrande", "winogrande_xl"), "acc",
             ("train", "validation"), _winogrande),
        Task("openbookqa", ("allenai/openbookqa", "main"), "acc_norm",
             ("train", "validation", "test"), _openbookqa),
    ]
}
# The method calibrates on five tasks and holds BoolQ out; the paper's headline averages six.
CALIBRATION_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande")
EVAL_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande")


HOLDOUT_SEED = 1234


def _holdout_key(qid: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{qid}".encode()).hexdigest()


def split_holdout(examples: list[Example], size: int,
                  seed: int = HOLDOUT_SEED) -> tuple[list[Example], list[Example]]:
    """Split validation examples into (holdout, rest).

    The holdout (calibration and router-label rows) is the `size` examples with the smallest
    sha1(seed:qid); it depends only on the question ids, not on row order or data source.
    Every evaluation uses `rest`. Both lists keep the input order.
    """
    chosen = set(sorted(_holdout_key(e.qid, seed) for e in examples)[:size])
    holdout = [e for e in examples if _holdout_key(e.qid, seed) in chosen]
    rest = [e for e in examples if _holdout_key(e.qid, seed) not in chosen]
    return holdout, rest


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise PuddingError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[TokenRequest]:
    """Token ids (context, continuation) per request, lm-eval style; the torch and MLX
    scorers both use this, so they score the same tokens."""
    out = []
    for context, continuation in requests:
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        ctx = tokenizer.encode(context, add_special_tokens=False)
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        if not cont:
            raise PuddingError(f"empty continuation for context {context[:60]!r}")
        if not ctx:  # lm-eval scores an empty context after the end-of-text token
            ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                   else tokenizer.eos_token_id]
        out.append((ctx, cont))
    return out
