"""Tiny random models and tokenizers built in-test (no downloads), and the independent
references (plain HF torch, plain mlx-lm) that the test modules compare against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

CORPUS = [
    "Question: Which gas do plants absorb from the air?\nAnswer: carbon dioxide",
    "Question: How do you boil an egg?\nAnswer: put it in boiling water for ten minutes",
    "The capital of France is Paris. Is it true that the sky is blue? yes no",
    "She poured the water into the glass because the glass was empty.",
    "hello, how are you today? I am fine, thank you very much!",
    "0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ' \" ( ) [ ] - _ + = / \\ @ # $ % & *",
]


def tiny_bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (like LLaMA-family ones) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def tiny_wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer over the words of CORPUS (plus characters)."""
    import re

    from transformers import BertTokenizerFast

    words = sorted({w.lower() for s in CORPUS for w in re.findall(r"\w+|[^\w\s]", s)})
    chars = sorted({c.lower() for s in CORPUS for c in s if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words + chars)]
    vocab += [f"##{c}" for c in chars]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)


# A few ARC-Easy and PIQA questions over CORPUS's words, for builds on tiny models.
ARC = [
    ("Which gas do plants absorb from the air?", ["carbon dioxide", "water", "salt", "sand"]),
    ("How do you boil an egg?", ["put it in boiling water", "freeze it", "paint it", "sing"]),
    ("What is the capital of France?", ["Paris", "the sky", "an egg", "the glass"]),
    ("Is the sky blue?", ["yes", "no", "only at night", "never"]),
    ("What fills an empty glass?", ["water", "the sky", "Paris", "a song"]),
    ("How are you today?", ["fine, thank you", "blue", "ten minutes", "carbon"]),
]
PIQA = [
    ("boil an egg", "put it in boiling water for ten minutes", "put it in the sky"),
    ("fill a glass", "pour the water into the glass", "pour the glass into the water"),
    ("say hello", "say hello, how are you today?", "boil the hello"),
    ("keep plants alive", "give them water and air", "put them in a glass of salt"),
    ("visit the capital of France", "go to Paris", "go to the egg"),
    ("answer a question", "say yes or no", "pour water on it"),
]


