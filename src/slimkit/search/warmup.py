"""Weight-sharing warm-up of the REINFORCE controller (ENAS, Pham et al. 2018).

A controller trained only on proxy-trained trials gets one policy step per few trials: with a few
dozen trials it learns little and samples about like random search. Before the first trial, the
warm-up gives it many cheap rewards instead: one weight-sharing supernet per feasible width is trained
once with uniformly sampled paths (single-path one-shot, Guo et al. 2019), and each architecture the
controller samples is scored by its sub-network's accuracy on the validation split, with no training
of its own. The controller then starts the real trials from that policy, and keeps learning from them.

Widths are compared by the real trials only: inside the warm-up each width's rewards are centred on a
common level (the one-shot nets of different widths are trained apart). The reward of a sampled
architecture that breaks a hard limit is its accuracy times limit / value for
each broken limit (MnasNet's hard-constraint reward), so the policy learns where the budget ends
without jumping to the cheapest models. The result (the controller's weights, JSON-serializable) is
stored in the study, so every worker starts from the same policy.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.task import Task
from slimkit.errors import ConfigError
from slimkit.evaluate.latency import torch_threads
from slimkit.search.space import MBConvSpace
from slimkit.search.units import Head, conv_bn_act


class ElasticMBConv(nn.Module):
    """One MBConv block that holds every (kernel, expansion, SE) choice of its position in shared
    weights (Once-for-All style): smaller kernels are the centre of the largest, smaller expansions the
    first hidden channels. Batch norm always uses batch statistics, so no running statistics of one
    sub-network leak into another."""

    def __init__(self, cin: int, cout: int, stride: int, kernels: list[int], expansions: list[int], se: bool):
        super().__init__()
        hidden, k = cin * max(expansions), max(kernels)
        self.cin, self.cout, self.stride = cin, cout, stride
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(hidden)
        self.se_reduce = nn.Conv2d(hidden, max(4, cin // 4), 1) if se else None
        self.se_expand = nn.Conv2d(max(4, cin // 4), hidden, 1) if se else None
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout)

    @staticmethod
    def _bn(x: torch.Tensor, bn: nn.BatchNorm2d, n: int) -> torch.Tensor:
        return F.batch_norm(x, None, None, bn.weight[:n], bn.bias[:n], training=True, eps=bn.eps)

    def forward(self, x: torch.Tensor, kernel: int, expansion: int, se: bool) -> torch.Tensor:
        h = self.cin * expansion
        y = x
        if expansion != 1:
            y = F.relu6(self._bn(F.conv2d(x, self.expand.weight[:h]), self.expand_bn, h))
        full = self.depthwise.kernel_size[0]
        lo = (full - kernel) // 2
        weight = self.depthwise.weight[:h, :, lo:lo + kernel, lo:lo + kernel]
        y = F.relu6(self._bn(F.conv2d(y, weight, None, self.stride, kernel // 2, groups=h), self.depthwise_bn, h))
        if se and self.se_reduce is not None:
            g = F.relu(F.conv2d(y.mean((2, 3), keepdim=True), self.se_reduce.weight[:, :h], self.se_reduce.bias))
            y = y * F.hardsigmoid(F.conv2d(g, self.se_expand.weight[:h], self.se_expand.bias[:h]))
        y = self._bn(F.conv2d(y, self.project.weight[:, :h]), self.project_bn, self.cout)
        return x + y if self.stride == 1 and self.cin == self.cout else y


class OneShotNet(nn.Module):
    """Every architecture of an MBConv space at one width, in shared weights: one elastic block per
    (stage, depth position). `forward(x, choices)` runs that sub-network; without choices, a uniformly
    random one (how it is trained: single-path one-shot, Guo et al. 2019)."""

    def __init__(self, space: MBConvSpace, width: float, seed: int = 0):
        super().__init__()
        self.space, self.width = space, width
        spec = space.spec({**space.cheapest(), "width": width})
        cin = spec["stem_channels"]
        self.stem = conv_bn_act(space.in_channels, cin, 3, 1)
        self.stages = nn.ModuleList()
        for stage in spec["stages"]:
            blocks = nn.ModuleList()
            for j in range(max(space.depths)):
                blocks.append(ElasticMBConv(cin, stage["channels"], stage["stride"] if j == 0 else 1,
                                            space.kernels, space.expansions, True in space.se))
                cin = stage["channels"]
            self.stages.append(blocks)
        self.head = Head(cin, spec["last_channels"], space.num_classes)
        for m in (*self.stem.modules(), *self.head.modules()):  # batch statistics in the shared stem and head too
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
        self.decisions = [d for d in space.decisions() if d.name != "width"]
        self.generator = torch.Generator().manual_seed(seed)

    def random_choices(self) -> dict[str, Any]:
        return {d.name: d.choices[int(torch.randint(len(d.choices), (1,), generator=self.generator))]
                for d in self.decisions}

    def forward(self, x: torch.Tensor, choices: dict[str, Any] | None = None) -> torch.Tensor:
        choices = choices or self.random_choices()
        x = self.stem(x)
        for s, blocks in enumerate(self.stages):
            for j in range(int(choices[f"s{s}.depth"])):
                x = blocks[j](x, int(choices[f"s{s}.kernel"]), int(choices[f"s{s}.expansion"]), bool(choices[f"s{s}.se"]))
        return self.head(x)


def train_one_shot(space: MBConvSpace, task: Task, width: float, *, epochs: int = 20, lr: float = 2e-3,
                   seed: int = 0, max_steps: int | None = None, progress: bool = True) -> OneShotNet:
    """A one-shot network at `width`, trained with one uniformly sampled sub-network per step."""
    from slimkit.core.trainer import TrainConfig, fit

    torch.manual_seed(seed)
    net = OneShotNet(space, width, seed)
    fit(net, task, TrainConfig(epochs=epochs, lr=lr, seed=seed, max_steps=max_steps),
        description=f"one-shot net (width {width:g})", progress=progress, in_place=True)
    return net


def _val_batch(task: Task, max_samples: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_samples` of the validation split as one batch (each reward is one forward pass)."""
    xs, ys = zip(*task.loader("val"))
    return torch.cat(xs)[:max_samples], torch.cat(ys)[:max_samples]


