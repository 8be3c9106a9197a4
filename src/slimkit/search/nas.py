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

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from slimkit.core.layers import pareto_front as front_of
from slimkit.search.cost import COST_KEY
from slimkit.core.config import Config
from slimkit.core.io import output_dir
from slimkit.core.progress import progress_bar
from slimkit.core.task import Task
from slimkit.errors import ConfigError, InfeasibleError, SlimkitError

OBJECTIVES = ("macs", "params", "latency")


class NASConfig(Config):
    """A NAS run. Constraints are hard limits (`max_*`); `objective` is the cost traded against accuracy
    on the Pareto front. `space_options` overrides fields of the space (e.g. {"kernels": [3, 5]})."""

    technique: ClassVar[str | None] = "nas"

    space: Literal["mbconv", "cell"] = "mbconv"
    space_options: dict[str, Any] = Field(default_factory=dict)
    strategy: Literal["random", "evolution", "rl", "gradient"] = "evolution"
    trials: int = Field(20, ge=1)
    # proxy training of each candidate with the shared trainer
    epochs: int = Field(3, ge=1)
    lr: float = Field(2e-3, gt=0)
    max_steps: int | None = Field(None, gt=0)
    train_fraction: float = Field(1.0, gt=0, le=1)
    train_threads: int = Field(1, ge=1)
    # hard constraints; max_macs_ratio is relative to the reference model (the model `apply` gets)
    max_macs: int | None = Field(None, gt=0)
    max_params: int | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)
    max_macs_ratio: float | None = Field(None, gt=0)
    objective: Literal["macs", "params", "latency"] = "macs"
    # latency lookup table: runtime, threads, batch, statistic; calibration candidates (0: none)
    runtime: Literal["torch", "ort"] = "torch"
    latency_threads: int = Field(1, ge=1)
    latency_batch: int = Field(1, ge=1)
    latency_statistic: Literal["median_ms", "p10_ms"] = "p10_ms"
    latency_runs: int = Field(30, ge=1)
    calibrate_latency: int = Field(3, ge=0)
    latency_rounds: int = Field(3, ge=1)  # interleaved calibration rounds (LatencyTable.measure_rounds)
    # strategy settings
    population: int = Field(10, ge=2)
    sample_size: int = Field(3, ge=1)
    controller_lr: float = Field(0.02, gt=0)
    controller_batch: int = Field(4, ge=1)  # completed trials per REINFORCE step
    controller_advantage: Literal["spread", "rank"] = "spread"  # how trial rewards weight a policy step
    # rl: reward = accuracy - controller_cost_weight * |cost / limit - 1| for the objective's limit (TuNAS)
    controller_cost_weight: float = Field(0.0, ge=0)
    # rl: architectures the controller is rewarded on by a weight-sharing one-shot net before the first
    # trial (ENAS-style; `slimkit.search.warmup`). None: 1024 for the mbconv space, 0 (none) for cell
    controller_warmup: int | None = Field(None, ge=0)
    oneshot_epochs: int = Field(20, ge=1)
    oneshot_lr: float | None = Field(None, gt=0)  # None: `lr`, as the trials (ranks sub-networks best)
    supernet_epochs: int = Field(3, ge=1)
    supernet_max_steps: int | None = Field(None, gt=0)
    final_epochs: int | None = Field(None, ge=1)
    # choosing: the `finalists` most accurate trials are proxy-trained again with `finalist_seeds` fresh
    # seeds and the best mean validation accuracy over those wins (one proxy run's accuracy is noisy, and
    # the most accurate of many is a lucky one; 0: no re-ranking)
    finalists: int = Field(3, ge=0)
    finalist_seeds: int = Field(3, ge=1)
    seed: int = 0
    stale_after_s: float = Field(120.0, gt=0)

    def constraints(self, reference_macs: int | None = None):
        from slimkit.search.cost import Constraints

        max_macs = self.max_macs
        if self.max_macs_ratio is not None:
            if reference_macs is None:
                raise ConfigError("max_macs_ratio needs a reference model (pass one, or use max_macs)")
            ratio_macs = int(self.max_macs_ratio * reference_macs)
            max_macs = ratio_macs if max_macs is None else min(max_macs, ratio_macs)
        return Constraints(max_macs=max_macs, max_params=self.max_params, max_latency_ms=self.max_latency_ms)

    def warmup_samples(self) -> int:
        """Controller warm-up samples this config asks for (rl only)."""
        if self.strategy != "rl":
            return 0
        if self.controller_warmup is None:
            return 1024 if self.space == "mbconv" else 0
        if self.controller_warmup and self.space != "mbconv":
            raise ConfigError("controller_warmup needs the 'mbconv' space (its one-shot net); set it to 0 for 'cell'")
        return self.controller_warmup

    def fingerprint(self) -> dict[str, Any]:
        """The settings a study is bound to (resuming with different ones would mix experiments)."""
        keys = ("space", "space_options", "strategy", "epochs", "lr", "max_steps", "train_fraction", "max_macs",
                "max_params", "max_latency_ms", "max_macs_ratio", "objective", "runtime", "seed", "controller_warmup",
                "oneshot_epochs", "oneshot_lr", "controller_cost_weight")
        return {k: v for k, v in self.to_dict().items() if k in keys}


