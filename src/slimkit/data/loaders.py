"""Loaders that turn real data on disk (or embedded) into `Task`s."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.core.task import Task, tensor_task
from slimkit.errors import DataError

_DIGITS_SEED = 0


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def standardize(x_train: torch.Tensor, *others: torch.Tensor | None):
    """([x_train, *others] shifted and scaled by x_train's mean and std, (mean, std)); None stays None."""
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    return [None if o is None else (o - mean) / std for o in (x_train, *others)], (mean, std)


def digits(size: int | None = 28, *, batch_size: int = 64, flatten: bool = False) -> Task:
    """scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes).

    Fixed stratified split: 60% train, 20% validation, 20% test (seed 0). Pixels scale to [0, 1],
    are bilinearly resized to `size` x `size` (None keeps 8x8) and standardized with the train
    mean/std. `flatten=True` gives vectors instead of 1xHxW images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    idx = np.arange(len(y))
    train_idx, rest = train_test_split(idx, test_size=0.4, stratify=y.numpy(), random_state=_DIGITS_SEED)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=y.numpy()[rest], random_state=_DIGITS_SEED)
    xs = [_resize(x[i], size) for i in (train_idx, val_idx, test_idx)]
    (x_tr, x_va, x_te), (mean, std) = standardize(*xs)
    if flatten:
        x_tr, x_va, x_te = (t.flatten(1) for t in (x_tr, x_va, x_te))
    return tensor_task("digits", x_tr, y[train_idx], x_va, y[val_idx], x_te, y[test_idx], num_classes=10,
                       batch_size=batch_size, info={"size": size, "mean": mean, "std": std,
                                                    "splits": [len(train_idx), len(val_idx), len(test_idx)]})


# -- MNIST IDX ------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as used by MNIST and Fashion-MNIST."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX payload is {len(data) - header} bytes, header says {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"MNIST directory {directory}: missing {stem}[.gz]")


def mnist(directory: str | Path, *, size: int | None = None, val_fraction: float = 0.1,
          batch_size: int = 64, flatten: bool = False) -> Task:
    """Real MNIST-format data from IDX files in `directory` (train-images-idx3-ubyte etc.).

    The last `val_fraction` of the training files becomes the validation split; the t10k
    files are the test split. Nothing is downloaded.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"MNIST directory not found: {directory}")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        xi = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        yi = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        if xi.ndim != 3 or yi.ndim != 1 or len(xi) != len(yi):
            raise DataError(f"MNIST directory {directory}: {prefix} images {xi.shape} do not match labels {yi.shape}")
        if len(xi) == 0:
            raise DataError(f"MNIST directory {directory}: {prefix} split is empty")
        arrays[split] = (torch.tensor(xi, dtype=torch.float32).unsqueeze(1) / 255.0,
                         torch.tensor(yi.astype(np.int64)))
    x_all, y_all = arrays["train"]
    n_val = int(len(y_all) * val_fraction)
    n_train = len(y_all) - n_val
    if n_train <= 0:
        raise DataError(f"MNIST directory {directory}: too few training images ({len(y_all)})")
    x_tr, y_tr = x_all[:n_train], y_all[:n_train]
    x_va, y_va = (x_all[n_train:], y_all[n_train:]) if n_val else (None, None)
    x_te, y_te = arrays["test"]
    (x_tr, x_va, x_te), _ = standardize(*(None if t is None else _resize(t, size) for t in (x_tr, x_va, x_te)))
    if flatten:
        x_tr, x_va, x_te = (None if t is None else t.flatten(1) for t in (x_tr, x_va, x_te))
    return tensor_task("mnist", x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes=10, batch_size=batch_size,
                       info={"directory": str(directory)})


