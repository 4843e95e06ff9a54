"""Data: the datasets the project ships or reads from system packages, a run's splits (validation carved from
train), the uint8 image path that keeps an accelerator fed, and batch augmentations on the device."""

from .augment import random_resized_crop, random_shift_flip
from .batches import ImageBatchTransform, UInt8Images, collate, decode_images, processor_settings
from .loading import SPLITS, TRAIN_VAL_SPLIT, carve_validation, check_image_folders, load_data, load_source
from .sources import (
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    SHIPPED_DATA_DIR,
    balanced_subset,
    digits_dataset,
    fashion_mnist_dataset,
    load_fashion_mnist,
    load_local_dataset,
    read_idx,
    shipped_dataset,
)


__all__ = [
    "FASHION_MNIST_LABELS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "SHIPPED_DATA_DIR",
    "SPLITS",
    "TRAIN_VAL_SPLIT",
    "ImageBatchTransform",
    "UInt8Images",
    "balanced_subset",
    "carve_validation",
    "check_image_folders",
    "collate",
    "decode_images",
    "digits_dataset",
    "fashion_mnist_dataset",
    "load_data",
    "load_fashion_mnist",
    "load_local_dataset",
    "load_source",
    "processor_settings",
    "random_resized_crop",
    "random_shift_flip",
    "read_idx",
    "shipped_dataset",
]
