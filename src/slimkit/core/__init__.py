"""Shared machinery: configs, registry, selector, task, trainer, model state."""
