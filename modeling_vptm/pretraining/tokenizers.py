"""A visual tokenizer for masked visual token modeling: k-means codes of (context-widened) image patches.

BEiT (Bao et al., 2021) predicts the codes of a DALL-E dVAE at masked patches; BEiT v2 the codes of a VQ-KD
tokenizer distilled from a teacher. Neither is available offline, so the project's backbone is pre-trained on
a tokenizer that is fitted on the training images themselves: each patch, widened by ``context`` pixels on
every side (zero padding at the border), is flattened, standardised with per-dimension statistics of the
training patches and assigned to its nearest of ``vocab_size`` k-means centroids. Channels are averaged first:
tokens describe luminance structure, which keeps the codes few and the encoding cheap. A wider window gives a code
that describes the patch *in its surroundings* (part of an edge, a sleeve, a sole), which is closer to the
semantic tokens BEiT v2 uses than raw patch colours are.

The tokenizer works on the model's own input (``pixel_values`` after the image processor), so tokens can be
recomputed from any batch, and is saved as one safetensors file beside the backbone.

:class:`TeacherFeatureTokenizer` is the second generation, BEiT v2's idea at small scale: tokens are codes of a
frozen *teacher's* contextual patch features instead of pixels, so that a token names what a patch is part of
rather than how bright it is. The codebook is L2-normalised and fitted by spherical k-means (VQ-KD's normalised
codebook and k-means initialisation, without its learned encoder and decoder). :func:`load_visual_tokenizer`
reads any kind from a backbone folder.

:class:`VQKDTokenizer` is the third generation, BEiT v2's VQ-KD itself: a learned encoder, a cosine codebook and a
decoder trained to reconstruct the patch features of a semantic teacher trained here without labels
(:mod:`modeling_vptm.teacher`). :func:`codebook_usage` reports how evenly a tokenizer uses its codes.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .teacher import patch_encoder


TOKENIZER_FILE = "visual_tokenizer.safetensors"


class PatchKMeansTokenizer(nn.Module):
    """Maps images ``(batch, channels, height, width)`` to visual tokens ``(batch, num_patches)``.

    Args:
        patch_size: side of the backbone's patches, in pixels.
        num_channels: channels of ``pixel_values``.
        vocab_size: number of k-means codes (the backbone's ``vocab_size``).
        context: pixels added on each side of a patch before it is described (0: the patch alone).
    """

    def __init__(self, patch_size: int, num_channels: int, vocab_size: int, context: int = 0) -> None:
        super().__init__()
        if patch_size < 1 or num_channels < 1 or vocab_size < 2 or context < 0:
            raise ValueError(
                "expected patch_size >= 1, num_channels >= 1, vocab_size >= 2 and context >= 0, got "
                f"patch_size={patch_size}, num_channels={num_channels}, vocab_size={vocab_size}, context={context}"
            )
        self.patch_size, self.num_channels, self.vocab_size, self.context = (
            patch_size,
            num_channels,
            vocab_size,
            context,
        )
        self.window = patch_size + 2 * context
        dim = self.window**2
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("centroids", torch.zeros(vocab_size, dim))

    @property
    def feature_dim(self) -> int:
        return self.centroids.shape[1]

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Standardised window features, ``(batch, num_patches, window**2)``, patches in raster order."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"expected pixel_values of shape (batch, {self.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}"
            )
        # (batch, channels * window**2, num_patches): one column per patch, same raster order as BEiT's patches
        return (self._windows(pixel_values) - self.mean) / self.std

    def _windows(self, pixel_values: torch.Tensor) -> torch.Tensor:
        gray = pixel_values.float().mean(1, keepdim=True)  # (batch, 1, height, width)
        # (batch, window**2, num_patches): one column per patch, in the raster order of BEiT's patches
        windows = F.unfold(gray, kernel_size=self.window, stride=self.patch_size, padding=self.context)
        return windows.transpose(1, 2)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token ids ``(batch, num_patches)``, ``int64``."""
        # exact float32 distances even inside a bf16/fp16 autocast region: codes must not depend on precision
        with torch.autocast(pixel_values.device.type, enabled=False):
            feats = self.patch_features(pixel_values)
            batch, length, dim = feats.shape
            return self._nearest(feats.reshape(-1, dim)).view(batch, length)

    def _nearest(self, feats: torch.Tensor) -> torch.Tensor:
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term does not change the argmin
        scores = feats @ self.centroids.T - 0.5 * (self.centroids**2).sum(1)
        return scores.argmax(1)

    @torch.no_grad()
    def fit(
        self,
        pixel_values: torch.Tensor,
        num_samples: int = 200_000,
        num_iters: int = 30,
        generator: torch.Generator | None = None,
        batch_size: int = 4096,
    ) -> dict[str, float]:
        """Fits statistics and centroids on patches of ``pixel_values`` (training images only) with k-means.

        Initialisation is k-means++ on a subsample; empty clusters are re-seeded with the points farthest from
        their centroid. Returns ``{"inertia": ..., "used_codes": ...}`` of the final assignment.
        """
        device = self.centroids.device
        windows = []
        for start in range(0, len(pixel_values), batch_size):
            chunk = pixel_values[start : start + batch_size].to(device)
            windows.append(self._windows(chunk).reshape(-1, self.feature_dim))
        data = torch.cat(windows)
        if len(data) < self.vocab_size:
            raise ValueError(f"k-means needs at least vocab_size={self.vocab_size} patches, got {len(data)}")
        index = torch.randperm(len(data), generator=generator, device="cpu")[:num_samples].to(device)
        data = data[index]
        self.mean.copy_(data.mean(0))
        self.std.copy_(data.std(0).clamp_min(1e-6))
        data = (data - self.mean) / self.std
        self.centroids.copy_(_kmeans_plus_plus(data, self.vocab_size, generator))
        for _ in range(num_iters):
            assign = self._nearest(data)
            sums = torch.zeros_like(self.centroids).index_add_(0, assign, data)
            counts = torch.bincount(assign, minlength=self.vocab_size)
            alive = counts > 0
            self.centroids[alive] = sums[alive] / counts[alive, None].to(data.dtype)
            if not alive.all():
                dist = ((data - self.centroids[assign]) ** 2).sum(1)
                far = dist.topk(int((~alive).sum())).indices
                self.centroids[~alive] = data[far]
        assign = self._nearest(data)
        inertia = ((data - self.centroids[assign]) ** 2).sum(1).mean().item()
        return {"inertia": inertia, "used_codes": int(torch.bincount(assign, minlength=self.vocab_size).gt(0).sum())}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        meta = {
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "vocab_size": self.vocab_size,
            "context": self.context,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(directory, TOKENIZER_FILE), metadata={"config": json.dumps(meta)})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PatchKMeansTokenizer:
        path, meta = _read_meta(directory)
        meta.pop("kind", None)
        missing = {"patch_size", "num_channels", "vocab_size", "context"} - set(meta)
        if missing:
            raise ValueError(f"{path} lacks the tokenizer metadata {sorted(missing)}")
        tokenizer = cls(**meta)
        tokenizer.load_state_dict(load_file(path))
        return tokenizer


def _kmeans_plus_plus(data: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) on at most 20,000 points, for speed."""
    sub = data[torch.randperm(len(data), generator=generator)[:20_000].to(data.device)]
    first = int(torch.randint(len(sub), (1,), generator=generator))
    centers = [sub[first]]
    dist = ((sub - sub[first]) ** 2).sum(1)
    for _ in range(1, k):
        probs = (dist / dist.sum()).cpu()
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        centers.append(sub[nxt])
        dist = torch.minimum(dist, ((sub - sub[nxt]) ** 2).sum(1))
    return torch.stack(centers)


def _read_meta(directory: str | os.PathLike) -> tuple[str, dict]:
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no visual tokenizer in {directory}: expected the file {TOKENIZER_FILE}")
    with safe_open(path, framework="pt") as f:
        return path, json.loads((f.metadata() or {}).get("config", "{}"))


class TeacherFeatureTokenizer(nn.Module):
    """Visual tokens from a frozen teacher's contextual patch features: ``(batch, C, H, W)`` -> ``(batch, patches)``.

    The teacher is a BEiT encoder (for the project, the first-generation shipped backbone, which learned without
    labels); a patch's token is the nearest L2-normalised code to the teacher's L2-normalised state of that patch at
    ``layer`` (an index into ``hidden_states``; ``-1`` is the last block's output). The teacher stays in eval mode
    even when the module around it trains: stochastic depth in the teacher would make the targets noisy.

    Args:
        teacher: a ``BeitModel`` (or ``BeitForMaskedImageModeling``, whose encoder is used).
        teacher_name: how the teacher is found again when the tokenizer is loaded (a ``vptm:`` name, a folder or a
            Hub id); saved with the codebook, the teacher's weights are not.
        vocab_size: number of codes.
        layer: which of the teacher's ``hidden_states`` is tokenised.
    """

    def __init__(self, teacher: nn.Module, teacher_name: str, vocab_size: int, layer: int = -1) -> None:
        super().__init__()
        encoder = getattr(teacher, "beit", teacher)
        num_states = encoder.config.num_hidden_layers + 1
        if vocab_size < 2 or not -num_states <= layer < num_states:
            raise ValueError(
                f"expected vocab_size >= 2 and a layer in [{-num_states}, {num_states - 1}] (the teacher has "
                f"{num_states} hidden states), got vocab_size={vocab_size}, layer={layer}"
            )
        self.teacher = encoder.eval().requires_grad_(False)
        self.teacher_name, self.vocab_size, self.layer = teacher_name, vocab_size, layer
        self.patch_size = encoder.config.patch_size
        self.register_buffer("centroids", torch.zeros(vocab_size, encoder.config.hidden_size))

    def train(self, mode: bool = True) -> TeacherFeatureTokenizer:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised teacher states of the patches, ``(batch, num_patches, hidden_size)``, raster order."""
        with torch.autocast(pixel_values.device.type, enabled=False):
            states = self.teacher(pixel_values.float(), output_hidden_states=True).hidden_states[self.layer]
            return F.normalize(states[:, 1:], dim=-1)  # drop CLS

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token ids ``(batch, num_patches)``, ``int64``: the code of highest cosine similarity."""
        return (self.patch_features(pixel_values) @ self.centroids.T).argmax(-1)

    @torch.no_grad()
    def fit(
        self,
        pixel_values: torch.Tensor,
        num_samples: int = 300_000,
        num_iters: int = 30,
        generator: torch.Generator | None = None,
        batch_size: int = 1024,
    ) -> dict[str, float]:
        """Spherical k-means (k-means++ seeding) on teacher features of ``pixel_values`` (training images only).

        Returns ``{"mean_cosine": ..., "used_codes": ...}`` of the final assignment.
        """
        device = self.centroids.device
        feats = torch.cat(
            [
                self.patch_features(pixel_values[s : s + batch_size].to(device)).flatten(0, 1)
                for s in range(0, len(pixel_values), batch_size)
            ]
        )
        if len(feats) < self.vocab_size:
            raise ValueError(f"k-means needs at least vocab_size={self.vocab_size} patches, got {len(feats)}")
        data = feats[torch.randperm(len(feats), generator=generator)[:num_samples].to(device)]
        self.centroids.copy_(F.normalize(_kmeans_plus_plus(data, self.vocab_size, generator), dim=-1))
        for _ in range(num_iters):
            assign = (data @ self.centroids.T).argmax(1)
            sums = torch.zeros_like(self.centroids).index_add_(0, assign, data)
            alive = torch.bincount(assign, minlength=self.vocab_size) > 0
            self.centroids[alive] = F.normalize(sums[alive], dim=-1)
            if not alive.all():  # re-seed empty codes with the worst-served points
                worst = (data * self.centroids[assign]).sum(1).topk(int((~alive).sum()), largest=False).indices
                self.centroids[~alive] = data[worst]
        cosine = (data @ self.centroids.T).max(1)
        used = int(torch.bincount(cosine.indices, minlength=self.vocab_size).gt(0).sum())
        return {"mean_cosine": cosine.values.mean().item(), "used_codes": used}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        meta = {
            "kind": "teacher_features",
            "teacher": self.teacher_name,
            "vocab_size": self.vocab_size,
            "layer": self.layer,
        }
        save_file(
            {"centroids": self.centroids.detach().cpu().contiguous()},
            os.path.join(directory, TOKENIZER_FILE),
            metadata={"config": json.dumps(meta)},
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> TeacherFeatureTokenizer:
        from transformers import BeitForMaskedImageModeling

        from ..shipped import resolve_backbone_path

        path, meta = _read_meta(directory)
        missing = {"teacher", "vocab_size", "layer"} - set(meta)
        if meta.get("kind") != "teacher_features" or missing:
            raise ValueError(f"{path} is not a teacher-feature tokenizer (metadata {meta})")
        teacher = BeitForMaskedImageModeling.from_pretrained(resolve_backbone_path(meta["teacher"]))
        tokenizer = cls(teacher, meta["teacher"], meta["vocab_size"], meta["layer"])
        tokenizer.centroids.copy_(load_file(path)["centroids"])
        return tokenizer


class VQKDTokenizer(nn.Module):
    """BEiT v2's vector-quantised knowledge distillation (VQ-KD) at small scale: ``(batch, C, H, W)`` -> tokens.

    An encoder over the image gives one vector per patch, projected to ``code_dim`` and L2-normalised; its token is
    the code of highest cosine similarity in an L2-normalised codebook of ``vocab_size`` codes. In training a decoder
    reconstructs a frozen teacher's patch features from the chosen codes (cosine loss), so the codes keep what the
    teacher knows, not what the pixels look like. The codebook is updated by exponential moving averages of the
    vectors assigned to each code (``decay``) and the encoder learns through the straight-through estimator with a
    commitment loss; a code that has gone unused (moving-average share of the assignments under
    ``1 / (vocab_size * 32)``) is restarted on a random encoder vector of the batch, so the whole codebook stays alive.
    The teacher is needed to train only: a trained tokenizer is its encoder and codebook, saved in one file.

    Args:
        patch_size: the backbone's patch size (a power of two >= 2).
        vocab_size: number of codes (the backbone's ``vocab_size``).
        code_dim: dimension of the codes (low, as in BEiT v2: lookups compare directions, not details).
        width, hidden_dim: sizes of the encoder (the teacher's convolutional layout) and of the decoder.
        target_dim: dimension of the teacher's patch features.
        decay: of the codebook's moving averages.
        commitment: weight of the commitment loss.
    """

    def __init__(
        self,
        patch_size: int = 4,
        vocab_size: int = 512,
        code_dim: int = 32,
        width: int = 32,
        hidden_dim: int = 96,
        target_dim: int = 96,
        decay: float = 0.99,
        commitment: float = 0.25,
    ) -> None:
        super().__init__()

        if vocab_size < 2 or code_dim < 1 or not 0.0 <= decay < 1.0:
            raise ValueError(
                f"expected vocab_size >= 2, code_dim >= 1 and decay in [0, 1), got vocab_size={vocab_size}, "
                f"code_dim={code_dim}, decay={decay}"
            )
        self.settings = {"patch_size": patch_size, "vocab_size": vocab_size, "code_dim": code_dim, "width": width,
                         "hidden_dim": hidden_dim, "target_dim": target_dim, "decay": decay,
                         "commitment": commitment}  # fmt: skip
        self.patch_size, self.vocab_size, self.decay, self.commitment = patch_size, vocab_size, decay, commitment
        self.encoder = nn.Sequential(patch_encoder(patch_size, width, hidden_dim), nn.Conv2d(hidden_dim, code_dim, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, hidden_dim, 1), nn.GELU(), nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden_dim, target_dim, 1),
        )  # fmt: skip
        codebook = F.normalize(torch.randn(vocab_size, code_dim, generator=torch.Generator().manual_seed(0)), dim=1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.full((vocab_size,), 1.0 / vocab_size))  # share of assignments
        self.register_buffer("ema_sum", codebook.clone())

    def codes(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised encoder vectors, ``(batch, num_patches, code_dim)``, raster order."""
        if pixel_values.ndim != 4:
            raise ValueError(f"expected pixel_values of shape (batch, channels, height, width), got "
                             f"{tuple(pixel_values.shape)}")  # fmt: skip
        z = self.encoder(pixel_values.float().mean(1, keepdim=True))
        return F.normalize(z.flatten(2).transpose(1, 2), dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Index of the most cosine-similar codebook entry for each L2-normalised vector ``(..., code_dim)``."""
        return (codes @ self.codebook.T).argmax(-1)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token ids ``(batch, num_patches)``, ``int64``; always with the encoder's frozen statistics (eval mode),
        in float32, so a token never depends on the batch or the precision it came with."""
        was_training = self.training
        self.eval()
        try:
            with torch.autocast(pixel_values.device.type, enabled=False):
                return self.lookup(self.codes(pixel_values))
        finally:
            self.train(was_training)

    def forward(self, pixel_values: torch.Tensor, target_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Distillation loss against the teacher's patch features ``(batch, num_patches, target_dim)``; in training
        mode it also updates the codebook."""
        codes = self.codes(pixel_values)  # (batch, patches, code_dim)
        ids = self.lookup(codes.detach())
        quantized = self.codebook[ids]
        if self.training:
            self._update_codebook(codes.detach().flatten(0, 1), ids.flatten())
        straight = codes + (quantized - codes).detach()  # the decoder's gradient reaches the encoder unchanged
        batch, patches, dim = straight.shape
        side = int(math.isqrt(patches))
        grid = straight.transpose(1, 2).reshape(batch, dim, side, patches // side)
        decoded = self.decoder(grid).flatten(2).transpose(1, 2)
        reconstruction = 1 - F.cosine_similarity(decoded, target_features.float(), dim=-1).mean()
        commitment = (codes - quantized.detach()).pow(2).sum(-1).mean()
        return {"loss": reconstruction + self.commitment * commitment, "tokens": ids}

    @torch.no_grad()
    def _update_codebook(self, codes: torch.Tensor, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids, minlength=self.vocab_size).to(codes.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, codes)
        self.ema_count.mul_(self.decay).add_(counts / len(ids), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.codebook.copy_(F.normalize(self.ema_sum, dim=1))
        dead = self.ema_count < 1.0 / (self.vocab_size * 32)
        if dead.any():  # restart dead codes on vectors of this batch
            pick = torch.randint(len(codes), (int(dead.sum()),), device=codes.device)
            self.codebook[dead] = codes[pick]
            self.ema_sum[dead] = codes[pick]
            self.ema_count[dead] = 1.0 / self.vocab_size

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"kind": "vqkd", **self.settings}
        save_file(tensors, os.path.join(directory, TOKENIZER_FILE), metadata={"config": json.dumps(meta)})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> VQKDTokenizer:
        path, meta = _read_meta(directory)
        if meta.pop("kind", None) != "vqkd":
            raise ValueError(f"{path} is not a VQ-KD tokenizer (metadata {meta})")
        tokenizer = cls(**meta)
        tokenizer.load_state_dict(load_file(path))  # strict: another layout is refused, never half-loaded
        return tokenizer.eval()


def codebook_usage(tokens: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """How a tokenizer uses its codebook on ``tokens`` (any shape): codes used, perplexity of the token
    distribution (``vocab_size`` when uniform, 1 when one code takes all) and the share of the commonest code."""
    counts = torch.bincount(tokens.flatten().cpu(), minlength=vocab_size).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {"used_codes": int((counts > 0).sum()), "perplexity": float(entropy.exp()), "top_share": float(probs.max())}


def load_visual_tokenizer(
    directory: str | os.PathLike,
) -> PatchKMeansTokenizer | TeacherFeatureTokenizer | VQKDTokenizer:
    """The visual tokenizer saved in a backbone folder, of whichever kind it is."""
    _, meta = _read_meta(directory)
    kind = meta.get("kind", "pixel_kmeans")
    if kind == "teacher_features":
        return TeacherFeatureTokenizer.from_pretrained(directory)
    if kind == "pixel_kmeans":
        return PatchKMeansTokenizer.from_pretrained(directory)
    if kind == "vqkd":
        return VQKDTokenizer.from_pretrained(directory)
    raise ValueError(
        f"unknown visual tokenizer kind {kind!r} in {directory}; expected pixel_kmeans, teacher_features or vqkd"
    )


__all__ = [
    "TOKENIZER_FILE",
    "PatchKMeansTokenizer",
    "TeacherFeatureTokenizer",
    "VQKDTokenizer",
    "codebook_usage",
    "load_visual_tokenizer",
]
