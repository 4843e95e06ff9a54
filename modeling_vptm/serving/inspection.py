"""Looking inside a prediction: where the read-out token attended, which visual tokens it predicted, and what
those tokens look like.

These turn the model's own outputs (``output_readout_attention``, ``visual_token_logits``, the backbone's
tokenizer) into arrays a person can look at; the demo Space draws them, and they are plain numpy so that any
front end can.
"""

from __future__ import annotations

import numpy as np
import torch

from ..pretraining.tokenizers import PatchKMeansTokenizer


def patch_attention_map(readout_attention: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The read-out token's attention over the image patches, averaged over heads, as a ``grid`` heatmap.

    ``readout_attention`` is ``(num_heads, sequence_length)`` (one image) with the patches as the last
    ``grid[0] * grid[1]`` columns, as the model returns it. Attention to CLS, prompts and [MASK] is left out and the
    rest renormalised, so the map sums to 1: it says which patches the token looked at, relative to each other.
    """
    num_patches = grid[0] * grid[1]
    if readout_attention.ndim != 2 or readout_attention.shape[1] < num_patches:
        raise ValueError(
            f"expected readout_attention of shape (num_heads, sequence_length >= {num_patches}) for a {grid} patch "
            f"grid, got {tuple(readout_attention.shape)}"
        )
    patches = readout_attention[:, -num_patches:].double().mean(0)
    return (patches / patches.sum()).reshape(grid).numpy()


def patch_attention_share(readout_attention: torch.Tensor, num_patches: int) -> float:
    """Fraction of the read-out token's attention (mean over heads) that goes to image patches at all."""
    return float(readout_attention[:, -num_patches:].double().sum(-1).mean())


def top_visual_tokens(visual_token_logits: torch.Tensor, k: int = 5) -> list[tuple[int, float]]:
    """The MIM head's ``k`` most probable visual tokens at [MASK], ``[(token_id, probability), ...]``."""
    probs = visual_token_logits.double().softmax(-1)
    values, indices = probs.topk(min(k, probs.numel()))
    return list(zip(indices.tolist(), values.tolist(), strict=True))


def render_visual_token(
    tokenizer: PatchKMeansTokenizer, token_id: int, image_mean: float, image_std: float
) -> np.ndarray:
    """What a k-means visual token looks like: its centroid as a greyscale ``uint8`` window (patch plus context).

    The centroid lives in the tokenizer's standardised space of the model's normalised input; both are undone, with
    the image processor's ``image_mean``/``image_std`` (the channels are averaged by the tokenizer, so one value
    each), back to 0–255 pixels.
    """
    if not isinstance(tokenizer, PatchKMeansTokenizer):
        raise TypeError(
            f"only pixel k-means tokens can be drawn as pixels; got a {type(tokenizer).__name__}, whose codes are "
            "teacher features"
        )
    if not 0 <= token_id < tokenizer.vocab_size:
        raise ValueError(f"token_id must be in [0, {tokenizer.vocab_size}), got {token_id}")
    window = tokenizer.centroids[token_id] * tokenizer.std + tokenizer.mean  # normalised pixel values
    pixels = (window.double() * image_std + image_mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).reshape(tokenizer.window, tokenizer.window).numpy()


def heatmap_overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``image`` ``(H, W, 3)`` ``uint8`` with ``heatmap`` (any grid, scaled to its max) blended on top in a
    dark-to-yellow ramp, upsampled to the image by nearest neighbour so each patch stays a visible square."""
    height, width = image.shape[:2]
    rows = np.arange(height) * heatmap.shape[0] // height
    cols = np.arange(width) * heatmap.shape[1] // width
    level = heatmap[rows][:, cols] / max(float(heatmap.max()), 1e-12)  # (H, W) in [0, 1]
    ramp = np.stack([level, level**2, 0.2 * (1 - level)], axis=-1) * 255  # black-red-yellow, like "hot"
    return (image * (1 - alpha) + ramp * alpha).round().clip(0, 255).astype(np.uint8)


__all__ = [
    "heatmap_overlay",
    "patch_attention_map",
    "patch_attention_share",
    "render_visual_token",
    "top_visual_tokens",
]
