"""Input augmentation for distillation: a larger transfer set for free.

The teacher labels whatever it is shown, so a student trained on randomly shifted copies of the
training images gets soft targets for inputs it would otherwise never see. On small data sets this
is what lets a much cheaper student match its teacher (see docs/distill.md for figures).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slimkit.errors import ConfigError


def random_shift(x: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """Shift every image of a (batch, channels, height, width) batch by its own random offset of at
    most `max_pixels` in each direction; the border pixels are repeated into the uncovered edge.
    Uses the global torch RNG, so runs under the trainer's seed are reproducible."""
    if x.dim() != 4:
        raise ConfigError(f"augment='shift' needs image batches (batch, channels, height, width); got shape "
                          f"{tuple(x.shape)}")
    if max_pixels == 0:
        return x
    n, _, h, w = x.shape
    m = max_pixels
    padded = F.pad(x, (m, m, m, m), mode="replicate")
    offsets = torch.randint(0, 2 * m + 1, (n, 2)).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + offsets[:, :1])  # (n, h)
    cols = (torch.arange(w, device=x.device)[None, :] + offsets[:, 1:])  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
