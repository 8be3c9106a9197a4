"""Compatibility with the environment slimkit runs in.

`ensure_torchvision_importable`: the torchvision wheel the package index serves for torch 2.13.0 is built
against the CUDA torch; beside the CPU build its compiled extension does not load, and `import torchvision`
then fails ("operator torchvision::nms does not exist"). See `slimkit.zoo.external`.
"""
from __future__ import annotations

import sys

_SHIM: list = []  # keeps the torch.library.Library that declares the operator schemas alive


def ensure_torchvision_importable() -> None:
    """If torchvision is installed and its compiled extension does not load beside this torch (this module's
    docstring), declare the schemas of the operators torchvision registers unconditionally (nms, qnms), so
    that `import torchvision` (by slimkit, timm or any other library) works. Cheap (a `dlopen`); called
    when slimkit.core is imported; does nothing once torchvision is imported or where the extension loads."""
    import importlib.util
    from pathlib import Path

    import torch

    if _SHIM or "torchvision" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None:
        return
    extension = next(Path(spec.origin).parent.glob("_C*.so"), None)
    if extension is not None:
        try:
            torch.ops.load_library(str(extension))  # what torchvision's own import does first
            return
        except OSError:
            pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM.append(lib)
