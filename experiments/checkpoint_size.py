"""Prompt-checkpoint bytes next to backbone bytes, for the BEiT-base MIM architecture (random weights).

    python experiments/checkpoint_size.py [--num_labels 100] [--output sizes.json]

Builds `microsoft/beit-base-patch16-224-pt22k`'s architecture with random weights (sizes do not depend on the
values), saves it, builds VPTM on it with the default configuration (prompts in the first half of the blocks) and
with prompts in every block, and the VPT baseline with its default (every block), and saves each prompt checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def folder_bytes(folder: str, name: str = "model.safetensors") -> int:
    return os.path.getsize(os.path.join(folder, name))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_labels", type=int, default=100)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from transformers import BeitConfig, BeitForMaskedImageModeling

    from modeling_vptm import VPTMForImageClassification

    config = BeitConfig(
        image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, vocab_size=8192, use_mask_token=True, use_shared_relative_position_bias=True,
        use_relative_position_bias=False, layer_scale_init_value=0.1,
    )  # fmt: skip
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone_dir, prompts_dir = os.path.join(tmp, "backbone"), os.path.join(tmp, "prompts")
        BeitForMaskedImageModeling(config).save_pretrained(backbone_dir)
        methods = {"vptm": {}, "vptm_deep": {"prompt_layers": "deep"},
                   "vpt_deep": {"classifier": "linear_cls", "prompt_layers": "deep"}}  # fmt: skip
        for method, fields in methods.items():
            model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=args.num_labels, **fields)
            model.save_pretrained(prompts_dir)
            trainable, total = model.get_nb_trainable_parameters()
            result[method] = {
                "trainable_parameters": trainable,
                "backbone_parameters": total - trainable,
                "prompt_checkpoint_bytes": folder_bytes(prompts_dir),
            }
        backbone_bytes = folder_bytes(backbone_dir)
    for entry in result.values():
        entry["backbone_bytes"] = backbone_bytes
        entry["ratio"] = entry["prompt_checkpoint_bytes"] / backbone_bytes
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
