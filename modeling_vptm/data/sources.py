"""Fashion-MNIST data for the shipped backbone and the offline examples.

Two sources:

* the IDX files of the Debian package ``dataset-fashion-mnist`` (60,000 train and 10,000 test images), read by
  :func:`load_fashion_mnist`; used to pre-train the shipped backbone and for full test-set evaluation;
* a small, seeded subset shipped inside this package as parquet files (:func:`shipped_dataset`): 100 training
  images per class and 300 test images per class, so that the examples and tests run with no download.

Fashion-MNIST is (c) Zalando SE, released under the MIT licence (https://github.com/zalandoresearch/fashion-mnist).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import uuid
from pathlib import Path

import numpy as np

from ..shipped import SHIPPED_DATA_FOLDER


logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes are used by (Fashion-)MNIST.
_IDX_UBYTE = 0x08

SHIPPED_DATA_DIR = Path(__file__).resolve().parents[1] / "shipped" / SHIPPED_DATA_FOLDER
# Fashion-MNIST pixel statistics on the training split, after scaling to [0, 1] (the shipped processor's too)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (optionally gzip-compressed) into a ``uint8`` array of the shape its header gives."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path} is not an IDX file: expected a header starting with two zero bytes, got {data[:4]!r}"
        )
    type_code, ndim = data[2], data[3]
    if type_code != _IDX_UBYTE:
        raise ValueError(f"{path}: expected IDX type 0x08 (unsigned byte), got {type_code:#04x}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, expected at least {header_end})")
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    expected = int(np.prod(shape)) if ndim else 0
    if len(data) - header_end != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header_end} bytes of data"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images, labels)`` of a Fashion-MNIST split: ``uint8`` arrays of shape (N, 28, 28) and (N,).

    ``data_dir`` defaults to ``$FASHION_MNIST_DIR`` or the folder of the Debian package.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    directory = Path(data_dir or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    image_stem, label_stem = _SPLIT_FILES[split]
    image_path, label_path = _find(directory, image_stem), _find(directory, label_stem)
    if image_path is None or label_path is None:
        missing = image_stem if image_path is None else label_stem
        raise FileNotFoundError(
            f"Fashion-MNIST file {missing}(.gz) not found in {directory}. Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point data_dir / $FASHION_MNIST_DIR at a "
            "folder holding the IDX files. The examples can also run on the subset shipped with this package."
        )
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"expected images of shape (N, H, W) and labels of shape (N,), got {images.shape} and {labels.shape}"
        )
    return images, labels


def shipped_dataset():
    """The Fashion-MNIST subset shipped with the package as a ``datasets.DatasetDict`` (``train``, ``test``).

    ``train``: 1,000 images (100 per class) drawn with seed 0 from the official training split; ``test``: 3,000
    images (300 per class) drawn with seed 0 from the official test split. Columns ``image`` (PIL) and ``label``
    (``ClassLabel`` with the Fashion-MNIST names). See ``shipped/fashion-mnist-1k/README.md``.
    """
    files = {split: str(SHIPPED_DATA_DIR / f"{split}.parquet") for split in ("train", "test")}
    return load_local_dataset("parquet", data_files=files)


def load_local_dataset(builder: str, **kwargs):
    """`datasets.load_dataset` with one of its packaged builders (parquet, imagefolder, ...) on local files, without
    the network request `datasets` sends to count the builder's downloads: nothing is downloaded, so a run on local
    data makes no network call at all (HF_UPDATE_DOWNLOAD_COUNTS=0 does the same for every load)."""
    import datasets

    counting = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        return datasets.load_dataset(builder, **kwargs)
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counting


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``per_class`` examples of every class, drawn without replacement with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(labels):
        candidates = np.flatnonzero(labels == cls)
        if len(candidates) < per_class:
            raise ValueError(f"class {cls} has {len(candidates)} examples, fewer than per_class={per_class}")
        picked.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


# Part of the cached files' names: a change to how a split is encoded (its columns, label names) must make new files
ENCODED_SPLIT_VERSION = 1


def fashion_mnist_dataset(
    split: str = "test", data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
):
    """A Fashion-MNIST split from the IDX files as a ``datasets.Dataset`` (``image`` PIL, ``label`` ClassLabel).

    The images are encoded once into a parquet file under ``cache_dir`` (default: the ``datasets`` cache), named by
    a hash of the split's pixels, labels and encoding, and read back from there: a later call, in any process, skips
    the encoding (about 2 s for the 10,000 test images on 2 cores), and the result is backed by a file, so that what
    `datasets.map` makes of it (the examples' decoded, resized images) is cached on disk too. A file is written under
    a unique temporary name and linked into place only if no other process got there first, so none is ever
    half-written and one already read is never replaced.
    """
    from datasets import ClassLabel, Dataset, Features, Image, config
    from PIL import Image as PILImage

    images, labels = load_fashion_mnist(split, data_dir)
    digest = hashlib.sha256(f"{ENCODED_SPLIT_VERSION} {FASHION_MNIST_LABELS}".encode())
    for array in (images, labels):
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    folder = Path(cache_dir or config.HF_DATASETS_CACHE) / "vptm-fashion-mnist"
    path = folder / f"{split}-{digest.hexdigest()[:16]}.parquet"
    if not path.is_file():
        features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
        encoded = Dataset.from_dict(
            {"image": [PILImage.fromarray(x, mode="L") for x in images], "label": labels.astype(int).tolist()},
            features=features,
        )
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{path.name}.{uuid.uuid4().hex}.partial"  # created with the usual permissions
        try:
            encoded.to_parquet(str(partial))
            try:
                os.link(partial, path)  # atomic, and fails if another process got there first: its file is kept
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links
                if not path.is_file():
                    os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    cache = None if cache_dir is None else str(cache_dir)
    return load_local_dataset("parquet", data_files={split: str(path)}, cache_dir=cache)[split]


def digits_dataset(train_per_class: int = 50, seed: int = 0):
    """A transfer task for the Fashion-MNIST backbone: scikit-learn's handwritten digits (1,797 images of 8x8 pixels,
    16 grey levels, shipped inside scikit-learn, so no download) as a ``datasets.DatasetDict``.

    ``train``: ``train_per_class`` images of each digit drawn with ``seed``; ``test``: every other image. Images are
    ``L`` mode PIL images scaled to 0-255 (light strokes on black, as in Fashion-MNIST); the backbone's image
    processor resizes them. Digits are not mirror-symmetric: train without horizontal flips.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits transfer task needs scikit-learn (the `examples` extra: pip install -e '.[examples]')"
        ) from error
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    labels = digits.target.astype(int)
    train = balanced_subset(labels, train_per_class, seed)
    test = np.setdiff1d(np.arange(len(labels)), train)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(index: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {"image": [PILImage.fromarray(images[i], mode="L") for i in index], "label": labels[index].tolist()},
            features=features,
        )

    return DatasetDict(train=split(train), test=split(test))


__all__ = [
    "FASHION_MNIST_LABELS",
    "balanced_subset",
    "digits_dataset",
    "fashion_mnist_dataset",
    "load_fashion_mnist",
    "load_local_dataset",
    "read_idx",
    "shipped_dataset",
]
