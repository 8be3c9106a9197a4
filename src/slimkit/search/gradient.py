"""Gradient-based NAS: a weight-sharing supernet with gradient-based path selection (GDAS-style,
Dong & Yang 2019) and a hardware-aware cost penalty (FBNet/ProxylessNAS-style).

For the MBConv space: each stage holds one block per (depth position, operator) where an operator
is a (kernel, expansion, SE) combination. Architecture logits `alpha` per stage choose the operator
and the depth; every training step samples one path with the
hard Gumbel-softmax, so a step costs about one sub-network, and the straight-through gradient
reaches the logits. Weights train on the training split through the shared trainer; the logits take
a step on a validation batch after every weight step (first-order DARTS bilevel scheme), with the
penalty `penalty * relu(expected_cost / budget - 1)` where the expected cost (MACs or table
latency) is differentiable in the logits.

The width multiplier is not relaxed (channel counts differ per width): the supernet uses the
largest width whose cheapest candidate costs at most `width_headroom` of the budget.
"""
from __future__ import annotations

import math
from itertools import product
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.task import Task
from slimkit.core.trainer import TrainConfig, fit, move_batch, resolve_device
from slimkit.errors import ConfigError
from slimkit.search.space import MBConvSpace
from slimkit.search.units import Head, conv_bn_act, mbconv_unit, out_size


class SuperNet(nn.Module):
    """All candidate blocks of an MBConv space at one width, with Gumbel path sampling."""

    def __init__(self, space: MBConvSpace, width: float):
        super().__init__()
        self.space, self.width = space, width
        self.ops = list(product(space.kernels, space.expansions, space.se))
        self.depths = sorted(space.depths)
        spec = space.spec({**space.cheapest(), "width": width})
        size, cin = space.input_size, space.in_channels
        self.stem = conv_bn_act(cin, spec["stem_channels"], 3, 1)
        self.stem_shape = (cin, size, size)
        cin = spec["stem_channels"]
        self.stages = nn.ModuleList()
        self.block_shapes: list[list[tuple]] = []  # [stage][position] -> (key per op, input shape)
        self.block_keys: list[list[list[str]]] = []
        for stage in spec["stages"]:
            positions, keys = nn.ModuleList(), []
            for j in range(max(self.depths)):
                stride = stage["stride"] if j == 0 else 1
                units = [mbconv_unit(cin, stage["channels"], stride, k, e, se, size) for k, e, se in self.ops]
                positions.append(nn.ModuleList(u for _, u, _ in units))
                keys.append([k for k, _, _ in units])
                size, cin = out_size(size, stride), stage["channels"]
            self.stages.append(positions)
            self.block_keys.append(keys)
        self.head = Head(cin, spec["last_channels"], space.num_classes)
        self.head_shape = (cin, size, size)
        n = len(spec["stages"])
        # architecture logits live outside the module's parameters so the weight optimizer skips them
        self.alpha_op = torch.zeros(n, len(self.ops), requires_grad=True)
        self.alpha_depth = torch.zeros(n, len(self.depths), requires_grad=True)
        self.tau = 5.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s, positions in enumerate(self.stages):
            w_op = F.gumbel_softmax(self.alpha_op[s], tau=self.tau, hard=True)
            w_depth = F.gumbel_softmax(self.alpha_depth[s], tau=self.tau, hard=True)
            op, d = int(w_op.argmax()), int(w_depth.argmax())
            for j in range(self.depths[d]):
                x = positions[j][op](x)
            # value 1 (hard sample); the straight-through gradient flows to both logits
            x = x * (w_op[op] * w_depth[d])
        return self.head(x)

    def probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        return F.softmax(self.alpha_op, -1), F.softmax(self.alpha_depth, -1)

    def expected_cost(self, cost_table: list[list[torch.Tensor]], fixed: float) -> torch.Tensor:
        """Expected cost under the current logits: block j of stage s runs when depth > j."""
        p_op, p_depth = self.probabilities()
        device = p_op[0].device  # the logits follow the supernet (CUDA while training there)
        depths = torch.tensor(self.depths, device=device)
        total = torch.tensor(float(fixed), device=device)
        for s in range(len(self.stages)):
            for j, costs in enumerate(cost_table[s]):
                runs = p_depth[s][depths > j].sum()
                total = total + runs * (p_op[s] * costs.to(device)).sum()
        return total

    def decision_probabilities(self) -> dict[str, list[float]]:
        """Per-decision marginal probabilities, in the space's decision format."""
        p_op, p_depth = (t.detach() for t in self.probabilities())
        out: dict[str, list[float]] = {"width": [1.0 if w == self.width else 0.0 for w in self.space.widths]}
        for s in range(len(self.stages)):
            out[f"s{s}.depth"] = [float(p_depth[s][self.depths.index(d)]) for d in self.space.depths]
            for field, values, idx in (("kernel", self.space.kernels, 0), ("expansion", self.space.expansions, 1),
                                       ("se", self.space.se, 2)):
                out[f"s{s}.{field}"] = [float(sum(p_op[s][i] for i, op in enumerate(self.ops) if op[idx] == v))
                                        for v in values]
        return out

    def argmax_choices(self) -> dict[str, Any]:
        """The most likely architecture: argmax operator and depth per stage."""
        p_op, p_depth = self.probabilities()
        choices: dict[str, Any] = {"width": self.width}
        for s in range(len(self.stages)):
            k, e, se = self.ops[int(p_op[s].argmax())]
            choices.update({f"s{s}.depth": self.depths[int(p_depth[s].argmax())], f"s{s}.kernel": k,
                            f"s{s}.expansion": e, f"s{s}.se": se})
        return choices