def write_task_data(root: Path) -> Path:
    """A data folder (<task>/train.jsonl) of 12 ARC-Easy and 12 PIQA questions."""
    rows = {
        "arc_easy": [{"id": f"arc-{i}", "question": q, "answerKey": "A",
                      "choices": {"text": c, "label": ["A", "B", "C", "D"]}}
                     for i, (q, c) in enumerate(ARC * 2)],
        "piqa": [{"goal": f"{g} ({i})", "sol1": a, "sol2": b, "label": i % 2}
                 for i, (g, a, b) in enumerate(PIQA * 2)],
    }
    for task, items in rows.items():
        (root / task).mkdir(parents=True)
        (root / task / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return root


def tiny_backbone(path: Path) -> Path:
    """A random tiny BERT encoder folder with its WordPiece tokenizer (a router backbone)."""
    import torch
    from transformers import BertConfig, BertModel

    tok = tiny_wordpiece_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=128), add_pooling_layer=False
              ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_llama(
    path: str | Path,
    num_layers: int = 6,
    rope_theta: float = 50000.0,
    seed: int = 0,
    model_type: str = "llama",
):
    """Save a random tiny HF causal LM (llama, qwen2 or mistral) with its tokenizer to `path`.

    Returns (torch model in fp32 eval mode, tokenizer).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_bpe_tokenizer()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=rope_theta,
        tie_word_embeddings=model_type != "mistral",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config).float().eval()
    # Random init with std 0.02 gives near-uniform logits; widen it so tests can tell sets apart.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def tiny_gemma3(path: str | Path, num_layers: int = 6, window: int = 4, pattern: int = 3,
                seed: int = 0, rope_thetas: tuple[float, float] | None = None,
                hidden: int = 64):
    """Save a random tiny HF Gemma 3 text model (`Gemma3ForCausalLM`) with its tokenizer.

    Every `pattern`-th block has full attention, the others a sliding window of `window` tokens.
    `rope_thetas` (full, sliding) replaces Gemma 3's default RoPE bases (1e6, 1e4). Hidden
    size 64: mlx-lm rounds the embedding scale sqrt(hidden) to bf16, HF in fp32 does not, and
    sqrt(64) is exact in both (sqrt(40) would put fp32 logits 1e-2 apart; `hidden` changes it).
    Returns (torch model in fp32 eval mode, tokenizer).
    """
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_bpe_tokenizer()
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=window,
        sliding_window_pattern=pattern,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if rope_thetas is not None:
        config.rope_parameters = {t: {"rope_type": "default", "rope_theta": theta}
                                  for t, theta in zip(("full_attention", "sliding_attention"),
                                                      rope_thetas, strict=True)}
    model = Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():  # wide weights, and norms away from 1 (Gemma scales by 1 + weight)
        for p in model.parameters():
            p.normal_(0.0, 0.15 if p.dim() > 1 else 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def tiny_router(path: str | Path | None, outputs: list[str], max_length: int = 32, seed: int = 0,
                pooling: str = "mean"):
    """A random tiny BERT router (convert.router_model.Router); saved to `path` when given."""
    import torch
    from transformers import BertConfig, BertModel

    from convert.router_model import Router
    from pudding_mlx.bundle import RouterConfig

    tok = tiny_wordpiece_tokenizer()
    torch.manual_seed(seed)
    enc = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
        ),
        add_pooling_layer=False,
    )
    cfg = RouterConfig(backbone="tiny-bert", num_outputs=len(outputs), max_length=max_length,
                       pooling=pooling, outputs=list(outputs))
    router = Router(enc, cfg).eval()
    if path is not None:
        router.save(path, tok)
    return router, tok


DEFAULT_SETS = {"early": [1, 2], "middle": [2, 3], "late": [3, 4]}


@dataclass
class TinyBundle:
    """What `tiny_bundle` built: the folder, its manifest, and the torch models behind it."""

    path: Path
    manifest: object  # pudding_mlx.bundle.Manifest
    model: object  # HF torch causal LM (fp32, eval)
    tokenizer: object  # its HF tokenizer
    router: object  # convert.router_model.Router (eval)
    router_tokenizer: object


def tiny_bundle(
    path: str | Path,
    sets: dict[str, list[int]] | None = None,
    static: list[int] | None = None,
    num_layers: int = 6,
    model_type: str = "llama",
    rope_theta: float = 50000.0,
    pooling: str = "mean",
    max_length: int = 32,
    protected: list[int] | None = None,
    seed: int = 0,
) -> TinyBundle:
    """Build a complete, valid bundle folder at `path` from tiny random models.

    `model/` is tiny_llama's HF folder as saved (config keeps rope_theta under
    `rope_parameters`, as the runtime must handle), `router/` is tiny_router with one output
    per set, in the order of `sets` (default DEFAULT_SETS); `static` defaults to the first set;
    `protected` defaults to [0] (the block mlx-lm builds the attention mask from).
    The manifest (with sha256 of every file) is written by pudding_mlx.bundle.write_manifest.
    """
    from pudding_mlx.bundle import Candidate, Manifest, RouterInfo, write_manifest

    path = Path(path)
    sets = dict(DEFAULT_SETS if sets is None else sets)
    names = list(sets)
    model, tok = tiny_llama(path / "model", num_layers=num_layers, rope_theta=rope_theta,
                            seed=seed, model_type=model_type)
    router, rtok = tiny_router(path / "router", names, max_length=max_length, seed=seed,
                               pooling=pooling)
    static_skip = list(sets[names[0]] if static is None else static)
    manifest = Manifest(
        base_model=f"tiny-random-{model_type}",
        num_blocks=num_layers,
        candidates=[Candidate(n, list(s), task="tiny", loss="likelihood", k=len(s))
                    for n, s in sets.items()],
        static=Candidate("static", static_skip, task="tiny", loss="likelihood",
                         k=len(static_skip)),
        router=RouterInfo(backbone="tiny-bert", max_length=max_length, outputs=names,
                          pooling=pooling),
        protected=[0] if protected is None else list(protected),
    )
    write_manifest(path, manifest)
    return TinyBundle(path, manifest, model, tok, router, rtok)


def run_cli(args, monkeypatch, capsys, stdin: bytes | None = None):
    """`pudding ARGS` in-process through the real entry point: (exit code, stdout, stderr).

    `stdin` is given as bytes and read as the console would.
    """
    import io
    import sys

    from pudding_mlx.cli import main

    monkeypatch.setenv("PUDDING_OPENBLAS", "0")
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# --- independent references: plain HF torch and plain mlx-lm, blocks removed by hand -----------
# (written out here rather than with convert.skip or pudding_mlx.masking, the code they check)


def torch_logits(model, ids, skip=()):
    """Logits of one plain HF torch forward (no cache) with the blocks in `skip` removed from
    the model's layer list (and from `config.layer_types`, by which Gemma 3 picks each block's
    mask and RoPE): [T, V] for one sequence of token ids, [B, T, V] for a [B, T] batch."""
    import torch

    ids = torch.as_tensor(ids)
    batch = ids if ids.dim() == 2 else ids[None]
    layers, config = model.model.layers, model.model.config
    types = getattr(config, "layer_types", None)
    model.model.layers = torch.nn.ModuleList(b for i, b in enumerate(layers) if i not in skip)
    if types is not None:
        config.layer_types = [t for i, t in enumerate(types) if i not in skip]
    try:
        with torch.no_grad():
            logits = model(batch, use_cache=False).logits
    finally:
        model.model.layers = layers
        if types is not None:
            config.layer_types = types
    return logits if ids.dim() == 2 else logits[0]


def torch_greedy(model, ids, skip, n: int, eos: int | None = None) -> list[int]:
    """Up to n tokens of greedy decoding after `ids` by HF torch with the blocks in `skip`
    removed, one full forward per token; stops after `eos` (which is kept) when given."""
    out: list[int] = []
    while len(out) < n and (eos is None or not out or out[-1] != eos):
        out.append(int(torch_logits(model, [*ids, *out], skip)[-1].argmax()))
    return out


def mlx_logits(model, ids, skip=()):
    """Logits [T, V] (fp32 numpy) of one plain mlx-lm forward (no cache) with the blocks in
    `skip` taken out of model.model.layers."""
    import mlx.core as mx
    import numpy as np

    inner = model.model
    layers = inner.layers
    inner.layers = [b for i, b in enumerate(layers) if i not in skip]
    try:
        return np.array(model(mx.array([list(ids)]))[0].astype(mx.float32))
    finally:
        inner.layers = layers


def dequantised_torch(hf_folder, mlx_model):
    """The HF torch model saved in `hf_folder` (fp32) carrying the weights of the quantised
    mlx-lm model `mlx_model`: every QuantizedLinear / QuantizedEmbedding weight dequantised
    by `mx.dequantize` and loaded under its own name (mlx-lm keeps HF's parameter names)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    state = {}
    for name, m in mlx_model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits,
                              mode=m.mode)
            state[f"{name}.weight"] = torch.from_numpy(np.array(w.astype(mx.float32)))
    assert state, "the MLX model has no quantised layer"
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return model


