"""The bundles behind these results: SmolLM2-135M-Instruct in MLX (float32 and float16), the
all-MiniLM-L6-v2 router (the default 64 input tokens) with a random head (routing time does not
depend on training) and ten hand-made sets of 6 of the 30 blocks.
Usage: python make_bench_bundle.py OUT_DIR"""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from convert.assets import load_causal_lm, minilm_path, smollm2_gguf
from convert.router_model import Router, RouterConfig
from convert.to_mlx import MLXSettings, convert_llm_to_mlx
from pudding_mlx.bundle import Candidate, Manifest, RouterInfo, write_manifest

SETS = [[20, 21, 22, 23, 24, 25], [19, 21, 22, 23, 25, 26], [3, 5, 20, 22, 24, 26],
        [10, 12, 14, 16, 18, 20], [17, 19, 21, 23, 25, 27], [2, 4, 6, 8, 10, 12],
        [22, 23, 24, 25, 26, 27], [15, 16, 17, 18, 19, 20], [5, 9, 13, 17, 21, 25],
        [7, 8, 9, 24, 25, 26]]


def main(out: Path) -> None:
    names = [f"set{i}" for i in range(len(SETS))]
    torch.manual_seed(0)
    config = RouterConfig(backbone="all-MiniLM-L6-v2", num_outputs=len(SETS),
                          pooling="mean", outputs=names)
    router = Router.from_backbone(str(minilm_path()), config).eval()
    router_tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    model, tokenizer = load_causal_lm(smollm2_gguf())
    for dtype in ("float32", "float16"):
        bundle = out / f"bundle_{dtype}"
        convert_llm_to_mlx(smollm2_gguf(), bundle / "model", MLXSettings(dtype), model, tokenizer)
        router.save(bundle / "router", router_tokenizer)
        write_manifest(bundle, Manifest(
            base_model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)", num_blocks=30,
            candidates=[Candidate(n, s, task="hand-made", loss="none", k=6)
                        for n, s in zip(names, SETS, strict=True)],
            static=Candidate("static", SETS[0], task="hand-made", loss="none", k=6),
            router=RouterInfo(backbone="all-MiniLM-L6-v2", max_length=config.max_length,
                              outputs=names, pooling="mean"),
            protected=[0]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
