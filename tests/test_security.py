"""A model file is data: a manifest naming a builder never imports or runs it unless trusted."""
import json
import re
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import slimkit as sk
from slimkit.cli.main import main
from slimkit.errors import ArtifactError, UntrustedFactoryError
from tests.helpers_factory import tiny_net

SRC = Path(__file__).resolve().parents[1] / "src" / "slimkit"


def _hostile_source(marker: Path) -> dict:
    return {"kind": "factory", "ref": "os:system", "kwargs": {"command": f"touch {marker}"}}


def _hostile_safetensors(path: Path, marker: Path) -> Path:
    """A slimkit model file whose manifest names `os:system` (what an attacker would write)."""
    model = tiny_net()
    manifest = {"format": "slimkit-model/1", "slimkit_version": sk.__version__, "torch_version": torch.__version__,
                "source": _hostile_source(marker), "stages": []}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"slimkit": json.dumps(manifest)})
    return path


def _hostile_slim(path: Path, marker: Path) -> Path:
    """A real .slim file whose manifest is rewritten to name `os:system`, header checksum recomputed."""
    import zstandard as zstd

    from slimkit.prune import packed

    sk.save(tiny_net(), path.with_suffix(".safetensors"), factory=tiny_net)  # a callable is registered
    packed.write_packed(sk.load(path.with_suffix(".safetensors")), path)
    data = path.read_bytes()
    magic, version, header_len, _ = packed._PREFIX.unpack_from(data)
    header = data[packed._PREFIX.size:packed._PREFIX.size + header_len]
    dictionary = packed._header_dictionary(version)  # what a reader of this version decompresses against
    meta = json.loads(zstd.ZstdDecompressor(dict_data=dictionary).decompress(header, max_output_size=64 << 20))
    meta["manifest"]["source"] = _hostile_source(marker)
    new_header = zstd.ZstdCompressor(dict_data=dictionary).compress(json.dumps(meta).encode())
    body = data[packed._PREFIX.size + header_len:]
    path.write_bytes(packed._PREFIX.pack(magic, version, len(new_header), zlib.crc32(new_header)) + new_header + body)
    return path


@pytest.fixture(params=["safetensors", "slim"])
def hostile(request, tmp_path):
    marker = tmp_path / "pwned"
    maker = _hostile_safetensors if request.param == "safetensors" else _hostile_slim
    path = maker(tmp_path / f"evil.{request.param}", marker)
    return path, marker


def test_load_refuses_a_hostile_builder(hostile):
    path, marker = hostile
    with pytest.raises(UntrustedFactoryError, match=r"os:system.*trust_factory=True"):
        sk.load(path)
    assert not marker.exists()


RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "int8.yaml")


def _commands(path: str, out: str) -> dict[str, list[str]]:
    """Every CLI command that takes a model, given the hostile file."""
    return {
        "train": ["train", path, "--epochs", "1", "--out", f"{out}/m.safetensors"],
        "evaluate": ["evaluate", path, "--runtime", "torch", "--batch-size", "1"],
        "list": ["list", "--layers", path],
        "prune": ["prune", path, "--out", f"{out}/p"],
        "pack": ["pack", path, "--out", f"{out}/m.slim"],
        "quantize": ["quantize", path, "--out", f"{out}/q"],
        "factorize": ["factorize", path, "--out", f"{out}/f"],
        "separable": ["separable", path, "--out", f"{out}/s"],
        "distill-teacher": ["distill", "--teacher", path, "--student", "zoo:lenet300_100", "--out", f"{out}/d"],
        "distill-student": ["distill", "--teacher", "zoo:lenet300_100", "--teacher-weights", f"{out}/w.safetensors",
                            "--student", path, "--out", f"{out}/d"],
        "compress": ["compress", path, "--recipe", RECIPE, "--out", f"{out}/c"],
        "auto": ["auto", path, "--out", f"{out}/a"],
        "search": ["search", "--reference", path, "--max-macs-ratio", "0.5", "--out", f"{out}/n"],
    }


@pytest.mark.parametrize("command", list(_commands("x", "y")))
def test_every_cli_command_refuses_a_hostile_builder(command, hostile, tmp_path, capsys):
    path, marker = hostile
    out = tmp_path / "out"
    out.mkdir()
    teacher = sk.zoo.lenet300_100(num_classes=10)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(out / "w.safetensors"))
    code = main(_commands(str(path), str(out))[command])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "os:system" in lines[0], err
    assert "--trust-factory" in lines[0]
    assert not marker.exists()


