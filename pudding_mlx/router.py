"""The router on device: a BERT-family encoder + pooling + linear head, in MLX or Core ML.

Reads the bundle's `router/` folder as written by convert/router_model.py (Router.save):
config.json (HF BertConfig), model.safetensors (`encoder.<BertModel name>`, `head.*`),
router_config.json and the tokenizer files. Only transformers' tokenizer is used, no torch.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .bundle import ROUTER_CONFIG, RouterConfig, check_safetensors
from .errors import BundleError, PuddingError
from .files import read_json
from .tasks import ROUTER_INPUTS

BACKENDS = ("auto", "mlx", "coreml")
MLPACKAGE = "router.mlpackage"
_ACTIVATIONS = {
    "gelu": nn.gelu,  # exact (erf), as HF's "gelu"
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "relu": nn.relu,
}


@dataclass
class Encoded:
    """A padded batch of router inputs."""

    input_ids: np.ndarray  # int32 [n, L]
    attention_mask: np.ndarray  # int32 [n, L]
    truncated: list[bool]  # prompt i was cut to max_length tokens


# --- the encoder, named like HF's BertModel so its weights load as saved -----------------------


@dataclass
class BertArgs:
    """The fields of an HF BertConfig (config.json) that the MLX encoder uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    model_type: str = "bert"
    position_embedding_type: str = "absolute"

    @classmethod
    def from_dict(cls, params: dict) -> BertArgs:
        """Like mlx-lm's BaseModelArgs.from_dict: keys the encoder does not use are ignored."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1])
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        h = h + self.token_type_embeddings(mx.zeros_like(input_ids))
        return self.LayerNorm(h)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertArgs):
        super().__init__()
        d = c.hidden_size
        self.num_heads = c.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, D = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for p in (self.query, self.key, self.value)
        )
        scale = 1.0 / math.sqrt(D // self.num_heads)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, D)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertArgs, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, h: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertArgs):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c, c.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertArgs):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = _ACTIVATIONS[c.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c: BertArgs):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertSelfOutput(c, c.intermediate_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, c: BertArgs):
        super().__init__()
        self.layer = [BertLayer(c) for _ in range(c.num_hidden_layers)]


class BertModel(nn.Module):
    def __init__(self, c: BertArgs):
        super().__init__()
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        h = self.embeddings(input_ids)
        # Additive mask over keys, [B, 1, 1, L], like HF's extended attention mask.
        mask = (1.0 - attention_mask[:, None, None, :].astype(h.dtype)) * -1e9
        for layer in self.encoder.layer:
            h = layer(h, mask)
        return h


class RouterNet(nn.Module):
    """Encoder + pooling + head: the MLX twin of convert.router_model.Router."""

    def __init__(self, encoder_config: BertArgs, num_outputs: int, pooling: str):
        super().__init__()
        self.encoder = BertModel(encoder_config)
        self.head = nn.Linear(encoder_config.hidden_size, num_outputs)
        self.pooling = pooling

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        h = self.encoder(input_ids, attention_mask)
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.astype(h.dtype)[..., None]
            pooled = (h * m).sum(1) / mx.maximum(m.sum(1), 1.0)
        return self.head(pooled)


# --- backends ----------------------------------------------------------------------------------


class Router:
    """Tokenizes prompts for the router; subclasses run the network."""

    backend = ""
    inputs = "context"  # what it was trained to read per question (RouterConfig.inputs)

    def __init__(self, folder: Path, outputs: list[str], max_length: int, pooling: str):
        self.folder = Path(folder)
        self.outputs = list(outputs)
        self.max_length = max_length
        self.pooling = pooling
        self.tokenizer = _load_tokenizer(self.folder)

    def encode(self, prompts: list[str], pad_to_max: bool = False) -> Encoded:
        """Tokenize and right-pad (to the longest prompt, or to max_length)."""
        rows, truncated = [], []
        for p in prompts:
            ids = self.tokenizer(p, truncation=False, verbose=False)["input_ids"]
            if len(ids) > self.max_length:
                ids = self.tokenizer(p, truncation=True, max_length=self.max_length)["input_ids"]
                truncated.append(True)
            else:
                truncated.append(False)
            rows.append(ids)
        width = self.max_length if pad_to_max else max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(rows), width), pad, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return Encoded(input_ids, mask, truncated)

    def forward(self, enc: Encoded) -> np.ndarray:
        """Scores [n, num_outputs] for an encoded batch."""
        raise NotImplementedError

    def scores_batch(self, prompts: list[str]) -> np.ndarray:
        return self.forward(self.encode(prompts))

    def scores(self, prompt: str) -> np.ndarray:
        """Scores [num_outputs] of one prompt (cut to max_length tokens)."""
        return self.scores_batch([prompt])[0]


class MLXRouter(Router):
    backend = "mlx"

    def __init__(self, folder: Path, outputs: list[str], max_length: int, pooling: str):
        super().__init__(folder, outputs, max_length, pooling)
        where = self.folder / "config.json"
        try:
            config = BertArgs.from_dict(read_json(where, error=BundleError))
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: not a usable BERT config ({type(e).__name__}: {e})"
                              ) from None
        if config.model_type != "bert" or config.position_embedding_type != "absolute":
            raise BundleError(
                f"{where}: encoder type {config.model_type!r} is not supported by the "
                "MLX router (BERT-family with absolute positions only); try --router-backend coreml"
            )
        if config.hidden_act not in _ACTIVATIONS:
            raise BundleError(f"{where}: activation {config.hidden_act!r} unsupported")
        try:
            positions = config.max_position_embeddings
            self.net = RouterNet(config, len(outputs), pooling)
        except (TypeError, ValueError) as e:
            raise BundleError(
                f"{where}: not a usable BERT config ({type(e).__name__}: {e})"
            ) from None
        if max_length > positions:
            raise BundleError(
                f"{self.folder}: max_length {max_length} exceeds the encoder's {positions} "
                "positions"
            )
        self._load_weights()

    def _load_weights(self) -> None:
        path = self.folder / "model.safetensors"
        weights = {
            k: v for k, v in read_weights(path).items()
            if not k.endswith(("position_ids", "token_type_ids"))
        }
        rows = weights.get("encoder.embeddings.word_embeddings.weight")
        if rows is not None and len(self.tokenizer) > rows.shape[0]:
            raise BundleError(
                f"{self.folder}: the tokenizer has {len(self.tokenizer)} tokens but the encoder "
                f"embeds {rows.shape[0]}; tokenizer and weights do not belong together"
            )
        head = weights.get("head.weight")
        if head is not None and head.shape[0] != len(self.outputs):
            raise BundleError(
                f"{path}: router head has {head.shape[0]} outputs but the manifest lists "
                f"{len(self.outputs)} candidates"
            )
        try:
            self.net.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            config_path = self.folder / "config.json"
            raise BundleError(f"{path}: weights do not match {config_path} ({e})") from None
        self.net.eval()
        mx.eval(self.net.parameters())

    def forward(self, enc: Encoded) -> np.ndarray:
        out = self.net(mx.array(enc.input_ids), mx.array(enc.attention_mask))
        return np.array(out.astype(mx.float32))


class CoreMLRouter(Router):
    """router.mlpackage: inputs input_ids/attention_mask int32 [1, max_length], output scores."""

    backend = "coreml"

    def __init__(self, package: Path, folder: Path, outputs: list[str], max_length: int,
                 pooling: str):
        if sys.platform != "darwin":
            raise PuddingError("the Core ML router runs only on macOS; use --router-backend mlx")
        try:
            import coremltools as ct
        except ImportError:
            raise PuddingError(
                "the Core ML router needs coremltools: pip install 'pudding-mlx[coreml]'"
            ) from None
        super().__init__(folder, outputs, max_length, pooling)
        self.model = ct.models.MLModel(str(package))

    def forward(self, enc: Encoded) -> np.ndarray:
        out = []
        for ids, mask in zip(enc.input_ids, enc.attention_mask, strict=True):
            n = self.max_length
            row_ids = np.zeros((1, n), np.int32)
            row_mask = np.zeros((1, n), np.int32)
            row_ids[0, : len(ids)], row_mask[0, : len(mask)] = ids[:n], mask[:n]
            pred = self.model.predict({"input_ids": row_ids, "attention_mask": row_mask})
            out.append(np.asarray(pred["scores"], dtype=np.float32).reshape(-1))
        return np.stack(out)


def read_weights(path: Path) -> dict[str, mx.array]:
    """A router's model.safetensors, whole (else a one-line BundleError)."""
    check_safetensors(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises bare RuntimeError/ValueError on bad files
        raise BundleError(f"{path}: cannot read ({e})") from None


def load_router(bundle: str | Path, outputs: list[str], max_length: int, pooling: str,
                backend: str = "auto", target: str | None = None) -> Router:
    """The bundle's router on `backend`: auto = Core ML on macOS when router.mlpackage exists.
    The router's config must match the manifest's outputs, max_length, pooling (and target,
    when given)."""
    bundle = Path(bundle)
    if backend not in BACKENDS:
        raise PuddingError(f"router backend must be one of {BACKENDS}, got {backend!r}")
    folder = bundle / "router"
    rc = check_router_config(folder, outputs, max_length, pooling, target)
    package = bundle / MLPACKAGE
    if backend == "auto":
        backend = "coreml" if sys.platform == "darwin" and package.exists() and _has_ct() else "mlx"
    if backend == "coreml":
        if not package.exists():
            raise BundleError(f"{package}: missing (needed by --router-backend coreml)")
        router: Router = CoreMLRouter(package, folder, outputs, max_length, pooling)
    else:
        router = MLXRouter(folder, outputs, max_length, pooling)
    router.inputs = rc.inputs
    return router


def check_router_config(folder: Path, outputs: list[str], max_length: int | None, pooling: str,
                        target: str | None) -> RouterConfig:
    """router_config.json in `folder`, checked against the manifest's router facts."""
    path = folder / ROUTER_CONFIG
    rc = RouterConfig.from_dict(read_json(path, error=BundleError), str(path))
    if rc.outputs != outputs or rc.num_outputs != len(outputs):
        raise BundleError(
            f"{path}: outputs {rc.outputs} (num_outputs {rc.num_outputs}) differ "
            f"from the manifest's router outputs {outputs}"
        )
    checks = [("max_length", max_length), ("pooling", pooling)]
    checks += [("target", target)] if target is not None else []
    for key, want in checks:
        if getattr(rc, key) != want:
            raise BundleError(f"{path}: {key} {getattr(rc, key)!r} differs from the manifest's "
                              f"{want!r}")
    if rc.inputs not in ROUTER_INPUTS:
        raise BundleError(f"{path}: inputs {rc.inputs!r} unknown; expected one of "
                          f"{ROUTER_INPUTS}")
    return rc


def _has_ct() -> bool:
    import importlib.util

    return importlib.util.find_spec("coremltools") is not None


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{folder}: cannot load the router tokenizer ({e})") from None
