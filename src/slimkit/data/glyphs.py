"""`glyphs`: an MNIST-sized 10-class data set of 28x28 digit images, generated offline and deterministically.

Why: the embedded digits are 1,797 images (360 to test); a figure reached there may not hold on a larger,
different set. MNIST itself cannot be downloaded here. `glyphs` gives a second set of MNIST's shape and size
that any machine with slimkit's pinned dependencies rebuilds bit for bit from a seed.

What it is (provenance). Each image is one digit 0-9 from one of two sources, half each:
- **typefaces**: the digit typeset in one of the 21 text fonts matplotlib ships (DejaVu Sans / Sans Mono /
  Serif in four styles each, STIX General in four, Computer Modern roman, bold, sans, italic, typewriter
  and math italic — licences in matplotlib's `mpl-data/fonts/ttf`), with random stroke thickness;
- **pen strokes**: slimkit's own centre-line templates of each digit (2-3 allographs: open and closed 4,
  1 with or without flag and base, 7 with or without bar, straight or curled 9 ...), every control point
  jittered per image and drawn with a random pen width.
Every image is then rotated (+-15 deg), sheared, scaled and elastically distorted (Simard et al. 2003),
normalized the way MNIST was (the digit fitted into 20x20 preserving its aspect, centred by its centre of
mass in 28x28), and given faint noise. Pixels are in [0, 1] before standardization (white on black).

Splits: train and validation draw from 16 of the fonts; the **test split uses the 5 other fonts** (one per
family) and fresh stroke jitter, so test accuracy measures generalization to unseen typefaces, not only to
new distortions.

Limits (say them with every figure): typeset and template strokes are not human handwriting — they lack
writers' idiosyncrasies, the stroke-order artefacts and the ambiguous digits of MNIST; classes are exactly
balanced; the noise is synthetic. Accuracy on `glyphs` is comparable between techniques, not with
published MNIST figures.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.core.task import Task, tensor_task
from slimkit.data.loaders import standardize
from slimkit.errors import ArtifactError, DataError

_CANVAS = 64
_VERSION = 1  # of the generator: part of the cache key; bump when the pixels change
# text fonts with real digit glyphs; the test split gets the last of each family
_TRAIN_FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-BoldOblique.ttf",
                "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
                "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
                "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralBolIta.ttf",
                "cmr10.ttf", "cmb10.ttf", "cmtt10.ttf", "cmmi10.ttf"]
_TEST_FONTS = ["DejaVuSans-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif-Bold.ttf",
               "STIXGeneralItalic.ttf", "cmss10.ttf"]

# centre-line templates in a unit box (x right, y down): digit -> allographs -> strokes -> control points
_STROKES: dict[int, list[list[list[tuple[float, float]]]]] = {
    0: [[[(.5, .1), (.74, .22), (.78, .55), (.6, .88), (.36, .86), (.22, .55), (.3, .2), (.5, .1)]],
        [[(.55, .1), (.7, .3), (.68, .7), (.5, .9), (.32, .72), (.32, .3), (.5, .1)]]],
    1: [[[(.5, .1), (.5, .9)]],
        [[(.33, .27), (.53, .1), (.53, .9)]],
        [[(.35, .25), (.52, .1), (.52, .9)], [(.34, .9), (.7, .9)]]],
    2: [[[(.25, .3), (.4, .12), (.62, .12), (.72, .3), (.6, .52), (.25, .88), (.78, .88)]],
        [[(.25, .25), (.5, .1), (.72, .25), (.55, .55), (.28, .85), (.4, .8), (.55, .9), (.78, .86)]]],
    3: [[[(.25, .18), (.5, .1), (.7, .22), (.65, .42), (.45, .5), (.68, .6), (.72, .78), (.5, .9), (.25, .82)]],
        [[(.25, .12), (.72, .12), (.45, .45), (.68, .58), (.7, .8), (.48, .9), (.25, .8)]]],
    4: [[[(.6, .1), (.22, .62), (.8, .62)], [(.62, .35), (.62, .9)]],
        [[(.3, .1), (.25, .55), (.75, .55)], [(.65, .1), (.65, .9)]]],
    5: [[[(.7, .12), (.33, .12), (.28, .45), (.55, .4), (.72, .56), (.7, .78), (.5, .9), (.25, .82)]],
        [[(.33, .12), (.28, .45), (.55, .4), (.72, .56), (.7, .78), (.5, .9), (.25, .82)], [(.33, .12), (.72, .12)]]],
    6: [[[(.68, .12), (.45, .2), (.28, .5), (.3, .8), (.5, .9), (.7, .78), (.68, .58), (.5, .5), (.3, .6)]],
        [[(.62, .1), (.35, .45), (.3, .75), (.48, .9), (.68, .75), (.55, .55), (.32, .65)]]],
    7: [[[(.22, .12), (.78, .12), (.45, .9)]],
        [[(.22, .12), (.78, .12), (.45, .9)], [(.36, .5), (.7, .5)]],
        [[(.25, .2), (.3, .12), (.78, .12), (.55, .5), (.5, .9)]]],
    8: [[[(.5, .5), (.3, .34), (.35, .15), (.5, .1), (.65, .15), (.7, .34), (.5, .5), (.28, .68), (.32, .86),
          (.5, .9), (.68, .86), (.72, .68), (.5, .5)]],
        [[(.65, .18), (.5, .1), (.33, .2), (.4, .4), (.7, .65), (.6, .88), (.4, .88), (.32, .68), (.62, .38),
          (.65, .18)]]],
    9: [[[(.7, .35), (.5, .46), (.3, .35), (.35, .15), (.55, .1), (.7, .2), (.7, .35), (.64, .9)]],
        [[(.7, .3), (.5, .45), (.3, .32), (.4, .12), (.62, .12), (.7, .3), (.68, .62), (.5, .9), (.3, .84)]]],
}


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _catmull_rom(points: np.ndarray, steps: int = 8) -> np.ndarray:
    """A smooth curve through `points` (n, 2): Catmull-Rom segments, `steps` samples each."""
    if len(points) < 3:
        return points
    p = np.vstack([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
    return np.vstack(out + [points[-1:]])


def _stroke_image(digit: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    allographs = _STROKES[digit]
    strokes = allographs[rng.integers(len(allographs))]
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(img)
    width = int(rng.integers(3, 8))
    for stroke in strokes:
        pts = np.asarray(stroke) + rng.normal(0, 0.035, (len(stroke), 2))  # every control point jittered
        curve = _catmull_rom(pts) * (_CANVAS * 0.8) + _CANVAS * 0.1
        draw.line([tuple(q) for q in curve], fill=255, width=width, joint="curve")
        r = width / 2  # round pen ends
        for x, y in (curve[0], curve[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return img


def _font_image(digit: int, font, rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFilter

    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(img)
    draw.text((_CANVAS / 2, _CANVAS / 2), str(digit), fill=255, font=font, anchor="mm")
    k = int(rng.integers(0, 3))  # as typeset, or bolder strokes
    if k:
        img = img.filter(ImageFilter.MaxFilter(2 * k + 1))
    return img


def _affine(img, rng: np.random.Generator):
    """Random rotation, shear and anisotropic scale about the canvas centre."""
    from PIL import Image

    a = math.radians(rng.uniform(-15, 15))
    sh = rng.uniform(-0.3, 0.3)
    sx, sy = rng.uniform(0.8, 1.15), rng.uniform(0.8, 1.15)
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.array([[1, sh], [0, 1]]) \
        @ np.diag([sx, sy])
    inv = np.linalg.inv(m)  # PIL maps output pixels back to input pixels
    c = _CANVAS / 2
    off = np.array([c, c]) - inv @ np.array([c, c])
    return img.transform(img.size, Image.Transform.AFFINE, (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                         resample=Image.Resampling.BILINEAR)


def _elastic(x: torch.Tensor, gen: torch.Generator, alpha: float = 3.0, cells: int = 6) -> torch.Tensor:
    """Elastic distortion of a (n, 1, H, W) batch in the manner of Simard et al. (2003): a smooth random
    displacement field (uniform noise on a `cells` x `cells` grid, bicubically interpolated — the cheap
    equivalent of their Gaussian-smoothed per-pixel noise), scaled to at most `alpha` pixels."""
    n, _, h, w = x.shape
    field = torch.rand(n, 2, cells, cells, generator=gen) * 2 - 1
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
    field = field / field.abs().amax(dim=(2, 3), keepdim=True).clamp(min=1e-6) * alpha
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    gx = (xs + field[:, 0]) / (w - 1) * 2 - 1
    gy = (ys + field[:, 1]) / (h - 1) * 2 - 1
    return F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="zeros", align_corners=True)


def _mnist_normalize(img: torch.Tensor) -> torch.Tensor:
    """MNIST's normalization of one (H, W) image: the digit's bounding box fitted into 20x20 (aspect kept),
    then placed in 28x28 with its centre of mass at the centre."""
    mask = img > 0.1
    if not mask.any():
        return torch.zeros(28, 28)
    rows, cols = torch.where(mask.any(1))[0], torch.where(mask.any(0))[0]
    crop = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    f = 20.0 / max(h, w)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    small = F.interpolate(crop[None, None], size=(nh, nw), mode="area" if f < 1 else "bilinear",
                          align_corners=None if f < 1 else False)[0, 0].clamp(0, 1)
    total = small.sum().clamp(min=1e-6)
    cy = (small.sum(1) * torch.arange(nh)).sum() / total
    cx = (small.sum(0) * torch.arange(nw)).sum() / total
    top, left = int(round(13.5 - float(cy))), int(round(13.5 - float(cx)))
    top, left = min(max(top, 0), 28 - nh), min(max(left, 0), 28 - nw)
    out = torch.zeros(28, 28)
    out[top:top + nh, left:left + nw] = small
    return out


def render(n: int, *, seed: int, fonts: list[str], chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` 8-bit images (n, 1, 28, 28) and their labels, exactly balanced over the 10 digits, half typeset
    in `fonts` (file names in matplotlib's font folder) and half pen strokes; deterministic in `seed`."""
    from PIL import ImageFont

    folder = _font_dir()
    missing = [f for f in fonts if not (folder / f).is_file()]
    if missing:
        raise DataError(f"glyphs: fonts {missing} are not in matplotlib's font folder {folder}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    faces = [ImageFont.truetype(str(folder / f), size=44) for f in fonts]
    labels = rng.permutation(np.arange(n) % 10)
    images = []
    for start in range(0, n, chunk):
        batch = []
        for i in range(start, min(n, start + chunk)):
            d = int(labels[i])
            img = _font_image(d, faces[rng.integers(len(faces))], rng) if i % 2 else _stroke_image(d, rng)
            batch.append(np.asarray(_affine(img, rng), dtype=np.float32) / 255.0)
        x = _elastic(torch.from_numpy(np.stack(batch))[:, None], gen)
        x = torch.stack([_mnist_normalize(im) for im in x[:, 0]])[:, None]
        x = (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        images.append(torch.round(x * 255).to(torch.uint8))  # 8-bit grey levels, as MNIST stores them
    return torch.cat(images), torch.from_numpy(labels).long()


def _cached_render(n: int, seed: int, fonts: list[str], cache: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`render`, kept as an .npz in `cache` (plain arrays, read without pickle) and written atomically."""
    if cache is None:
        return render(n, seed=seed, fonts=fonts)
    import hashlib

    from slimkit.core.io import atomic_path

    key = hashlib.sha256(repr((_VERSION, n, seed, fonts)).encode()).hexdigest()[:16]
    path = Path(cache) / f"glyphs-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return torch.from_numpy(z["x"]), torch.from_numpy(z["y"]).long()
        except Exception:  # a damaged cache file: render again and replace it
            pass
    x, y = render(n, seed=seed, fonts=fonts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, x=x.numpy(), y=y.numpy())
    except (OSError, ArtifactError):  # a read-only cache costs the next call a render, nothing else
        pass
    return x, y


def default_cache() -> Path:
    """`$SLIMKIT_CACHE/` or `~/.cache/slimkit/`: where rendered `glyphs` splits are kept."""
    import os

    return Path(os.environ.get("SLIMKIT_CACHE") or Path.home() / ".cache" / "slimkit")


def glyphs(n_train: int = 60_000, n_test: int = 10_000, *, val_fraction: float = 1 / 12, seed: int = 0,
           batch_size: int = 64, flatten: bool = False, cache: str | Path | None | bool = True) -> Task:
    """The `glyphs` data set (module docstring: provenance and limits): `n_train` images split into train and
    validation (`val_fraction`, same 16 fonts), `n_test` test images from 5 held-out fonts. MNIST-sized by
    default (55,000 / 5,000 / 10,000). Rendering takes about 1 ms per image on one core (70,000: ~80 s), so the
    8-bit images are kept in `cache` (True: `default_cache()`; a folder; False/None: render every time — the
    same pixels either way). Standardized with the train mean/std; `flatten=True` gives 784-vectors."""
    if n_train < 20 or n_test < 10:
        raise DataError(f"glyphs: n_train {n_train} / n_test {n_test} too small (at least 20 / 10 images)")
    if not 0 < val_fraction < 1:
        raise DataError(f"glyphs: val_fraction must be in (0, 1), got {val_fraction}")
    folder = default_cache() if cache is True else (Path(cache) if cache else None)
    x, y = _cached_render(n_train, seed, _TRAIN_FONTS, folder)
    x_te, y_te = _cached_render(n_test, seed + 1_000_003, _TEST_FONTS, folder)
    x, x_te = x.float() / 255, x_te.float() / 255
    n_val = max(10, int(round(n_train * val_fraction)))
    x_tr, y_tr, x_va, y_va = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    (x_tr, x_va, x_te), (mean, std) = standardize(x_tr, x_va, x_te)
    if flatten:
        x_tr, x_va, x_te = (t.flatten(1) for t in (x_tr, x_va, x_te))
    return tensor_task("glyphs", x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes=10, batch_size=batch_size,
                       info={"seed": seed, "mean": mean, "std": std, "splits": [len(y_tr), len(y_va), len(y_te)],
                             "test_fonts": _TEST_FONTS})
