"""What ships inside the package, by name: the small BEiT backbones the project pre-trained and the datasets the
examples run on, all named portably as ``vptm:<name>``.

A prompt checkpoint trained on a shipped backbone records that name, and any machine with the package installed
resolves it to the package's data folder, with no network. Only the names in this catalogue resolve: a name is never
taken as a path (``vptm:../../elsewhere`` is refused). This is a Hub code file: it imports only the standard library.
"""

from __future__ import annotations

import os


SHIPPED_PREFIX = "vptm:"
# the backbones in the package's shipped/ folder (see model_cards/): the first is the default of every script
SHIPPED_BACKBONES = ("tiny-beit-fashion-mnist", "tiny-beit-fashion-mnist-v2", "tiny-beit-fashion-mnist-v3")
SHIPPED_BACKBONE = SHIPPED_PREFIX + SHIPPED_BACKBONES[0]
# the datasets of `examples/run_classification.py` that ship or come from system packages (`data.load_source`):
# the 1,000-image Fashion-MNIST subset in the package, the same training images scored on the 10,000 official test
# images (Debian's dataset-fashion-mnist), and scikit-learn's 8x8 digits as a transfer task
SHIPPED_DATASET = SHIPPED_PREFIX + "fashion-mnist-1k"
FULL_TEST_DATASET = SHIPPED_PREFIX + "fashion-mnist-1k-test10k"
DIGITS_DATASET = SHIPPED_PREFIX + "digits"
SHIPPED_DATASETS = (SHIPPED_DATASET, FULL_TEST_DATASET, DIGITS_DATASET)
# the folder of the shipped subset's parquet files, inside shipped/
SHIPPED_DATA_FOLDER = "fashion-mnist-1k"


def is_shipped_name(name: object) -> bool:
    """Whether `name` is meant as a shipped name (``vptm:...``), known or not."""
    return isinstance(name, str) and name.startswith(SHIPPED_PREFIX)


def shipped_folder(name: str, what: str = "data") -> str:
    """The data folder of a shipped name inside the installed vptm package, ``shipped/<name>``, found by file lookup
    without importing the package (so a Hub code file that calls this keeps importing only torch and
    transformers). `what` names the thing in the message when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("modeling_vptm")
    if spec is None or not spec.submodule_search_locations:
        raise OSError(
            f"{SHIPPED_PREFIX + name!r} is the {what} shipped with the vptm package, which is not installed here; "
            "install it from its repository (`pip install -e .` in a checkout, or the wheel `pip wheel .` builds), "
            "or pass a local folder or Hub id instead"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "shipped", name)


def resolve_backbone_path(name_or_path: str) -> str:
    """Resolves ``vptm:<name>`` to the shipped backbone's folder inside the installed package; other names pass
    through. Only the catalogue's names resolve (`SHIPPED_BACKBONES`)."""
    if not is_shipped_name(name_or_path):
        return name_or_path
    name = name_or_path[len(SHIPPED_PREFIX) :]
    if name not in SHIPPED_BACKBONES:
        known = ", ".join(SHIPPED_PREFIX + n for n in SHIPPED_BACKBONES)
        raise ValueError(f"backbone {name_or_path[:200]!r} is not a shipped backbone; the shipped ones are {known}")
    folder = shipped_folder(name, "backbone")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise OSError(f"backbone {name_or_path!r}: the installed vptm package has no shipped backbone at {folder}")
    return folder


def shipped_backbone_path(name: str = SHIPPED_BACKBONE) -> str:
    """Local folder of a shipped backbone (``config.json``, ``model.safetensors``, image processor, tokenizer), by its
    ``vptm:`` name or its bare name."""
    return resolve_backbone_path(name if is_shipped_name(name) else SHIPPED_PREFIX + name)


__all__ = [
    "DIGITS_DATASET",
    "FULL_TEST_DATASET",
    "SHIPPED_BACKBONE",
    "SHIPPED_BACKBONES",
    "SHIPPED_DATASET",
    "SHIPPED_PREFIX",
    "is_shipped_name",
    "resolve_backbone_path",
    "shipped_backbone_path",
]
