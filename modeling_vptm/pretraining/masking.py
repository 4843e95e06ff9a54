"""Block-wise masking and the pre-training collator for masked visual token modeling.

The masking follows BEiT (Bao et al., 2021, Algorithm 1): rectangular blocks of random area (at least
``min_num_patches``) and aspect ratio (log-uniform in ``[min_aspect, 1 / min_aspect]``) are masked until about
``mask_ratio`` of the patch grid is covered. Written from the paper's description; randomness comes only from
the seeded generator passed in, so a seed reproduces every mask.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

from ..data.augment import random_shift_flip
from .tokenizers import PatchKMeansTokenizer


class BlockMaskGenerator:
    """Draws boolean masks of shape ``grid`` with block-wise masking.

    Args:
        grid: ``(height, width)`` of the patch grid.
        mask_ratio: target fraction of masked patches.
        min_num_patches: smallest block area, in patches.
        max_num_patches: largest block area (default: the number of patches still to mask).
        min_aspect: smallest aspect ratio of a block; the largest is its inverse.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        mask_ratio: float = 0.4,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
    ) -> None:
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.height, self.width = grid
        self.num_masking_patches = max(1, round(mask_ratio * self.height * self.width))
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches or self.num_masking_patches
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def _mask_block(self, mask: np.ndarray, max_patches: int, rng: random.Random) -> int:
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_patches)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(target_area * aspect))
            w = round(math.sqrt(target_area / aspect))
            if 0 < h <= self.height and 0 < w <= self.width:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = int(block.size - block.sum())
                if 0 < new <= max_patches:
                    block[...] = True
                    return new
        return 0

    def __call__(self, rng: random.Random) -> torch.Tensor:
        """One mask, ``(height, width)`` boolean. ``rng`` is a seeded ``random.Random`` (fast for scalar draws)."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_patches = min(self.num_masking_patches - count, self.max_num_patches)
            if max_patches < self.min_num_patches:
                # too few left for a block: finish with single random patches, so the ratio holds
                free = np.flatnonzero(~mask).tolist()
                mask.flat[rng.sample(free, max_patches)] = True
                break
            new = self._mask_block(mask, max_patches, rng)
            if new == 0:
                break
            count += new
        return torch.from_numpy(mask)


class MaskedImageModelingCollator:
    """Turns a list of ``{"pixel_values": (C, H, W)}`` examples into a BEiT pre-training batch.

    Output: ``pixel_values`` ``(batch, C, H, W)``, ``bool_masked_pos`` ``(batch, num_patches)`` and, when a
    tokenizer is given, ``labels`` ``(num_masked,)``: the visual tokens of the masked patches, in the order
    ``BeitForMaskedImageModeling`` reads them (``logits[bool_masked_pos]``). Augmentation (random shift and flip)
    happens before tokenizing, so tokens always describe the image the model sees. Without a tokenizer the
    labels are left to the model (:class:`TokenizingMIMModel` computes them on the accelerator, which is much
    faster than in data-loader workers).
    """

    def __init__(
        self,
        tokenizer: PatchKMeansTokenizer | None,
        mask_generator: BlockMaskGenerator,
        max_shift: int = 0,
        flip: bool = False,
        seed: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.mask_generator = mask_generator
        self.max_shift, self.flip = max_shift, flip
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        self._worker_seed: int | None = None

    def _reseed_in_worker(self) -> None:
        # Each DataLoader worker holds a copy of this collator: without reseeding, all workers would draw the
        # same masks. torch gives every worker a seed derived from the main process's RNG, so runs stay
        # reproducible under a fixed Trainer seed and masks differ across workers and epochs.
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            self.generator.manual_seed(info.seed)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        self._reseed_in_worker()
        pixel_values = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]).float()
        if self.max_shift or self.flip:
            pixel_values = random_shift_flip(pixel_values, self.max_shift, self.flip, self.generator)
        rng = random.Random(int(torch.randint(2**62, (), generator=self.generator)))
        masks = torch.stack([self.mask_generator(rng).flatten() for _ in examples])
        batch = {"pixel_values": pixel_values, "bool_masked_pos": masks}
        if self.tokenizer is not None:
            batch["labels"] = self.tokenizer.encode(pixel_values)[masks]
        return batch


class TokenizingMIMModel(torch.nn.Module):
    """A ``BeitForMaskedImageModeling`` with its frozen tokenizer, computing the labels of a batch on its device.

    Used for pre-training only; ``self.mim`` is the model that gets saved.
    """

    def __init__(self, mim: torch.nn.Module, tokenizer: PatchKMeansTokenizer) -> None:
        super().__init__()
        self.mim = mim
        self.tokenizer = tokenizer.requires_grad_(False)

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ):
        if labels is None:
            labels = self.tokenizer.encode(pixel_values)[bool_masked_pos]  # (num_masked,)
        return self.mim(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, labels=labels, **kwargs)


__all__ = [
    "BlockMaskGenerator",
    "MaskedImageModelingCollator",
    "TokenizingMIMModel",
]
