"""The router in PyTorch: a Hugging Face encoder, pooled, then one linear layer.

On disk (the bundle's `router/` layout, read by the MLX port in pudding_mlx/router.py):
    config.json           the encoder's HF config
    model.safetensors     encoder weights as `encoder.<hf name>`, head as `head.weight/bias`
    router_config.json    RouterConfig below
    tokenizer files       as saved by the HF tokenizer
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pudding_mlx.bundle import ROUTER_CONFIG, RouterConfig
from pudding_mlx.files import read_json

WEIGHTS = "model.safetensors"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class Router(nn.Module):
    def __init__(self, encoder: nn.Module, config: RouterConfig):
        super().__init__()
        self.encoder = encoder
        self.config = config
        self.head = nn.Linear(encoder.config.hidden_size, config.num_outputs)
        self.autocast: torch.dtype | None = None  # the encoder's compute dtype in training

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        else:  # weights stay float32; pooling and head in float32 (scores differ by hundredths)
            with torch.autocast(input_ids.device.type, dtype=self.autocast):
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            hidden = hidden.float()
        return self.head(self.pool(hidden, attention_mask))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(hidden, attention_mask, self.config.pooling)

    @classmethod
    def from_backbone(
        cls, backbone: str, config: RouterConfig, trust_remote_code: bool = False
    ) -> Router:
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(
            backbone, add_pooling_layer=False, trust_remote_code=trust_remote_code
        )
        return cls(encoder, config)

    def save(self, path: str | Path, tokenizer=None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.encoder.config.save_pretrained(path)
        state = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
        (path / ROUTER_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    @classmethod
    def load(cls, path: str | Path) -> Router:
        from transformers import AutoConfig, AutoModel

        path = Path(path)
        config = RouterConfig.from_dict(read_json(path / ROUTER_CONFIG), str(path / ROUTER_CONFIG))
        enc_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        encoder = AutoModel.from_config(enc_config, add_pooling_layer=False,
                                        trust_remote_code=False)
        router = cls(encoder, config)
        router.load_state_dict(load_file(str(path / WEIGHTS)))
        return router.eval()
