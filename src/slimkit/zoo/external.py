"""Models from torchvision and timm by name, random weights, never downloaded.

    model = slimkit.zoo.external("torchvision:resnet18", num_classes=10)
    model = slimkit.zoo.external("timm:mobilenetv4_conv_small", num_classes=10)
    # CLI: slimkit quantize torchvision:resnet18 --data ...   (any command taking a model reference)

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

KINDS = ("torchvision", "timm")


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
    """`"torchvision:NAME"` or `"timm:NAME"` built with random weights (see `build_external`)."""
    kind, sep, name = ref.partition(":")
    if not sep or kind not in KINDS or not name:
        raise ModelError(f"bad model reference {ref!r}; use torchvision:NAME or timm:NAME")
    return build_external(kind, name, **kwargs)
