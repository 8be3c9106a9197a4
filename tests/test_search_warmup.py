"""The REINFORCE controller's weight-sharing warm-up: elastic blocks share weights the way they claim,
the one-shot net learns, the warm-up's policy is stored in the study and every worker starts from it."""
import optuna
import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.search.cost import Constraints, CostModel
from slimkit.search.nas import NASConfig, open_storage, search
from slimkit.search.space import MBConvSpace
from slimkit.search.strategies import ReinforceStrategy, load_state
from slimkit.search import warmup
from slimkit.search.warmup import ElasticMBConv, _penalty, _val_batch, controller_warmup, train_one_shot

TINY_SPACE = {"widths": [0.5, 1.0], "depths": [1, 2], "kernels": [3, 5], "expansions": [1, 3], "se": [False, True]}


@pytest.fixture(autouse=True)
def one_thread():
    from slimkit.evaluate.latency import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def small_digits():
    from slimkit import data

    return data.digits(size=8)


def test_elastic_block_smaller_kernel_is_the_centre_and_expansion_the_first_channels():
    torch.manual_seed(0)
    block = ElasticMBConv(8, 8, 1, kernels=[3, 5], expansions=[1, 3, 6], se=True)
    x = torch.randn(4, 8, 6, 6)
    k3, k5 = block(x, 3, 3, False), block(x, 5, 3, False)
    with torch.no_grad():  # change only the outer ring of the 5x5 depthwise kernels
        ring = torch.ones_like(block.depthwise.weight)
        ring[:, :, 1:4, 1:4] = 0
        block.depthwise.weight.add_(ring)
    assert torch.allclose(block(x, 3, 3, False), k3, atol=1e-6)
    assert not torch.allclose(block(x, 5, 3, False), k5, atol=1e-3)
    e3 = block(x, 5, 3, True)
    with torch.no_grad():  # hidden channels beyond 3 x 8 belong to expansion 6 only
        block.expand.weight[24:].add_(1.0)
    assert torch.allclose(block(x, 5, 3, True), e3, atol=1e-6)
    assert block(x, 3, 6, True).shape == (4, 8, 6, 6)


def test_one_shot_net_learns_and_scores_sub_networks(small_digits):
    space = MBConvSpace.for_task(small_digits, **TINY_SPACE)
    net = train_one_shot(space, small_digits, 1.0, epochs=8, lr=1e-2, progress=False)
    x, y = _val_batch(small_digits)
    with torch.no_grad():
        accs = [float((net(x, net.random_choices()).argmax(1) == y).float().mean()) for _ in range(6)]
    assert min(accs) > 0.4  # 10 classes: chance is 0.1; every sampled sub-network learned from the shared weights
    biggest = {d.name: d.choices[-1] for d in net.decisions}
    assert net(x[:5], biggest).shape == (5, 10)


def test_penalty_is_limit_over_value_for_each_broken_limit():
    limits = Constraints(max_macs=100, max_params=50)
    assert _penalty({"macs": 80, "params": 40}, limits) == 1.0
    assert _penalty({"macs": 200, "params": 40}, limits) == pytest.approx(0.5)
    assert _penalty({"macs": 200, "params": 100}, limits) == pytest.approx(0.25)


def test_warmup_raises_the_reward_and_its_state_loads_into_a_controller(small_digits):
    space = MBConvSpace.for_task(small_digits, **TINY_SPACE)
    cost = CostModel(Constraints())
    out = controller_warmup(space, small_digits, cost, samples=96, batch=16, lr=0.05, epochs=3, lr_train=1e-2,
                            within_width=False, progress=False)
    assert out["samples"] == 96 and out["widths"] == [0.5, 1.0]
    assert out["reward_last"] > out["reward_first"]
    a = ReinforceStrategy(space.decisions(), lambda c: True, initial_state=out["state"])
    b = ReinforceStrategy(space.decisions(), lambda c: True, seed=5)
    load_state(b.controller, out["state"])
    assert a.probabilities() == b.probabilities()
    assert max(a.probabilities()["width"]) > 0.5  # the policy moved from uniform
    other = MBConvSpace.for_task(small_digits, **{**TINY_SPACE, "kernels": [3, 5, 7]})
    with pytest.raises(ConfigError, match="does not fit"):
        ReinforceStrategy(other.decisions(), lambda c: True, initial_state=out["state"])


def test_within_width_rewards_teach_choices_inside_a_width_not_which_width(small_digits, monkeypatch):
    # one-shot nets of different widths are trained apart: a large width offset in their scores says
    # little about real accuracy, a kernel effect inside each width does
    space = MBConvSpace.for_task(small_digits, **TINY_SPACE)
    monkeypatch.setattr(warmup, "train_one_shot", lambda *a, **k: None)
    monkeypatch.setattr(warmup, "_reward", lambda nets, c, *a: 0.3 + 0.5 * (c["width"] == 1.0)
                        + 0.1 * (c["s0.kernel"] == 5))

    def policy(within: bool) -> dict:
        out = controller_warmup(space, small_digits, CostModel(Constraints()), samples=320, batch=16, lr=0.05,
                                within_width=within, progress=False)
        return ReinforceStrategy(space.decisions(), lambda c: True, initial_state=out["state"]).probabilities()

    across, within = policy(False), policy(True)
    assert across["width"][1] > 0.9  # the offset alone decides the width
    assert max(within["width"]) < 0.8
    assert within["s0.kernel"][1] > 0.7  # the kernel effect is still learned


def test_warmup_drops_widths_that_cannot_meet_the_budget(small_digits):
    space = MBConvSpace.for_task(small_digits, **TINY_SPACE)
    cheapest_wide = CostModel().costs(space.spec({**space.cheapest(), "width": 1.0}))["macs"]
    cost = CostModel(Constraints(max_macs=cheapest_wide - 1))
    out = controller_warmup(space, small_digits, cost, samples=32, batch=16, epochs=1, max_steps=2, progress=False)
    assert out["widths"] == [0.5]


def test_rl_search_stores_the_warmed_up_controller_and_resumes_from_it(small_digits, tmp_path):
    cfg = NASConfig(strategy="rl", space_options=TINY_SPACE, trials=3, epochs=1, max_steps=2, train_fraction=0.3,
                    finalists=0, controller_warmup=32, oneshot_epochs=1, oneshot_lr=1e-2, supernet_max_steps=3)
    result = search(small_digits, cfg, out_dir=tmp_path, progress=False)
    study = optuna.load_study(study_name=result.study_name, storage=open_storage(result.storage))
    warm = study.user_attrs["controller"]
    assert warm["samples"] == 32 and "state" in warm
    assert result.info["controller_warmup"]["samples"] == 32 and "state" not in result.info["controller_warmup"]
    assert "warm-up" in (tmp_path / "report.md").read_text()
    # resuming with more trials reuses the stored policy: no second warm-up
    again = search(small_digits, cfg.model_copy(update={"trials": 4}), out_dir=tmp_path, progress=False)
    assert optuna.load_study(study_name=again.study_name, storage=open_storage(again.storage)).user_attrs[
        "controller"]["state"] == warm["state"]
    assert len([r for r in again.rows if r["state"] == "COMPLETE"]) == 4


def test_controller_warmup_needs_the_mbconv_space():
    with pytest.raises(ConfigError, match="mbconv"):
        NASConfig(strategy="rl", space="cell", controller_warmup=16).warmup_samples()
    assert NASConfig(strategy="rl", space="cell").warmup_samples() == 0
    assert NASConfig(strategy="rl").warmup_samples() == 1024
    assert NASConfig(strategy="evolution", controller_warmup=16).warmup_samples() == 0
