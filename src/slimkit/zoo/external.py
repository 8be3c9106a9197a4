"""Models from torchvision, timm and Hugging Face transformers by name, random weights, never downloaded.

    model = slimkit.zoo.external("torchvision:resnet18", num_classes=10)
    model = slimkit.zoo.external("timm:mobilenetv4_conv_small", num_classes=10)
    model = slimkit.zoo.external("hf:bert", hidden_size=128, num_hidden_layers=2, head="classifier", num_labels=2)
    model = slimkit.zoo.external("hf:path/to/dir")   # a local directory's config.json (its weights are not read)
    # CLI: slimkit quantize torchvision:resnet18 --data ...   (any command taking a model reference)

`hf:MODEL_TYPE` builds a transformers architecture from its config class (`AutoConfig.for_model`, keyword
arguments are config fields) and `head` picks what it computes: "features" (`AutoModel`: the last hidden
state), "classifier" (`AutoModelForSequenceClassification`: logits) or "causal-lm" (`AutoModelForCausalLM`:
next-token logits); forward(input_ids, attention_mask=None) returns that tensor. The model type must be one
transformers itself registers; remote code is never trusted. The recorded source holds the config's
non-default fields, so a saved file rebuilds without the directory.

The model records its source ({"kind": "torchvision" | "timm", "ref": NAME, "kwargs": {...}}), so
`slimkit.save` / `slimkit.load` rebuild it with no factory argument. These constructors are trusted:
the name is looked up in the library's own registry of models (`torchvision.models.list_models`,
`timm.list_models`), never imported as a path, and the keyword arguments are JSON data. Weights are
never fetched (`weights=None`, `pretrained=False`): load trained ones with `--weights` or
`slimkit.core.artifact.load_weights`.

torchvision beside a CPU-only torch: the torchvision wheel the package index serves for torch 2.13.0
is built against the CUDA torch; next to the CPU build its compiled extension (detection operators:
nms, roi_align, ...) does not load, and `import torchvision` then fails registering a fake kernel for
`torchvision::nms` ("operator torchvision::nms does not exist"). When slimkit.core is imported,
`slimkit.core.compat.ensure_torchvision_importable` tries to load that extension as torchvision would and, if it does not
load, declares the schemas of the two operators torchvision registers unconditionally (nms, qnms), so
the pure-Python model definitions import (for slimkit, timm and any other library in the process);
calling a detection operator then raises torchvision's own "Couldn't load custom C++ ops" error. With
a matching torch/torchvision pair the extension loads and nothing is declared.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from slimkit.core.compat import ensure_torchvision_importable
from slimkit.errors import MissingDependencyError, ModelError

KINDS = ("torchvision", "timm", "hf")
HF_HEADS = {"features": "AutoModel", "classifier": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}


class HFModel(nn.Module):
    """A transformers model returning one tensor: forward(input_ids, attention_mask=None) -> logits (heads
    "classifier", "causal-lm") or the last hidden state ("features")."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, input_ids, attention_mask=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if self.head == "features" else out.logits


def _transformers():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config name must never turn into a download
    try:
        import transformers
    except ImportError as err:
        raise MissingDependencyError(f"hf: models need the transformers package ({err}); `make venv` installs it") from None
    return transformers


