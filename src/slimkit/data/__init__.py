"""Data sets as `Task`s: digits (embedded default), glyphs (generated, MNIST-sized), mnist (IDX files), npz, imagefolder,
natural images (for fidelity checks of ImageNet models). Nothing here downloads."""
from slimkit.data.glyphs import glyphs
from slimkit.data.loaders import digits, imagefolder, mnist, npz, resolve
from slimkit.data.natural import natural_image_sources, natural_images

DATASETS = {
    "digits": "scikit-learn's 1,797 real 8x8 handwritten digits, stratified 60/20/20 split (embedded)",
    "glyphs": "70,000 generated 28x28 digits (typefaces + pen strokes, distorted; test on 5 held-out fonts), "
              "MNIST-sized, rebuilt offline from a seed; glyphs:N = N training images and N/6 test "
              "(slimkit.data.glyphs: provenance and limits)",
    "mnist:DIR": "MNIST-format IDX files (train-images-idx3-ubyte[.gz] ...) in DIR",
    "npz:FILE": "arrays x, y (optional x_val, y_val, x_test, y_test) in a .npz file",
    "imagefolder:DIR": "one sub-folder per class of PNG/JPEG images (optional train/ val/ test/ splits)",
}

__all__ = ["digits", "glyphs", "mnist", "npz", "imagefolder", "natural_images", "natural_image_sources", "resolve", "DATASETS"]
