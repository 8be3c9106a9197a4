import os

import pytest
import torch

os.environ.setdefault("SLIMKIT_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_task():
    from slimkit import data

    return data.digits()


@pytest.fixture(scope="session")
def trained_lenet5(digits_task):
    """LeNet-5 trained briefly on digits (shared by tests; do not mutate)."""
    from slimkit import zoo
    from slimkit.core.trainer import TrainConfig, fit

    return fit(zoo.for_task("lenet5", digits_task, seed=0), digits_task, TrainConfig(epochs=8, lr=2e-3), progress=False).model


@pytest.fixture(scope="session")
def trained_mlp(digits_task):
    """LeNet-300-100 trained briefly on digits (shared by tests; do not mutate)."""
    from slimkit import zoo
    from slimkit.core.trainer import TrainConfig, fit

    return fit(zoo.for_task("lenet300_100", digits_task, seed=0), digits_task, TrainConfig(epochs=8, lr=1e-3), progress=False).model
