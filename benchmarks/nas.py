"""NAS on digits: evolution, REINFORCE and the gradient-based supernet vs random search, under a MACs
budget of half the zoo's mobilenetv2_small; latency-table accuracy; two workers on one storage;
kill-and-resume; typed errors for infeasible budgets and bad spaces.

    python benchmarks/nas.py --out nas.json                       # full run (issue 7 settings)
    python benchmarks/nas.py --trials 8 --epochs 3 --final-seeds 2 --out nas.json   # reduced run
    python benchmarks/nas.py --parts latency scale bad --out nas-latency.json       # no searches
    python benchmarks/nas.py --parts replicate --from nas-search.json --first-seed 10 --final-seeds 20 \
        --out nas-replicate.json     # a finished run's chosen architectures and the zoo net, other seeds

Digits at 16x16 by default (at 28x28 a 40-trial search takes ~45 CPU-minutes per strategy on this
CPU, over the issue's 20). Every strategy gets the same number of trials and proxy epochs; the zoo
net is trained with the same epochs. Each strategy's chosen architecture (best mean validation
accuracy of its finalists, see NASConfig.finalists) and the zoo net are then retrained from scratch
with the same `--final-seeds` seeds and the same `--final-epochs` (default 3x the proxy's: as in NAS
practice, the answer is trained longer than the proxy, and the zoo net just as long) and compared on
mean test accuracy (mean validation accuracy beside it); the search run's own single-seed figures are
reported beside them.
CPU time (user + system, this process and its children) is measured per strategy. The latency table
is checked on candidates it was not calibrated on, calibration and check measured together in
`--latency-rounds` interleaved rounds (smallest value of each unit and model kept).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check, environment, print_table, write_result  # noqa: E402


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def test_accuracy(model, task) -> float:
    from slimkit.evaluate import predict, topk_accuracy

    return topk_accuracy(*predict(model, task, "test"), ks=(1,))["top1"]


def run_strategies(task, args, budget, work: Path) -> list[dict]:
    from slimkit.search.nas import NASConfig, search

    rows = []
    for strategy in args.strategies:
        cfg = NASConfig(strategy=strategy, trials=args.trials, epochs=args.epochs, max_macs=budget,
                        population=args.population, sample_size=args.sample_size, supernet_epochs=args.epochs,
                        seed=args.seed, train_threads=args.threads, finalists=args.finalists,
                        finalist_seeds=args.finalist_seeds, controller_advantage=args.controller_advantage,
                        controller_cost_weight=args.controller_cost_weight)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        result = search(task, cfg, out_dir=work / strategy, progress=False)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        best = result.best
        complete = [r for r in result.rows if r["state"] == "COMPLETE"]
        rows.append({"part": "search", "strategy": strategy, "trials": len(complete), "epochs": args.epochs,
                     "best_trial": best["trial"], "val_accuracy": best["val_accuracy"],
                     "val_accuracy_mean": best.get("val_accuracy_mean"), "finalists": result.info.get("finalists"),
                     "test_accuracy": test_accuracy(result.model, task), "macs": best["macs"],
                     "params": best["param_count"], "budget_macs": budget, "within_budget": best["macs"] <= budget,
                     "all_trials_within_budget": all(r["macs"] <= budget for r in complete),
                     "pareto_size": len(result.pareto), "wall_s": round(wall, 1), "cpu_minutes": round(cpu / 60, 2),
                     "supernet_s": result.info.get("supernet_seconds"),
                     "architecture": best["spec"], "report": result.artifacts.get("report")})
        print(f"{strategy}: val {best['val_accuracy']:.4f} test {rows[-1]['test_accuracy']:.4f} "
              f"macs {best['macs']:,} wall {wall:.0f}s cpu {cpu / 60:.1f} min", flush=True)
    return rows


def seed_rows(task, args, search_rows: list[dict]) -> list[dict]:
    """The zoo net and each strategy's chosen architecture trained again from scratch with seeds
    first..first+k-1, all with the same epochs (`--final-epochs`, default 3x the proxy's) and learning rate:
    a comparison of architectures, not of lucky initializations (on a 360-image test split one image is
    0.28 points, and seed-to-seed spread is about 1 point)."""
    import torch

    from slimkit import zoo
    from slimkit.core.trainer import TrainConfig, accuracy, fit
    from slimkit.search.space import build

    def train(make, seed):
        return fit(make(seed), task, TrainConfig(epochs=args.final_epochs, lr=2e-3, seed=seed), progress=False).model

    def zoo_net(seed):
        return zoo.for_task("mobilenetv2_small", task, seed=seed)

    def chosen(spec):
        def make(seed):
            torch.manual_seed(seed)
            return build(spec)
        return make

    models = [("zoo:mobilenetv2_small", zoo_net)] + [(r["strategy"], chosen(r["architecture"])) for r in search_rows]
    rows = []
    for label, make in models:
        seeds = list(range(args.first_seed, args.first_seed + args.final_seeds))
        nets = [train(make, seed) for seed in seeds]
        accs = [test_accuracy(net, task) for net in nets]
        vals = [accuracy(net, task, "val") for net in nets]
        rows.append({"part": "seeds", "model": label, "seeds": args.final_seeds, "seed_list": seeds, "epochs": args.final_epochs,
                     "test_accuracies": [round(a, 4) for a in accs], "mean_test_accuracy": sum(accs) / len(accs),
                     "val_accuracies": [round(a, 4) for a in vals], "mean_val_accuracy": sum(vals) / len(vals)})
        print(f"{label}: {args.final_seeds} seeds, mean test {rows[-1]['mean_test_accuracy']:.4f} {rows[-1]['test_accuracies']}",
              flush=True)
    return rows


def latency_rows(task, args) -> list[dict]:
    """Calibrate the table's scale on `calib` candidates, then check it on `samples` other candidates."""
    import numpy as np
    import torch

    from slimkit.search.cost import LatencyTable, check_table
    from slimkit.search.space import MBConvSpace, build

    space = MBConvSpace.for_task(task)
    decisions = space.decisions()
    rng = np.random.default_rng(args.seed + 11)

    def sample(k):
        return [build(space.spec({d.name: d.choices[int(rng.integers(len(d.choices)))] for d in decisions}))
                for _ in range(k)]

    calib, models = sample(args.latency_calibration), sample(args.latency_samples)
    torch.set_num_threads(1)
    rows = []
    for statistic in ("median_ms", "p10_ms"):
        table = LatencyTable("torch", threads=1, batch_size=1, runs=args.latency_runs, statistic=statistic)
        t0 = time.perf_counter()
        checked = check_table(table, models, rounds=args.latency_rounds, calibration=calib)
        scale = table.scale
        for i, r in enumerate(checked):
            rows.append({"part": "latency", "statistic": statistic, "candidate": i, "scale": round(scale, 4),
                         "runtime": "torch-eager", "threads": 1, "batch_size": 1, "runs": args.latency_runs,
                         "rounds": args.latency_rounds,
                         **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}})
        print(f"latency table ({statistic}): scale {scale:.3f}, {len(table.entries)} entries, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    torch.set_num_threads(args.threads)
    return rows


def _killed_search(task, out_dir, cfg_dict):
    from slimkit.search.nas import NASConfig, search

    search(task, NASConfig.from_dict(cfg_dict), out_dir=out_dir, progress=False)


def scale_out_rows(work: Path, args) -> list[dict]:
    """Two worker processes on one journal storage; then a search killed mid-way and resumed."""
    from slimkit import data
    from slimkit.search.nas import NASConfig, search

    task = data.digits(size=8)
    tiny = dict(space_options={"widths": [0.5], "depths": [1, 2], "kernels": [3, 5], "expansions": [1, 3]},
                epochs=1, max_steps=3, train_fraction=0.3, population=2, sample_size=1, seed=args.seed)

    def read_events(d):
        p = d / "events.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    rows = []
    n = args.scale_trials
    out = work / "two-workers"
    result = search(task, NASConfig(strategy="evolution", trials=n, **tiny), out_dir=out, workers=2, progress=False)
    ev = read_events(out)
    done = [e["trial"] for e in ev if e["event"] == "done"]
    rows.append({"part": "scale-out", "test": "two workers, one journal storage", "trials_requested": n,
                 "trials_completed": sum(r["state"] == "COMPLETE" for r in result.rows), "trials_started": sum(
                     e["event"] == "start" for e in ev), "distinct_done": len(set(done)), "done_events": len(done),
                 "workers_used": len({(e["host"], e["pid"]) for e in ev if e["event"] == "start"})})
    out = work / "resume"
    cfg = NASConfig(strategy="random", trials=n, **tiny)
    proc = multiprocessing.get_context("fork").Process(target=_killed_search, args=(task, out, cfg.to_dict()))
    proc.start()
    deadline = time.time() + 300
    while time.time() < deadline:
        ev = read_events(out)
        if sum(e["event"] == "done" for e in ev) >= 2 and ev[-1]["event"] == "start":
            break
        time.sleep(0.05)
    proc.kill()
    proc.join()
    before = {e["trial"] for e in read_events(out) if e["event"] == "done"}
    result = search(task, cfg, out_dir=out, progress=False)
    done = [e["trial"] for e in read_events(out) if e["event"] == "done"]
    rows.append({"part": "scale-out", "test": "killed mid-way, resumed", "trials_requested": n,
                 "done_before_kill": len(before), "trials_completed": sum(r["state"] == "COMPLETE" for r in result.rows),
                 "failed_by_kill": sum(r["failure"] == "worker died" for r in result.rows),
                 "distinct_done": len(set(done)), "done_events": len(done), "kept_before_kill": before <= set(done)})
    return rows


def bad_input_rows(task, work: Path) -> list[dict]:
    from slimkit.errors import SlimkitError
    from slimkit.search.nas import NASConfig, search

    cases = {
        "budget no candidate meets (max_macs=1000)": lambda: search(task, NASConfig(max_macs=1000, trials=1),
                                                                    out_dir=work / "bad", progress=False),
        "empty space (kernels=[])": lambda: search(task, NASConfig(space_options={"kernels": []}, trials=1),
                                                   out_dir=work / "bad", progress=False),
        "contradictory space (6 stride-2 stages on small images)": lambda: search(
            task, NASConfig(space_options={"stage_channels": [8] * 6, "stage_strides": [2] * 6}, trials=1),
            out_dir=work / "bad", progress=False),
    }
    rows = []
    for name, fn in cases.items():
        try:
            fn()
            rows.append({"part": "bad-input", "case": name, "error": None, "message": None, "typed": False})
        except SlimkitError as err:
            rows.append({"part": "bad-input", "case": name, "error": type(err).__name__, "message": str(err)[:200],
                         "typed": True})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", nargs="+", default=["latency", "search", "scale", "bad"],
                        choices=["latency", "search", "replicate", "scale", "bad"],
                        help="replicate: retrain the chosen architectures of the run in --from with other seeds")
    parser.add_argument("--size", type=int, default=16, help="digits image size (28: the default task)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--population", type=int, default=10)
    parser.add_argument("--sample-size", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=["random", "evolution", "rl", "gradient"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--finalists", type=int, default=5, help="most accurate trials re-trained before choosing")
    parser.add_argument("--finalist-seeds", type=int, default=3, help="fresh proxy-training seeds per finalist")
    parser.add_argument("--latency-samples", type=int, default=20)
    parser.add_argument("--latency-calibration", type=int, default=3)
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--latency-rounds", type=int, default=5,
                        help="interleaved measurement rounds (smallest value of each unit and model kept)")
    parser.add_argument("--scale-trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--controller-advantage", choices=["spread", "rank"], default="spread",
                        help="rl: how trial rewards weight a policy step")
    parser.add_argument("--controller-cost-weight", type=float, default=0.0,
                        help="rl: reward = accuracy - weight * |MACs / budget - 1| (TuNAS)")
    parser.add_argument("--final-seeds", type=int, default=10,
                        help="seeds the zoo net and each chosen architecture are retrained with for the accuracy check")
    parser.add_argument("--first-seed", type=int, default=0, help="the first of those seeds")
    parser.add_argument("--final-epochs", type=int, default=None,
                        help="epochs of that retraining, the same for the zoo net and every answer (default: 3x "
                             "--epochs: the 5-epoch proxy leaves the zoo net at 98.1%%, 15 epochs at 98.7%%)")
    parser.add_argument("--from", dest="from_json", default=None,
                        help="replicate: a benchmark JSON whose 'search' rows give the architectures")
    parser.add_argument("--work", default=None, help="folder for search outputs (default: a temporary folder)")
    args = parser.parse_args()
    if "replicate" in args.parts and (not args.from_json or "search" in args.parts):
        parser.error("--parts replicate needs --from FILE (a finished run) and no search part")
    if args.final_epochs is None:
        args.final_epochs = 3 * args.epochs
    os.environ.setdefault("SLIMKIT_PROGRESS", "0")
    import optuna
    import torch

    from slimkit import data, zoo
    from slimkit.core.trainer import TrainConfig, accuracy, fit
    from slimkit.evaluate import count_macs, count_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="slimkit-nas-bench-"))
    env = environment(command=" ".join(["python", *sys.argv]), digits_size=args.size, trials=args.trials,
                      epochs=args.epochs, train_threads=args.threads,
                      note="machine shared with other jobs; compare figures within this run only")
    task = data.digits(size=args.size)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    zoo_net = fit(zoo.for_task("mobilenetv2_small", task, seed=args.seed), task, TrainConfig(epochs=args.epochs, lr=2e-3, seed=args.seed),
                  progress=False).model
    zoo_macs = count_macs(zoo_net, task.example_input(1))
    budget = zoo_macs // 2
    rows = [{"part": "baseline", "model": "zoo:mobilenetv2_small", "epochs": args.epochs, "macs": zoo_macs,
             "params": count_params(zoo_net)["params"], "val_accuracy": accuracy(zoo_net, task, "val"),
             "test_accuracy": test_accuracy(zoo_net, task), "wall_s": round(time.perf_counter() - t0, 1),
             "cpu_minutes": round((cpu_seconds() - cpu0) / 60, 2)}]
    print(f"zoo mobilenetv2_small: {zoo_macs:,} MACs, test {rows[0]['test_accuracy']:.4f}; budget {budget:,} MACs",
          flush=True)
    parts = set(args.parts)
    if "latency" in parts:
        rows += latency_rows(task, args)  # first, while nothing else of this run competes for the cores
    if "search" in parts:
        rows += run_strategies(task, args, budget, work)
        rows += seed_rows(task, args, [r for r in rows if r["part"] == "search"])
    if "replicate" in parts:
        earlier = [r for r in json.loads(Path(args.from_json).read_text())["rows"] if r["part"] == "search"]
        rows += [{**r, "replicated_from": args.from_json} for r in earlier]
        rows += seed_rows(task, args, earlier)
    if "scale" in parts:
        rows += scale_out_rows(work, args)
    if "bad" in parts:
        rows += bad_input_rows(task, work)
    checks = []
    if parts & {"search", "replicate"}:
        search_checks(rows, args, budget, checks)
    if "latency" in parts:
        latency_checks(rows, checks)
    if "scale" in parts:
        scale_checks(rows, checks)
    if "bad" in parts:
        bad_input_checks(rows, checks)
    write_result(args.out, "nas", env, rows, checks)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def search_checks(rows: list[dict], args, budget: int, checks: list) -> None:
    base = rows[0]
    search_rows = {r["strategy"]: r for r in rows if r["part"] == "search"}
    print_table([r for r in rows if r["part"] in ("baseline", "search")],
                ["part", "strategy", "model", "trials", "epochs", "val_accuracy", "test_accuracy", "macs", "params",
                 "within_budget", "wall_s", "cpu_minutes"], title="search under half the zoo net's MACs")
    seeds = {r["model"]: r for r in rows if r["part"] == "seeds"}
    zoo_mean = seeds["zoo:mobilenetv2_small"]["mean_test_accuracy"]
    print_table(list(seeds.values()), ["model", "seeds", "epochs", "test_accuracies", "mean_test_accuracy",
                                       "mean_val_accuracy"],
                title=f"retrained from scratch, seeds {args.first_seed}-{args.first_seed + args.final_seeds - 1}")
    for s in ("evolution", "rl"):
        if s in search_rows:
            r, mean = search_rows[s], seeds[s]["mean_test_accuracy"]
            checks.append(check(f"{s}: mean test accuracy over seeds {args.first_seed}-"
                                f"{args.first_seed + args.final_seeds - 1} >= zoo net's "
                                f"(both trained {args.final_epochs} epochs), MACs <= budget, <= 20 CPU-min",
                                {"mean_test_accuracy": round(mean, 4), "zoo_mean_test_accuracy": round(zoo_mean, 4),
                                 "delta_pp": round(100 * (mean - zoo_mean), 2),
                                 "search_run_test_accuracy": r["test_accuracy"],
                                 "zoo_search_run_test_accuracy": base["test_accuracy"],
                                 "macs": r["macs"], "budget": budget, "cpu_minutes": r["cpu_minutes"]},
                                ">= zoo, <= budget, <= 20",
                                mean >= zoo_mean and r["within_budget"] and r["cpu_minutes"] <= 20))
    if "random" in search_rows:
        same = {r["trials"] for r in search_rows.values() if r["strategy"] in ("random", "evolution", "rl")}
        checks.append(check("random search reported with the same number of trials",
                            {s: r["trials"] for s, r in search_rows.items()}, "equal trial counts", len(same) == 1))
    checks.append(check("every completed trial honored the MACs budget",
                        {s: r["all_trials_within_budget"] for s, r in search_rows.items()}, "all true",
                        all(r["all_trials_within_budget"] for r in search_rows.values())))


