"""Fashion-MNIST as tensors for the pre-training scripts (the backbone, the teacher, the visual tokenizer): the
60,000 images normalised as the shipped image processor makes them, with no per-example image decoding.
"""

from __future__ import annotations

import numpy as np

from ..data.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD


def to_pixel_values(images: np.ndarray):
    """``uint8`` Fashion-MNIST images ``(N, H, W)`` as normalised 3-channel ``pixel_values``, as the shipped image
    processor makes them (the channels are a view of one: no copy)."""
    import torch

    pixels = (torch.tensor(images, dtype=torch.float32) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return pixels[:, None].expand(-1, 3, -1, -1)


class ImageTensorDataset:
    """``uint8`` images ``(N, H, W)`` as a map-style dataset of ``{"pixel_values": (3, H, W)}`` (normalised as the
    image processor makes them), for the pre-training scripts' Trainer."""

    def __init__(self, images: np.ndarray) -> None:
        self.pixel_values = to_pixel_values(images)  # (N, 3, H, W)

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index]}


__all__ = ["ImageTensorDataset", "to_pixel_values"]
