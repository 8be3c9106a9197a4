"""Strategies as Optuna samplers, on a synthetic objective (no training): constraints honored,
evolution mutates one decision of a population member, REINFORCE moves toward rewarded choices."""
import optuna
import pytest
import torch

from slimkit.errors import ConfigError, InfeasibleError
from slimkit.search.space import Decision
from slimkit.search.strategies import Controller, RandomStrategy, ReinforceStrategy, make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

DECISIONS = [Decision("a", (0, 1, 2, 3)), Decision("b", (0, 1, 2, 3)), Decision("c", ("x", "y"))]



@pytest.fixture(autouse=True)
def one_thread():
    """NAS tests run tiny ops: one thread is faster than two on a loaded 2-core machine."""
    from slimkit.evaluate.latency import torch_threads

    with torch_threads(1):
        yield

def feasible(choices):  # a hard constraint: a + b <= 4
    return choices["a"] + choices["b"] <= 4


def reward(choices):
    return choices["a"] + choices["b"] + (0.5 if choices["c"] == "y" else 0.0)


def run(strategy, n=30, **options):
    sampler = make_sampler(strategy, DECISIONS, feasible, seed=1, **options)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lambda t: reward({d.name: t.suggest_categorical(d.name, list(d.choices)) for d in DECISIONS}),
                   n_trials=n)
    return study, sampler


@pytest.mark.parametrize("strategy,options", [("random", {}), ("evolution", {"population": 6, "sample_size": 3}),
                                              ("rl", {"lr": 0.1}),
                                              ("gradient", {"probabilities": {"a": [0.1, 0.2, 0.3, 0.4],
                                                                              "b": [0.25] * 4, "c": [0.5, 0.5]}})])
def test_every_strategy_honors_the_constraint(strategy, options):
    study, sampler = run(strategy, **options)
    assert len(study.trials) == 30
    assert all(feasible(t.params) for t in study.trials)
    if strategy == "random":
        assert sampler.rejected > 0  # the constraint did cut proposals (a + b > 4 is 3/16 of the space)


def test_evolution_children_differ_from_a_member_in_one_decision():
    study, _ = run("evolution", n=20, population=6, sample_size=2)
    trials = sorted(study.trials, key=lambda t: t.number)
    for child in trials[6:]:
        earlier = [t.params for t in trials if t.number < child.number]
        diffs = min(sum(child.params[k] != p[k] for k in child.params) for p in earlier)
        assert diffs <= 1


def test_evolution_beats_random_on_average():
    # a space of 4^6 architectures (the small one above has fewer than the trials, and no repeats)
    big = [Decision(f"d{i}", (0, 1, 2, 3)) for i in range(6)]
    best = {s: [] for s in ("random", "evolution")}
    for seed in range(3):
        for s in best:
            opts = {"population": 6, "sample_size": 3} if s == "evolution" else {}
            sampler = make_sampler(s, big, lambda c: True, seed=seed, **opts)
            study = optuna.create_study(direction="maximize", sampler=sampler)
            study.optimize(lambda t: sum(t.suggest_categorical(d.name, list(d.choices)) for d in big), n_trials=25)
            best[s].append(sum(t.value for t in study.trials[-10:]) / 10)
    assert sum(best["evolution"]) > sum(best["random"])


def test_reinforce_raises_the_probability_of_rewarded_choices():
    sampler = ReinforceStrategy(DECISIONS, feasible, seed=0, lr=0.2)
    before = sampler.probabilities()["c"][1]
    for _ in range(12):
        advantages = sampler.update([({"a": 0, "b": 0, "c": "y"}, 0.99), ({"a": 0, "b": 0, "c": "x"}, 0.98)])
    assert sampler.probabilities()["c"][1] > before + 0.2
    # advantages are in units of the rewards' spread: a one-point accuracy gap moves the policy as a big one would
    assert advantages[0] > 0.5 and advantages[1] < -0.5


