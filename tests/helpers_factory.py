"""A user-defined architecture for factory save/load tests (importable as tests.helpers_factory)."""
import torch.nn as nn


def tiny_net(hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
