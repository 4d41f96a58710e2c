"""The routed model as an lm-evaluation-harness model, "pudding-mlx" (needs `pip install lm-eval`).

Importing this module registers the model, so run lm-eval's CLI through it (with any of its
options; a plain `lm_eval --model pudding-mlx` cannot find the model, as lm-eval never imports
this module):

    python -m pudding_mlx.evaluation.lm_eval_adapter --model pudding-mlx \\
        --model_args bundle=path/to/bundle,mode=router --tasks arc_easy,piqa

or, in Python, import it and call lm_eval.simple_evaluate(model="pudding-mlx", model_args=...).
Every request is routed from its own context (one router call per distinct context, cached),
then scored or generated greedily with that set skipped; mode=dense / static run without the
router. Like mlx_lm.evaluate, this is a thin wrapper.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..errors import PuddingError
from ..model import MODES, Route, load
from ..tasks import TokenRequest, encode_requests
from .loglik import loglikelihoods


@register_model("pudding-mlx")
class PuddingLM(LM):
    def __init__(self, bundle: str, mode: str = "router", max_tokens: int = 256,
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 device: str | None = None):
        # batch_size, max_batch_size and device are lm-eval's own options; MLX ignores them
        super().__init__()
        if mode not in MODES:
            raise PuddingError(f"mode must be one of {MODES}, got {mode!r}")
        self.pm = load(bundle)
        self.mode = mode
        self.max_tokens = int(max_tokens)
        self.max_length = int(self.pm.config.get("max_position_embeddings", 2048))
        self._routes: dict[str, Route] = {}

    def route(self, context: str) -> Route:
        if context not in self._routes:
            self._routes[context] = self.pm.route(context, self.mode)
        return self._routes[context]

    def _score(self, route: Route, token_requests: list[TokenRequest]) -> list[tuple[float, bool]]:
        return loglikelihoods(self.pm.view(route), lambda: self.pm.make_cache(route),
                              token_requests, self.max_length)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(summed log-prob, is_greedy) of each continuation."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.args[0], []).append(i)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for context, idx in tqdm(groups.items(), desc="pudding-mlx loglikelihood"):
            tokens = encode_requests(self.pm.tokenizer, [requests[i].args for i in idx])
            for i, r in zip(idx, self._score(self.route(context), tokens), strict=True):
                out[i] = r
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-prob of each whole text after the BOS (else EOS) token, in lm-eval's rolling
        windows of max_length tokens; routed from the text."""
        tok = self.pm.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        out = []
        for req in tqdm(requests, desc="pudding-mlx loglikelihood_rolling"):
            (text,) = req.args
            ids = tok.encode(text, add_special_tokens=False)
            windows = [make_disjoint_window(w)
                       for w in get_rolling_token_windows(ids, prefix, self.max_length, 1)]
            out.append(sum(s for s, _ in self._score(self.route(text), windows)))
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy generation from the raw context (no chat template) up to the first stop
        string, decoded as lm-eval's HF model does (leading space kept, special tokens not)."""
        out = []
        for req in tqdm(requests, desc="pudding-mlx generate"):
            context, opts = req.args
            until = opts.get("until") or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            tokens: list[int] = []
            for r in self.pm.stream_generate(context, opts.get("max_gen_toks", self.max_tokens),
                                             route=self.route(context), chat_template=False):
                if r.finish_reason != "stop":  # a "stop" response carries the end-of-text token
                    tokens.append(r.token)
                text = self.pm.tokenizer.decode(tokens, skip_special_tokens=True)
                if any(s in text for s in until):
                    break
            out.append(min((text.split(s)[0] for s in until), key=len, default=text))
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