@dataclass
class SearchResult:
    """What a search produced: every trial as a row, the Pareto front, the chosen row and model."""

    study_name: str
    storage: str
    rows: list[dict[str, Any]]
    pareto: list[dict[str, Any]]
    best: dict[str, Any] | None
    model: Any = None
    artifacts: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# storage
def default_storage(out_dir: str | Path) -> str:
    return f"journal:{Path(out_dir) / 'study.journal'}"


def open_storage(url: str):
    """An Optuna storage for `url`: 'journal:PATH' (or a path ending .journal/.log) for a journal
    file, or an RDB URL such as 'sqlite:///nas.db' / 'postgresql://user@host/db'."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not isinstance(url, str) or not url:
        raise ConfigError("storage must be a non-empty URL such as journal:nas.journal or sqlite:///nas.db")
    if url.startswith("journal:") or ("://" not in url and url.endswith((".journal", ".log"))):
        path = Path(url.removeprefix("journal:"))
        if not path.parent.exists():
            output_dir(path.parent)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" in url:
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as err:  # sqlalchemy / driver errors
            raise ConfigError(f"cannot open storage {url!r}: {err}") from None
    raise ConfigError(f"unknown storage {url!r}; use journal:PATH or an RDB URL such as sqlite:///nas.db")


def _study(config: NASConfig, storage, study_name: str, sampler=None, *, create: bool = True):
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
class _Context:
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


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(study, stale_after_s: float) -> list[int]:
    """Fail RUNNING trials whose worker is gone; returns their numbers. A trial is stale when its
    worker ran on this host and that process no longer exists, or its heartbeat is older than
    `stale_after_s` (workers on other machines)."""
    from optuna.trial import TrialState

    storage, now, here, reaped = study._storage, time.time(), socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        beat = t.user_attrs.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else now)
        dead = worker is not None and worker.get("host") == here and worker.get("pid") != os.getpid() \
            and not _pid_alive(int(worker["pid"]))
        if dead or now - beat > stale_after_s:
            try:
                storage.set_trial_user_attr(t._trial_id, "failure", "worker died" if dead else "heartbeat timed out")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                reaped.append(t.number)
            except Exception:  # another worker reaped it first
                pass
    return reaped


class _Heartbeat:
    """Records `heartbeat` (epoch seconds) on a running trial every `interval` seconds."""

    def __init__(self, study, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = study._storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except Exception:  # the trial finished meanwhile
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _log_event(out_dir: Path, **event: Any) -> None:
    # one short O_APPEND write per line: safe with several processes on one file
    line = json.dumps({"time": round(time.time(), 3), **event}) + "\n"
    with open(out_dir / "events.jsonl", "a") as fh:
        fh.write(line)


def _make_sampler(ctx: _Context, study):
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
    from optuna.trial import TrialState

    output_dir(out_dir / "trials")
    constraints = constraints or config.constraints()
    ctx = _Context(task, config, out_dir, constraints)
    storage = open_storage(storage_url)
    study = _study(config, storage, study_name, create=False)
    study.sampler = _make_sampler(ctx, study)
    n, ran, me = config.trials, 0, _me()
    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    with progress_bar(f"NAS {config.strategy}", n if progress else 0) as advance:
        shown = 0
        while True:
            reap_stale(study, config.stale_after_s)
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state == TrialState.COMPLETE for t in trials)
            advance(done - shown, done=done)
            shown = done
            if done >= n:
                break
            if sum(t.state in live for t in trials) >= n:
                time.sleep(min(1.0, heartbeat_s))  # the remaining slots are taken; wait for them (or their death)
                continue
            trial = study.ask()
            trial.set_user_attr("worker", me)  # first, so a worker killed from here on is recognised as dead
            ahead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                     if t.number < trial.number]
            if len(ahead) >= n:  # another worker took the last slot between our check and ask
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                continue
            trial.set_user_attr("heartbeat", time.time())
            _log_event(out_dir, event="start", trial=trial.number, **me)
            with _Heartbeat(study, trial._trial_id, heartbeat_s):
                try:
                    values = _run_trial(trial, ctx)
                except InfeasibleError:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                except SlimkitError as err:
                    trial.set_user_attr("failure", str(err))
                    study.tell(trial, state=TrialState.FAIL)
                    _log_event(out_dir, event="fail", trial=trial.number, error=str(err), **me)
                    continue
                except BaseException as err:  # interrupted or a bug: free the slot now, not after a timeout
                    trial.set_user_attr("failure", f"interrupted: {type(err).__name__}: {err}")
                    study.tell(trial, state=TrialState.FAIL)
                    raise
            study.tell(trial, values)
            _log_event(out_dir, event="done", trial=trial.number, accuracy=values[0], **me)
            ran += 1
    if ctx.cost.table is not None:
        ctx.cost.table.save(out_dir / "latency_table.json")
    return ran


def _run_trial(trial, ctx: _Context) -> list[float]:
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
    model = _proxy_train(ctx, spec, cfg.seed + trial.number)
    acc = accuracy(model, ctx.task, "val")
    seconds = time.perf_counter() - t0
    weights = ctx.out_dir / "trials" / f"trial-{trial.number:05d}.safetensors"
    save(model, weights)
    trial.set_user_attr("spec", spec)
    trial.set_user_attr("costs", costs)
    trial.set_user_attr("train_seconds", round(seconds, 3))
    trial.set_user_attr("weights", str(weights))
    return [acc, ctx.objective_value(costs)]


def _proxy_train(ctx: _Context, spec: dict[str, Any], seed: int):
    """`spec` built and trained on the proxy task; initial weights depend on `seed` only, not on what
    this worker ran before."""
    from slimkit.core.trainer import TrainConfig, fit
    from slimkit.search.space import build

    cfg = ctx.config
    torch.manual_seed(seed)
    return fit(build(spec), ctx.proxy_task, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, seed=seed,
                                                        max_steps=cfg.max_steps), progress=False).model


def _worker_entry(task: Task, config: dict[str, Any], storage_url: str, study_name: str, out_dir: str,
                  constraints: dict[str, Any]) -> None:
    from slimkit.search.cost import Constraints

    os.environ["SLIMKIT_PROGRESS"] = "0"
    run_worker(task, NASConfig.from_dict(config), storage_url, study_name, out_dir,
               constraints=Constraints.from_dict(constraints))


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
    ctx = _Context(task, config, out_dir, constraints)
    t_start = time.perf_counter()
    cheapest = ctx.cost.check_space(ctx.space)  # InfeasibleError names the limit no candidate meets
    if ctx.cost.table is not None and config.calibrate_latency and ctx.cost.table.scale == 1.0:
        ctx.cost.table.calibrate(_calibration_models(ctx, config.calibrate_latency), rounds=config.latency_rounds)
        ctx.cost._cache.clear()
    if ctx.cost.table is not None:
        ctx.cost.table.save(out_dir / "latency_table.json")
    storage_url = storage or default_storage(out_dir)
    study_name = study_name or f"nas-{config.space}-{config.strategy}"
    study = _study(config, open_storage(storage_url), study_name)
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
        procs = [mp.Process(target=_worker_entry, args=(task, cfg_dict, storage_url, study_name, str(out_dir), cons_dict))
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


def _calibration_models(ctx: _Context, k: int) -> list:
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


def rerank_finalists(result: SearchResult, study, ctx: _Context, progress: bool = False) -> None:
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
                model = _proxy_train(ctx, r["spec"], cfg.seed + 1_000_003 * j + r["trial"])  # seeds no trial uses
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
