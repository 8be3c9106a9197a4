"""Case study (a): turn the VGG-style zoo CNN into a MobileNet-style network.

    python examples/case_mobilenet.py [--epochs 6] [--block separable|inverted_residual] [--out case.json]

Trains vgg_small on the embedded digits data, rewrites every 3x3 convolution except the one on the
image into a depthwise-separable block (least-squares init on calibration activations, then
knowledge distillation from the original), and prints accuracy, parameters, MACs, bytes on disk
and latency (PyTorch eager and ONNX Runtime, 1 thread, batch 1 and 64) before and after.
"""
from __future__ import annotations

import argparse
import json

import slimkit as sk
from slimkit.core.trainer import TrainConfig, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the VGG baseline")
    parser.add_argument("--block", default="separable", choices=["separable", "inverted_residual"])
    parser.add_argument("--recovery-epochs", type=int, default=2, help="KD epochs after the conversion")
    parser.add_argument("--out", help="also write the before/after metrics as JSON")
    args = parser.parse_args()

    task = sk.data.digits()
    vgg = fit(sk.zoo.for_task("vgg_small", task), task, TrainConfig(epochs=args.epochs, lr=2e-3),
              description="train vgg_small").model
    mobile = sk.separable(vgg, sk.SeparableConfig(block=args.block,
                                                  recovery={"method": "distill", "epochs": args.recovery_epochs}),
                          task=task)
    report = sk.arch.conversion_report(mobile)
    for name, info in report["layers"].items():
        print(f"converted {name}: {info['params_before']:,} -> {info['params_after']:,} params, "
              f"least-squares relative error {info.get('relative_error', float('nan')):.4f}")
    for name, why in report["skipped"].items():
        print(f"kept {name}: {why}")
    results = {}
    for label, model in (("VGG-small", vgg), (f"MobileNet-style ({args.block})", mobile)):
        metrics = sk.evaluate(model, task, reference=vgg if model is mobile else None, runtimes=("torch", "ort"))
        results[label] = metrics.to_dict()
        print(f"\n== {label}\n{metrics}")
    base, conv = results.values()
    print(f"\nparams {base['params'] / conv['params']:.2f}x fewer, MACs {base['macs'] / conv['macs']:.2f}x fewer, "
          f"accuracy {100 * base['accuracy']:.2f}% -> {100 * conv['accuracy']:.2f}%")
    for row_b, row_c in zip(base["latency"], conv["latency"]):
        print(f"{row_b['runtime']:>16} batch {row_b['batch_size']:>2}: {row_b['median_ms']:.2f} ms -> "
              f"{row_c['median_ms']:.2f} ms ({row_b['median_ms'] / row_c['median_ms']:.2f}x)")
    if args.out:
        from slimkit.core.io import write_text

        write_text(args.out, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
