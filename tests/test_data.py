import gzip
import struct

import numpy as np
import pytest
import torch

from slimkit import data
from slimkit.errors import ConfigError, DataError


def test_digits_split_is_fixed_stratified_and_disjoint():
    task = data.digits()
    assert task.input_shape == (1, 28, 28) and task.num_classes == 10
    sizes = [len(task.train), len(task.val), len(task.test)]
    assert sum(sizes) == 1797 and sizes[0] > 1000
    for split in (task.train, task.val, task.test):
        counts = torch.bincount(split.tensors[1], minlength=10)
        assert counts.min() > 0.8 * counts.float().mean()  # stratified: every class present evenly
    again = data.digits()
    assert torch.equal(task.test.tensors[0], again.test.tensors[0])  # fixed split
    # no test image also appears in train
    tr = {tuple(x.flatten().tolist()) for x in data.digits(size=None).train.tensors[0]}
    te = data.digits(size=None).test.tensors[0]
    assert sum(tuple(x.flatten().tolist()) in tr for x in te) < 5  # digits has a few exact duplicate images


def test_digits_sizes_and_flatten():
    assert data.digits(size=32).input_shape == (1, 32, 32)
    assert data.digits(size=None).input_shape == (1, 8, 8)
    assert data.digits(flatten=True).input_shape == (784,)


def _write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(root, n_train=40, n_test=10, gz=False):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    _write_idx(root / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 255, (n_train, 28, 28), dtype=np.uint8), gz)
    _write_idx(root / f"train-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n_train, dtype=np.uint8), gz)
    _write_idx(root / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 255, (n_test, 28, 28), dtype=np.uint8), gz)
    _write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n_test, dtype=np.uint8), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_loader(tmp_path, gz):
    _fake_mnist(tmp_path, gz=gz)
    task = data.mnist(tmp_path)
    assert (len(task.train), len(task.val), len(task.test)) == (36, 4, 10)
    assert task.input_shape == (1, 28, 28)
    assert data.resolve(f"mnist:{tmp_path}").num_classes == 10


def test_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.mnist(tmp_path / "nope")
    with pytest.raises(DataError, match="missing train-images"):
        data.mnist(tmp_path)
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DataError, match="header says"):
        data.mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(DataError, match="bad magic"):
        data.mnist(tmp_path)