# -- npz -------------------------------------------------------------------------------------
def npz(path: str | Path, *, batch_size: int = 64) -> Task:
    """Arrays `x`, `y` (and optionally `x_val`, `y_val`, `x_test`, `y_test`) from a .npz file.

    Loaded with `allow_pickle=False`: object arrays are refused rather than unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile/ValueError variety for corrupt files
        raise DataError(f"cannot read npz file {path}: {err}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"npz file {path}: missing array {key!r} (found {sorted(arrays)})")

    def pair(xk, yk):
        if xk not in arrays:
            return None, None
        x = torch.tensor(arrays[xk], dtype=torch.float32)
        y = torch.tensor(arrays[yk])
        if not torch.isfinite(x).all():
            raise DataError(f"npz file {path}: array {xk!r} contains NaN or Inf")
        if y.is_floating_point() and not (torch.isfinite(y).all() and (y == y.round()).all()):
            raise DataError(f"npz file {path}: array {yk!r} holds non-integer values; slimkit's npz data are "
                            "classification labels 0..K-1 (integers)")
        return x, y.long()

    x, y = pair("x", "y")
    x_va, y_va = pair("x_val", "y_val")
    x_te, y_te = pair("x_test", "y_test")
    if len(x) == 0:
        raise DataError(f"npz file {path}: array 'x' is empty")
    return tensor_task(path.stem, x, y, x_va, y_va, x_te, y_te, batch_size=batch_size, info={"path": str(path)})


# -- image folder ---------------------------------------------------------------------------
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp"}


def _load_folder(root: Path, classes: list[str] | None, size: int, grayscale: bool):
    from PIL import Image

    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in _IMAGE_EXT:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if grayscale else "RGB").resize((size, size))
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except OSError as err:
                raise DataError(f"cannot read image {f}: {err}") from None
            xs.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            ys.append(label)
    return classes, xs, ys


def imagefolder(directory: str | Path, *, size: int = 32, grayscale: bool = False, val_fraction: float = 0.2,
                batch_size: int = 64) -> Task:
    """Images in one sub-folder per class. If `train/` (and `val/`, `test/`) exist they are the
    splits; otherwise a fixed stratified `val_fraction` of the images becomes validation."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    if (root / "train").is_dir():
        classes, xs, ys = _load_folder(root / "train", None, size, grayscale)
        splits = {"train": (xs, ys)}
        for name in ("val", "test"):
            if (root / name).is_dir():
                _, xv, yv = _load_folder(root / name, classes, size, grayscale)
                splits[name] = (xv, yv)
    else:
        classes, xs, ys = _load_folder(root, None, size, grayscale)
        splits = {"train": (xs, ys)}
        if xs and val_fraction > 0 and len(set(ys)) > 1:
            from sklearn.model_selection import train_test_split

            tr, va = train_test_split(np.arange(len(ys)), test_size=val_fraction, random_state=0,
                                      stratify=ys if min(np.bincount(ys)) >= 2 else None)
            splits = {"train": ([xs[i] for i in tr], [ys[i] for i in tr]),
                      "val": ([xs[i] for i in va], [ys[i] for i in va])}
    if not splits["train"][0]:
        raise DataError(f"image folder {root}: no images found (expected one sub-folder per class with PNG/JPEG files)")

    def t(split):
        if split not in splits or not splits[split][0]:
            return None, None
        x, y = splits[split]
        return torch.tensor(np.stack(x)), torch.tensor(y, dtype=torch.int64)

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = t("train"), t("val"), t("test")
    (x_tr, x_va, x_te), _ = standardize(x_tr, x_va, x_te)
    return tensor_task(root.name, x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes=len(classes),
                       batch_size=batch_size, info={"classes": classes, "directory": str(root)})


def resolve(ref: str, **kwargs) -> Task:
    """Turn a data reference into a Task: `digits`, `glyphs[:N_TRAIN]`, `mnist:DIR`, `npz:FILE`, `imagefolder:DIR`."""
    kind, _, arg = ref.partition(":")
    if kind == "digits" and not arg:
        return digits(**kwargs)
    if kind == "glyphs":  # glyphs or glyphs:N_TRAIN
        from slimkit.data.glyphs import glyphs

        if arg and not arg.isdigit():
            raise DataError(f"data set {ref!r}: glyphs:N takes the number of training images, e.g. glyphs:10000")
        return glyphs(int(arg), n_test=max(10, int(arg) // 6), **kwargs) if arg else glyphs(**kwargs)
    if kind == "mnist" and arg:
        return mnist(arg, **kwargs)
    if kind == "npz" and arg:
        return npz(arg, **kwargs)
    if kind == "imagefolder" and arg:
        return imagefolder(arg, **kwargs)
    if ref.endswith(".npz"):
        return npz(ref, **kwargs)
    raise DataError(f"unknown data set {ref!r}; use digits, glyphs[:N_TRAIN], mnist:DIR, npz:FILE or imagefolder:DIR")
