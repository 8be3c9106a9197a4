"""Natural-image crops from the photographs that ship with scikit-image and scikit-learn.

Used to measure the fidelity of ImageNet models (EfficientNet-Lite0) after compression, offline.
No labels: the reference model's own predictions are the target (top-1 agreement).

Sources. `sources="photographs"` (the default) takes the camera photographs of everyday scenes and
objects: scikit-learn's two sample photographs and scikit-image's "general-purpose" images (its own
gallery category) less the ones that are not photographs (the drawn `colorwheel`, `logo` and `horse`
silhouette, the scanned `page`). `sources="all"` adds those and scikit-image's "scientific" images
(microscopy, retina, telescope images), which no ImageNet class fits: the benchmarks' earlier set
(benchmarks/RESULTS.md, quantize).
"""
from __future__ import annotations

import numpy as np
import torch

from slimkit.errors import ConfigError, MissingDependencyError

# Only images bundled inside the scikit-image wheel: others are fetched over the network.
_SKIMAGE_RGB = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina",
                "hubble_deep_field", "colorwheel", "logo"]
_SKIMAGE_GRAY = ["camera", "coins", "moon", "page", "text", "horse", "clock", "brick", "grass", "gravel",
                 "cell", "microaneurysms"]
# in the lists above but not camera photographs of everyday scenes (see the module docstring)
_NOT_PHOTOGRAPHS = {"colorwheel", "logo", "horse", "page",  # drawn, synthetic or scanned
                    "immunohistochemistry", "retina", "hubble_deep_field", "moon", "cell", "microaneurysms"}
SOURCES = ("photographs", "all")


def source_images(sources: str = "photographs") -> list[tuple[str, np.ndarray]]:
    """The shipped images of `sources` ("photographs" or "all", see the module docstring) as
    (name, HxWx3 uint8) arrays, each once (scikit-image also ships `chelsea` as `cat`, left out; an image
    seen under an earlier name is skipped, so none is sampled twice as often)."""
    if sources not in SOURCES:
        raise ConfigError(f"natural-image sources must be one of {', '.join(SOURCES)}, got {sources!r}")
    images = []
    try:
        from sklearn.datasets import load_sample_images

        for name, img in zip(("china", "flower"), load_sample_images().images):
            images.append((f"sklearn.{name}", np.asarray(img)))
    except ImportError as err:
        raise MissingDependencyError(f"natural images need scikit-learn: {err}") from None
    try:
        import skimage.data as skd
    except ImportError:
        return images
    for name in _SKIMAGE_RGB + _SKIMAGE_GRAY:
        if sources == "photographs" and name in _NOT_PHOTOGRAPHS:
            continue
        fn = getattr(skd, name, None)
        if fn is None:
            continue
        try:
            img = np.asarray(fn())
        except Exception:  # an image missing from this skimage build (some are fetched on demand)
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        if img.ndim != 3 or img.shape[2] < 3 or min(img.shape[:2]) < 64:
            continue
        img = img[..., :3]
        if img.dtype != np.uint8:
            img = img.astype(np.float64)
            img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-8)).astype(np.uint8)
        if not any(img.shape == seen.shape and np.array_equal(img, seen) for _, seen in images):
            images.append((f"skimage.{name}", img))
    return images


def _draws(n: int, seed: int, min_scale: float, sources: str):
    """The random crops of `natural_images`: (source name, image, side, top, left, flip), in order."""
    if not 0 < min_scale <= 1:  # checked now, not at the first crop
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    rng = np.random.default_rng(seed)
    images = source_images(sources)

    def crops():
        for _ in range(n):
            name, img = images[int(rng.integers(len(images)))]
            h, w = img.shape[:2]
            side = max(int(min(h, w) * rng.uniform(min_scale, 1.0)), 32)
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(0, w - side + 1))
            yield name, img, side, top, left, bool(rng.random() < 0.5)

    return crops()


def natural_images(n: int = 256, *, size: int = 224, seed: int = 0, min_scale: float = 0.2,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), sources: str = "photographs") -> torch.Tensor:
    """`n` random square crops (side: a random fraction `min_scale`-1 of the image's short side;
    random flips), resized to `size`, normalized with `mean` / `std` (default: ImageNet statistics; pass
    the model's own, e.g. `slimkit.zoo.EFFICIENTNET_LITE_MEAN` / `_STD`). Different seeds give
    disjoint-ish sets; use separate seeds for calibration and evaluation. Small crops of these
    photographs are often textures no ImageNet class fits, so a larger `min_scale` gives crops on
    which an ImageNet model is more decisive. `sources`: "photographs" or "all" (module docstring).
    `natural_image_sources` names each crop's photograph."""
    import torch.nn.functional as F

    out = torch.empty(n, 3, size, size)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    for i, (_, img, side, top, left, flip) in enumerate(_draws(n, seed, min_scale, sources)):
        crop = torch.tensor(img[top:top + side, left:left + side], dtype=torch.float32).permute(2, 0, 1) / 255.0
        if flip:
            crop = crop.flip(-1)
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        out[i] = (crop - m) / s
    return out


def natural_image_sources(n: int = 256, *, seed: int = 0, min_scale: float = 0.2,
                          sources: str = "photographs") -> list[str]:
    """The photograph each crop of `natural_images(n, seed=seed, min_scale=min_scale, sources=sources)`
    comes from (e.g. "skimage.coffee"), to break a measurement down by source."""
    return [name for name, *_ in _draws(n, seed, min_scale, sources)]


def is_grey(source: str) -> bool:
    """True for the grey-level photographs (stacked to three equal channels), e.g. "skimage.camera"."""
    return source.startswith("skimage.") and source.split(".", 1)[1] in _SKIMAGE_GRAY
