"""Export: ONNX (fp32 here; techniques register lowerings, e.g. int8 QDQ), packed formats,
and parity checks against the source model.

    slimkit.export(model, "out/model.onnx", example_input=task.example_input(1))
"""
from slimkit.export.base import export, register_exporter
from slimkit.export.onnx import check_onnx_parity, export_onnx

__all__ = ["export", "register_exporter", "export_onnx", "check_onnx_parity"]

from slimkit.core.verbs import make_callable  # noqa: E402

make_callable(__name__, "export")  # `slimkit.export(model, path)` (see core/verbs.py)
