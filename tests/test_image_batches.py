"""The uint8 data path (modeling_vptm/data/batches.py): the same pixel values and augmentations as the image
processor called per example, decoded once and cached on the processor's settings."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import BeitImageProcessor

from modeling_vptm.data import (
    ImageBatchTransform,
    UInt8Images,
    collate,
    decode_images,
    random_resized_crop,
    random_shift_flip,
)


def image_dataset(tmp_path, count: int = 10, size=(37, 29), mode: str = "RGB", cached: bool = True):
    """A parquet-backed image dataset (so that `datasets` caches what is mapped from it) of odd-sized images."""
    from datasets import ClassLabel, Dataset, Features, load_dataset
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    channels = {"RGB": (3,), "L": ()}[mode]
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8), mode=mode)
              for _ in range(count)]  # fmt: skip
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])})
    dataset = Dataset.from_dict({"image": images, "label": [i % 3 for i in range(count)]}, features=features)
    if not cached:
        return dataset
    dataset.to_parquet(str(tmp_path / "images.parquet"))
    return load_dataset("parquet", data_files=str(tmp_path / "images.parquet"), cache_dir=str(tmp_path / "cache"))[
        "train"
    ]


def make_processor(**overrides) -> BeitImageProcessor:
    """A resizing processor (odd input sizes to 24x24, bicubic) with per-channel statistics."""
    settings = {"size": {"height": 24, "width": 24}, "do_center_crop": False, "image_mean": [0.4, 0.5, 0.6],
                "image_std": [0.2, 0.25, 0.3]}  # fmt: skip
    return BeitImageProcessor(**{**settings, **overrides})


def batch_of(decoded, indices) -> dict:
    images = UInt8Images(decoded)
    return collate([images[i] for i in indices])


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_eval_pixel_values_equal_the_processors(tmp_path, mode):
    dataset = image_dataset(tmp_path, mode=mode)
    processor = make_processor()
    decoded = decode_images(dataset, processor)
    batch = batch_of(decoded, range(len(dataset)))
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (10, 3, 24, 24)
    assert batch["labels"].tolist() == dataset["label"]
    expected = processor([image.convert("RGB") for image in dataset["image"]], return_tensors="pt")["pixel_values"]
    found = ImageBatchTransform.from_processor(processor)(batch["pixel_values"])
    assert found.dtype == torch.float32
    torch.testing.assert_close(found, expected, atol=1e-6, rtol=1e-6)
    # a processor that neither rescales nor normalises: the uint8 values themselves
    plain = make_processor(do_rescale=False, do_normalize=False)
    torch.testing.assert_close(ImageBatchTransform.from_processor(plain)(batch["pixel_values"]),
                               batch["pixel_values"].float())  # fmt: skip


def test_training_batches_equal_the_per_example_path_for_a_seed(tmp_path):
    """Normalise, then crop, then shift and flip, with the draws taken from the global generator in the same order
    as the per-example path took them: the same images for the same seed."""
    dataset = image_dataset(tmp_path, cached=False)
    processor = make_processor()
    transform = ImageBatchTransform.from_processor(processor, crop_scale=0.2, shift=3, flip=True)
    batch = batch_of(decode_images(dataset, processor), range(len(dataset)))
    torch.manual_seed(0)
    found = transform(batch["pixel_values"], train=True)
    torch.manual_seed(0)
    expected = processor([image.convert("RGB") for image in dataset["image"]], return_tensors="pt")["pixel_values"]
    expected = random_shift_flip(random_resized_crop(expected, 0.2, None), 3, True, None)
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(found, transform(batch["pixel_values"], train=False))  # augmented, and only in training
    torch.testing.assert_close(transform(batch["pixel_values"]), transform.model_inputs(batch, train=False)[
        "pixel_values"])  # fmt: skip
    assert transform.model_inputs({"pixel_values": found}, train=True)["pixel_values"] is found  # floats pass
    with pytest.raises(ValueError, match=r"ImageBatchTransform takes uint8 pixels, got torch.float32"):
        transform(found)


def test_batched_crop_equals_each_box_interpolated():
    images = torch.randn(16, 3, 30, 22, generator=torch.Generator().manual_seed(0))
    found = random_resized_crop(images, 0.05, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # the same draws, as the per-image version made them
    area = torch.empty(16).uniform_(0.05, 1.0, generator=generator) * 30 * 22
    ratio = torch.empty(16).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator).exp()
    width = (area * ratio).sqrt().round().clamp(1, 22).long()
    height = (area / ratio).sqrt().round().clamp(1, 30).long()
    top = (torch.rand(16, generator=generator) * (30 - height + 1)).long()
    left = (torch.rand(16, generator=generator) * (22 - width + 1)).long()
    for i in range(16):
        t, l, h, w = top[i].item(), left[i].item(), height[i].item(), width[i].item()
        box = F.interpolate(images[i : i + 1, :, t : t + h, l : l + w], size=(30, 22), mode="bilinear",
                            antialias=True, align_corners=False)  # fmt: skip
        torch.testing.assert_close(found[i : i + 1], box, atol=1e-5, rtol=1e-5)


def test_decoding_is_cached_on_the_processors_settings(tmp_path):
    dataset = image_dataset(tmp_path)
    first = decode_images(dataset, make_processor())
    again = decode_images(dataset, make_processor())
    assert first.cache_files and again.cache_files == first.cache_files  # read back, not decoded again
    other = decode_images(dataset, make_processor(size={"height": 16, "width": 16}))
    assert other.cache_files != first.cache_files and other.features["pixel_values"].shape == (3, 16, 16)
    resampled = decode_images(dataset, make_processor(resample=Image.NEAREST))
    assert resampled.cache_files != first.cache_files


def test_uint8_images_follow_chunks_selections_and_label_maps(tmp_path):
    from datasets import concatenate_datasets

    dataset = image_dataset(tmp_path, cached=False)
    decoded = decode_images(dataset, make_processor())
    several = concatenate_datasets([decoded, decoded.select([4, 1])])  # several Arrow chunks and an index map
    images = UInt8Images(several)
    assert len(images) == 12 and len(several.data.table.column("pixel_values").chunks) > 1
    expected = np.stack(decoded.with_format("numpy")["pixel_values"]).astype(np.uint8)
    for i, source in enumerate([*range(10), 4, 1]):
        assert np.array_equal(images[i]["pixel_values"], expected[source]), i
    assert images[-1]["labels"] == decoded[1]["labels"] == 1
    with pytest.raises(IndexError, match=r"index 12 out of range for 12 images"):
        images[12]
    copy = pickle.loads(pickle.dumps(images))  # as a spawned data-loader worker gets it: rebuilds its views
    assert np.array_equal(copy[11]["pixel_values"], expected[1])
    # labels that are not class indices are mapped
    named = dataset.map(lambda row: {"name": "abc"[row["label"]]})
    by_name = decode_images(named, make_processor(), label_to_index={"a": 2, "b": 0, "c": 1}, label_column="name")
    assert by_name["labels"] == [{0: 2, 1: 0, 2: 1}[label] for label in dataset["label"]]
