"""Neural architecture search on Optuna: many workers on one study, resumable, hard constraints.

    result = slimkit.search.nas.search(task, NASConfig(strategy="evolution", trials=30, max_macs=4_000_000),
                                       out_dir="nas-out")
    result.model          # the chosen architecture, trained (also saved as nas-out/best.safetensors)

Every trial proposes an architecture (the strategy is an Optuna sampler, see `strategies.py`), trains
it briefly with the shared trainer (proxy training) and reports two objectives: validation accuracy
(maximize) and a cost (MACs, parameters or predicted latency; minimize). Trials live in an Optuna
storage: by default a journal file in `out_dir` (`JournalStorage` + `JournalFileBackend`), or any
URL Optuna accepts (`sqlite:///nas.db`, `postgresql://...`). Workers on any number of processes or
machines that open the same storage and study share the work:

* each worker asks the study for a trial; only the `trials` lowest-numbered live trials run (a
  trial asked beyond that is closed unrun as surplus), so exactly `trials` complete, none twice;
* a running trial records its worker (host, pid) and a heartbeat; a trial whose worker is gone
  (same host, dead pid) or silent for `stale_after_s` is failed and its slot is run again, so a
  search killed mid-way resumes from its storage and completes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from slimkit.core.io import output_dir
from slimkit.core.layers import pareto_front as front_of
from slimkit.core.progress import progress_bar
from slimkit.core.task import Task
from slimkit.errors import ConfigError
from slimkit.search.cost import COST_KEY
from slimkit.search.nas_config import OBJECTIVES, NASConfig, SearchResult
from slimkit.core.trials import open_storage, reap_stale
from slimkit.search.workers import (Context, default_storage, open_study, proxy_train, run_worker, worker_entry,
                                    worker_start_method)

__all__ = ["NASConfig", "SearchResult", "OBJECTIVES", "search", "collect", "rerank_finalists", "pareto_front",
           "open_storage", "default_storage", "reap_stale", "run_worker", "worker_start_method"]


# ---------------------------------------------------------------------------------------------
# the search
def search(task: Task, config: NASConfig | None = None, *, out_dir: str | Path = "nas-out", storage: str | None = None,
           study_name: str | None = None, workers: int = 1, reference=None, progress: bool = True) -> SearchResult:
    """Run (or resume) a NAS study and export the chosen architecture.

    storage: Optuna storage URL (default: journal file `out_dir/study.journal`). workers: local worker
    processes (1: this process). reference: a model whose MACs `max_macs_ratio` is relative to.
    Writes `out_dir/best.safetensors` (loadable with `slimkit.load`), `best.json` (spec),
    `search.json`, `pareto.png` and `report.md`.
    """
    import multiprocessing

    from slimkit.evaluate import count_macs
    from slimkit.search import nas_report
    from slimkit.search.space import make_space

    config = config or NASConfig()
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    output_dir(out_dir)
    make_space(config.space, task, **config.space_options)  # bad spaces fail before anything is written
    reference_macs = count_macs(reference, task.example_input(1)) if reference is not None else None
    constraints = config.constraints(reference_macs)
    ctx = Context(task, config, out_dir, constraints)
    t_start = time.perf_counter()
    cheapest = ctx.cost.check_space(ctx.space)  # InfeasibleError names the limit no candidate meets
    if ctx.cost.table is not None and config.calibrate_latency and ctx.cost.table.scale == 1.0:
        ctx.cost.table.calibrate(_calibration_models(ctx, config.calibrate_latency), rounds=config.latency_rounds)
        ctx.cost._cache.clear()
    if ctx.cost.table is not None:
        ctx.cost.table.save(out_dir / "latency_table.json")
    storage_url = storage or default_storage(out_dir)
    study_name = study_name or f"nas-{config.space}-{config.strategy}"
    study = open_study(config, open_storage(storage_url), study_name)
    supernet_seconds = None
    if config.strategy == "gradient" and "supernet" not in study.user_attrs:
        from slimkit.search.gradient import supernet_search

        limit, objective = _gradient_budget(constraints, config)
        from slimkit.evaluate.latency import torch_threads

        t0 = time.perf_counter()
        with torch_threads(config.train_threads):
            found = supernet_search(ctx.space, ctx.proxy_task, ctx.cost, objective=objective, budget=limit,
                                    epochs=config.supernet_epochs, lr=config.lr, seed=config.seed,
                                    max_steps=config.supernet_max_steps, progress=progress)
        supernet_seconds = time.perf_counter() - t0
        study.set_user_attr("supernet", {"probabilities": found["probabilities"], "choices": found["choices"],
                                         "width": found["width"], "seconds": round(supernet_seconds, 2)})
        study.enqueue_trial(found["choices"], user_attrs={"origin": "supernet argmax"})
    if config.warmup_samples() and "controller" not in study.user_attrs:
        from slimkit.evaluate.latency import torch_threads
        from slimkit.search.warmup import controller_warmup

        with torch_threads(config.train_threads):
            warm = controller_warmup(ctx.space, ctx.proxy_task, ctx.cost, samples=config.warmup_samples(),
                                     lr=config.controller_lr, epochs=config.oneshot_epochs,
                                     lr_train=config.oneshot_lr or config.lr, seed=config.seed,
                                     max_steps=config.supernet_max_steps, objective=config.objective,
                                     cost_weight=config.controller_cost_weight, progress=progress)
        study.set_user_attr("controller", warm)
    cfg_dict, cons_dict = config.to_dict(), constraints.to_dict()
    if workers == 1:
        run_worker(task, config, storage_url, study_name, out_dir, constraints=constraints, progress=progress)
    else:
        mp = multiprocessing.get_context(worker_start_method())
        procs = [mp.Process(target=worker_entry, args=(task, cfg_dict, storage_url, study_name, str(out_dir), cons_dict))
                 for _ in range(workers)]
        for p in procs:
            p.start()
        _watch(study, config.trials, procs, progress)
        for p in procs:
            p.join()
        # a crashed worker leaves its slots open: finish them here, so no trial is lost
        run_worker(task, config, storage_url, study_name, out_dir, constraints=constraints, progress=False)
    seconds = time.perf_counter() - t_start
    result = collect(study, storage_url, config)
    rerank_finalists(result, study, ctx, progress)
    result.info.update({"seconds": round(seconds, 2), "workers": workers, "constraints": cons_dict,
                        "reference_macs": reference_macs, "cheapest_candidate": cheapest,
                        "supernet": study.user_attrs.get("supernet"),
                        "controller_warmup": {k: v for k, v in (study.user_attrs.get("controller") or {}).items()
                                              if k != "state"} or None,
                        "latency_table": ctx.cost.table.info() if ctx.cost.table is not None else None})
    if supernet_seconds is not None:
        result.info["supernet_seconds"] = round(supernet_seconds, 2)
    warning = _chance_warning(result, task)
    if warning:
        result.info["warning"] = warning
    result.model = _chosen_model(result, task, config)
    nas_report.write_report(result, out_dir, config)
    return result


def _chance_warning(result: SearchResult, task: Task) -> str | None:
    """A search whose best trial is no better than always answering the most frequent validation class
    learned nothing; its "best" model must not be passed off as a result (report, result.info, CLI)."""
    if result.best is None or task.metric != "accuracy":
        return None
    labels = torch.cat([y for _, y in task.loader("val", batch_size=1024)])
    majority = float(torch.bincount(labels.long()).max()) / len(labels)
    best = result.best.get("val_accuracy_mean", result.best["val_accuracy"])
    if best > majority + 0.01:
        return None
    return (f"every trial scored at chance level (best validation accuracy {100 * best:.1f}%; always answering the "
            f"most frequent class scores {100 * majority:.1f}%): the search learned nothing and its model is not a "
            "result. Train candidates longer (epochs), check the learning rate and the labels")


def _gradient_budget(constraints, config: NASConfig) -> tuple[float | None, str]:
    if constraints.max_macs is not None:
        return float(constraints.max_macs), "macs"
    if constraints.max_latency_ms is not None:
        return float(constraints.max_latency_ms), "latency"
    if constraints.max_params is not None:
        return None, "macs"  # params are checked exactly after the argmax (repair), not relaxed
    return None, config.objective if config.objective != "params" else "macs"


def _calibration_models(ctx: Context, k: int) -> list:
    import numpy as np

    from slimkit.search.space import build

    rng = np.random.default_rng([ctx.config.seed, 7919])
    decisions = ctx.space.decisions()
    return [build(ctx.space.spec({d.name: d.choices[int(rng.integers(len(d.choices)))] for d in decisions}))
            for _ in range(k)]


def _watch(study, n: int, procs, progress: bool) -> None:
    from optuna.trial import TrialState

    with progress_bar("NAS workers", n if progress else 0) as advance:
        shown = 0
        while any(p.is_alive() for p in procs):
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            advance(done - shown, done=done)
            shown = done
            time.sleep(0.5)


def collect(study, storage_url: str, config: NASConfig) -> SearchResult:
    """Rows of every trial of a study, its Pareto front and the most accurate trial (before any
    re-ranking of finalists, see `rerank_finalists`)."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        costs = t.user_attrs.get("costs", {})
        rows.append({"trial": t.number, "state": t.state.name, "strategy": config.strategy,
                     "origin": t.user_attrs.get("origin", config.strategy), "params": dict(t.params),
                     "spec": t.user_attrs.get("spec"), "val_accuracy": t.values[0] if t.values else None,
                     "macs": costs.get("macs"), "param_count": costs.get("params"),
                     "latency_ms_predicted": costs.get("latency_ms"), "train_seconds": t.user_attrs.get("train_seconds"),
                     "weights": t.user_attrs.get("weights"), "worker": t.user_attrs.get("worker"),
                     "failure": t.user_attrs.get("failure"), "surplus": bool(t.user_attrs.get("surplus"))})
    complete = [r for r in rows if r["state"] == TrialState.COMPLETE.name]
    key = COST_KEY[config.objective]
    front = pareto_front(complete, key)
    best = max(complete, key=lambda r: (r["val_accuracy"], -(r[key] or 0)), default=None)
    return SearchResult(study_name=study.study_name, storage=storage_url, rows=rows, pareto=front, best=best)


