"""Shared machinery: configs, registry, selector, task, trainer, model state."""

from slimkit.core.compat import ensure_torchvision_importable as _ensure_torchvision_importable

_ensure_torchvision_importable()  # before any library in the process imports torchvision (core/compat.py)
