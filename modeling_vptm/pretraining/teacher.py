"""A semantic teacher trained without labels: a small CNN learned by contrastive instance discrimination (SimCLR).

BEiT v2 distils its visual tokens from a teacher whose features carry meaning (CLIP). No such model can be
downloaded here, so the project trains one on the unlabelled Fashion-MNIST training images with SimCLR (Chen et al.,
2020): two random views of each image (resized crop, flip, brightness and contrast jitter) must find each other among
the ``2 * batch`` embeddings of a batch (the NT-Xent loss). What makes the views of one image alike and other images
apart is what the image *is*, so the features become semantic; the linear probe of
``experiments/evaluate_backbone.py --teacher`` measures how much.

The encoder keeps a spatial map: strided convolutions bring the image down to the backbone's patch grid (stride
``patch_size``), so :meth:`ContrastiveTeacher.patch_features` gives one feature per BEiT patch, each seeing most of the
image through the stacked convolutions. Those patch features are what the VQ-KD tokenizer
(:class:`~modeling_vptm.pretraining.tokenizers.VQKDTokenizer`) learns to reconstruct; the contrastive loss reads their
mean.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..data.augment import random_resized_crop, random_shift_flip


TEACHER_FILE = "teacher.safetensors"


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def patch_encoder(patch_size: int, width: int, feature_dim: int) -> nn.Sequential:
    """Convolutions from one luminance channel ``(batch, 1, H, W)`` to ``(batch, feature_dim, H / patch_size, W /
    patch_size)``: the teacher's encoder, and the VQ-KD tokenizer's."""
    # space-to-depth first: full-resolution convolutions cost most and see least (the CPU budget decides)
    layers, channels = [nn.PixelUnshuffle(2), _conv(4, width)], width
    for _ in range(int(math.log2(patch_size)) - 1):  # then stride-2 stages down to the patch grid
        layers.append(_conv(channels, channels * 3, stride=2))
        channels *= 3
    # three convolutions at patch level widen each patch's view to most of the image
    layers += [_conv(channels, feature_dim), _conv(feature_dim, feature_dim), _conv(feature_dim, feature_dim)]
    return nn.Sequential(*layers)


class ContrastiveTeacher(nn.Module):
    """A convolutional encoder of ``pixel_values`` ``(batch, channels, H, W)`` with a SimCLR projection head.

    Args:
        patch_size: stride of the output map; a power of two, the backbone's patch size (one feature per patch).
        width: channels at half resolution; each further stride-2 stage triples them.
        feature_dim: channels of the patch features.
        projection_dim: size of the embedding the contrastive loss compares (the head is dropped after training).
        temperature: of the NT-Xent softmax.
    """

    def __init__(
        self,
        patch_size: int = 4,
        width: int = 32,
        feature_dim: int = 96,
        projection_dim: int = 64,
        temperature: float = 0.2,
    ) -> None:
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1) or min(width, feature_dim, projection_dim) < 1:
            raise ValueError(
                "expected a power-of-two patch_size >= 2 and positive widths, got "
                f"patch_size={patch_size}, width={width}, feature_dim={feature_dim}, projection_dim={projection_dim}"
            )
        if temperature <= 0:
            raise ValueError(f"expected temperature > 0, got {temperature}")
        self.settings = {"patch_size": patch_size, "width": width, "feature_dim": feature_dim,
                       "projection_dim": projection_dim, "temperature": temperature}  # fmt: skip
        self.patch_size, self.feature_dim, self.temperature = patch_size, feature_dim, temperature
        self.encoder = patch_encoder(patch_size, width, feature_dim)
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True),
            nn.Linear(feature_dim, projection_dim),
        )  # fmt: skip

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(batch, feature_dim, H / patch_size, W / patch_size)``; channels are averaged (luminance), as the
        pixel tokenizer does, so gray images given as three channels cost one."""
        if pixel_values.ndim != 4:
            raise ValueError(f"expected pixel_values of shape (batch, channels, height, width), got "
                             f"{tuple(pixel_values.shape)}")  # fmt: skip
        return self.encoder(pixel_values.float().mean(1, keepdim=True))

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One feature per patch, ``(batch, num_patches, feature_dim)``, in the raster order of BEiT's patches."""
        return self.feature_map(pixel_values).flatten(2).transpose(1, 2)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Mean of the patch features, ``(batch, feature_dim)``: what the linear probe reads."""
        return self.feature_map(pixel_values).mean((2, 3))

    def forward(self, pixel_values: torch.Tensor, pixel_values_2: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        """NT-Xent loss of two views of the same images (row ``i`` of both is image ``i``)."""
        embeddings = F.normalize(self.projector(self.image_features(torch.cat([pixel_values, pixel_values_2]))), dim=1)
        return {"loss": nt_xent(embeddings, self.temperature)}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(directory, TEACHER_FILE), metadata={"config": json.dumps(self.settings)})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ContrastiveTeacher:
        path = os.path.join(directory, TEACHER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no teacher in {directory}: expected the file {TEACHER_FILE}")
        with safe_open(path, framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
        teacher = cls(**config)
        teacher.load_state_dict(load_file(path))  # strict: a file of another layout is refused, never half-loaded
        return teacher.eval()


def nt_xent(embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for ``(2 * batch, dim)`` L2-normalised embeddings whose halves are views of the same images."""
    batch = len(embeddings) // 2
    logits = embeddings @ embeddings.T / temperature
    logits.fill_diagonal_(float("-inf"))  # an embedding is not its own positive
    targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(embeddings.device)
    return F.cross_entropy(logits, targets)


class TwoViewCollator:
    """``[{"pixel_values": (C, H, W)}, ...]`` -> two augmented views, ``pixel_values`` and ``pixel_values_2``.

    Views: a random resized crop of ``min_scale``-1 of the area, a horizontal flip, a shift of up to ``max_shift``
    pixels, then brightness and contrast jitter of up to ``jitter`` (in units of the normalised pixel values).
    """

    def __init__(self, min_scale: float = 0.35, max_shift: int = 2, jitter: float = 0.4, seed: int | None = None):
        self.min_scale, self.max_shift, self.jitter = min_scale, max_shift, jitter
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def view(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = random_resized_crop(pixel_values, self.min_scale, self.generator)
        x = random_shift_flip(x, self.max_shift, True, self.generator)
        batch = len(x)
        scale = 1 + self.jitter * (2 * torch.rand(batch, 1, 1, 1, generator=self.generator) - 1)
        shift = self.jitter * (2 * torch.rand(batch, 1, 1, 1, generator=self.generator) - 1)
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) * scale + mean + shift

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]).float()
        return {"pixel_values": self.view(pixel_values), "pixel_values_2": self.view(pixel_values)}


__all__ = [
    "TEACHER_FILE",
    "ContrastiveTeacher",
    "TwoViewCollator",
    "nt_xent",
    "patch_encoder",
]