def test_rank_advantages_are_not_shrunk_by_a_failed_trial():
    good, better, failed = {"a": 0, "b": 0, "c": "x"}, {"a": 0, "b": 0, "c": "y"}, {"a": 1, "b": 1, "c": "x"}
    batch = [(failed, 0.10), (better, 0.98), (good, 0.97), (better, 0.98)]
    spread = ReinforceStrategy(DECISIONS, feasible, seed=0).update(batch)
    rank = ReinforceStrategy(DECISIONS, feasible, seed=0, advantage="rank").update(batch)
    # spread: the failed trial's 0.88 gap sets the scale, one point between the good ones is ~nothing
    assert abs(spread[1] - spread[2]) < 0.05
    assert rank[1] - rank[2] > 0.8 and rank[0] < rank[2] < rank[1] and abs(sum(rank)) < 1e-9
    with pytest.raises(ConfigError, match="advantage"):
        make_sampler("rl", DECISIONS, feasible, advantage="ranks")


def test_cost_weight_rewards_the_controller_for_spending_the_budget():
    from types import SimpleNamespace

    from slimkit.search.cost import Constraints

    limits = Constraints(max_macs=1000)
    assert limits.budget_gap({"macs": 500}, "macs") == 0.5 and limits.budget_gap({"macs": 1000}, "macs") == 0.0
    assert limits.budget_gap({"params": 10}, "params") == 0.0  # no limit on the objective: no term
    assert limits.reward(0.9, {"macs": 500}, "macs", 0.1) == pytest.approx(0.85)  # TuNAS: accuracy - w * gap
    assert limits.reward(0.9, {"macs": 500}, "macs", 0.0) == 0.9
    trials = [SimpleNamespace(number=i, params={"a": 0, "b": 0, "c": c}, values=[0.9], user_attrs={"costs": {"macs": m}})
              for i, (c, m) in enumerate([("x", 300), ("y", 1000)])]
    shaped = ReinforceStrategy(DECISIONS, feasible, seed=0, batch=2, cost_weight=0.1, constraints=limits)
    shaped.observe(trials)
    assert shaped.rewards == pytest.approx([0.9 - 0.07, 0.9])  # same accuracy: the one using its budget wins
    plain = ReinforceStrategy(DECISIONS, feasible, seed=0, batch=2)
    plain.observe(trials)
    assert plain.rewards == [0.9, 0.9]


def test_reinforce_steps_once_per_batch_of_trials():
    study, sampler = run("rl", n=10, lr=0.1, batch=4)
    assert len(sampler.seen) == 9 and len(sampler.rewards) == 8 and len(sampler.pending) == 1
    with pytest.raises(ConfigError, match="batch"):
        make_sampler("rl", DECISIONS, feasible, batch=0)


class Sticky(RandomStrategy):
    """Proposes one architecture nine times in ten, like a controller that has collapsed."""

    def propose(self, history, rng):
        return {"a": 0, "b": 0, "c": "x"} if rng.random() < 0.9 else self.random_choices(rng)


def test_no_architecture_is_evaluated_twice_while_new_ones_remain():
    sampler = Sticky(DECISIONS, feasible, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lambda t: reward({d.name: t.suggest_categorical(d.name, list(d.choices)) for d in DECISIONS}),
                   n_trials=20)
    keys = [tuple(t.params[d.name] for d in DECISIONS) for t in study.trials]
    assert len(set(keys)) == 20 and sampler.repeats > 20
    # 26 feasible architectures: beyond them repeats are accepted rather than failing the search
    study, _ = run("random", n=30)
    assert len(study.trials) == 30 and len({tuple(t.params.values()) for t in study.trials}) == 26


def test_controller_scores_what_it_samples():
    controller = Controller(DECISIONS)
    indices, logp, _ = controller(generator=torch.Generator().manual_seed(0))
    _, logp_again, _ = controller(indices)
    assert torch.allclose(logp, logp_again)


def test_bad_strategy_settings_raise():
    with pytest.raises(ConfigError, match="unknown search strategy"):
        make_sampler("bayes", DECISIONS, feasible)
    with pytest.raises(ConfigError, match="population"):
        make_sampler("evolution", DECISIONS, feasible, population=3, sample_size=5)
    with pytest.raises(ConfigError, match="no probabilities"):
        make_sampler("gradient", DECISIONS, feasible, probabilities={"a": [1, 0, 0, 0]})
    sampler = make_sampler("random", DECISIONS, lambda c: False, max_tries=20)
    study = optuna.create_study(sampler=sampler)
    with pytest.raises(InfeasibleError, match="20 proposals"):
        study.optimize(lambda t: t.suggest_categorical("a", [0, 1, 2, 3]), n_trials=1)
