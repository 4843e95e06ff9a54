r"""Converts an original BEiT v2 (or v1) pre-training checkpoint into a transformers BeitForMaskedImageModeling folder.

    # download e.g. beitv2_base_patch16_224_pt1k.pth from the authors' release, then
    python examples/convert_beitv2_to_hf.py --checkpoint beitv2_base_patch16_224_pt1k.pth --output_dir beitv2-base
    python examples/run_classification.py --model_name_or_path beitv2-base --dataset_name cifar10 \
        --image_column_name img --output_dir runs/vptm-cifar10
    # the same, published to the Hub so that prompt checkpoints trained on it load anywhere
    python examples/convert_beitv2_to_hf.py --checkpoint beitv2_base_patch16_224_pt1k.pth --output_dir beitv2-base \
        --push_to_hub me/beitv2-base

The file is read with torch.load(weights_only=True); every tensor is used or deliberately dropped (the
cls_pt_layers branch, index buffers). Base and large sizes are read off the tensors.
"""

from __future__ import annotations

import argparse

from modeling_vptm.deploy import push_backbone
from modeling_vptm.pretraining import convert_beit_checkpoint
from modeling_vptm.standalone import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Original .pth file (with a 'model' entry).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None,
                        help="Also publish the converted folder to this Hub repository (with a card).")  # fmt: skip
    parser.add_argument("--private", action="store_true", help="With --push_to_hub: create the repository private.")
    args = parser.parse_args(argv)
    model = convert_beit_checkpoint(args.checkpoint, args.output_dir)
    config = model.config
    print(
        f"converted {args.checkpoint} -> {args.output_dir}: hidden {config.hidden_size}, {config.num_hidden_layers} "
        f"blocks, {config.num_attention_heads} heads, patch {config.patch_size}, image {config.image_size}, "
        f"vocabulary {config.vocab_size}, {sum(p.numel() for p in model.parameters()):,d} parameters"
    )
    if args.push_to_hub:
        commit = push_backbone(args.output_dir, args.push_to_hub, private=args.private or None, source=args.checkpoint)
        print(f"pushed {args.output_dir} to {args.push_to_hub} at commit {commit}")
        print(f"train on it with: --model_name_or_path {args.push_to_hub} --model_revision {commit}")


if __name__ == "__main__":
    run(main)  # an anticipated error: one line and exit status 2, no traceback
