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

from .images import IMAGE_EXTENSIONS, is_image_file


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

SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "shipped" / "fashion-mnist-1k"
# the dataset names of `examples/run_classification.py` for the data shipped or packaged here (`load_data`)
SHIPPED_DATASET = "vptm:fashion-mnist-1k"
# the shipped 1,000 training images, evaluated on the 10,000 official test images (Debian dataset-fashion-mnist)
FULL_TEST_DATASET = "vptm:fashion-mnist-1k-test10k"
# a transfer task: scikit-learn's 8x8 handwritten digits, 50 training images per digit, the other 1,297 for test
DIGITS_DATASET = "vptm:digits"
# the splits a run reads, and the fraction of train held out as validation when a dataset has neither other split
SPLITS = ("train", "validation", "test")
TRAIN_VAL_SPLIT = 0.15
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


# ----------------------------------------------------------------------- the script's data, your own data checked
def load_source(data_args, model_args):
    """The dataset the arguments name, as it comes: image folders (checked, unreadable files skipped if asked), the
    shipped or packaged data, or a Hub dataset."""
    from datasets import DatasetDict, load_dataset

    if data_args.train_dir:
        files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
        unreadable = check_image_folders(data_args.train_dir, data_args.validation_dir,
                                         data_args.skip_unreadable_images)  # fmt: skip
        dataset = load_local_dataset("imagefolder", data_files=files, cache_dir=model_args.cache_dir)
        if unreadable:
            dataset = drop_images(dataset, unreadable)
            logger.warning("skipped %d unreadable image(s)", len(unreadable))
    elif data_args.dataset_name == SHIPPED_DATASET:
        dataset = shipped_dataset()
    elif data_args.dataset_name == FULL_TEST_DATASET:
        test = fashion_mnist_dataset("test", cache_dir=model_args.cache_dir)
        dataset = DatasetDict(train=shipped_dataset()["train"], test=test)
    elif data_args.dataset_name == DIGITS_DATASET:
        dataset = digits_dataset()
    elif data_args.dataset_name:
        dataset = load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
            token=model_args.token,
        )  # fmt: skip
    else:
        raise ValueError(
            f"no dataset given: pass --dataset_name (a Hub dataset, or {SHIPPED_DATASET} for the shipped "
            "Fashion-MNIST subset) or --train_dir (an image folder with one sub-folder per class)"
        )
    return dataset


def load_data(data_args, model_args, seed: int = 0):
    """The splits the script's `DataTrainingArguments` name (`model_args`: where Hub data is cached, the token): train,
    and validation and/or test, with columns renamed to image/label.

    validation (for model selection: Trainer's eval_dataset) is the dataset's own, or carved from train by
    --validation_split; test is the dataset's own and is only scored at the end (--do_predict). With neither,
    --train_val_split of train is held out as validation. Every random choice in here is seeded.
    """
    from datasets import DatasetDict

    dataset = load_source(data_args, model_args)
    if "train" not in dataset:
        raise ValueError(f"the dataset has no 'train' split; it has {sorted(dataset)}")
    if data_args.validation_split:  # model selection on a carved split, whatever validation split the data has
        carved = carve_validation(dataset, data_args.validation_split, data_args.validation_split_seed,
                                  data_args.label_column_name)  # fmt: skip
        dataset = DatasetDict(carved, **({"test": dataset["test"]} if "test" in dataset else {}))
    elif "validation" not in dataset and "test" not in dataset:  # nothing held out: hold out part of train
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset = DatasetDict(train=split["train"], validation=split["test"])
    elif data_args.train_val_split != TRAIN_VAL_SPLIT:
        logger.warning(
            "--train_val_split is ignored: the dataset has its own %s split (carve a validation split from train "
            "with --validation_split)",
            " and ".join(s for s in ("validation", "test") if s in dataset),
        )
    return select_columns_and_samples(dataset, data_args, seed)


def select_columns_and_samples(dataset, data_args, seed: int = 0):
    """The run's splits with their image and label columns named image and label, subsampled (seeded) to
    --max_train_samples and --max_eval_samples."""
    from datasets import DatasetDict

    for name in (data_args.image_column_name, data_args.label_column_name):
        if name not in dataset["train"].column_names:
            raise ValueError(
                f"column {name!r} not found in the dataset; its columns are {dataset['train'].column_names}. Pass "
                "--image_column_name / --label_column_name"
            )
    dataset = dataset.rename_columns(
        {c: n for c, n in ((data_args.image_column_name, "image"), (data_args.label_column_name, "label")) if c != n}
    )
    dataset = DatasetDict({name: dataset[name] for name in SPLITS if name in dataset})
    if data_args.max_train_samples is not None:
        count = min(data_args.max_train_samples, len(dataset["train"]))
        dataset["train"] = dataset["train"].shuffle(seed=seed).select(range(count))
    for name in ("validation", "test"):  # a random subset: the first rows of an image folder are one class
        if data_args.max_eval_samples is not None and name in dataset:
            count = min(data_args.max_eval_samples, len(dataset[name]))
            dataset[name] = dataset[name].shuffle(seed=seed).select(range(count))
    return dataset


def carve_validation(dataset, fraction: float, seed: int = 0, label: str = "label") -> dict:
    """`dataset`'s train minus a stratified, seeded validation split of `fraction` of it: a dict with train and
    validation (choose hyperparameters on it, never on the test images)."""
    from datasets import ClassLabel

    train = dataset["train"]
    if label not in train.column_names:
        raise ValueError(f"column {label!r} not found in the dataset; its columns are {train.column_names}")
    if not isinstance(train.features[label], ClassLabel):
        train = train.class_encode_column(label)
    split = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column=label)
    return {"train": split["train"], "validation": split["test"]}


def check_image_folders(train_dir: str, validation_dir: str | None = None, skip_unreadable: bool = False) -> set[str]:
    """Refuses image folders (one sub-folder per class) with no images, or a training folder with one class;
    unreadable files fail, or with `skip_unreadable` are returned (absolute paths) to be skipped."""
    from PIL import Image, UnidentifiedImageError

    unreadable: set[str] = set()
    for folder in filter(None, (train_dir, validation_dir)):
        if not os.path.isdir(folder):
            raise ValueError(f"image folder {folder} does not exist")
        classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        images = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names if is_image_file(f)]
        if not images:
            raise ValueError(f"image folder {folder} holds no images (looked for {list(IMAGE_EXTENSIONS)})")
        if folder == train_dir and len(classes) < 2:
            raise ValueError(
                f"image folder {folder} must hold one sub-folder per class and at least 2 classes, found {classes}"
            )
        bad = []
        for path in images:
            try:
                with Image.open(path) as image:
                    image.load()
            except (OSError, UnidentifiedImageError, SyntaxError):
                bad.append(path)
        if bad and not skip_unreadable:
            raise ValueError(
                f"{len(bad)} unreadable image file(s) in {folder}, e.g. {bad[:3]}; fix or remove them, or pass "
                "--skip_unreadable_images to skip them"
            )
        for path in bad:
            logger.warning("skipping unreadable image %s", path)
        unreadable.update(os.path.abspath(p) for p in bad)
    return unreadable


def drop_images(dataset, paths: set[str]):
    """Removes the rows whose image file is in `paths` (undecoded column, so bad files are never opened)."""
    from datasets import Image

    for split in list(dataset):
        raw = dataset[split].cast_column("image", Image(decode=False))
        keep = [i for i, v in enumerate(raw["image"]) if os.path.abspath(v["path"] or "") not in paths]
        dataset[split] = raw.select(keep).cast_column("image", Image())
    return dataset


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
