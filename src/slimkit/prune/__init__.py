"""Pruning: unstructured / N:M (global or per layer, magnitude or Taylor, one-shot / iterative /
gradual), structured channel pruning with a dependency graph, sensitivity analysis, and the
Deep-Compression `.slim` packed format.

    small = slimkit.prune(model, slimkit.PruneConfig(sparsity=0.9, scope="global"), task=task)
    slim  = slimkit.prune(model, slimkit.StructuredPruneConfig(target_macs=0.5), task=task)
    out   = slimkit.pack(small, "model.slim", slimkit.PackConfig(bits=5, conv_bits=8), task=task)
    again = slimkit.load("model.slim")
"""
from slimkit.prune.apply import prune
from slimkit.prune.config import HeadPruneConfig, PackConfig, PruneConfig, StructuredPruneConfig
from slimkit.prune.masks import check_nm
from slimkit.prune.pack import pack
from slimkit.prune.packed import packed_info, read_packed, write_packed
from slimkit.prune.sensitivity import allocate_sparsity, sensitivity_analysis

__all__ = ["prune", "pack", "PruneConfig", "StructuredPruneConfig", "HeadPruneConfig", "PackConfig", "sensitivity_analysis",
           "allocate_sparsity", "check_nm", "write_packed", "read_packed", "packed_info"]


from slimkit.core.verbs import make_callable  # noqa: E402

make_callable(__name__, "prune")  # `slimkit.prune(model, config, task=task)`