def _penalty(costs: dict[str, float], constraints) -> float:
    """Product of limit / value over the broken hard limits (1.0 when all are met)."""
    factor = 1.0
    for key, limit in (("macs", constraints.max_macs), ("params", constraints.max_params),
                       ("latency_ms", constraints.max_latency_ms)):
        if limit is not None and costs.get(key, 0.0) > limit:
            factor *= limit / costs[key]
    return factor


def controller_warmup(space: MBConvSpace, task: Task, cost_model, *, samples: int = 1024, batch: int = 16,
                      lr: float = 0.02, epochs: int = 20, max_steps: int | None = None, seed: int = 0,
                      lr_train: float = 2e-3, entropy_weight: float = 0.05, within_width: bool = True,
                      objective: str = "macs", cost_weight: float = 0.0, progress: bool = True) -> dict[str, Any]:
    """Train one-shot nets, then the controller on `samples` architectures they score.

    `entropy_weight` (5x the real phase's) keeps the policy diverse: on the digits space, 40 draws from
    the warmed-up policy gave 40 distinct architectures (27 at 0.01), at a mean one-shot reward of 0.72
    (0.74 at 0.01; 0.68 at 0.1).

    `within_width` (default): each width's rewards are centred on a common level (a moving average per
    width) before the policy step, so the controller learns which kernels, depths, expansions and SE
    suit each width but not which width to use: the one-shot nets of different widths are trained
    apart and their scores are not comparable across widths (on digits the warm-up without it put 99%
    on width 0.75, while the most accurate architectures proxy training finds are width 1.0). The
    real trials then learn the width from real rewards.

    Returns {"state" (controller weights as {name: {"shape", "values"}}), "widths", "samples",
    "reward_first", "reward_last" (mean reward of the first and last batches), "seconds"}.
    """
    from slimkit.core.progress import progress_bar
    from slimkit.search.strategies import ReinforceStrategy

    if not isinstance(space, MBConvSpace):
        raise ConfigError("the controller warm-up needs the 'mbconv' space (its one-shot net); "
                          "set controller_warmup=0 for the 'cell' space")
    t0 = time.perf_counter()
    widths = [w for w in space.widths if cost_model.feasible(space.spec({**space.cheapest(), "width": w}))]
    nets = {w: train_one_shot(space, task, w, epochs=epochs, lr=lr_train, seed=seed, max_steps=max_steps,
                              progress=progress) for w in widths}
    x, y = _val_batch(task)
    decisions = space.decisions()
    strategy = ReinforceStrategy(decisions, lambda choices: True, lr=lr, batch=batch, seed=seed,
                                 entropy_weight=entropy_weight)
    gen = torch.Generator().manual_seed(seed)
    means: list[float] = []
    level: dict[float, float] = {}  # moving average of each width's rewards
    steps = max(1, samples // batch)
    silent = nullcontext(lambda n=1, **fields: None)
    with torch_threads(1), progress_bar("controller warm-up", steps) if progress else silent as advance:
        for _ in range(steps):
            pairs = []
            for _ in range(batch):
                with torch.no_grad():
                    indices, _, _ = strategy.controller(generator=gen)
                choices = {d.name: d.choices[k] for d, k in zip(decisions, indices)}
                pairs.append((choices, _reward(nets, choices, x, y, space, cost_model, objective, cost_weight)))
            means.append(sum(r for _, r in pairs) / len(pairs))
            if within_width:  # centre each width's rewards on a common level: no push across widths
                for choices, r in pairs:
                    w = choices["width"]
                    level[w] = r if w not in level else 0.9 * level[w] + 0.1 * r
                common = sum(level.values()) / len(level)
                pairs = [(c, r - level[c["width"]] + common) for c, r in pairs]
            strategy.update(pairs)
            advance(1, reward=means[-1])
    state = {name: {"shape": list(t.shape), "values": [round(float(v), 6) for v in t.flatten()]}
             for name, t in strategy.controller.state_dict().items()}
    return {"state": state, "widths": widths, "samples": steps * batch, "reward_first": round(means[0], 4),
            "reward_last": round(means[-1], 4), "seconds": round(time.perf_counter() - t0, 2)}


def _reward(nets: dict[float, OneShotNet], choices: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
            space: MBConvSpace, cost_model, objective: str = "macs", cost_weight: float = 0.0) -> float:
    net = nets.get(choices["width"])
    if net is None:  # even the cheapest candidate at this width breaks a limit
        return 0.0
    with torch.no_grad():
        acc = float((net(x, choices).argmax(1) == y).float().mean())
    costs = cost_model.costs(space.spec(choices))
    return cost_model.constraints.reward(acc * _penalty(costs, cost_model.constraints), costs, objective, cost_weight)
