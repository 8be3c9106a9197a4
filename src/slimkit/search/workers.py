"""NAS workers on an Optuna storage: the study, one worker's trial (train the proxy, score it) run through
the shared loop of `core.trials` (heartbeat, reaping of trials whose worker died), the process entry point."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from slimkit.core.io import output_dir
from slimkit.core.progress import progress_bar
from slimkit.core.task import Task
from slimkit.core.trials import open_storage, run_shared
from slimkit.errors import ConfigError
from slimkit.search.nas_config import NASConfig


# ---------------------------------------------------------------------------------------------
# storage
def default_storage(out_dir: str | Path) -> str:
    return f"journal:{Path(out_dir) / 'study.journal'}"


def open_study(config: NASConfig, storage, study_name: str, sampler=None, *, create: bool = True):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if create:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=["maximize", "minimize"],
                                    sampler=sampler, load_if_exists=True)
    else:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    bound = study.user_attrs.get("slimkit_nas")
    if bound is None:
        study.set_user_attr("slimkit_nas", config.fingerprint())
    elif bound != config.fingerprint():
        diff = sorted(k for k in set(bound) | set(config.fingerprint()) if bound.get(k) != config.fingerprint().get(k))
        raise ConfigError(f"study {study_name!r} in this storage was created with different settings ({', '.join(diff)}); "
                          "use another --study name or storage, or the original settings to resume")
    return study


# ---------------------------------------------------------------------------------------------
# one worker
class Context:
    """What a worker needs: space, cost model, proxy task (built identically in every process)."""

    def __init__(self, task: Task, config: NASConfig, out_dir: Path, constraints):
        from slimkit.search.cost import CostModel, LatencyTable, load_table
        from slimkit.search.space import make_space

        self.task, self.config, self.out_dir = task, config, Path(out_dir)
        self.space = make_space(config.space, task, **config.space_options)
        table = None
        if config.objective == "latency" or constraints.max_latency_ms is not None:
            path = self.out_dir / "latency_table.json"
            table = LatencyTable(config.runtime, threads=config.latency_threads, batch_size=config.latency_batch,
                                 statistic=config.latency_statistic, runs=config.latency_runs)
            if path.is_file():
                old = load_table(path)
                if (old.runtime, old.threads, old.batch_size, old.statistic) == (
                        table.runtime, table.threads, table.batch_size, table.statistic):
                    table = old
        self.cost = CostModel(constraints, table)
        self.proxy_task = proxy_task(task, config.train_fraction, config.seed)

    def feasible(self, choices: dict[str, Any]) -> bool:
        return self.cost.feasible(self.space.spec(choices))

    def objective_value(self, costs: dict[str, float]) -> float:
        return float(costs["latency_ms"] if self.config.objective == "latency" else costs[self.config.objective])


def proxy_task(task: Task, fraction: float, seed: int) -> Task:
    """`task` with a seeded random `fraction` of its training split (proxy training data)."""
    if fraction >= 1.0:
        return task
    import dataclasses

    from torch.utils.data import Subset

    n = len(task.train)
    keep = max(1, int(round(fraction * n)))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].tolist()
    return dataclasses.replace(task, train=Subset(task.train, idx), calibration=task.calibration)


def _make_sampler(ctx: Context, study):
    from slimkit.search.strategies import make_sampler

    cfg = ctx.config
    options: dict[str, Any] = {}
    if cfg.strategy == "evolution":
        options = {"population": cfg.population, "sample_size": cfg.sample_size}
    elif cfg.strategy == "rl":
        warm = study.user_attrs.get("controller")
        if cfg.warmup_samples() and warm is None:
            raise ConfigError("rl strategy: the study has no warmed-up controller; start it with `search`")
        options = {"lr": cfg.controller_lr, "batch": cfg.controller_batch, "advantage": cfg.controller_advantage,
                   "cost_weight": cfg.controller_cost_weight, "constraints": ctx.cost.constraints,
                   "objective": cfg.objective, "initial_state": warm["state"] if warm else None}
    elif cfg.strategy == "gradient":
        info = study.user_attrs.get("supernet")
        if info is None:
            raise ConfigError("gradient strategy: the study has no supernet result; start it with `search`")
        options = {"probabilities": info["probabilities"]}
    return make_sampler(cfg.strategy, ctx.space.decisions(), ctx.feasible, seed=cfg.seed, **options)


def worker_start_method() -> str:
    """fork where it is safe (Linux; the caller's script needs no `if __name__ == "__main__"` guard), else
    spawn: elsewhere, and once this process has used CUDA (a forked child cannot re-initialize it)."""
    import multiprocessing

    import torch

    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def run_worker(task: Task, config: NASConfig, storage_url: str, study_name: str, out_dir: str | Path, *,
               constraints=None, progress: bool = False, heartbeat_s: float = 5.0) -> int:
    """Run trials of one study until `config.trials` have completed; returns how many this worker ran.

    Safe to run in any number of processes or machines at once on the same storage."""
    from slimkit.evaluate.latency import torch_threads

    with torch_threads(config.train_threads):  # restored afterwards: the caller's setting is not ours to keep
        return _run_worker(task, config, storage_url, study_name, Path(out_dir), constraints, progress, heartbeat_s)


def _run_worker(task, config, storage_url, study_name, out_dir: Path, constraints, progress, heartbeat_s) -> int:
    output_dir(out_dir / "trials")
    constraints = constraints or config.constraints()
    ctx = Context(task, config, out_dir, constraints)
    storage = open_storage(storage_url)
    study = open_study(config, storage, study_name, create=False)
    study.sampler = _make_sampler(ctx, study)
    with progress_bar(f"NAS {config.strategy}", config.trials if progress else 0) as advance:
        shown = [0]

        def on_progress(done: int) -> None:
            advance(done - shown[0], done=done)
            shown[0] = done

        ran = run_shared(study, config.trials, lambda trial: _run_trial(trial, ctx), stale_after_s=config.stale_after_s,
                         heartbeat_s=heartbeat_s, log_dir=out_dir, on_progress=on_progress)
    if ctx.cost.table is not None:
        ctx.cost.table.save(out_dir / "latency_table.json")
    return ran


def _run_trial(trial, ctx: Context) -> list[float]:
    """Propose (through the sampler), check, proxy-train and score one candidate: [accuracy, cost]."""
    from slimkit.core.artifact import save
    from slimkit.core.trainer import accuracy

    cfg = ctx.config
    params = {d.name: trial.suggest_categorical(d.name, list(d.choices)) for d in ctx.space.decisions()}
    spec = ctx.space.spec(params)
    costs = ctx.cost.costs(spec)
    bad = ctx.cost.constraints.violations(costs)
    if bad:  # only enqueued trials can get here: samplers reject infeasible proposals
        raise ConfigError("candidate breaks " + "; ".join(bad))
    t0 = time.perf_counter()
    model = proxy_train(ctx, spec, cfg.seed + trial.number)
    acc = accuracy(model, ctx.task, "val")
    seconds = time.perf_counter() - t0
    weights = ctx.out_dir / "trials" / f"trial-{trial.number:05d}.safetensors"
    save(model, weights)
    trial.set_user_attr("spec", spec)
    trial.set_user_attr("costs", costs)
    trial.set_user_attr("train_seconds", round(seconds, 3))
    trial.set_user_attr("weights", str(weights))
    return [acc, ctx.objective_value(costs)]


def proxy_train(ctx: Context, spec: dict[str, Any], seed: int):
    """`spec` built and trained on the proxy task; initial weights depend on `seed` only, not on what
    this worker ran before."""
    from slimkit.core.trainer import TrainConfig, fit
    from slimkit.search.space import build

    cfg = ctx.config
    torch.manual_seed(seed)
    return fit(build(spec), ctx.proxy_task, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, seed=seed,
                                                        max_steps=cfg.max_steps), progress=False).model


def worker_entry(task: Task, config: dict[str, Any], storage_url: str, study_name: str, out_dir: str,
                  constraints: dict[str, Any]) -> None:
    from slimkit.search.cost import Constraints

    os.environ["SLIMKIT_PROGRESS"] = "0"
    run_worker(task, NASConfig.from_dict(config), storage_url, study_name, out_dir,
               constraints=Constraints.from_dict(constraints))
