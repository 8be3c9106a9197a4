"""The decompositions themselves: factor weights, the matrices whose spectra pick ranks, and
the parameter / MAC cost of a layer before and after factorization.

Everything is computed in float64 and copied back in the layer's dtype.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn

from slimkit.core.layers import pair
from slimkit.lowrank.modules import ChannelSVDConv, LowRankLinear, SpatialSVDConv, Tucker2Conv


@contextmanager
def single_threaded_blas():
    """Run numpy/scipy linear algebra on one BLAS thread. The matrices here are small, and a
    multi-threaded OpenBLAS on a busy machine spin-waits: measured 100x slower (0.8 s vs 0.02 s
    for one SVD of a 128 x 1152 matrix) with other jobs running."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl ships with scikit-learn; without it, run as is
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _w64(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().to(torch.float64).cpu()


# -- the matrices whose singular values decide ranks -------------------------------------------
def spectra(kind: str, layer: nn.Module) -> list[np.ndarray]:
    """Singular values that rank selection looks at: one list for matrix methods, two (output mode,
    input mode) for Tucker-2."""
    with single_threaded_blas():
        return [np.linalg.svd(m.numpy(), compute_uv=False) for m in unfoldings(kind, layer)]


def unfoldings(kind: str, layer: nn.Module) -> list[torch.Tensor]:
    w = _w64(layer)
    if kind == "svd":
        return [w]
    cout, cin, kh, kw = w.shape
    if kind == "channel":
        return [w.reshape(cout, cin * kh * kw)]
    if kind == "spatial":
        return [w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)]
    if kind == "tucker2":
        return [w.reshape(cout, -1), w.transpose(0, 1).reshape(cin, -1)]
    raise ValueError(kind)


def max_rank(kind: str, layer: nn.Module) -> list[int]:
    """The largest meaningful rank per mode (beyond it the factors only add parameters)."""
    return [min(m.shape) for m in unfoldings(kind, layer)]


