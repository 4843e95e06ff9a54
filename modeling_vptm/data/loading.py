"""The data of `examples/run_classification.py`: the dataset its arguments name (an image folder, the shipped or
packaged data, a Hub dataset), checked, split (validation carved from train, never from test) and subsampled.
"""

from __future__ import annotations

import logging
import os

from ..hub_names import ask_hub, check_local_folder
from ..shipped import DIGITS_DATASET, FULL_TEST_DATASET, SHIPPED_DATASET, SHIPPED_DATASETS, is_shipped_name
from ..standalone.image_input import IMAGE_EXTENSIONS, is_image_file, read_image
from .sources import digits_dataset, fashion_mnist_dataset, load_local_dataset, shipped_dataset


logger = logging.getLogger(__name__)

# the splits a run reads, and the fraction of train held out as validation when a dataset has neither other split
SPLITS = ("train", "validation", "test")
TRAIN_VAL_SPLIT = 0.15


def load_source(data_args, model_args):
    """The dataset the arguments name, as it comes: image folders (checked, unreadable files skipped if asked), the
    shipped or packaged data, or a Hub dataset."""
    from datasets import DatasetDict

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
        dataset = load_hub_dataset(data_args.dataset_name, data_args.dataset_config_name, model_args)
    else:
        raise ValueError(
            f"no dataset given: pass --dataset_name (a Hub dataset, or {SHIPPED_DATASET} for the shipped "
            "Fashion-MNIST subset) or --train_dir (an image folder with one sub-folder per class)"
        )
    return dataset


def load_hub_dataset(name: str, config_name: str | None, model_args):
    """`datasets.load_dataset(name)` for a local dataset folder or a Hub dataset, with a name that is neither answered
    in one line within seconds: one meant as a folder at once, one the Hub does not have after one question to it
    (not a minute of download retries and a page of traceback)."""
    from datasets import load_dataset
    from huggingface_hub import is_offline_mode

    if is_shipped_name(name):
        raise ValueError(f"--dataset_name {name!r:.80} is no shipped dataset; the shipped ones are {SHIPPED_DATASETS}")
    if not os.path.isdir(name):
        check_local_folder(name, "dataset")
        if not is_offline_mode():  # offline, datasets looks in its cache without retrying
            ask_hub(name, "dataset", repo_type="dataset", token=model_args.token)
    try:
        return load_dataset(name, config_name, cache_dir=model_args.cache_dir, token=model_args.token)
    except (FileNotFoundError, ConnectionError) as error:  # datasets' DatasetNotFoundError is a FileNotFoundError
        reason = " ".join(str(error).split())[:300]
        raise ValueError(f"cannot load the dataset {name!r:.80}: {reason}") from error


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
            try:  # the package's image policy: a regular file, within the pixel limit, that decodes
                read_image(path)
            except ValueError:
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


__all__ = ["SPLITS", "TRAIN_VAL_SPLIT", "carve_validation", "check_image_folders", "load_data", "load_source"]
