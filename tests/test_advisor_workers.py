"""The advisor's search shared by worker processes on one Optuna journal storage (`slimkit auto --storage`)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slimkit.core.trials import open_storage

JOB = [sys.executable, str(Path(__file__).with_name("advisor_job.py"))]
ENV = {**os.environ, "SLIMKIT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _run(*args, **kw):
    return subprocess.Popen(JOB + [str(a) for a in args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _trials(storage: str):
    return optuna.load_study(study_name="t", storage=open_storage(storage)).get_trials()


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    out = tmp_path_factory.mktemp("alone")
    _finish(_run(out))
    return json.loads((out / "summary.json").read_text())


def _key(point):
    return json.dumps(point["params"], sort_keys=True)


def test_two_workers_share_the_trials_and_recommend_what_one_does(tmp_path, alone):
    storage = f"journal:{tmp_path / 'auto.journal'}"
    lead, helper = _run(tmp_path / "lead", storage), _run(tmp_path / "helper", storage, "worker")
    _finish(helper)
    _finish(lead)
    summary = json.loads((tmp_path / "lead" / "summary.json").read_text())
    trials = _trials(storage)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 6  # the budget, not a trial more
    points = [t.user_attrs["point"] for t in done]
    assert len({_key(p) for p in points if not p.get("reused")}) == len([p for p in points if not p.get("reused")])
    assert len({p["worker"]["pid"] for p in points}) == 2  # both workers ran trials
    assert summary["recommendation"] == alone["recommendation"]
    # the same recipes were measured to the same accuracy and bytes as by one worker
    assert sorted((_key(p), p["accuracy"], p["size_bytes"]) for p in summary["trials"]) == \
        sorted((_key(p), p["accuracy"], p["size_bytes"]) for p in alone["trials"])


def test_killed_worker_loses_no_finished_trial(tmp_path, alone):
    storage = f"journal:{tmp_path / 'auto.journal'}"
    victim = _run(tmp_path / "victim", storage, "worker")
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until it has finished a trial and started the next
        time.sleep(0.5)
        if not (tmp_path / "auto.journal").exists():
            continue
        try:
            states = [t.state for t in _trials(storage)]
        except KeyError:  # the study is being created
            continue
        if states.count(TrialState.COMPLETE) >= 1 and TrialState.RUNNING in states:
            break
    else:
        pytest.fail("the worker never got to its second trial")
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    before = {t.number: t.user_attrs["point"] for t in _trials(storage) if t.state == TrialState.COMPLETE}
    _finish(_run(tmp_path / "lead", storage))  # picks the study up, reaps the dead worker's trial, finishes
    trials = _trials(storage)
    after = {t.number: t.user_attrs["point"] for t in trials if t.state == TrialState.COMPLETE}
    assert all(after[n] == p for n, p in before.items())  # every finished trial kept as it was
    assert len(after) == 6
    dead = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.user_attrs.get("failure") for t in dead] == ["worker died"]
    retried = [t for t in trials if t.user_attrs.get("retry_of") == dead[0].number]
    assert retried and retried[0].params == dead[0].params  # its recipe was run again
    summary = json.loads((tmp_path / "lead" / "summary.json").read_text())
    assert summary["recommendation"] == alone["recommendation"]


def test_worker_without_storage_is_a_usage_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "slimkit", "auto", "zoo:lenet5", "--worker", "--out", str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--worker needs --storage" in done.stderr
    assert "Traceback" not in done.stderr


def test_joining_a_study_with_other_settings_is_refused(tmp_path):
    storage = f"journal:{tmp_path / 'auto.journal'}"
    _finish(_run(tmp_path / "a", storage))
    env = {**ENV, "ADVISOR_JOB_TRIALS": "5"}
    done = subprocess.run(JOB + [str(tmp_path / "b"), storage], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "was started with another config" in done.stderr