# -- data-aware basis ----------------------------------------------------------------------------
@torch.no_grad()
def input_moments(model: nn.Module, layers: dict[str, nn.Module], batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and covariance of each layer's inputs (unfolded patches for convolutions), in float64,
    from one pass over `batches`. Statistics only; nothing is changed."""
    sums: dict[str, list] = {}

    def hook(name: str, layer: nn.Module):
        def fn(_m, inp):
            x = inp[0].detach()
            if isinstance(layer, nn.Conv2d):
                x = torch.nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
                x = x.transpose(1, 2).reshape(-1, x.shape[1])  # rows: (image, position); cols: (cin, kh, kw)
            else:
                x = x.reshape(-1, x.shape[-1])
            x = x.float()
            update = [(x.T @ x).double(), x.sum(0).double(), len(x)]  # float32 products, float64 sums
            sums[name] = update if name not in sums else [a + b for a, b in zip(sums[name], update)]
        return fn

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    stats = {}
    for name, (second, first, n) in sums.items():
        mean = first / n
        stats[name] = (mean, second / n - torch.outer(mean, mean))
    return stats


def response_basis(kind: str, layer: nn.Module, stats: tuple[torch.Tensor, torch.Tensor]):
    """(singular values, basis U, input mean) of the layer's centered responses on calibration
    inputs, from W Cov(x) W^T = U diag(s^2) U^T (Zhang et al., 2016). Factoring along U keeps the
    response variance the data actually excites and ignores weight directions no input reaches;
    the mean response is restored exactly through the bias (see `factorize_layer`)."""
    mean, cov = stats
    w = unfoldings(kind, layer)[0]
    with single_threaded_blas():
        eigvals, eigvecs = np.linalg.eigh((w @ cov @ w.T).numpy())
    order = np.argsort(eigvals)[::-1]
    return np.sqrt(np.clip(eigvals[order], 0, None)), torch.from_numpy(np.ascontiguousarray(eigvecs[:, order])), mean


# -- costs -------------------------------------------------------------------------------------
def cost(kind: str | None, layer: nn.Module, rank=None) -> tuple[int, int]:
    """(parameters, MACs per output position) of `layer` (kind None) or of its factorization.

    For convolutions, MACs are per output pixel; a Tucker-2 first 1x1 runs at the input
    resolution, so it is charged stride_h * stride_w times.
    """
    bias = 0 if getattr(layer, "bias", None) is None else layer.bias.numel()
    if isinstance(layer, nn.Linear):
        m, n = layer.out_features, layer.in_features
        if kind is None:
            return m * n + bias, m * n
        return rank * (m + n) + bias, rank * (m + n)
    cout, cin, (kh, kw), (sh, sw) = layer.out_channels, layer.in_channels, pair(layer.kernel_size), pair(layer.stride)
    cin_g = cin // layer.groups
    if kind is None:
        return cout * cin_g * kh * kw + bias, cout * cin_g * kh * kw
    if kind == "channel":
        w = rank * cin * kh * kw + cout * rank
        return w + bias, w
    if kind == "spatial":
        # the kh x 1 conv runs at output height but full (stride-1-in-width) width
        return rank * (cin * kh + cout * kw) + bias, rank * cin * kh * sw + rank * cout * kw
    if kind == "tucker2":
        r_out, r_in = rank
        return cin * r_in + r_in * r_out * kh * kw + r_out * cout + bias, \
            cin * r_in * sh * sw + r_in * r_out * kh * kw + r_out * cout
    raise ValueError(kind)


# -- factor weights ----------------------------------------------------------------------------
def _split_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """matrix ~= left @ right with left (m, r), right (r, n); sqrt(S) goes to both sides so the two
    factors have balanced scales (better conditioned for fine-tuning)."""
    with single_threaded_blas():
        u, s, vh = (torch.from_numpy(a) for a in np.linalg.svd(matrix.numpy(), full_matrices=False))
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def factorize_layer(kind: str, layer: nn.Module, rank, response: tuple | None = None) -> nn.Module:
    """Build the factorized replacement of `layer` with the given rank, weights set.

    response: (s, U, input mean) from `response_basis` (svd/channel only): W ~= U_r (U_r^T W), the
    projection of the layer onto its top-r response directions, and the bias gains
    (I - U_r U_r^T) W mean so the mean response is kept exactly.
    """
    dtype = layer.weight.dtype
    w = _w64(layer)
    if response is not None and kind in ("svd", "channel"):
        cls = LowRankLinear if kind == "svd" else ChannelSVDConv
        new = cls.like(layer, rank, bias=True)
        u, mean = response[1][:, :rank], response[2]
        w2 = w.reshape(w.shape[0], -1)
        new.first.weight.copy_((u.T @ w2).reshape(new.first.weight.shape).to(dtype))
        new.second.weight.copy_(u.reshape(new.second.weight.shape).to(dtype))
        mean_response = w2 @ mean
        correction = mean_response - u @ (u.T @ mean_response)
        bias = correction + (layer.bias.detach().to(torch.float64) if layer.bias is not None else 0)
        new.second.bias.copy_(bias.to(dtype))
        return new.to(layer.weight.device)
    elif kind == "svd":
        new = LowRankLinear.like(layer, rank)
        left, right = _split_svd(w, rank)
        new.first.weight.copy_(right.to(dtype))
        new.second.weight.copy_(left.to(dtype))
        last = new.second
    elif kind == "channel":
        new = ChannelSVDConv.like(layer, rank)
        cout, cin, kh, kw = w.shape
        left, right = _split_svd(w.reshape(cout, -1), rank)
        new.first.weight.copy_(right.reshape(rank, cin, kh, kw).to(dtype))
        new.second.weight.copy_(left.reshape(cout, rank, 1, 1).to(dtype))
        last = new.second
    elif kind == "spatial":
        new = SpatialSVDConv.like(layer, rank)
        cout, cin, kh, kw = w.shape
        # rows (input channel, kernel row), columns (output channel, kernel column)
        left, right = _split_svd(w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw), rank)
        new.first.weight.copy_(left.T.reshape(rank, cin, kh, 1).to(dtype))
        new.second.weight.copy_(right.reshape(rank, cout, kw).permute(1, 0, 2).reshape(cout, rank, 1, kw).to(dtype))
        last = new.second
    elif kind == "tucker2":
        from tensorly.decomposition import partial_tucker

        r_out, r_in = rank
        new = Tucker2Conv.like(layer, [r_out, r_in])
        with single_threaded_blas():
            (core, (u_out, u_in)), _ = partial_tucker(w.numpy(), rank=[r_out, r_in], modes=[0, 1], init="svd",
                                                      n_iter_max=50, random_state=0)
        new.first.weight.copy_(torch.from_numpy(np.ascontiguousarray(u_in.T))[:, :, None, None].to(dtype))
        new.core.weight.copy_(torch.from_numpy(np.ascontiguousarray(core)).to(dtype))
        new.last.weight.copy_(torch.from_numpy(np.ascontiguousarray(u_out))[:, :, None, None].to(dtype))
        last = new.last
    else:
        raise ValueError(kind)
    if layer.bias is not None:
        last.bias.copy_(layer.bias.detach())
    return new.to(layer.weight.device)
