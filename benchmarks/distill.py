"""Knowledge distillation benchmark: does KD beat hard labels, and does it recover pruned networks?

    python benchmarks/distill.py --out distill.json            # full run (several minutes on 2 cores)
    python benchmarks/distill.py --out distill.json --quick    # smoke run (fewer seeds/epochs)

Part 1, Hinton-style (Hinton et al. 2015, MNIST: 146 -> 74 test errors): on digits resized to 28x28
and flattened, a teacher MLP 784-1200-1200-10 with dropout (trained on images jittered by up to 1
pixel, as the paper's teacher was) teaches a much smaller student MLP 784-30-30-10. The same student
(same initialization per seed) is trained on hard labels and with KD for the same epochs and learning
rate (at most; both stop early on validation accuracy with the library's default patience), over 5 seeds;
test errors per seed. KD runs with the library's defaults: temperature and alpha "auto", chosen in every run
on the validation split (the labels alone when KD does not help there). `--data glyphs[:N]` runs parts 1-2 on
the generated MNIST-sized set instead of digits. Check: mean KD errors <= 0.8 x mean hard-label errors.

Part 2, teacher-output cache: the same KD run with and without `cache_teacher` (wall time, identical
result).

Part 3, KD as recovery: LeNet-5 (trained 60 epochs on 28x28 digits shifted by up to 1 pixel) and the
part-1 teacher MLP are structurally
pruned (channels / neurons removed for real with torch-pruning's MagnitudePruner; slimkit's own
structured pruning belongs to the pruning issue), then recovered for the same epochs with plain
fine-tuning or with KD from the unpruned model, over 5 seeds (T, alpha chosen on validation), both
for 40 epochs on shifted images (image networks).
Check per network: mean test accuracy after KD >= after plain fine-tuning.

Part 4, shifted inputs (`DistillConfig.augment="shift"`): LeNet-5 trained on 28x28 digits teaches
the advisor's students (LeNet-300-100 at width 0.5, at full and at half input resolution) for 120
epochs, over 3 seeds, four ways: hard labels, hard labels on shifted images, KD, KD on shifted
images (shifts of up to 1 pixel). Check: mean test errors of KD on shifted images <= of plain KD.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check, environment, print_table, write_result  # noqa: E402

from slimkit import data, zoo  # noqa: E402
from slimkit.core.task import Task, tensor_task  # noqa: E402
from slimkit.core.trainer import TrainConfig, fit  # noqa: E402
from slimkit.core.state import stages  # noqa: E402
from slimkit.distill import DistillConfig, distill, finetune, recover  # noqa: E402
from slimkit.distill.apply import resolved_patience  # noqa: E402
from slimkit.evaluate import count_params, predict  # noqa: E402


def test_errors(model: nn.Module, task: Task) -> int:
    logits, targets = predict(model, task, "test")
    return int((logits.argmax(1) != targets).sum())


def test_accuracy(model: nn.Module, task: Task) -> float:
    logits, targets = predict(model, task, "test")
    return float((logits.argmax(1) == targets).float().mean())


def mlp(sizes: list[int], dropout_in: float = 0.0, dropout_hidden: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Dropout(dropout_in)] if dropout_in else []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout_hidden:
                layers.append(nn.Dropout(dropout_hidden))
    return nn.Sequential(*layers)


def jittered(task: Task, pixels: int, side: int = 28) -> Task:
    """The task with its training images shifted by up to `pixels` in x and y (the teacher's data)."""
    x = torch.stack([task.train[i][0] for i in range(len(task.train))]).view(-1, 1, side, side)
    y = torch.stack([task.train[i][1] for i in range(len(task.train))])
    background = float(x.min())  # standardized zero pixel
    padded = F.pad(x, (pixels,) * 4, value=background)
    shifted = [padded[:, :, pixels + dy: pixels + dy + side, pixels + dx: pixels + dx + side]
               for dy in range(-pixels, pixels + 1) for dx in range(-pixels, pixels + 1)]
    xs = torch.cat(shifted).flatten(1)
    ys = y.repeat(len(shifted))
    val = [torch.stack(t) for t in zip(*[task.val[i] for i in range(len(task.val))])]
    test = [torch.stack(t) for t in zip(*[task.test[i] for i in range(len(task.test))])]
    return tensor_task("digits-jittered", xs, ys, *val, *test, num_classes=10, batch_size=128)


TUNE_SEED = 99  # the validation-split tuning runs use a seed none of the reported runs use


def tune(train_fn, task: Task, part: str, rows: list[dict], grid: list[tuple[float, float]]) -> tuple[float, float]:
    """The (temperature, alpha) of `grid` whose student makes the fewest validation errors."""
    best = None
    for t, a in grid:
        logits, targets = predict(train_fn(t, a), task, "val")
        val_errors = int((logits.argmax(1) != targets).sum())
        rows.append({"part": f"{part}-tune", "temperature": t, "alpha": a, "val_errors": val_errors, "seed": TUNE_SEED})
        if best is None or val_errors < best[0]:
            best = (val_errors, t, a)
    print(f"{part}: tuned on the validation split: T={best[1]:g}, alpha={best[2]:g} ({best[0]} val errors)")
    return best[1], best[2]


def load_data(ref: str) -> Task:
    """The benchmark's data, flattened 28x28: `digits` (embedded) or `glyphs[:N_TRAIN]` (generated, MNIST-sized)."""
    return data.resolve(ref, flatten=True)  # digits are 28x28 by default


def hinton(args, rows: list[dict]) -> dict:
    task = load_data(args.data)
    n_in = task.input_shape[0]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    teacher = mlp([n_in, 1200, 1200, 10], dropout_in=0.2, dropout_hidden=0.5)
    teacher_task = jittered(task, args.jitter) if args.jitter else task
    teacher = fit(teacher, teacher_task, TrainConfig(epochs=args.teacher_epochs, lr=1e-3, seed=0),
                  description="teacher 2x1200").model
    teacher_errors = test_errors(teacher, task)
    teacher_s = time.perf_counter() - t0
    hidden = args.student_hidden
    student_params = count_params(mlp([n_in, hidden, hidden, 10]))["params"]
    print(f"teacher 784-1200-1200-10 ({count_params(teacher)['params']:,} params): {teacher_errors} test errors "
          f"of {len(task.test)} ({teacher_s:.0f} s); student 784-{hidden}-{hidden}-10 ({student_params:,} params)")

    def student(seed: int) -> nn.Module:
        torch.manual_seed(1000 + seed)  # same initialization for the hard-label and the KD student
        return mlp([n_in, hidden, hidden, 10])

    # the library's defaults: T and alpha "auto" (chosen per run on the validation split, labels when KD does
    # not help) and early stopping on validation; the hard-label baseline gets the same early stopping
    train = dict(epochs=args.epochs, lr=args.lr)
    temperature = args.temperature if args.temperature == "auto" else float(args.temperature)
    alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
    kd_cfg = dict(temperature=temperature, alpha=alpha, cache_teacher=True, **train)
    patience = resolved_patience(DistillConfig(**kd_cfg), task)

    part = []
    for seed in range(args.seeds):
        t1 = time.perf_counter()
        hard = fit(student(seed), task, TrainConfig(seed=seed, patience=patience, **train),
                   description=f"hard labels seed {seed}").model
        t2 = time.perf_counter()
        kd = distill(student(seed), teacher, task=task, config=DistillConfig(seed=seed, **kd_cfg))
        t3 = time.perf_counter()
        used = stages(kd)[-1]["structure"]
        row = {"part": "hinton", "data": task.name, "seed": seed, "teacher_errors": teacher_errors,
               "hard_errors": test_errors(hard, task), "kd_errors": test_errors(kd, task), "test_images": len(task.test),
               "train_images": len(task.train), "student_hidden": hidden, "student_params": student_params,
               "max_epochs": args.epochs, "patience": patience, "temperature": used["temperature"],
               "alpha": used["alpha"], "kd_best_epoch": used["best_epoch"], "hard_seconds": round(t2 - t1, 1),
               "kd_seconds_with_tuning": round(t3 - t2, 1),
               "tuning": [(r["temperature"], r["alpha"], round(r["val_accuracy"], 4))
                          for r in used.get("tuning", {}).get("trials", [])],
               "full_runs_val": [(r["temperature"], r["alpha"], round(r["val_accuracy"], 4))
                                 for r in used.get("tuning", {}).get("final", [])]}
        part.append(row)
        rows.append(row)
    print_table(part, ["seed", "teacher_errors", "hard_errors", "kd_errors", "test_images", "temperature", "alpha",
                       "kd_best_epoch", "hard_seconds", "kd_seconds_with_tuning"],
                title=f"Hinton-style on {task.name}: student 784-{hidden}-{hidden}-10, at most {args.epochs} epochs, "
                      f"T/alpha {temperature}/{alpha}")
    return {"task": task, "teacher": teacher, "student": student, "temperature": temperature, "alpha": alpha,
            "rows": part}


def cache_timing(args, ctx: dict, rows: list[dict]) -> list[dict]:
    part = []
    results = {}
    for cache in (False, True):
        model = ctx["student"](0)
        t0 = time.perf_counter()
        trained = distill(model, ctx["teacher"], task=ctx["task"], config=DistillConfig(
            temperature=4.0, alpha=0.9, patience=None, seed=0, epochs=args.epochs, lr=args.lr,
            cache_teacher=cache))
        seconds = time.perf_counter() - t0
        results[cache] = trained
        note = [n for n in trained.slimkit_notes if "cached" in n]
        row = {"part": "cache", "cache_teacher": cache, "seconds": round(seconds, 2), "epochs": args.epochs,
               "note": note[0] if note else ""}
        part.append(row)
        rows.append(row)
    x = ctx["task"].example_input(64, split="test")
    same = bool(torch.allclose(results[False](x), results[True](x), atol=1e-5))
    for row in part:
        row["same_result"] = same
    print_table(part, ["cache_teacher", "seconds", "same_result", "note"], title="teacher-output cache")
    return part


def structured_prune(model: nn.Module, example: torch.Tensor, ratio: float, last: nn.Module) -> nn.Module:
    """Remove channels/neurons for real with torch-pruning (the classifier's output layer is kept)."""
    import torch_pruning as tp

    from slimkit.core.state import copy_model

    pruned = copy_model(model).eval()
    index = dict(model.named_modules())
    last_name = next(n for n, m in index.items() if m is last)
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=[pruned.get_submodule(last_name)])
    pruner.step()
    return pruned