class TorchRoute(NamedTuple):
    index: int  # into the router's outputs
    name: str
    scores: object  # numpy [num_outputs]


def torch_route(router, tokenizer, prompt: str) -> TorchRoute:
    """The torch router's choice for `prompt`, read from its first router.config.max_length
    tokens (convert.router_model.Router and its HF tokenizer)."""
    import torch

    enc = tokenizer(prompt, truncation=True, max_length=router.config.max_length,
                    return_tensors="pt")
    with torch.no_grad():
        scores = router(enc["input_ids"], enc["attention_mask"])[0].numpy()
    index = int(scores.argmax())
    return TorchRoute(index, router.config.outputs[index], scores)


def real_model(gguf: Path, folder: Path):
    """A real GGUF checkpoint as (torch model, tokenizer, MLX model, MLX tokenizer): HF torch
    in float32 and its float32 MLX conversion in `folder`."""
    from convert.assets import load_causal_lm
    from convert.to_mlx import MLXSettings, convert_llm_to_mlx
    from pudding_mlx.model import load_lm

    torch_model, tok = load_causal_lm(gguf)
    convert_llm_to_mlx(gguf, folder, MLXSettings("float32"), torch_model, tok)
    mlx_model, mlx_tok, _ = load_lm(folder)
    return torch_model, tok, mlx_model, mlx_tok


