"""Image batches that keep an accelerator busy: decoded and resized once, handed over as uint8, made model inputs on
the model's device.

An image processor called per example in a `with_transform` decodes, resizes and normalises every image in Python,
every epoch, and hands over float32: on a GPU that fed a BEiT-base at a quarter of its training speed. Here the work
is split by where it belongs (the layout timm's loader uses: uint8 collate, normalisation on the device):

1. `decode_images`, once per split: the processor's geometric steps (RGB, resize, centre crop; the processor itself
   runs them, so the pixels are its own) into fixed-size uint8 arrays, through `datasets.map`, which caches the
   result on disk keyed on the split and the processor's settings: a rerun reads it back.
2. `UInt8Images` and `collate`, in the data-loader workers: batches cut out of the memory-mapped arrays with no
   per-example formatting, stacked as uint8 (4x fewer bytes than float32 to pin and copy).
3. `ImageBatchTransform`, batched on the batch's device: the processor's rescale and normalisation, then, in
   training, the random resized crop, shift and flip of `modeling_vptm.data.augment`. Their parameters are drawn on the
   CPU from the global torch generator, one draw per image in the same order as the per-example path made them with
   no workers, so Trainer's seed and the RNG states in its checkpoints reproduce them on any device and with any
   number of workers.

Same numbers as the per-example path (tested): the same resize, the same arithmetic within float rounding, the same
random draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .augment import random_resized_crop, random_shift_flip


# part of every cache key: bump it when what `decode_images` writes changes
DECODED_FORMAT_VERSION = 1


def processor_settings(processor) -> dict:
    """What a processor's output depends on: its settings and its class (a PIL and a torchvision backend may
    resize differently)."""
    return {"class": type(processor).__name__, **processor.to_dict()}


def _uint8(pixels: np.ndarray) -> np.ndarray:
    """The processor's un-normalised output as uint8: PIL processors return uint8 already; a backend that resizes in
    floating point is rounded (at most half a grey level off)."""
    if pixels.dtype == np.uint8:
        return pixels
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def decode_images(
    dataset,
    processor,
    label_to_index: Mapping | None = None,
    num_proc: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
):
    """A `datasets.Dataset` of images as one of `pixel_values` (uint8 `(channels, height, width)`, the size the
    processor makes) and `labels` (class indices), decoded and resized once.

    `label_to_index` maps the dataset's labels to class indices (`None`: they are indices already). The result is
    cached by `datasets` (for datasets backed by files) under a fingerprint of the split, the processor's settings and
    the label map, so a second run with the same ones reads it back and any change makes a new one.
    """
    from datasets import Array3D, Features, Value
    from datasets.fingerprint import Hasher

    def geometry(images) -> np.ndarray:
        rgb = [image.convert("RGB") for image in images]
        # the processor's own resize and crop, without its float steps, which run on the device instead
        pixels = processor(rgb, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        return _uint8(np.asarray(pixels))  # (batch, channels, height, width)

    def decode(batch: dict) -> dict:
        labels = batch[label_column]
        if label_to_index is not None:
            labels = [label_to_index[label] for label in labels]
        return {"pixel_values": geometry(batch[image_column]), "labels": labels}

    if len(dataset) == 0:
        raise ValueError("decode_images got an empty dataset")
    shape = geometry([dataset[0][image_column]]).shape[1:]  # (channels, height, width)
    features = Features({"pixel_values": Array3D(shape, "uint8"), "labels": Value("int64")})
    fingerprint = Hasher.hash(
        [dataset._fingerprint, processor_settings(processor), label_to_index, DECODED_FORMAT_VERSION]
    )
    return dataset.map(
        decode,
        batched=True,
        batch_size=64,
        remove_columns=dataset.column_names,
        features=features,
        new_fingerprint=fingerprint,
        num_proc=num_proc,
        desc="Decoding and resizing images (once; cached)",
    )


class UInt8Images(torch.utils.data.Dataset):
    """Examples `{"pixel_values": uint8 (C, H, W) array, "labels": int}` read straight out of the Arrow arrays that
    `decode_images` wrote (memory-mapped when cached on disk): no per-example formatting, no copy until `collate`
    stacks a batch. `datasets`' own numpy formatting of such arrays is about 20x slower and returns int64."""

    def __init__(self, decoded) -> None:
        if decoded._indices is not None:  # a select() or shuffle() after decoding: rows in that order, contiguous
            decoded = decoded.flatten_indices()
        self.decoded = decoded
        self._chunks: list[np.ndarray] | None = None  # built lazily, in each worker process

    def __len__(self) -> int:
        return len(self.decoded)

    def _arrays(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        if self._chunks is None:
            table = self.decoded.data.table
            chunks, starts = [], [0]
            for chunk in table.column("pixel_values").chunks:
                # Array3D stores list<list<list<uint8>>>: three flattens give the values, zero-copy
                values = chunk.storage.flatten().flatten().flatten().to_numpy(zero_copy_only=True)
                chunks.append(values.reshape(len(chunk), *self.decoded.features["pixel_values"].shape))
                starts.append(starts[-1] + len(chunk))
            self._chunks, self._starts = chunks, np.asarray(starts)
            self._labels = table.column("labels").to_numpy()
        return self._chunks, self._starts, self._labels

    def __getitem__(self, index: int) -> dict:
        chunks, starts, labels = self._arrays()
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        chunk = int(np.searchsorted(starts, index, side="right")) - 1
        return {"pixel_values": chunks[chunk][index - starts[chunk]], "labels": int(labels[index])}

    def __getstate__(self) -> dict:
        # the views point into this process's memory map; a spawned worker builds its own
        return {**self.__dict__, "_chunks": None}


def collate(examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """A list of examples as one batch: `pixel_values` uint8 `(batch, C, H, W)`, `labels` `(batch,)`."""
    pixels = np.stack([np.asarray(e["pixel_values"]) for e in examples])  # (batch, C, H, W): the one copy
    return {
        "pixel_values": torch.from_numpy(pixels),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }


class ImageBatchTransform:
    """uint8 batches -> the model's float `pixel_values`, on the batch's device, for a whole batch at once: the
    processor's rescale and normalisation, then (in training) random resized crops, shifts and flips.

    Args:
        mean, std: per-channel normalisation (after rescaling), as the image processor's `image_mean`/`image_std`.
        rescale_factor: multiplies the uint8 values first (the processor's, 1/255 usually).
        crop_scale: random resized crops covering this fraction of the image up to all of it (0: off).
        shift: random translation by up to this many pixels, zero-filled after normalisation (0: off).
        flip: random horizontal flips.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        rescale_factor: float = 1 / 255,
        crop_scale: float = 0.0,
        shift: int = 0,
        flip: bool = False,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}")
        self.mean, self.std, self.rescale_factor = tuple(mean), tuple(std), rescale_factor
        self.crop_scale, self.shift, self.flip = crop_scale, shift, flip
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_processor(cls, processor, crop_scale: float = 0.0, shift: int = 0, flip: bool = False):
        """The arithmetic `processor` applies after resizing (its `do_rescale`/`do_normalize` honoured), plus the
        given augmentations."""
        normalize, rescale = getattr(processor, "do_normalize", True), getattr(processor, "do_rescale", True)
        mean = np.broadcast_to(np.asarray(processor.image_mean, dtype=float), (3,)) if normalize else np.zeros(3)
        std = np.broadcast_to(np.asarray(processor.image_std, dtype=float), (3,)) if normalize else np.ones(3)
        rescale = processor.rescale_factor if rescale else 1.0
        return cls(mean.tolist(), std.tolist(), rescale, crop_scale=crop_scale, shift=shift, flip=flip)

    def _scale_offset(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, `(x * rescale - mean) / std` as `x * scale + offset`, `(C, 1, 1)` each."""
        if device not in self._constants:
            mean, std = torch.tensor(self.mean, dtype=torch.float64), torch.tensor(self.std, dtype=torch.float64)
            scale, offset = self.rescale_factor / std, -mean / std
            self._constants[device] = tuple(t.to(device, torch.float32)[:, None, None] for t in (scale, offset))
        return self._constants[device]

    def __call__(self, pixels: torch.Tensor, train: bool = False) -> torch.Tensor:
        """`pixels`: uint8 `(batch, C, H, W)`; returns float32 `(batch, C, H, W)` on the same device."""
        if pixels.dtype != torch.uint8:
            raise ValueError(f"ImageBatchTransform takes uint8 pixels, got {pixels.dtype}")
        scale, offset = self._scale_offset(pixels.device)
        # one kernel from uint8 to normalised float32 (the processor's rescale and normalisation folded, equal to its
        # values within float32 rounding): small batches on a busy CPU pay per kernel, not per pixel
        images = torch.addcmul(offset, pixels, scale)  # (batch, C, H, W)
        if train and self.crop_scale:
            images = random_resized_crop(images, self.crop_scale, None)
        if train and (self.shift or self.flip):
            images = random_shift_flip(images, self.shift, self.flip, None)
        return images

    def model_inputs(self, batch: Mapping, train: bool, device: torch.device | str | None = None) -> dict:
        """`batch` with its uint8 `pixel_values` moved to `device` (default: where they are) and made model inputs;
        a batch whose `pixel_values` are already floating point passes unchanged."""
        pixels = batch["pixel_values"]
        if pixels.is_floating_point():
            return dict(batch)
        if device is not None:
            pixels = pixels.to(device, non_blocking=True)
        return {**batch, "pixel_values": self(pixels, train=train)}


__all__ = ["ImageBatchTransform", "UInt8Images", "collate", "decode_images", "processor_settings"]
