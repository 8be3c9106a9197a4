"""Search strategies as Optuna samplers, so every strategy runs on one engine with shared storage.

* `RandomStrategy`     uniform over the space (the baseline every NAS method must beat).
* `EvolutionStrategy`  regularized (aging) evolution (Real et al. 2019): tournament selection in
                       the most recent `population` completed trials, one-decision mutations.
* `ReinforceStrategy`  an LSTM controller trained with REINFORCE (Zoph & Le 2017, NASNet-style),
                       reward = validation accuracy, moving-average baseline, batched steps with
                       advantages scaled by the rewards' spread, bounded logits (ENAS); it can
                       start from a policy warmed up on a one-shot net (`slimkit.search.warmup`).
* `GradientStrategy`   samples from architecture weights learned by the gradient-based supernet
                       (`slimkit.search.gradient`); its first trial is their argmax.

Each sampler proposes a full architecture in `sample_relative` and rejects candidates that break a
hard constraint (so no trial is spent on an infeasible model) or that an earlier or running trial
already evaluates (`dedup`, on by default: with a few dozen trials, a repeat is a trial not spent on
a new candidate, and repeats of one architecture let its luckiest run win; a repeat is accepted only
when the strategy proposes nothing new in `max_tries` draws, e.g. in a space smaller than the trials).
State lives in the study: a sampler rebuilds what it needs from the completed trials, so several
workers (processes or machines) on one storage share it, and a resumed search continues where it
stopped. Draws are seeded by (seed, trial number), so a trial's proposal does not depend on which
worker ran it.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import optuna
import torch
import torch.nn as nn
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from slimkit.errors import ConfigError, InfeasibleError
from slimkit.evaluate.latency import torch_threads
from slimkit.search.space import Decision

STRATEGIES = ("random", "evolution", "rl", "gradient")


class NASSampler(optuna.samplers.BaseSampler):
    """Base: proposes whole architectures; `feasible(choices) -> bool` enforces hard constraints."""

    name = "base"

    def __init__(self, decisions: list[Decision], feasible: Callable[[dict[str, Any]], bool], *, seed: int = 0,
                 max_tries: int = 500, dedup: bool = True):
        if not decisions:
            raise ConfigError("the search space has no decisions")
        self.decisions = decisions
        self.feasible = feasible
        self.seed = seed
        self.max_tries = max_tries
        self.dedup = dedup
        self.rejected = 0  # infeasible proposals skipped (reported, so a tight budget is visible)
        self.repeats = 0  # proposals skipped because a trial already evaluates that architecture

    # -- optuna interface -------------------------------------------------------------
    def infer_relative_search_space(self, study, trial) -> dict[str, CategoricalDistribution]:
        return {d.name: CategoricalDistribution(list(d.choices)) for d in self.decisions}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        if not search_space:
            return {}
        rng = np.random.default_rng([self.seed, trial.number])
        live = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        history = [t for t in live if t.state == TrialState.COMPLETE and t.values
                   and all(d.name in t.params for d in self.decisions)]
        history.sort(key=lambda t: t.number)
        self.observe(history)
        seen = {self._key(t.params) for t in live if t.number != trial.number} if self.dedup else set()
        repeat = None
        for _ in range(self.max_tries):
            choices = self.propose(history, rng)
            if not self.feasible(choices):
                self.rejected += 1
            elif self._key(choices) in seen:
                self.repeats += 1
                repeat = choices
            else:
                return choices
        if repeat is not None:  # nothing new in max_tries draws: a repeat beats no trial
            return repeat
        raise InfeasibleError(f"{self.name}: {self.max_tries} proposals in a row broke the constraints; "
                              "the feasible part of the space is too small for this strategy (relax the limits)")

    def _key(self, params: dict[str, Any]) -> tuple:
        return tuple(params.get(d.name) for d in self.decisions)

    def sample_independent(self, study, trial, param_name, param_distribution):
        # only reached for parameters outside the architecture (none today): uniform
        rng = np.random.default_rng([self.seed, trial.number, len(param_name)])
        return param_distribution.choices[int(rng.integers(len(param_distribution.choices)))]

    # -- strategy interface -----------------------------------------------------------
    def observe(self, history: list[FrozenTrial]) -> None:
        """Learn from completed trials (sorted by number); called before each proposal."""

    def propose(self, history: list[FrozenTrial], rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def random_choices(self, rng: np.random.Generator) -> dict[str, Any]:
        return {d.name: d.choices[int(rng.integers(len(d.choices)))] for d in self.decisions}


class RandomStrategy(NASSampler):
    """Uniform random search over the feasible part of the space."""

    name = "random"

    def propose(self, history, rng):
        return self.random_choices(rng)


class EvolutionStrategy(NASSampler):
    """Regularized (aging) evolution: the population is the `population` most recently completed
    trials; each child mutates one decision of the most accurate of `sample_size` random members.
    Until `population` trials are complete, proposals are random (the initial population)."""

    name = "evolution"

    def __init__(self, decisions, feasible, *, population: int = 10, sample_size: int = 3, **kw):
        super().__init__(decisions, feasible, **kw)
        if population < 2 or not 1 <= sample_size <= population:
            raise ConfigError(f"evolution needs population >= 2 and 1 <= sample_size <= population "
                              f"(got population={population}, sample_size={sample_size})")
        self.population, self.sample_size = population, sample_size

    def propose(self, history, rng):
        if len(history) < self.population:
            return self.random_choices(rng)
        # aging: the oldest members die, whatever their accuracy
        members = sorted(history, key=lambda t: (t.datetime_complete, t.number))[-self.population:]
        picks = rng.choice(len(members), size=self.sample_size, replace=False)
        parent = max((members[i] for i in picks), key=lambda t: (t.values[0], -t.number))
        child = dict(parent.params)
        mutable = [d for d in self.decisions if len(d.choices) > 1]
        if mutable:
            d = mutable[int(rng.integers(len(mutable)))]
            others = [c for c in d.choices if c != child[d.name]]
            child[d.name] = others[int(rng.integers(len(others)))]
        return child


class Controller(nn.Module):
    """NASNet-style controller: an LSTM emits one decision per step; the embedding of each choice
    is the next step's input. Logits are squashed to [-`tanh_constant`, `tanh_constant`] (as in ENAS),
    so no choice's probability collapses to zero on a few lucky rewards."""

    def __init__(self, decisions: list[Decision], hidden: int = 32, tanh_constant: float = 2.5):
        super().__init__()
        self.sizes = [len(d.choices) for d in decisions]
        self.tanh_constant = tanh_constant
        self.start = nn.Parameter(torch.zeros(1, hidden))
        self.cell = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.sizes)
        self.embeds = nn.ModuleList(nn.Embedding(n, hidden) for n in self.sizes)

    def log_probs(self, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
        c = self.tanh_constant
        return torch.log_softmax(c * torch.tanh(head(h)[0] / c), dim=-1)

    def forward(self, indices: list[int] | None = None, generator: torch.Generator | None = None):
        """Sample (indices None) or score given indices; returns (indices, log-prob, entropy)."""
        h = c = torch.zeros(1, self.start.shape[1])
        x = self.start
        out, logp, entropy = [], torch.zeros(()), torch.zeros(())
        for i, (head, embed) in enumerate(zip(self.heads, self.embeds)):
            h, c = self.cell(x, (h, c))
            log_probs = self.log_probs(head, h)
            if indices is None:
                k = int(torch.multinomial(log_probs.exp().detach(), 1, generator=generator))
            else:
                k = indices[i]
            out.append(k)
            logp = logp + log_probs[k]
            entropy = entropy - (log_probs.exp() * log_probs).sum()
            x = embed(torch.tensor([k]))
        return out, logp, entropy


class ReinforceStrategy(NASSampler):
    """REINFORCE on an LSTM controller. Completed trials (any worker's, in trial order) are taken in
    batches of `batch`: one policy-gradient step per batch, each architecture weighted by its advantage.
    advantage="spread": (reward - moving-average baseline) divided by the spread of the rewards seen so
    far, so a step's size follows how much better an architecture was than its peers, not the scale of
    the metric. advantage="rank": the reward's rank among all rewards seen so far, centred and scaled to
    unit spread (fitness shaping, as in natural evolution strategies): a few very poor trials (a width
    that trains badly) then cannot shrink the differences between the good ones, which decide the
    search. `cost_weight` > 0 (with `constraints` and `objective`): the controller's reward is the
    trial's accuracy minus cost_weight * |cost / limit - 1| (TuNAS's absolute reward), so the policy
    learns to spend the budget; the trials' own values (and the choice of the result) stay accuracy.
    Trials sampled by an older policy are used as they are (a small off-policy error, the price
    of many workers)."""

    name = "rl"

    def __init__(self, decisions, feasible, *, lr: float = 0.02, batch: int = 4, baseline_decay: float = 0.8,
                 entropy_weight: float = 0.01, hidden: int = 32, initial_state: dict | None = None,
                 advantage: str = "spread", cost_weight: float = 0.0, constraints=None, objective: str = "macs",
                 **kw):
        super().__init__(decisions, feasible, **kw)
        if batch < 1:
            raise ConfigError(f"rl: batch must be >= 1, got {batch}")
        if advantage not in ("spread", "rank"):
            raise ConfigError(f"rl: advantage must be 'spread' or 'rank', got {advantage!r}")
        self.advantage = advantage
        self.cost_weight, self.constraints, self.objective = cost_weight, constraints, objective
        torch.manual_seed(self.seed)
        self.controller = Controller(decisions, hidden)
        if initial_state is not None:  # a warmed-up policy (`slimkit.search.warmup`)
            load_state(self.controller, initial_state)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=lr)
        self.batch = batch
        self.baseline: float | None = None
        self.baseline_decay, self.entropy_weight = baseline_decay, entropy_weight
        self.rewards: list[float] = []
        self.pending: list[tuple[dict[str, Any], float]] = []
        self.seen: set[int] = set()

    def _indices(self, params: dict[str, Any]) -> list[int]:
        return [d.choices.index(params[d.name]) for d in self.decisions]

    def update(self, batch: list[tuple[dict[str, Any], float]]) -> list[float]:
        """One REINFORCE step on a batch of (architecture, reward); returns the advantages."""
        rewards = [r for _, r in batch]
        self.rewards += rewards
        mean = sum(rewards) / len(rewards)
        if self.baseline is None:
            self.baseline = mean
        if self.advantage == "rank":  # centred rank among every reward so far; uniform ranks have spread 1/sqrt(12)
            seen = np.asarray(self.rewards)
            ranks = [(np.sum(seen < r) + 0.5 * np.sum(seen == r)) / len(seen) for r in rewards]
            advantages = [(q - 0.5) * np.sqrt(12.0) for q in ranks]
        else:
            spread = float(np.std(self.rewards)) if len(self.rewards) > 1 else 0.0
            scale = spread if spread > 1e-8 else 1.0
            advantages = [(r - self.baseline) / scale for r in rewards]
        loss = torch.zeros(())
        for (params, _), adv in zip(batch, advantages):
            _, logp, entropy = self.controller(self._indices(params))
            loss = loss - adv * logp - self.entropy_weight * entropy
        self.optimizer.zero_grad()
        (loss / len(batch)).backward()
        self.optimizer.step()
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * mean
        return advantages

    def observe(self, history):
        # the controller's ops are tiny: one thread avoids thread hand-offs that cost more than the math
        with torch_threads(1):
            for t in history:
                if t.number not in self.seen:
                    self.seen.add(t.number)
                    reward = float(t.values[0])
                    if self.constraints is not None:
                        reward = self.constraints.reward(reward, t.user_attrs.get("costs", {}), self.objective,
                                                         self.cost_weight)
                    self.pending.append((t.params, reward))
                    if len(self.pending) == self.batch:
                        self.update(self.pending)
                        self.pending = []

    def propose(self, history, rng):
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        with torch.no_grad(), torch_threads(1):
            indices, _, _ = self.controller(generator=gen)
        return {d.name: d.choices[k] for d, k in zip(self.decisions, indices)}

    def probabilities(self) -> dict[str, list[float]]:
        """The controller's greedy-path choice probabilities (for reports)."""
        with torch.no_grad():
            h = c = torch.zeros(1, self.controller.start.shape[1])
            x = self.controller.start
            out = {}
            for d, head, embed in zip(self.decisions, self.controller.heads, self.controller.embeds):
                h, c = self.controller.cell(x, (h, c))
                p = self.controller.log_probs(head, h).exp()
                out[d.name] = [round(float(v), 4) for v in p]
                x = embed(p.argmax().view(1))
        return out


