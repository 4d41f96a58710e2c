"""The routed model as an lm-evaluation-harness model, "pudding-mlx" (needs `pip install lm-eval`).

    python -m pudding_mlx.lm_eval_adapter --model pudding-mlx \\
        --model_args bundle=path/to/bundle,mode=router --tasks arc_easy,piqa

Importing this module registers the model. Every request is routed from its own context (one
router call per distinct context, cached), then scored or generated with that set skipped;
mode=dense / static run without the router. Like mlx_lm.evaluate, this is a thin wrapper.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .loglik import encode_requests, score_requests
from .model import load


@register_model("pudding-mlx")
class PuddingLM(LM):
    def __init__(self, bundle: str, mode: str = "router", max_tokens: int = 256, **kwargs):
        super().__init__()
        self.pm = load(bundle)
        self.mode = mode
        self.max_tokens = int(max_tokens)
        self.max_length = int(self.pm.config.get("max_position_embeddings", 2048))
        self._routes: dict[str, object] = {}

    def route(self, context: str):
        if context not in self._routes:
            self._routes[context] = self.pm.route(context, self.mode)
        return self._routes[context]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Summed log-prob of each continuation; the greedy flag is not computed (False)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.args[0], []).append(i)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for context, idx in tqdm(groups.items(), desc="pudding-mlx loglikelihood"):
            route = self.route(context)
            sums, _ = score_requests(
                self.pm.view(route), lambda r=route: self.pm.make_cache(r),
                encode_requests(self.pm.tokenizer, [requests[i].args for i in idx]),
                self.max_length)
            for i, s in zip(idx, sums, strict=True):
                out[i] = (s, False)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise NotImplementedError("pudding-mlx: rolling log-likelihood (perplexity tasks) is "
                                  "not supported")

    def generate_until(self, requests) -> list[str]:
        """Greedy generation from the raw context (no chat template), cut at the first stop
        string."""
        out = []
        for req in tqdm(requests, desc="pudding-mlx generate"):
            context, opts = req.args
            text = self.pm.generate(context, opts.get("max_gen_toks", self.max_tokens),
                                    route=self.route(context), chat_template=False)
            for stop in opts.get("until", []):
                text = text.split(stop)[0]
            out.append(text)
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