def _unit_costs(supernet: SuperNet, objective: str, cost_model) -> tuple[list[list[torch.Tensor]], float]:
    """Cost of every candidate block (per stage, position, operator) and of the fixed stem + head."""
    from slimkit.evaluate import count_macs

    def cost(key: str, unit: nn.Module, shape: tuple) -> float:
        if objective == "latency":
            return cost_model.table.scale * cost_model.table.unit_ms(key, unit, shape)
        return float(count_macs(unit, torch.zeros(1, *shape)))

    table = []
    for s, positions in enumerate(supernet.stages):
        rows = []
        for j, blocks in enumerate(positions):
            rows.append(torch.tensor([cost(k, b, _shape_of(k)) for k, b in zip(supernet.block_keys[s][j], blocks)]))
        table.append(rows)
    fixed = cost("stem", supernet.stem, supernet.stem_shape) + cost("head", supernet.head, supernet.head_shape)
    return table, fixed


def _shape_of(key: str) -> tuple[int, ...]:
    import json

    return tuple(json.loads(key)["in"])


def choose_width(space: MBConvSpace, cost_model, objective: str, budget: float | None, headroom: float) -> float:
    """Largest width whose cheapest candidate costs at most `headroom` x budget (no budget: largest)."""
    widths = sorted(space.widths)
    if budget is None:
        return widths[-1]
    for w in reversed(widths):
        if _objective_cost(cost_model.costs(space.spec({**space.cheapest(), "width": w})), objective) <= headroom * budget:
            return w
    return widths[0]


def _objective_cost(costs: dict[str, float], objective: str) -> float:
    return costs["latency_ms"] if objective == "latency" else costs[objective]


