"""`slimkit` CLI entry point: core commands plus every technique package's `cli.register(app)`.

Every failure a user can cause — a `SlimkitError`, a usage error (unknown command or option, a
missing argument, a bad value), an unwritable output path — is printed as one line
(`error: ...`) without a traceback, exit code 2. Ctrl-C prints one line and exits 130; outputs
are written atomically, so an interrupted command leaves no partial file.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.common import TrustFactoryOpt, console, load_model, load_task
from slimkit.errors import SlimkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slimkit: make PyTorch models smaller and faster, and measure what it cost.")

ModelArg = typer.Argument(..., help="zoo:NAME, a saved .safetensors/.slim model, or package.module:factory")
DataOpt = typer.Option("digits", "--data", "-d", help="digits | glyphs[:N] | mnist:DIR | npz:FILE | imagefolder:DIR")
WeightsOpt = typer.Option(None, "--weights", help="safetensors weights for a factory or zoo model")


def _version(value: bool) -> None:
    if value:
        import slimkit

        print(f"slimkit {slimkit.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """slimkit: make PyTorch models smaller and faster, and measure what it cost."""


@app.command()
def train(
    model: str = ModelArg,
    data: str = DataOpt,
    weights: Optional[str] = WeightsOpt,
    trust_factory: bool = TrustFactoryOpt,
    epochs: int = typer.Option(20, min=1, help="training epochs"),
    lr: float = typer.Option(2e-3, help="learning rate"),
    optimizer: str = typer.Option("adam", help="adam | adamw | sgd"),
    patience: Optional[int] = typer.Option(None, min=1, help="early-stopping patience in epochs (off by default)"),
    seed: int = typer.Option(0, help="random seed"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    config: Optional[Path] = typer.Option(None, "--config", help="TrainConfig as YAML/JSON (overrides the options above)"),
    out: Path = typer.Option(Path("slimkit-out/model.safetensors"), "--out", "-o", help="where to save the trained model"),
) -> None:
    """Train a model on a data set and save it (safetensors + manifest)."""
    from slimkit.core.artifact import save
    from slimkit.core.io import output_file
    from slimkit.core.trainer import TrainConfig, fit
    from slimkit.evaluate.metrics import predict, topk_accuracy

    if config is not None:
        cfg = TrainConfig.from_file(config)
    else:
        cfg = TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, patience=patience, seed=seed, device=device)
    output_file(out)  # before training: an unwritable --out must not cost the training run
    task = load_task(data)
    net = load_model(model, weights=weights, task=task, seed=cfg.seed, trust_factory=trust_factory,
                     untrained_note=False)
    result = fit(net, task, cfg)
    acc = topk_accuracy(*predict(result.model, task, "test"))["top1"]
    save(result.model, out)
    console.print(f"test accuracy {100 * acc:.2f}%  saved {out} ({out.stat().st_size:,} bytes)")


@app.command()
def evaluate(
    model: str = ModelArg,
    data: str = DataOpt,
    weights: Optional[str] = WeightsOpt,
    trust_factory: bool = TrustFactoryOpt,
    runtime: list[str] = typer.Option(["torch", "ort"], help="runtimes to time: torch, ort, openvino, executorch, litert"),
    threads: int = typer.Option(1, min=1, help="threads for latency"),
    batch_size: list[int] = typer.Option([1, 64], min=1, help="batch sizes for latency"),
    split: str = typer.Option("test", help="data split to score"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the metrics as JSON"),
) -> None:
    """Accuracy, parameters, MACs, bytes on disk and latency of a model."""
    from slimkit.core.io import output_file, write_text
    from slimkit.evaluate import evaluate as run_evaluate

    if json_out:
        output_file(json_out)
    task = load_task(data)
    net = load_model(model, weights=weights, task=task, trust_factory=trust_factory)
    artifact = model if Path(model).is_file() else None
    metrics = run_evaluate(net, task, split=split, artifact=artifact, runtimes=runtime, threads=threads,
                           batch_sizes=batch_size)
    print(f"{model} on {task.name} ({split})")
    print(metrics)
    if json_out:
        import json

        write_text(json_out, json.dumps(metrics.to_dict(), indent=2))


@app.command("export")
def export_(
    model: str = ModelArg,
    out: Path = typer.Argument(..., help="file to write; its suffix picks the format: .onnx (ONNX Runtime), "
                               ".xml (OpenVINO IR), .pte (ExecuTorch/XNNPACK), .tflite (LiteRT)"),
    data: str = DataOpt,
    weights: Optional[str] = WeightsOpt,
    trust_factory: bool = TrustFactoryOpt,
    batch_size: int = typer.Option(1, min=1, help="input batch of the program (.pte/.tflite have static shapes)"),
) -> None:
    """Write a model (float, compressed or slimkit-quantized) for a deployment runtime, then check the runtime's
    outputs against slimkit's on a test batch and say what runs off the fast kernels."""
    from slimkit.core.io import output_file
    from slimkit.export import export
    from slimkit.export.runtimes import check_parity, file_bytes, runtime_of, slow_path

    runtime_of(out)  # an unknown suffix fails before any work
    output_file(out)
    task = load_task(data)
    net = load_model(model, weights=weights, task=task, trust_factory=trust_factory)
    path = export(net, out, example_input=task.example_input(batch_size))
    parity = check_parity(net, path, task.example_input(max(batch_size, 64)))
    console.print(f"wrote {path} ({file_bytes(path):,} bytes) for {runtime_of(path)}")
    console.print("parity with slimkit on 64 test inputs: " + ", ".join(f"{k} {v:.4g}" for k, v in parity.items()))
    console.print(f"kernels: {slow_path(path)}")


