"""The classic: train a small CNN on MNIST-format digits, quantize weights and activations to 8 bits,
print accuracy, bytes and latency before and after.

    python examples/mnist_int8.py                      # scikit-learn digits (embedded, real)
    python examples/mnist_int8.py --mnist DIR          # real MNIST IDX files in DIR (nothing downloaded)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import slimkit as sk
from slimkit.evaluate import ort_latency, torch_latency
from slimkit.export.onnx import export_onnx
from slimkit.quantize import QuantConfig, check_parity, export_quantized


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", help="folder with MNIST IDX files (train-images-idx3-ubyte[.gz] ...)")
    ap.add_argument("--model", default="vgg_small", help="zoo model: vgg_small (default) or lenet5")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    task = sk.data.mnist(args.mnist) if args.mnist else sk.data.digits()
    model = sk.train(sk.zoo.for_task(args.model, task), task, epochs=args.epochs, lr=2e-3)
    q = sk.quantize(model, QuantConfig(weights="int8", activations="uint8", per_channel=True,
                                       calibration="percentile"), task=task)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", task.example_input(1))
        int8 = export_quantized(q, Path(tmp) / "int8.onnx", task.example_input(1))
        x = task.example_input(args.batch)
        print(f"{task.name}, {args.model}, batch {args.batch}, 1 thread")
        for label, m, path in (("fp32", model, fp32), ("int8", q, int8)):
            acc = sk.evaluate.topk_accuracy(*sk.evaluate.predict(m, task, "test"))["top1"]
            ort_ms = ort_latency(path, x, threads=1, runs=30)["median_ms"]
            line = f"{label:<5} accuracy {100 * acc:6.2f}%  {path.stat().st_size:>10,} bytes  onnxruntime {ort_ms:8.3f} ms"
            if label == "fp32":
                line += f"  (PyTorch eager {torch_latency(m, x, threads=1, runs=20)['median_ms']:.3f} ms)"
            print(line)
        parity = check_parity(q, int8, x)
        print(f"ONNX Runtime int8 vs slimkit simulation: max |diff| {parity['max_abs_diff']:.3g}, "
              f"top-1 agreement {parity['top1_agreement']:.4f}")


if __name__ == "__main__":
    main()
