"""Measures a pre-trained MIM backbone on Fashion-MNIST: masked-token accuracy and a linear probe.

Figures (all on the 10,000 official test images unless ``--max_test_samples`` says otherwise):

* **MIM accuracy**: visual-token prediction accuracy on block-masked patches (40 %, seeded masks), next to the
  most-frequent-token baseline (the most frequent token of the training patches, predicted everywhere).
* **Linear probe**: logistic regression on frozen features of the 1,000-image training subset (100 per class,
  seed 0, the subset shipped with the package), next to logistic regression on raw pixels of the same images
  (C=0.1; a backbone that cannot beat raw pixels is not worth prompting). Features: mean of the final patch states
  after the MIM head's layer norm, standardised with training statistics; the regularisation C is chosen by 5-fold
  cross-validation on the 1,000 training images only.

    python experiments/evaluate_backbone.py --backbone modeling_vptm/shipped/tiny-beit-fashion-mnist --output eval.json

Needs scikit-learn (the ``examples`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np
import torch

from modeling_vptm.data import balanced_subset, load_fashion_mnist, to_pixel_values
from modeling_vptm.masking import BlockMaskGenerator
from modeling_vptm.tokenizer import load_visual_tokenizer


@torch.no_grad()
def mim_accuracy(model, tokenizer, pixel_values, batch_size, seed, majority_token, device) -> dict[str, float]:
    grid = (model.config.image_size // model.config.patch_size,) * 2
    masks_gen = BlockMaskGenerator(grid, mask_ratio=0.4, min_num_patches=4)
    rng = random.Random(seed)
    correct = majority = total = 0
    for start in range(0, len(pixel_values), batch_size):
        x = pixel_values[start : start + batch_size].to(device)
        masks = torch.stack([masks_gen(rng).flatten() for _ in range(len(x))]).to(device)
        tokens = tokenizer.encode(x)[masks]
        logits = model(pixel_values=x, bool_masked_pos=masks).logits[masks]  # (num_masked, vocab)
        correct += int((logits.argmax(-1) == tokens).sum())
        majority += int((tokens == majority_token).sum())
        total += len(tokens)
    return {"mim_accuracy": correct / total, "majority_token_accuracy": majority / total, "masked_patches": total}


@torch.no_grad()
def features(model, pixel_values, batch_size, device) -> np.ndarray:
    out = []
    for start in range(0, len(pixel_values), batch_size):
        hidden = model.beit(pixel_values[start : start + batch_size].to(device)).last_hidden_state
        out.append(model.layernorm(hidden[:, 1:]).mean(1).float().cpu())  # (batch, hidden)
    return torch.cat(out).numpy()


def probe(train_x, train_y, test_x, test_y, c_grid, seed) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    search = GridSearchCV(LogisticRegression(max_iter=3000, random_state=seed), {"C": c_grid}, cv=5)
    search.fit(scaler.transform(train_x), train_y)
    return {"accuracy": float(search.score(scaler.transform(test_x), test_y)), "C": search.best_params_["C"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="Folder of a BeitForMaskedImageModeling + tokenizer.")
    parser.add_argument("--data_dir", default=None, help="Folder of the Fashion-MNIST IDX files.")
    parser.add_argument("--max_test_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="Write the figures to this JSON file.")
    args = parser.parse_args(argv)

    from transformers import BeitForMaskedImageModeling

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model = BeitForMaskedImageModeling.from_pretrained(args.backbone).to(device).eval()
    tokenizer = load_visual_tokenizer(args.backbone).to(device)
    train_images, train_labels = load_fashion_mnist("train", args.data_dir)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    if args.max_test_samples:
        test_images, test_labels = test_images[: args.max_test_samples], test_labels[: args.max_test_samples]
    test_pixels = to_pixel_values(test_images)

    # most frequent token over (unaugmented) training patches
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    train_pixels = to_pixel_values(train_images)
    for s in range(0, len(train_pixels), 5000):
        counts += torch.bincount(
            tokenizer.encode(train_pixels[s : s + 5000].to(device)).flatten().cpu(), minlength=tokenizer.vocab_size
        )
    majority_token = int(counts.argmax())
    result = {"backbone": args.backbone, "test_images": len(test_images)}
    result.update(mim_accuracy(model, tokenizer, test_pixels, args.batch_size, args.seed, majority_token, device))

    subset = balanced_subset(train_labels, per_class=100, seed=0)
    train_x = features(model, train_pixels[subset], args.batch_size, device)
    test_x = features(model, test_pixels, args.batch_size, device)
    c_grid = [0.001, 0.01, 0.1, 1.0, 10.0]
    lp = probe(train_x, train_labels[subset], test_x, test_labels, c_grid, args.seed)
    result["linear_probe_accuracy"], result["linear_probe_C"] = lp["accuracy"], lp["C"]

    from sklearn.linear_model import LogisticRegression

    raw = LogisticRegression(C=0.1, max_iter=3000, random_state=args.seed)
    raw.fit(train_images[subset].reshape(len(subset), -1) / 255.0, train_labels[subset])
    result["raw_pixel_logreg_accuracy"] = float(
        raw.score(test_images.reshape(len(test_images), -1) / 255.0, test_labels)
    )
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["device"] = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(json.dumps(result, indent=2))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