def test_npz_loader_and_errors(tmp_path):
    x = np.random.rand(20, 1, 8, 8).astype(np.float32)
    y = np.arange(20) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    task = data.resolve(f"npz:{tmp_path / 'd.npz'}")
    assert task.num_classes == 3 and len(task.train) == 20
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="empty"):
        data.npz(tmp_path / "empty.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((3, 2), np.nan, np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="NaN"):
        data.npz(tmp_path / "nan.npz")
    np.savez(tmp_path / "nox.npz", y=y)
    with pytest.raises(DataError, match="missing array 'x'"):
        data.npz(tmp_path / "nox.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        data.npz(tmp_path / "corrupt.npz")


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    task = data.imagefolder(tmp_path, size=16)
    assert task.num_classes == 2 and task.input_shape == (3, 16, 16)
    assert len(task.train) + len(task.val) == 10
    assert task.info["classes"] == ["cat", "dog"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        data.imagefolder(tmp_path / "empty")


def test_unknown_data_reference():
    with pytest.raises(DataError, match="unknown data set 'cifar'"):
        data.resolve("cifar")


def test_empty_split_rejected():
    from torch.utils.data import TensorDataset

    from slimkit.core.task import Task

    with pytest.raises(DataError, match="split 'val' is empty"):
        Task("t", train=TensorDataset(torch.zeros(2, 3), torch.zeros(2)), val=TensorDataset(torch.zeros(0, 3), torch.zeros(0)))


def test_natural_images_are_real_and_normalized():
    x = data.natural_images(8, size=64, seed=1)
    assert x.shape == (8, 3, 64, 64)
    assert torch.isfinite(x).all() and 0.3 < x.std() < 3
    assert not torch.equal(x, data.natural_images(8, size=64, seed=2))


def test_natural_images_min_scale():
    # the same seed draws the same sources and positions; min_scale=1 crops the whole short side
    whole = data.natural_images(4, size=32, seed=5, min_scale=1.0)
    assert whole.shape == (4, 3, 32, 32)
    assert not torch.equal(whole, data.natural_images(4, size=32, seed=5))
    with pytest.raises(ValueError, match="min_scale"):
        data.natural_images(2, min_scale=0.0)


def test_natural_source_photographs_are_distinct():
    from slimkit.data.natural import source_images

    images = source_images("all")
    names = [n for n, _ in images]
    assert "skimage.chelsea" in names and "skimage.cat" not in names  # the same photograph under two names
    assert len(names) == len(set(names)) >= 20
    for i, (_, a) in enumerate(images):
        assert not any(a.shape == b.shape and np.array_equal(a, b) for _, b in images[:i])


def test_natural_sources_default_to_photographs():
    from slimkit.data.natural import source_images

    photos = [n for n, _ in source_images()]
    everything = [n for n, _ in source_images("all")]
    # camera photographs only: no drawing, scan, microscopy or telescope image; all of them in "all"
    assert {"sklearn.china", "skimage.chelsea", "skimage.camera", "skimage.grass"} <= set(photos)
    assert not {"skimage.logo", "skimage.colorwheel", "skimage.page", "skimage.cell", "skimage.moon"} & set(photos)
    assert set(photos) < set(everything) and len(photos) >= 12
    assert set(data.natural_image_sources(64, seed=4)) <= set(photos)
    assert not set(data.natural_image_sources(64, seed=4, sources="all")) <= set(photos)
    with pytest.raises(ConfigError, match="sources.*'scans'"):
        data.natural_images(2, sources="scans")


def test_natural_image_sources_name_each_crop():
    from slimkit.data.natural import is_grey

    names = data.natural_image_sources(64, seed=3)
    x = data.natural_images(64, size=32, seed=3)
    assert len(names) == 64 and all(n.startswith(("skimage.", "sklearn.")) for n in names)
    grey = torch.tensor([is_grey(n) for n in names])
    assert 0 < grey.sum() < 64
    # grey-level photographs are stacked to three equal channels; colour ones are not (same normalization)
    raw = data.natural_images(64, size=32, seed=3, mean=(0, 0, 0), std=(1, 1, 1))
    equal = (raw[:, 0] == raw[:, 1]).flatten(1).all(1) & (raw[:, 1] == raw[:, 2]).flatten(1).all(1)
    assert torch.equal(equal[grey], torch.ones(int(grey.sum()), dtype=torch.bool))
    assert x.shape[0] == len(names)
    with pytest.raises(ValueError, match="min_scale"):
        data.natural_image_sources(0, min_scale=2.0)  # checked before any crop is drawn


# -- glyphs (generated MNIST-sized set) --------------------------------------------------------
def test_glyphs_render_is_deterministic_balanced_and_8_bit():
    from slimkit.data.glyphs import _TEST_FONTS, _TRAIN_FONTS, render

    x, y = render(300, seed=3, fonts=_TRAIN_FONTS)
    assert x.shape == (300, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y, minlength=10).tolist() == [30] * 10
    x2, y2 = render(300, seed=3, fonts=_TRAIN_FONTS)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(render(300, seed=4, fonts=_TRAIN_FONTS)[0], x)
    assert not set(_TRAIN_FONTS) & set(_TEST_FONTS)
    # MNIST's normalization: ink inside the 28x28 frame, centre of mass near the centre, nothing blank
    ink = x.float().sum((1, 2, 3))
    assert (ink > 0).all()
    rows = (x.float().sum((1, 3)) * torch.arange(28)).sum(1) / ink
    assert (rows - 13.5).abs().max() < 2.5


def test_glyphs_task_splits_cache_and_reference(tmp_path):
    task = data.glyphs(240, 60, cache=tmp_path)
    assert [len(task.train), len(task.val), len(task.test)] == [220, 20, 60]
    assert task.input_shape == (1, 28, 28) and task.num_classes == 10
    cached = list(tmp_path.glob("glyphs-*.npz"))
    assert len(cached) == 2  # train+val and test
    again = data.glyphs(240, 60, cache=tmp_path)
    assert torch.equal(task.test.tensors[0], again.test.tensors[0])
    fresh = data.glyphs(240, 60, cache=False)  # rendered, not read: the same pixels
    assert torch.equal(task.train.tensors[0], fresh.train.tensors[0])
    cached[0].write_bytes(b"not an npz")  # a damaged cache file is rendered again, not trusted
    assert torch.equal(data.glyphs(240, 60, cache=tmp_path).train.tensors[0], task.train.tensors[0])
    assert len(data.resolve("glyphs:120", cache=tmp_path).test) == 20
    with pytest.raises(DataError, match="glyphs:N"):
        data.resolve("glyphs:many")
    with pytest.raises(DataError, match="too small"):
        data.glyphs(5, 5)


def test_glyphs_labels_match_images_on_held_out_fonts():
    """A linear classifier learns the digits and recognizes them in typefaces it never saw."""
    import slimkit as sk

    task = data.glyphs(2000, 400, cache=False, flatten=True)
    torch.manual_seed(0)
    model = sk.train(torch.nn.Linear(784, 10), task, epochs=4, lr=3e-3)
    from slimkit.core.trainer import accuracy

    assert accuracy(model, task, "test") > 0.6  # chance is 0.1