def recovery_one(args, name: str, teacher: nn.Module, task: Task, ratio: float, last: nn.Module,
                 rows: list[dict]) -> list[dict]:
    pruned = structured_prune(teacher, task.example_input(2), ratio, last)
    base_acc, pruned_acc = test_accuracy(teacher, task), test_accuracy(pruned, task)
    p0, p1 = count_params(teacher)["params"], count_params(pruned)["params"]
    print(f"{name}: {p0:,} params, test accuracy {100 * base_acc:.2f}%; {ratio:.0%} of channels/neurons pruned -> "
          f"{p1:,} params, {100 * pruned_acc:.2f}% before recovery")
    augment = args.recovery_augment if task.example_input(1).dim() == 4 else "none"  # shifts need images
    train = dict(epochs=args.recovery_epochs, lr=args.recovery_lr, augment=augment, max_shift=1)
    temperature, alpha = args.recovery_temperature, args.recovery_alpha
    if args.tune:
        temperature, alpha = tune(lambda t, a: recover(pruned, teacher, task, temperature=t, alpha=a, seed=TUNE_SEED,
                                                       cache_teacher=augment == "none", **train),
                                  task, f"recovery {name}", rows, grid=[(1.0, 0.5), (2.0, 0.5), (4.0, 0.9)])
    part = []
    for seed in range(args.seeds):
        ft = finetune(pruned, task, seed=seed, description=f"fine-tune seed {seed}", **train)
        kd = recover(pruned, teacher, task, temperature=temperature, alpha=alpha,
                     cache_teacher=augment == "none", seed=seed,
                     description=f"recover (KD) seed {seed}", **train)
        row = {"part": "recovery", "network": name, "seed": seed, "original_accuracy": base_acc,
               "pruned_accuracy": pruned_acc, "finetune_accuracy": test_accuracy(ft, task),
               "kd_accuracy": test_accuracy(kd, task), "original_params": p0, "pruned_params": p1,
               "epochs": args.recovery_epochs, "lr": args.recovery_lr, "prune_ratio": ratio,
               "temperature": temperature, "alpha": alpha, "augment": augment}
        part.append(row)
        rows.append(row)
    print_table(part, ["network", "seed", "original_accuracy", "pruned_accuracy", "finetune_accuracy", "kd_accuracy"],
                title=f"KD as recovery: {name} pruned {ratio:.0%} (torch-pruning), {args.recovery_epochs} epochs, "
                      f"T={temperature:g}, alpha={alpha:g}")
    return part