def chat_ids(tokenizer, text: str) -> list[int]:
    """The ids the LLM sees for a user message: the HF chat template, generation prompt added."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False)


def check_incremental_decoding(view, ids: list[int], prefill: int = 7, atol: float = 1e-4):
    """Prefill `prefill` tokens into the view's caches, then feed one token at a time: every
    step's last logits equal one full forward's, and every cache ends at len(ids)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    full = np.array(view(mx.array([ids])))[0]
    cache = make_prompt_cache(view)
    steps = [np.array(view(mx.array([ids[:prefill]]), cache=cache))[0, -1]]
    for t in ids[prefill:]:
        steps.append(np.array(view(mx.array([[t]]), cache=cache))[0, -1])
    assert np.abs(np.stack(steps) - full[prefill - 1:]).max() <= atol
    assert all(c.offset == len(ids) for c in cache)
    return cache


def tiny_in_model_bundle(path: str | Path, sets: dict[str, list[int]] | None = None,
                         blocks: int = 1, chat_template: bool = True, seed: int = 0
                         ) -> tuple[TinyBundle, object]:
    """`tiny_bundle` with its router replaced by an in-model one: a random head on the tiny
    LLM's hidden state after `blocks` blocks. Returns (bundle, convert.in_model.Head)."""
    import shutil

    import numpy as np

    from convert.in_model import Head, save_head
    from pudding_mlx.bundle import RouterConfig, RouterInfo, write_manifest

    tb = tiny_bundle(path, sets, seed=seed)
    names = tb.manifest.router.outputs
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.5, (len(names), tb.model.config.hidden_size)).astype(np.float32)
    bias = rng.normal(0, 0.1, len(names)).astype(np.float32)
    head = Head(weight, bias, rng.normal(0, 0.1, weight.shape[1]).astype(np.float32))
    shutil.rmtree(tb.path / "router")
    save_head(tb.path / "router", head, RouterConfig(
        backbone="tiny-llama", num_outputs=len(names), max_length=0, outputs=list(names),
        target="fidelity", kind="in-model", blocks=blocks, chat_template=chat_template))
    tb.manifest.router = RouterInfo(backbone="tiny-llama", max_length=0, outputs=list(names),
                                    target="fidelity", tolerance=1.0, kind="in-model",
                                    blocks=blocks)
    write_manifest(tb.path, tb.manifest)
    return tb, head


def assert_one_line(code, err, *phrases, after_progress: bool = False):
    """Exit code 2 and one `error: ` line holding every phrase, the last thing on stderr and the
    only one unless `after_progress` (progress bars may come first); no traceback."""
    assert code == 2, err
    errors = [line for line in err.split("\n") if line.startswith("error: ")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n") and "Traceback" not in err, err
    assert after_progress or err == errors[0] + "\n", err
    for phrase in phrases:
        assert phrase in errors[0], (phrase, err)