@app.command("list")
def list_(
    layers: Optional[str] = typer.Option(None, "--layers", help="print the layers of this model reference"),
    trust_factory: bool = TrustFactoryOpt,
) -> None:
    """Techniques, zoo models and data sets (from the registries)."""
    from rich.table import Table

    from slimkit import zoo
    from slimkit.core import registry
    from slimkit.data import DATASETS

    if layers:
        net = load_model(layers, trust_factory=trust_factory)
        for name, module in net.named_modules():
            if name and not list(module.children()):
                n = sum(p.numel() for p in module.parameters(recurse=False))
                print(f"{name:<40} {type(module).__name__:<24} {n:>10,}")
        return
    t = Table(title="techniques")
    for col in ("name", "family", "config", "summary"):
        t.add_column(col)
    for tech in registry.techniques():
        t.add_row(tech.name, tech.family, tech.config_cls.__name__, tech.summary)
    console.print(t)
    z = Table(title="zoo models (zoo:NAME)")
    z.add_column("name")
    z.add_column("summary")
    for entry in zoo.ZOO.values():
        z.add_row(entry.name, entry.summary)
    console.print(z)
    console.print("also: torchvision:NAME, timm:NAME (the libraries' own model names, random weights) and "
                  "hf:MODEL_TYPE / hf:DIR (a transformers config); see slimkit.zoo.external", markup=False,
                  highlight=False)
    d = Table(title="data sets (--data)")
    d.add_column("reference")
    d.add_column("summary")
    for ref, summary in DATASETS.items():
        d.add_row(ref, summary)
    console.print(d)


@app.command()
def env() -> None:
    """Versions, threads and devices: what a bug report needs."""
    import platform

    import torch

    import slimkit

    rows = {"slimkit": slimkit.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torch threads": torch.get_num_threads(),
            "cuda available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        rows["cuda device"] = torch.cuda.get_device_name(0)
    from slimkit.core.cpu import cpu_isa

    isa = cpu_isa()
    rows["cpu"] = f"{isa['machine']}, int8 flags: {' '.join(isa['flags']) or 'none'}"
    rows["int8 accumulate"] = isa["int8_accumulation"]
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("onnx", "onnxruntime", "openvino", "executorch", "litert-torch", "ai-edge-litert", "torchao",
                "torch-pruning", "tensorly", "optuna", "safetensors"):
        try:
            rows[pkg] = version(pkg)
        except PackageNotFoundError:  # optional: report, do not fail
            rows[pkg] = "not installed"
    for k, v in rows.items():
        print(f"{k:<16} {v}")


@app.command()
def demo(
    out: Path = typer.Option(Path("slimkit-out"), "--out", "-o", help="output folder"),
    epochs: int = typer.Option(30, min=1, help="epochs for the baseline LeNet-5"),
    only: Optional[list[str]] = typer.Option(None, help="run only these techniques"),
    advisor: bool = typer.Option(True, "--advisor/--no-advisor", help="also run the advisor (slimkit auto)"),
) -> None:
    """Train LeNet-5 on digits, run every registered technique and the advisor, write report.html and
    result.json."""
    from slimkit.pipeline.demo import run_demo

    result = run_demo(out, epochs=epochs, only=only or None, advisor=advisor)
    console.print(f"wrote {out / 'report.html'} and {out / 'result.json'} ({len(result['stages'])} stages)")
    failed = [s["name"] for s in result["stages"] if s.get("error")]
    if failed:  # the report shows why; a script must not take a partial demo for a success
        print(f"error: {len(failed)} of {len(result['stages']) - 1} techniques failed in the demo: "
              f"{', '.join(failed)} (see {out / 'report.html'})", file=sys.stderr)
        raise typer.Exit(1)


def _register_technique_commands() -> None:
    import slimkit

    for info in pkgutil.iter_modules(slimkit.__path__):
        if info.ispkg and importlib.util.find_spec(f"slimkit.{info.name}.cli") is not None and info.name != "cli":
            module = importlib.import_module(f"slimkit.{info.name}.cli")
            if hasattr(module, "register"):
                module.register(app)


def _usage_error(err) -> str:
    """A click usage error as one line: the command, the message and where to look."""
    ctx = getattr(err, "ctx", None)
    where = ctx.command_path if ctx is not None else "slimkit"
    message = " ".join(err.format_message().split())
    return f"{where}: {message} (see '{where} --help')"


def main(argv: list[str] | None = None) -> int:
    from typer._click import exceptions as click_exceptions  # typer 0.29 raises its bundled click's errors

    from slimkit.core import distributed

    distributed.quiet_other_ranks()  # under torchrun rank 0 prints; every rank still exits with the same code
    try:
        _register_technique_commands()
        code = app(args=argv, standalone_mode=False)
    except SlimkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        code = 130
    except click_exceptions.NoArgsIsHelpError:  # typer has printed the help already
        return 2
    except click_exceptions.ClickException as err:  # usage errors: unknown command/option, bad value
        print(f"error: {_usage_error(err)}", file=sys.stderr)
        return 2
    except typer.Exit as err:
        code = err.exit_code
    except typer.Abort:
        code = 130
    except OSError as err:  # disk full, permission denied, a path in the way: the user's to fix
        name = f" {err.filename}" if getattr(err, "filename", None) else ""
        print(f"error: cannot read or write{name}: {err.strerror or err}", file=sys.stderr)
        return 2
    if code == 130:  # typer turns Ctrl-C into Exit(130); outputs are atomic, so nothing half-written stays
        print("error: interrupted (Ctrl-C); no partial output was written", file=sys.stderr)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
