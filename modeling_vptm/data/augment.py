"""Image augmentations for whole batches on the images' device, in plain torch (the project does not depend on
torchvision): random translation, horizontal flip and random resized crop. Every random draw comes from a CPU
generator (the global one by default) whatever the device, so a seed gives the same images everywhere.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def random_shift_flip(
    images: torch.Tensor, max_shift: int, flip: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Per-image random translation by up to ``max_shift`` pixels (zero fill) and horizontal flip.

    ``images``: ``(batch, channels, height, width)`` on any device. The random draws come from ``generator`` (a CPU
    generator; ``None``: the global one) whatever the device, so a seed gives the same images on every device.
    Plain torch, as the project does not depend on torchvision.
    """
    batch, channels, height, width = images.shape
    device = images.device
    if max_shift > 0:
        padded = F.pad(images, (max_shift,) * 4)  # (batch, channels, height + 2s, width + 2s)
        offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator).to(device, non_blocking=True)
        rows = offsets[:, 0, None] + torch.arange(height, device=device)  # (batch, height)
        cols = offsets[:, 1, None] + torch.arange(width, device=device)  # (batch, width)
        # one gather, every dimension indexed so that it comes out (batch, channels, height, width), contiguous
        index = (torch.arange(batch, device=device)[:, None, None, None], torch.arange(channels, device=device)[
            None, :, None, None], rows[:, None, :, None], cols[:, None, None, :])  # fmt: skip
        images = padded[index]
    if flip:
        flip_mask = (torch.rand(batch, generator=generator) < 0.5).to(device, non_blocking=True)
        images = torch.where(flip_mask[:, None, None, None], images.flip(-1), images)
    return images.contiguous()


def random_resized_crop(
    images: torch.Tensor,
    min_scale: float,
    generator: torch.Generator | None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per image, a random box of ``min_scale``–1 of the area and aspect ratio in ``ratio`` (log-uniform), resized
    back to the full size (bilinear): the usual ImageNet-style training crop, in plain torch, for the whole batch at
    once on the images' device.

    ``images``: ``(batch, channels, height, width)``, floating point; boxes that do not fit fall back to the whole
    image. The random draws come from ``generator`` (a CPU generator; ``None``: the global one) whatever the device.
    The resize is `F.interpolate(box, (height, width), mode="bilinear", align_corners=False)` of each box (a box is
    never larger than the image, so antialiasing would change nothing), written as two gathers per axis so that
    boxes of different sizes share one batched computation.
    """
    batch, channels, height, width = images.shape
    area = torch.empty(batch).uniform_(min_scale, 1.0, generator=generator) * height * width
    log_ratio = torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    box_w = (area * log_ratio).sqrt().round().clamp(1, width).long()
    box_h = (area / log_ratio).sqrt().round().clamp(1, height).long()
    top = (torch.rand(batch, generator=generator) * (height - box_h + 1)).long()
    left = (torch.rand(batch, generator=generator) * (width - box_w + 1)).long()
    row0, row1, row_weight = _bilinear_taps(top, box_h, height, images)  # (batch, height) each
    col0, col1, col_weight = _bilinear_taps(left, box_w, width, images)  # (batch, width) each

    def rows(index: torch.Tensor) -> torch.Tensor:  # (batch, channels, height, width) rows picked per image
        return images.gather(2, index[:, None, :, None].expand(-1, channels, -1, width))

    row_weight = row_weight[:, None, :, None]
    images = rows(row0) * (1 - row_weight) + rows(row1) * row_weight

    def cols(index: torch.Tensor) -> torch.Tensor:  # (batch, channels, height, width) columns picked per image
        return images.gather(3, index[:, None, None, :].expand(-1, channels, height, -1))

    col_weight = col_weight[:, None, None, :]
    return cols(col0) * (1 - col_weight) + cols(col1) * col_weight


def _bilinear_taps(
    start: torch.Tensor, size: torch.Tensor, out: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For boxes ``[start, start + size)`` (one per image) resized to ``out`` pixels along one axis: the two source
    pixels of each output pixel and the weight of the second, as `F.interpolate` (bilinear, align_corners=False)
    computes them: source coordinate ``(i + 0.5) * size / out - 0.5``, clamped at the box's edges."""
    scale = size.to(torch.float32)[:, None] / out  # (batch, 1); float32, as F.interpolate computes it
    source = ((torch.arange(out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)  # (batch, out)
    first = source.long().clamp(max=size[:, None] - 1)  # (batch, out)
    second = torch.minimum(first + 1, size[:, None] - 1)
    weight = (source - first).clamp(0, 1)
    return (
        (start[:, None] + first).to(like.device, non_blocking=True),
        (start[:, None] + second).to(like.device, non_blocking=True),
        weight.to(like.device, like.dtype, non_blocking=True),
    )


__all__ = ["random_resized_crop", "random_shift_flip"]