def latency_checks(rows: list[dict], checks: list) -> None:
    lat = [r for r in rows if r["part"] == "latency"]
    print_table(lat, ["statistic", "candidate", "predicted_ms", "measured_ms", "relative_error", "within_tolerance"],
                title="latency table vs end-to-end (torch eager, 1 thread, batch 1)")
    frac = {}
    for statistic in ("p10_ms", "median_ms"):
        sel = [r for r in lat if r["statistic"] == statistic]
        frac[statistic] = round(sum(r["within_tolerance"] for r in sel) / max(len(sel), 1), 3)
    # the check is on the table's own statistic (LatencyTable / NASConfig default: p10); the median
    # table's figure is reported beside it
    checks.append(check("latency table (p10_ms, the table's statistic) within 15% of end-to-end",
                        {"p10_ms": frac["p10_ms"], "median_ms (reported, not the table's statistic)": frac["median_ms"]},
                        ">= 0.8 of candidates", frac["p10_ms"] >= 0.8))


def scale_checks(rows: list[dict], checks: list) -> None:
    scale = [r for r in rows if r["part"] == "scale-out"]
    print_table(scale, title="scale-out and resume")
    two, resumed = scale[0], scale[1]
    checks.append(check("two workers on one storage: N completed, none lost, none run twice",
                        {k: two[k] for k in ("trials_requested", "trials_completed", "trials_started", "distinct_done",
                                             "workers_used")}, "completed == started == distinct == N, 2 workers",
                        two["trials_completed"] == two["trials_started"] == two["distinct_done"] == two["done_events"]
                        == two["trials_requested"] and two["workers_used"] == 2))
    checks.append(check("killed search resumes and completes",
                        {k: resumed[k] for k in ("done_before_kill", "trials_completed", "failed_by_kill",
                                                 "kept_before_kill")}, "completed == N, finished trials kept",
                        resumed["trials_completed"] == resumed["trials_requested"] and resumed["kept_before_kill"]
                        and resumed["distinct_done"] == resumed["done_events"]))


def bad_input_checks(rows: list[dict], checks: list) -> None:
    bad = [r for r in rows if r["part"] == "bad-input"]
    print_table(bad, ["case", "error", "message"], title="bad input")
    checks.append(check("bad input raises typed errors naming the constraint",
                        {r["case"]: r["error"] for r in bad}, "InfeasibleError / ConfigError",
                        bad[0]["error"] == "InfeasibleError" and "max_macs" in (bad[0]["message"] or "")
                        and all(r["typed"] for r in bad)))


if __name__ == "__main__":
    sys.exit(main())
