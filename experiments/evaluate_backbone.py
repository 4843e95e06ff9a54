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
    python experiments/evaluate_backbone.py --teacher runs/teacher --output teacher_eval.json  # linear probe only

Also reported for a backbone: its tokenizer's codebook usage on the 60,000 training images (codes used,
perplexity, share of the commonest code).

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

from modeling_vptm.data import balanced_subset, load_fashion_mnist
from modeling_vptm.pretraining import (
    BlockMaskGenerator,
    ContrastiveTeacher,
    codebook_usage,
    load_visual_tokenizer,
    to_pixel_values,
)


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


def backbone_features(model):
    """The probe's features of a MIM backbone: mean final patch state after the MIM head's layer norm."""
    return lambda x: model.layernorm(model.beit(x).last_hidden_state[:, 1:]).mean(1)


@torch.no_grad()
def features(extract, pixel_values, batch_size, device) -> np.ndarray:
    out = []
    for start in range(0, len(pixel_values), batch_size):
        out.append(extract(pixel_values[start : start + batch_size].to(device)).float().cpu())  # (batch, dim)
    return torch.cat(out).numpy()


def probe(train_x, train_y, test_x, test_y, c_grid, seed) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    search = GridSearchCV(LogisticRegression(max_iter=3000, random_state=seed), {"C": c_grid}, cv=5)
    search.fit(scaler.transform(train_x), train_y)
    return {"accuracy": float(search.score(scaler.transform(test_x), test_y)), "C": search.best_params_["C"]}


def token_figures(model, tokenizer, train_pixels, test_pixels, args, device) -> dict:
    """MIM accuracy on the test images beside the majority-token baseline, and the codebook's usage on the
    (unaugmented) training patches."""
    tokens = torch.cat([tokenizer.encode(train_pixels[s : s + 5000].to(device)).cpu()
                        for s in range(0, len(train_pixels), 5000)])  # fmt: skip
    usage = codebook_usage(tokens, tokenizer.vocab_size)
    majority_token = int(torch.bincount(tokens.flatten(), minlength=tokenizer.vocab_size).argmax())
    figures = mim_accuracy(model, tokenizer, test_pixels, args.batch_size, args.seed, majority_token, device)
    return {**figures, **{f"codebook_{k}": v for k, v in usage.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--backbone", help="Folder of a BeitForMaskedImageModeling + tokenizer.")
    which.add_argument("--teacher", help="Folder of a contrastive teacher (linear probe of its mean patch feature).")
    parser.add_argument("--data_dir", default=None, help="Folder of the Fashion-MNIST IDX files.")
    parser.add_argument("--max_test_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="Write the figures to this JSON file.")
    args = parser.parse_args(argv)

    from transformers import BeitForMaskedImageModeling

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    train_images, train_labels = load_fashion_mnist("train", args.data_dir)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    if args.max_test_samples:
        test_images, test_labels = test_images[: args.max_test_samples], test_labels[: args.max_test_samples]
    test_pixels, train_pixels = to_pixel_values(test_images), to_pixel_values(train_images)
    if args.teacher:
        teacher = ContrastiveTeacher.from_pretrained(args.teacher).to(device)
        result, extract = {"teacher": args.teacher, "test_images": len(test_images)}, teacher.image_features
    else:
        model = BeitForMaskedImageModeling.from_pretrained(args.backbone).to(device).eval()
        tokenizer = load_visual_tokenizer(args.backbone).to(device)
        result = {"backbone": args.backbone, "test_images": len(test_images)}
        result.update(token_figures(model, tokenizer, train_pixels, test_pixels, args, device))
        extract = backbone_features(model)

    subset = balanced_subset(train_labels, per_class=100, seed=0)
    train_x = features(extract, train_pixels[subset], args.batch_size, device)
    test_x = features(extract, test_pixels, args.batch_size, device)
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