def rerank_finalists(result: SearchResult, study, ctx: Context, progress: bool = False) -> None:
    """Re-train the most accurate trials with more seeds; the best mean validation accuracy over the
    fresh seeds is chosen (the trial's own accuracy, which selected it, is listed but not averaged in).

    The extra accuracies are stored on the study (user attribute `finalists`), so a resumed or
    repeated search does not train them again."""
    from slimkit.core.trainer import accuracy
    from slimkit.evaluate.latency import torch_threads

    cfg = ctx.config
    complete = [r for r in result.rows if r["state"] == "COMPLETE"]
    if not cfg.finalists or len(complete) < 2:
        return
    key = COST_KEY[cfg.objective]
    top = sorted(complete, key=lambda r: (-r["val_accuracy"], r[key] or 0))[:cfg.finalists]
    done: dict[str, list[float]] = dict(study.user_attrs.get("finalists") or {})
    todo = [r for r in top if len(done.get(str(r["trial"]), [])) != cfg.finalist_seeds]
    with torch_threads(cfg.train_threads), progress_bar("NAS finalists", len(todo) * cfg.finalist_seeds
                                                        if progress else 0) as advance:
        for r in todo:
            accs = []
            for j in range(1, cfg.finalist_seeds + 1):
                model = proxy_train(ctx, r["spec"], cfg.seed + 1_000_003 * j + r["trial"])  # seeds no trial uses
                accs.append(accuracy(model, ctx.task, "val"))
                advance(1)
            done[str(r["trial"])] = accs
            study.set_user_attr("finalists", done)
    for r in top:
        fresh = done[str(r["trial"])]
        r["val_accuracy_seeds"] = [r["val_accuracy"], *fresh]
        r["fresh_seeds"] = len(fresh)
        # the trial's own accuracy is what made it a finalist (the most accurate of many noisy runs is
        # biased high, luckier than its architecture): only the fresh seeds rank the finalists
        r["val_accuracy_mean"] = sum(fresh) / len(fresh)
    result.best = max(top, key=lambda r: (r["val_accuracy_mean"], -(r[key] or 0)))
    result.info["finalists"] = [{"trial": r["trial"], "val_accuracy_seeds": r["val_accuracy_seeds"],
                                 "fresh_seeds": r["fresh_seeds"],
                                 "val_accuracy_mean": round(r["val_accuracy_mean"], 4)} for r in top]


def pareto_front(rows: list[dict[str, Any]], cost_key: str) -> list[dict[str, Any]]:
    """Rows not dominated on (val_accuracy: higher, `cost_key`: lower), sorted by cost."""
    return sorted(front_of(rows, maximize=("val_accuracy",), minimize=(cost_key,)), key=lambda r: r[cost_key])


def _chosen_model(result: SearchResult, task: Task, config: NASConfig):
    """The chosen trial's trained model: its saved weights, or retrained (final_epochs or the proxy
    epochs) when they are not on this machine or a longer final training was asked for."""
    from slimkit.core.artifact import load
    from slimkit.core.trainer import TrainConfig, fit
    from slimkit.search.space import build

    if result.best is None:
        return None
    weights = result.best.get("weights")
    if config.final_epochs is None and weights and Path(weights).is_file():
        return load(weights)
    epochs = config.final_epochs or config.epochs
    return fit(build(result.best["spec"]), task, TrainConfig(epochs=epochs, lr=config.lr, seed=config.seed),
               description="final training").model
