"""Resampling as matrices and index maps: resize, pad, crop and flip in one step, on a batch.

A resize of an image axis from ``n_in`` to ``n_out`` pixels followed by keeping the output
pixels ``start .. start + length - 1`` (those past ``n_out`` are padding) is a linear map
``(length, n_in)`` for the image and an index map ``(length,)`` for the mask. Resizing,
right/bottom padding, cropping and a left-right flip of the *input* (the official order: flip,
then scale, pad and crop) therefore reduce to two matrix products per image
(``rows @ image @ cols^T``) and one gather per mask, batched when the images share one size.

- Bilinear weights are Pillow's ``BILINEAR`` resampling (``Resample.c``: a triangle filter whose
  support widens by ``n_in / n_out`` when shrinking, i.e. antialiased; weights normalised over
  the taps inside the image, which clamps at the borders), equal to
  ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``; with
  ``antialias=False`` the support stays 1, which is plain bilinear interpolation.
- Nearest indices are ``floor((i + 0.5) * n_in / n_out)`` computed exactly in integers
  (``F.interpolate(mode="nearest-exact")``; Pillow's ``NEAREST`` agrees except where that value
  is an exact integer, where its floating accumulation sometimes picks the pixel before).
"""
from __future__ import annotations

import torch


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``short``, keeping the aspect ratio;
    the longer side is ``int(short * long / short_in)`` (the official RandomScaleCrop and
    torchvision's ``Resize(short)``)."""
    if h > w:
        return int(1.0 * h * short / w), int(short)
    return int(short), int(1.0 * w * short / h)


def _positions(n_out: torch.Tensor, start: torch.Tensor, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Output positions (B, length) and whether each lies inside the resized axis."""
    pos = start.to(device).view(-1, 1) + torch.arange(length, device=device)
    return pos, pos < n_out.to(device).view(-1, 1)


def axis_weights(n_in: int, n_out: torch.Tensor, start: torch.Tensor, length: int, *,
                 flip: torch.Tensor | None = None, antialias: bool = True, device=None) -> torch.Tensor:
    """Bilinear weights (B, length, n_in), float32: row i of item b is output pixel
    ``start[b] + i`` of the axis resized from ``n_in`` to ``n_out[b]`` (all zeros past
    ``n_out[b]``: padding); ``flip[b]`` mirrors the input axis first."""
    n_out, start = torch.as_tensor(n_out).long().view(-1), torch.as_tensor(start).long().view(-1)
    pos, inside = _positions(n_out, start, length, device)
    scale = n_in / n_out.to(device=device, dtype=torch.float64)  # (B,)
    support = scale.clamp(min=1.0) if antialias else torch.ones_like(scale)
    centre = (pos.double() + 0.5) * scale[:, None]  # (B, length), in input pixel units
    taps = torch.arange(n_in, device=device, dtype=torch.float64) + 0.5
    w = (1 - ((taps - centre[..., None]) / support[:, None, None]).abs()).clamp(min=0)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-300)
    w = w * inside[..., None]
    if flip is not None:
        w = torch.where(flip.to(device).view(-1, 1, 1), w.flip(-1), w)
    return w.float()


def axis_index(n_in: int, n_out: torch.Tensor, start: torch.Tensor, length: int, *,
               flip: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Nearest source indices (B, length), int64, of the same outputs as :func:`axis_weights`;
    -1 marks padding."""
    n_out, start = torch.as_tensor(n_out).long().view(-1), torch.as_tensor(start).long().view(-1)
    pos, inside = _positions(n_out, start, length, device)
    index = ((2 * pos + 1) * n_in) // (2 * n_out.to(device).view(-1, 1))
    if flip is not None:
        index = torch.where(flip.to(device).view(-1, 1), n_in - 1 - index, index)
    return torch.where(inside, index, torch.full_like(index, -1))


def apply_weights(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows @ x @ cols^T`` per item: x (B, C, H, W), rows (B, h, H), cols (B, w, W) -> (B, C, h, w)."""
    b, c, h_in, w_in = x.shape
    h = rows.shape[1]
    y = torch.bmm(rows, x.transpose(1, 2).reshape(b, h_in, c * w_in))  # (B, h, C*W)
    y = torch.bmm(y.view(b, h * c, w_in), cols.transpose(1, 2))  # (B, h*C, w)
    return y.view(b, h, c, -1).transpose(1, 2)


def apply_index(masks: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, fill: int) -> torch.Tensor:
    """Masks (B, H, W) gathered at rows (B, h) x cols (B, w); ``fill`` where either index is -1."""
    h, _w = rows.shape[1], cols.shape[1]
    out = masks.gather(1, rows.clamp(min=0)[:, :, None].expand(-1, -1, masks.shape[2]))
    out = out.gather(2, cols.clamp(min=0)[:, None, :].expand(-1, h, -1))
    pad = (rows < 0)[:, :, None] | (cols < 0)[:, None, :]
    return out.masked_fill(pad, fill)


def blur_radius(sigma: torch.Tensor) -> torch.Tensor:
    """Kernel radius of each standard deviation: ``int(3 * sigma + 0.5)`` (scipy's
    ``gaussian_filter`` with ``truncate=3``)."""
    return (3 * sigma + 0.5).floor().long()


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of x (B, C, H, W) blurred by a Gaussian of standard deviation ``sigma[b]``
    pixels, separable, radius ``blur_radius(sigma[b])`` (0 = unchanged), borders replicated: as
    Pillow's ``GaussianBlur(radius=sigma)``, whose box-blur approximation it replaces. Every
    image gets its own kernel, zero-padded to a common length of at least 7 taps, so a row's
    result does not depend on the rest of the batch."""
    b, c, h, w = x.shape
    sigma = sigma.to(x.device, torch.float64).view(-1)
    if b == 0:
        return x
    own = blur_radius(sigma)
    radius = max(3, int(own.max()))
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    kern = torch.exp(-0.5 * (k / sigma.clamp(min=1e-12)[:, None]) ** 2) * (k.abs() <= own[:, None])
    kern = torch.where(own[:, None] > 0, kern, (k == 0).double().expand_as(kern))
    kern = (kern / kern.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = torch.nn.functional.pad(y, (radius, radius, 0, 0), mode="replicate")
    y = torch.nn.functional.conv2d(y, kern[:, None, None, :], groups=b * c)
    y = torch.nn.functional.pad(y, (0, 0, radius, radius), mode="replicate")
    y = torch.nn.functional.conv2d(y, kern[:, None, :, None], groups=b * c)
    return y.view(b, c, h, w)