class GradientStrategy(NASSampler):
    """Samples from the architecture distribution a gradient-based supernet learned
    (`probabilities`: decision name -> choice probabilities). The argmax architecture itself is
    enqueued as a fixed trial by `slimkit.search.nas`, so it is evaluated exactly once."""

    name = "gradient"

    def __init__(self, decisions, feasible, *, probabilities: dict[str, list[float]], **kw):
        super().__init__(decisions, feasible, **kw)
        missing = [d.name for d in decisions if d.name not in probabilities]
        if missing:
            raise ConfigError(f"gradient strategy: the supernet gave no probabilities for {missing}")
        self.probabilities = probabilities

    def propose(self, history, rng):
        out = {}
        for d in self.decisions:
            p = np.asarray(self.probabilities[d.name], dtype=float)
            out[d.name] = d.choices[int(rng.choice(len(d.choices), p=p / p.sum()))]
        return out


def make_sampler(strategy: str, decisions: list[Decision], feasible, *, seed: int = 0, **options: Any) -> NASSampler:
    """The sampler for `strategy` ('random', 'evolution', 'rl' or 'gradient')."""
    classes = {"random": RandomStrategy, "evolution": EvolutionStrategy, "rl": ReinforceStrategy,
               "gradient": GradientStrategy}
    if strategy not in classes:
        raise ConfigError(f"unknown search strategy {strategy!r}; use one of: {', '.join(STRATEGIES)}")
    return classes[strategy](decisions, feasible, seed=seed, **options)


def load_state(controller: torch.nn.Module, state: dict[str, dict[str, Any]]) -> None:
    """Load weights saved by `controller_warmup` into a controller of the same space."""
    tensors = {name: torch.tensor(v["values"], dtype=torch.float32).reshape(v["shape"]) for name, v in state.items()}
    try:
        controller.load_state_dict(tensors)
    except RuntimeError as err:
        raise ConfigError(f"the study's warmed-up controller does not fit this search space: {err}") from err