def test_trust_is_explicit_registered_or_given(tmp_path):
    model = tiny_net(hidden=5)
    path = sk.save(model, tmp_path / "f.safetensors", factory="tests.helpers_factory:tiny_net",
                   factory_kwargs={"hidden": 5})
    x = torch.randn(2, 1, 28, 28)
    from slimkit.core import artifact

    artifact._BUILDERS.pop("tests.helpers_factory:tiny_net", None)  # a fresh process knows nothing of it
    with pytest.raises(UntrustedFactoryError, match="tests.helpers_factory:tiny_net"):
        sk.load(path)
    assert torch.allclose(model(x), sk.load(path, trust_factory=True)(x))
    assert sk.register_builder(tiny_net) == "tests.helpers_factory:tiny_net"
    assert torch.allclose(model(x), sk.load(path)(x))


def test_cli_trust_factory_flag_loads_the_file(tmp_path, capsys):
    from slimkit.core import artifact

    path = sk.save(tiny_net(), tmp_path / "f.safetensors", factory="tests.helpers_factory:tiny_net")
    artifact._BUILDERS.pop("tests.helpers_factory:tiny_net", None)
    assert main(["evaluate", str(path), "--runtime", "torch", "--batch-size", "1"]) == 2
    assert "--trust-factory" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--runtime", "torch", "--batch-size", "1", "--trust-factory"]) == 0
    assert "params        6,370" in capsys.readouterr().out


def test_file_kwargs_are_data_and_results_are_checked(tmp_path):
    with pytest.raises(ArtifactError, match="not a function"):
        sk.load(_with_source(tmp_path / "a.safetensors", {"kind": "factory", "ref": "os:sep", "kwargs": {}}),
                trust_factory=True)
    with pytest.raises(ArtifactError, match="returned int"):
        sk.load(_with_source(tmp_path / "b.safetensors", {"kind": "factory", "ref": "os:getpid", "kwargs": {}}),
                trust_factory=True)
    with pytest.raises(ArtifactError, match="JSON object"):
        sk.load(_with_source(tmp_path / "c.safetensors", {"kind": "zoo", "ref": "lenet5", "kwargs": ["x"]}))
    with pytest.raises(ArtifactError, match="bad factory reference"):
        sk.load(_with_source(tmp_path / "d.safetensors", {"kind": "factory", "ref": "nocolon", "kwargs": {}}))


def _with_source(path: Path, source) -> Path:
    manifest = {"format": "slimkit-model/1", "slimkit_version": sk.__version__, "source": source, "stages": []}
    save_file({"w": torch.zeros(1)}, str(path), metadata={"slimkit": json.dumps(manifest)})
    return path


def test_a_typed_factory_reference_must_be_a_module_builder(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(weights))
    for ref, needle in (("os:sep", "not a function"), ("os:getpid", "returned int"), ("os:nothing", "no attribute")):
        assert main(["evaluate", ref, "--weights", str(weights)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err


def test_nothing_outside_the_trusted_path_imports_a_name_it_was_given():
    """The only dynamic imports are of slimkit's own modules or fixed tables; resolve_factory (which
    imports a reference) is called only on the trusted branch of build_source and for a reference
    typed by the user (load_factory_weights)."""
    dynamic = {}
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"import_module\(", r"__import__\(", r"resolve_factory\(", r"\bpickle\.loads?\(",
                        r"torch\.load\((?![^)]*weights_only=True)"):
            n = len(re.findall(pattern, text))
            if n:
                dynamic.setdefault(str(path.relative_to(SRC)), {})[pattern] = n
    assert dynamic == {
        "__init__.py": {r"import_module\(": 2},
        "cli/main.py": {r"import_module\(": 1},  # technique CLIs; `env` reads package versions from metadata
        "core/registry.py": {r"import_module\(": 2},  # slimkit's families; plugins the user installed or named
        "core/artifact.py": {r"import_module\(": 1, r"resolve_factory\(": 3},
        "search/__init__.py": {r"import_module\(": 2},
        "zoo/pretrained.py": {r"import_module\(": 1},
    }
    registry = (SRC / "core" / "registry.py").read_text()
    loading = registry[registry.index("def load_all"):registry.index("def plugin_modules")]
    assert "importlib.import_module(module)" in loading and "for module in plugin_modules():" in loading
    plugins = registry[registry.index("def plugin_modules"):registry.index("def techniques")]
    assert "entry_points(group=ENTRY_POINTS)" in plugins and "os.environ.get(PLUGINS_ENV" in plugins  # never a file
    text = (SRC / "core" / "artifact.py").read_text()
    trusted_branch = text[text.index("def build_source"):text.index("def rebuild")]
    assert "elif trust_factory:\n            fn = resolve_factory(ref)" in trusted_branch
