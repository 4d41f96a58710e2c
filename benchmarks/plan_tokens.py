"""The token counts `pudding plan` uses (convert/plan.py TASKS, CHAT_PROMPT_TOKENS): per task,
packed rows per question, tokens per row after padding to the longest of a batch of 16,
answer tokens per question; and the chat prompts' length with the chat template.

    python benchmarks/plan_tokens.py                 # SmolLM2's tokenizer
    python benchmarks/plan_tokens.py --model QWEN.gguf
"""

from __future__ import annotations

import json

import click
import numpy as np

TASKS = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "openbookqa")


@click.command()
@click.option("--model", default=None, help="GGUF file or HF folder [default: SmolLM2].")
@click.option("--samples", default=128, show_default=True)
@click.option("--data-dir", default=None)
def main(model, samples, data_dir):
    from convert.assets import default_model, load_causal_lm
    from convert.scoring import BlockRunner
    from pudding_mlx.data import calibration_examples
    from pudding_mlx.prompts import encode_chat, read_prompts, select
    from pudding_mlx.tasks import encode_requests

    lm, tok = load_causal_lm(model or default_model())
    runner = BlockRunner(lm)
    out = {}
    for task in TASKS:
        exs = calibration_examples(task, samples, 0, data_dir)
        batches = runner.prepare(encode_requests(tok, [r for ex in exs for r in ex.prompt]), 16)
        rows = sum(b.rows for b in batches)
        out[task] = {"rows": rows / len(exs),
                     "row_tokens": sum(b.input_ids.numel() for b in batches) / rows,
                     "answer_tokens": sum(len(b.targets) for b in batches) / len(exs)}
    prompts = select(read_prompts(), "train")
    out["chat_prompt_tokens"] = float(np.mean([len(encode_chat(tok, p.text, True))
                                               for p in prompts]))
    click.echo(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
