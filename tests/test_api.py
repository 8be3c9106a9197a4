"""The public API table: every technique package's public names reachable as `sk.NAME`, each importing only
the package that defines it (and that package's own dependencies)."""
import importlib
import subprocess
import sys

import pytest

import slimkit as sk


def test_every_public_name_of_every_package_is_in_the_table():
    for pkg in ("arch", "distill", "lowrank", "pipeline", "prune", "quantize", "search"):
        module = importlib.import_module(f"slimkit.{pkg}")
        missing = [n for n in module.__all__ if n not in sk._LAZY and n != pkg and n != "restore"]
        assert not missing, (pkg, missing)
        assert all(getattr(sk, n) is getattr(module, n) for n in module.__all__ if sk._LAZY.get(n) == f"slimkit.{pkg}")


def test_a_name_imports_only_its_package():
    code = ("import sys, slimkit as sk; sk.PruneConfig; "
            "print(' '.join(m for m in sys.modules if m.startswith('slimkit.') and m.count('.') == 1))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "slimkit.prune" in loaded
    assert not loaded & {"slimkit.quantize", "slimkit.arch", "slimkit.lowrank", "slimkit.search", "slimkit.pipeline"}


def test_ambiguous_and_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="restore"):  # each technique has its own: sk.quantize.restore
        sk.restore
    with pytest.raises(AttributeError, match="no_such_name"):
        sk.no_such_name
    assert callable(sk.prune) and sk.prune.PruneConfig is sk.PruneConfig  # the package, callable as its verb
