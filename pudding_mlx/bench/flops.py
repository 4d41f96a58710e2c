"""The ideal speedup of skipping blocks, from the model config alone.

Counts the matrix multiplies of a decoder-only transformer (2 FLOPs per multiply-add):
attention projections, attention scores/values over the context, the MLP and the LM head.
Embedding lookups, norms, RoPE and activations are element-wise and left out (well under 1%
of the work here). Decoding is bandwidth-bound, so its ideal comes from the bytes read per
token (`DecodeBytes`): every weight of the kept blocks and the LM head, one embedding row, and
the KV cache. `pudding bench` measures those bytes on the loaded arrays (quantised weights
with their scales and biases, summary.decode_bytes); `DecodeBytes.from_shape` is the
config-only estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import PuddingError

GATED_MLP = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
             "olmo2")
# Norms around both sublayers (four per block), plus RMS norms of q and k per head.
SANDWICH_NORMS = ("gemma3_text",)


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that its cost depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = True  # the LM head reuses the embedding matrix
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    gated: bool = True  # gate, up and down projections (SwiGLU) instead of up and down
    sandwich_norms: bool = False  # Gemma 3: four norms per block and q/k norms

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> Shape:
        """From an HF / mlx-lm config.json dict."""
        try:
            d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            kind = config.get("model_type", "llama")
            attention_bias = bool(config.get("attention_bias", False))
            return cls(
                hidden=d,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or d // heads),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", True)),
                qkv_bias=kind == "qwen2" or attention_bias,
                o_bias=attention_bias and kind != "qwen2",
                mlp_bias=bool(config.get("mlp_bias", False)),
                gated=kind in GATED_MLP,
                sandwich_norms=kind in SANDWICH_NORMS,
            )
        except KeyError as e:
            raise PuddingError(f"{where}: missing {e.args[0]!r} (needed for FLOPs)") from None

    # --- parameters -----------------------------------------------------------------------------

    def attention_params(self) -> int:
        q = o = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        weights = self.hidden * (q + 2 * kv) + o * self.hidden
        return weights + self.qkv_bias * (q + 2 * kv) + self.o_bias * self.hidden

    def mlp_params(self) -> int:
        n = 3 if self.gated else 2
        bias = self.mlp_bias * ((n - 1) * self.intermediate + self.hidden)
        return n * self.hidden * self.intermediate + bias

    def block_params(self) -> int:
        """One decoder block: attention, MLP and its norm weights."""
        norms = 4 * self.hidden + 2 * self.head_dim if self.sandwich_norms else 2 * self.hidden
        return self.attention_params() + self.mlp_params() + norms

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        """The final norm (the LM head matrix is counted in `DecodeBytes`, tied or not)."""
        return self.hidden

    # --- FLOPs per token ------------------------------------------------------------------------

    def block_flops(self, context: float) -> float:
        """One block for one token that attends `context` positions (itself included)."""
        scores = 4 * self.heads * self.head_dim * context  # q.k and the weighted sum of v
        return 2 * self.attention_params() + scores + 2 * self.mlp_params()

    def head_flops(self) -> float:
        return 2 * self.vocab * self.hidden

    def prefill_flops(self, prompt: int, skipped: int = 0) -> float:
        """A whole prompt through the kept blocks (causal: token i attends i + 1 positions),
        then the LM head for the last position only (mlx-lm never evaluates the others)."""
        mean_context = (prompt + 1) / 2
        kept = self.layers - skipped
        return kept * prompt * self.block_flops(mean_context) + self.head_flops()

    def decode_flops(self, context: int, skipped: int = 0) -> float:
        return (self.layers - skipped) * self.block_flops(context) + self.head_flops()

    def kv_values(self) -> int:
        """Keys and values one block caches per position."""
        return 2 * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class DecodeBytes:
    """What decoding one token reads: each block's weights, the weights outside the blocks
    (final norm, LM head matrix, one embedding row) and, per block, the KV cache's bytes per
    cached position."""

    blocks: tuple[float, ...]
    outside: float
    kv_per_position: float

    @classmethod
    def from_shape(cls, shape: Shape, bytes_per_param: float, kv_bytes: float) -> DecodeBytes:
        """Every weight at `bytes_per_param`, `kv_bytes` per cached value."""
        outside = shape.hidden + shape.head_params() + shape.vocab * shape.hidden
        return cls((shape.block_params() * bytes_per_param,) * shape.layers,
                   outside * bytes_per_param, shape.kv_values() * kv_bytes)

    def total(self, context: int, skip: Sequence[int] = ()) -> float:
        """Bytes read per token at `context` cached positions with the blocks `skip` skipped."""
        skipped = set(skip)
        kept = [b for i, b in enumerate(self.blocks) if i not in skipped]
        return sum(kept) + len(kept) * self.kv_per_position * context + self.outside


def prefill_ideal(shape: Shape, prompt: int, skipped: int) -> float:
    """Ideal prefill speedup (= time to first token, router aside) skipping `skipped` blocks."""
    return shape.prefill_flops(prompt) / shape.prefill_flops(prompt, skipped)


def decode_ideal(weights: DecodeBytes, context: int, skip: Sequence[int]) -> float:
    """Ideal decoding speedup at `context` cached positions, from the bytes read per token."""
    return weights.total(context) / weights.total(context, skip)


def decode_flops_ideal(shape: Shape, context: int, skipped: int) -> float:
    """The same from FLOPs (what a compute-bound decoder would reach)."""
    return shape.decode_flops(context) / shape.decode_flops(context, skipped)


def combined_ideal(phase_seconds: list[float], phase_ideals: list[float]) -> float:
    """Ideal speedup of a request made of phases (e.g. prefill then decoding), each taking
    `phase_seconds` dense and sped up ideally by its own factor."""
    ideal_seconds = sum(t / s for t, s in zip(phase_seconds, phase_ideals, strict=True))
    return sum(phase_seconds) / ideal_seconds
