"""Writes the Fashion-MNIST subset shipped with the package (``modeling_vptm/shipped/fashion-mnist-1k``).

``train``: 100 images per class (1,000) from the official training split; ``test``: 300 per class (3,000) from
the official test split; both drawn with ``balanced_subset(..., seed=0)``. Parquet with an ``image`` (PNG) and a
``label`` (``ClassLabel``) column, which ``datasets`` loads offline.

    python experiments/make_shipped_data.py [--data_dir /usr/share/datasets/fashion-mnist] [--output_dir DIR]
"""

from __future__ import annotations

import argparse
import os

from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from modeling_vptm.data import FASHION_MNIST_LABELS, SHIPPED_DATA_DIR, balanced_subset, load_fashion_mnist


def build_split(images, labels, per_class: int, seed: int) -> Dataset:
    index = balanced_subset(labels, per_class, seed)
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(images[i], mode="L") for i in index], "label": [int(labels[i]) for i in index]},
        features=features,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--output_dir", default=str(SHIPPED_DATA_DIR))
    parser.add_argument("--train_per_class", type=int, default=100)
    parser.add_argument("--test_per_class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images, labels = load_fashion_mnist(split, args.data_dir)
        dataset = build_split(images, labels, per_class, args.seed)
        dataset.to_parquet(os.path.join(args.output_dir, f"{split}.parquet"))
        print(f"{split}: {len(dataset)} images -> {args.output_dir}/{split}.parquet")


if __name__ == "__main__":
    main()