def build_hf(ref: str, *, head: str = "features", allow_dir: bool = True, **fields: Any) -> nn.Module:
    """`ref`: a transformers model type ("bert", "gpt2", "llama", ...) or (`allow_dir`) a local directory
    holding a config.json; `fields` override config fields. Random weights."""
    from pathlib import Path

    from slimkit.core.state import set_source

    tf = _transformers()
    if head not in HF_HEADS:
        raise ModelError(f"hf:{ref}: unknown head {head!r}; use one of {', '.join(HF_HEADS)}")
    if allow_dir and Path(ref).is_dir():
        if not (Path(ref) / "config.json").is_file():
            raise ModelError(f"hf:{ref}: the directory has no config.json")
        try:
            config = tf.AutoConfig.from_pretrained(ref, local_files_only=True, trust_remote_code=False, **fields)
        except (ValueError, OSError, KeyError) as err:
            raise ModelError(f"hf:{ref}: not a transformers config ({str(err).splitlines()[0]})") from None
    else:
        if ref not in tf.CONFIG_MAPPING:
            near = [n for n in tf.CONFIG_MAPPING.keys() if ref.lower() in n][:8]
            raise ModelError(f"hf: transformers has no model type {ref!r}" + (f"; similar: {', '.join(near)}" if near else ""))
        try:
            config = tf.AutoConfig.for_model(ref, **fields)
        except (TypeError, ValueError) as err:
            raise ModelError(f"hf:{ref}: {err}") from None
    try:
        model = getattr(tf, HF_HEADS[head]).from_config(config)
    except ValueError as err:  # e.g. no causal-LM class for an encoder-only type
        raise ModelError(f"hf:{ref}: no {head!r} model for {config.model_type!r} ({str(err).splitlines()[0]})") from None
    recorded = {k: v for k, v in config.to_diff_dict().items() if k not in ("model_type", "transformers_version")}
    return set_source(HFModel(model, head).eval(), "hf", config.model_type, {"head": head, **recorded})


def import_torchvision():
    """`import torchvision`, working around a compiled extension built for another torch (module docstring)."""
    ensure_torchvision_importable()
    try:
        import torchvision
    except ImportError as err:
        raise MissingDependencyError(f"torchvision models need the torchvision package ({err}); "
                                     "`make venv` installs it") from None
    return torchvision


def _timm():
    import_torchvision()  # timm imports torchvision
    try:
        import timm
    except ImportError as err:
        raise MissingDependencyError(f"timm models need the timm package ({err}); `make venv` installs it") from None
    return timm


def names(kind: str) -> list[str]:
    """The model names `kind` ("torchvision" classification models, or "timm") can build."""
    if kind == "torchvision":
        tv = import_torchvision()
        return sorted(tv.models.list_models(module=tv.models))
    if kind == "timm":
        return sorted(_timm().list_models())
    raise ModelError(f"unknown model library {kind!r}; known: {', '.join(KINDS)}")


def build_external(kind: str, name: str, **kwargs: Any) -> nn.Module:
    """Build `name` from `kind` with random weights (e.g. num_classes=10) and record its source."""
    from slimkit.core.state import set_source

    known = names(kind)
    if name not in known:
        near = [n for n in known if name.lower() in n.lower()][:8]
        raise ModelError(f"{kind} has no model {name!r}" + (f"; similar: {', '.join(near)}" if near else
                                                            f" ({len(known)} known: {kind} list_models)"))
    for key in ("weights", "pretrained", "pretrained_cfg_overlay", "checkpoint_path"):
        if key in kwargs:
            raise ModelError(f"{kind}:{name}: {key!r} would fetch or read weights; slimkit builds random weights "
                             "(load trained ones with --weights / load_weights)")
    try:
        if kind == "torchvision":
            model = import_torchvision().models.get_model(name, weights=None, **kwargs)
        else:
            model = _timm().create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError) as err:
        raise ModelError(f"{kind}:{name}: {err}") from None
    return set_source(model, kind, name, kwargs)


def external(ref: str, **kwargs: Any) -> nn.Module:
    """`"torchvision:NAME"`, `"timm:NAME"` or `"hf:TYPE_OR_DIR"` built with random weights (see
    `build_external`, `build_hf`)."""
    kind, sep, name = ref.partition(":")
    if not sep or kind not in KINDS or not name:
        raise ModelError(f"bad model reference {ref!r}; use torchvision:NAME, timm:NAME or hf:TYPE_OR_DIR")
    if kind == "hf":
        return build_hf(name, **kwargs)
    return build_external(kind, name, **kwargs)
