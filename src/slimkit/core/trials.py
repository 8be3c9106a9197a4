"""Trials of one Optuna study shared by any number of worker processes or machines.

Used by the NAS search (`slimkit search --storage`) and the advisor (`slimkit auto --storage`):
`open_storage` (a journal file or an RDB URL), and `run_shared`, one worker's loop: reap trials whose
worker died, ask for a trial while the budget has room, run it under a heartbeat, tell the result.
Optuna gives every `ask` its own trial, so two workers never run the same one; a worker killed
mid-trial is recognised (its process is gone on this host, or its heartbeat stopped) and its slot is
run again; finished trials stay in the storage, so a restarted worker loses nothing.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from slimkit.core.io import output_dir
from slimkit.errors import ConfigError, InfeasibleError, SlimkitError


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


def worker_id() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(study, stale_after_s: float) -> list:
    """Fail RUNNING trials whose worker is gone; returns them (as they were). A trial is stale when its
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
                reaped.append(t)
            except Exception:  # another worker reaped it first
                pass
    return reaped


class Heartbeat:
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


def log_event(out_dir: Path, **event: Any) -> None:
    # one short O_APPEND write per line: safe with several processes on one file
    line = json.dumps({"time": round(time.time(), 3), **event}) + "\n"
    with open(out_dir / "events.jsonl", "a") as fh:
        fh.write(line)


def run_shared(study, n: int, run_trial: Callable[[Any], list[float]], *, stale_after_s: float,
               heartbeat_s: float = 5.0, log_dir: Path | None = None,
               on_progress: Callable[[int], None] | None = None, allows: Callable[[], bool] | None = None,
               retry_reaped: bool = False) -> int:
    """Run trials of `study` until `n` have completed (by every worker together); returns how many this
    worker ran. `run_trial(trial)` returns the objective values; a SlimkitError fails that trial (noted
    in its `failure` attribute) and the loop goes on, an InfeasibleError or an interruption fails it and
    is raised. `allows()` False stops starting trials (a time budget). `retry_reaped`: a trial whose
    worker died is enqueued again with its parameters (the advisor's seed points are not lost)."""
    from optuna.trial import TrialState

    ran, me = 0, worker_id()
    taken = (TrialState.COMPLETE, TrialState.RUNNING)  # WAITING (enqueued) trials are there to be asked for
    while True:
        for t in reap_stale(study, stale_after_s):
            if retry_reaped and t.params:
                study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        if on_progress is not None:
            on_progress(done)
        if done >= n or (allows is not None and not allows()):
            return ran
        if sum(t.state in taken for t in trials) >= n:
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
        if log_dir is not None:
            log_event(log_dir, event="start", trial=trial.number, **me)
        with Heartbeat(study, trial._trial_id, heartbeat_s):
            try:
                values = run_trial(trial)
            except InfeasibleError:
                study.tell(trial, state=TrialState.FAIL)
                raise
            except SlimkitError as err:
                trial.set_user_attr("failure", str(err))
                study.tell(trial, state=TrialState.FAIL)
                if log_dir is not None:
                    log_event(log_dir, event="fail", trial=trial.number, error=str(err), **me)
                continue
            except BaseException as err:  # interrupted or a bug: free the slot now, not after a timeout
                trial.set_user_attr("failure", f"interrupted: {type(err).__name__}: {err}")
                study.tell(trial, state=TrialState.FAIL)
                raise
        study.tell(trial, values)
        if log_dir is not None:
            log_event(log_dir, event="done", trial=trial.number, values=values, **me)
        ran += 1