def recovery(args, ctx: dict | None, rows: list[dict]) -> dict[str, list[dict]]:
    parts = {}
    task = data.digits()
    # a converged original, as users prune: trained long, on shifted images (99.4% test at 60 epochs)
    lenet = finetune(zoo.for_task("lenet5", task, seed=0), task, epochs=args.lenet_epochs, lr=2e-3, seed=0,
                     augment="shift", max_shift=1, description="LeNet-5")
    parts["lenet5"] = recovery_one(args, "lenet5", lenet, task, args.prune_ratio, lenet.classifier[-1], rows)
    if ctx is not None:  # the Hinton teacher MLP, pruned to a small MLP
        mlp_teacher = ctx["teacher"]
        parts["mlp-2x1200"] = recovery_one(args, "mlp-2x1200", mlp_teacher, ctx["task"], args.mlp_prune_ratio,
                                           mlp_teacher[-1], rows)
    return parts


def augment(args, rows: list[dict]) -> list[dict]:
    task = data.digits()
    teacher = fit(zoo.for_task("lenet5", task, seed=0), task, TrainConfig(epochs=30, lr=2e-3, seed=0), progress=False).model
    teacher_errors = test_errors(teacher, task)
    part = []
    for pool in (1, 2):
        for seed in range(args.augment_seeds):
            torch.manual_seed(seed)
            student = zoo.for_task("lenet300_100", task, width=0.5, input_pool=pool)
            row = {"part": "augment", "student": "lenet300_100 w0.5" + (f" pool{pool}" if pool > 1 else ""),
                   "seed": seed, "teacher_errors": teacher_errors}
            for how in ("none", "shift"):
                hard = finetune(student, task, epochs=args.augment_epochs, lr=2e-3, seed=seed, augment=how, max_shift=1)
                kd = distill(student, teacher, task=task, config=DistillConfig(
                    epochs=args.augment_epochs, lr=2e-3, seed=seed, augment=how, max_shift=1))
                suffix = "" if how == "none" else "_shift"
                row[f"hard{suffix}_errors"], row[f"kd{suffix}_errors"] = test_errors(hard, task), test_errors(kd, task)
            part.append(row)
            rows.append(row)
    print_table(part, ["student", "seed", "teacher_errors", "hard_errors", "hard_shift_errors", "kd_errors",
                       "kd_shift_errors"], title=f"shifted inputs (test errors of {len(task.test)})")
    return part


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, fewer epochs")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--jitter", type=int, default=1, help="teacher trains on images shifted by up to N pixels")
    p.add_argument("--student-hidden", type=int, default=30)
    p.add_argument("--epochs", type=int, default=150, help="student epochs (hard labels and KD alike; KD needs a long, \"patient\" schedule)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data", default="digits", help="digits | glyphs[:N_TRAIN] (parts 1-2)")
    p.add_argument("--temperature", default="auto", help="part 1: a number, or auto (the library's default)")
    p.add_argument("--alpha", default="auto", help="part 1: a number, or auto (the library's default)")
    p.add_argument("--no-tune", dest="tune", action="store_false",
                   help="part 3: use --recovery-temperature/--recovery-alpha as given instead of choosing them on "
                        "the validation split")
    p.add_argument("--lenet-epochs", type=int, default=60,
                   help="epochs of the LeNet-5 that part 3 prunes (trained on images shifted by up to 1 pixel)")
    p.add_argument("--prune-ratio", type=float, default=0.7, help="LeNet-5 channels/neurons removed")
    p.add_argument("--mlp-prune-ratio", type=float, default=0.95, help="teacher MLP neurons removed")
    p.add_argument("--recovery-epochs", type=int, default=40)
    p.add_argument("--recovery-lr", type=float, default=3e-3)
    p.add_argument("--recovery-temperature", type=float, default=4.0)
    p.add_argument("--recovery-alpha", type=float, default=0.9)
    p.add_argument("--recovery-augment", choices=["none", "shift"], default="shift",
                   help="both recoveries train on images shifted by up to 1 pixel (image networks only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--augment-seeds", type=int, default=3)
    p.add_argument("--augment-epochs", type=int, default=120)
    p.add_argument("--skip", nargs="*", default=[], choices=["hinton", "cache", "recovery", "augment"])
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.teacher_epochs, args.epochs, args.lenet_epochs, args.recovery_epochs = 2, 2, 15, 5, 3
        args.tune = False
    torch.set_num_threads(args.threads)
    env = environment(note="shared 2-core machine; other engineers' jobs were running", args=vars(args))
    rows: list[dict] = []
    checks = []
    t0 = time.perf_counter()
    ctx = None

    def save_partial(done: str) -> None:
        # a long run on a busy machine keeps what it measured so far (rows + checks of the parts done)
        import json

        from slimkit.core.io import write_text

        write_text(args.out, json.dumps({"benchmark": "distill", "environment": {**env, "complete": False,
                                         "parts_done": done}, "rows": rows, "checks": checks}, indent=2, default=str))

    if "hinton" not in args.skip:
        ctx = hinton(args, rows)
        hard = statistics.mean(r["hard_errors"] for r in ctx["rows"])
        kd = statistics.mean(r["kd_errors"] for r in ctx["rows"])
        ratio = kd / hard if hard else float("inf")
        checks.append(check("hinton_kd_over_hard_errors", round(ratio, 3),
                            f"<= 0.8 (mean test errors over {len(ctx['rows'])} seeds: KD {kd:g}, hard labels {hard:g}, "
                            f"teacher {ctx['rows'][0]['teacher_errors']})", ratio <= 0.8))
        save_partial("hinton")
        if "cache" not in args.skip:
            off, on = cache_timing(args, ctx, rows)
            checks.append(check("cache_same_result", on["same_result"], "cached == uncached", on["same_result"]))
            speedup = off["seconds"] / on["seconds"]
            checks.append(check("cache_speedup", round(speedup, 2), "> 1 (teacher runs once per example)", speedup > 1))
            save_partial("hinton, cache")
    if "recovery" not in args.skip:
        for name, part in recovery(args, ctx, rows).items():
            ft = statistics.mean(r["finetune_accuracy"] for r in part)
            kd = statistics.mean(r["kd_accuracy"] for r in part)
            checks.append(check(f"recovery_{name}_kd_minus_finetune_accuracy", round(kd - ft, 4),
                                f">= 0 (mean test accuracy over {len(part)} seeds: KD {kd:.4f}, fine-tune {ft:.4f}; "
                                f"pruned {part[0]['pruned_accuracy']:.4f})", kd >= ft))
    if "augment" not in args.skip:
        part = augment(args, rows)
        for student in dict.fromkeys(r["student"] for r in part):
            sel = [r for r in part if r["student"] == student]
            kd, kd_shift = (statistics.mean(r[k] for r in sel) for k in ("kd_errors", "kd_shift_errors"))
            hard, hard_shift = (statistics.mean(r[k] for r in sel) for k in ("hard_errors", "hard_shift_errors"))
            checks.append(check(f"augment_{student.replace(' ', '_')}_kd_shift_minus_kd_errors", round(kd_shift - kd, 3),
                                f"<= 0 (mean test errors over {len(sel)} seeds: KD+shift {kd_shift:g}, KD {kd:g}, "
                                f"hard+shift {hard_shift:g}, hard {hard:g}, teacher {sel[0]['teacher_errors']})",
                                kd_shift <= kd))
    env["seconds"] = round(time.perf_counter() - t0, 1)
    env["complete"] = True
    write_result(args.out, "distill", env, rows, checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