def supernet_search(space: MBConvSpace, task: Task, cost_model, *, objective: str = "macs", budget: float | None = None,
                    epochs: int = 3, lr: float = 2e-3, arch_lr: float = 0.05, penalty: float = 2.0,
                    warmup_fraction: float = 0.3, width_headroom: float = 0.5, seed: int = 0,
                    max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a supernet and return {"choices" (argmax, repaired to meet the constraints),
    "probabilities", "width", "expected_cost", "steps"}."""
    if not isinstance(space, MBConvSpace):
        raise ConfigError("the gradient strategy supports the 'mbconv' space; use random, evolution or rl for 'cell'")
    if objective == "params":
        objective = "macs"  # parameters follow MACs closely in this space; MACs is the relaxed cost
    torch.manual_seed(seed)
    width = choose_width(space, cost_model, objective, budget, width_headroom)
    supernet = SuperNet(space, width)
    cost_table, fixed = _unit_costs(supernet, objective, cost_model)
    train_cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, max_steps=max_steps)
    # the logits are not module parameters, so fit's .to(device) does not move them: put them where it trains
    device = resolve_device(train_cfg.device)
    supernet.alpha_op, supernet.alpha_depth = (a.detach().to(device).requires_grad_()
                                               for a in (supernet.alpha_op, supernet.alpha_depth))
    arch_params = [supernet.alpha_op, supernet.alpha_depth]
    arch_opt = torch.optim.Adam(arch_params, lr=arch_lr, betas=(0.5, 0.999))
    val_iter = iter(())
    total = max_steps or epochs * len(task.loader("train"))
    warmup = int(warmup_fraction * total)

    def arch_step(model: nn.Module, step: int) -> None:
        nonlocal val_iter
        # linear temperature decay 5 -> 0.5 makes late samples follow the logits closely
        supernet.tau = 5.0 - 4.5 * min(1.0, step / max(total, 1))
        if step <= warmup:
            return
        try:
            x, y = next(val_iter)
        except StopIteration:
            val_iter = iter(task.loader("val", shuffle=True, seed=step))
            x, y = next(val_iter)
        x, y = move_batch((x, y), supernet.alpha_op.device)
        arch_opt.zero_grad()
        loss = task.loss(supernet(x), y)
        if budget is not None:
            loss = loss + penalty * F.relu(supernet.expected_cost(cost_table, fixed) / budget - 1.0)
        loss.backward()
        arch_opt.step()

    fit(supernet, task, train_cfg, on_step=arch_step,
        description="supernet", progress=progress, in_place=True, unused_parameters=True)
    choices = repair(space, supernet, cost_model, supernet.argmax_choices(), cost_table, fixed)
    return {"choices": choices, "probabilities": supernet.decision_probabilities(), "width": width,
            "expected_cost": float(supernet.expected_cost(cost_table, fixed).detach()), "steps": total}


def table_cost(supernet: SuperNet, cost_table: list[list[torch.Tensor]], fixed: float, choices: dict[str, Any]) -> float:
    """Cost of an architecture at the supernet's width from the per-block table (additive, no build)."""
    total = fixed
    for s in range(len(supernet.stages)):
        op = supernet.ops.index((choices[f"s{s}.kernel"], choices[f"s{s}.expansion"], choices[f"s{s}.se"]))
        total += sum(float(cost_table[s][j][op]) for j in range(int(choices[f"s{s}.depth"])))
    return total


def repair(space: MBConvSpace, supernet: SuperNet, cost_model, choices: dict[str, Any],
           cost_table: list[list[torch.Tensor]], fixed: float) -> dict[str, Any]:
    """Make `choices` feasible: while a constraint is broken, take the cheaper single-decision change
    that loses the least log-probability per unit of (table) cost saved."""
    probs = supernet.decision_probabilities()
    for _ in range(200):
        if cost_model.feasible(space.spec(choices)):
            return choices
        here = table_cost(supernet, cost_table, fixed, choices)
        best, best_score = None, None
        for d in space.decisions():
            if d.name == "width":
                continue
            for v in d.choices:
                if v == choices[d.name]:
                    continue
                cand = {**choices, d.name: v}
                saved = here - table_cost(supernet, cost_table, fixed, cand)
                if saved <= 0:
                    continue
                p_old = probs[d.name][d.choices.index(choices[d.name])]
                p_new = probs[d.name][d.choices.index(v)]
                score = (math.log(p_old + 1e-9) - math.log(p_new + 1e-9)) / saved
                if best_score is None or score < best_score:
                    best, best_score = cand, score
        if best is None:
            break
        choices = best
    if not cost_model.feasible(space.spec(choices)):
        choices = dict(space.cheapest())  # the space check guarantees the cheapest is feasible
    return choices
