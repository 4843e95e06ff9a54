"""Publishes a backbone folder to the Hub, so that prompt checkpoints trained on it load anywhere.

    # the backbone packaged with vptm, or a folder written by convert_beitv2_to_hf.py
    python examples/push_backbone.py --backbone vptm:tiny-beit-fashion-mnist --repo_id me/tiny-beit-fashion-mnist
    python examples/push_backbone.py --backbone beitv2-base --repo_id me/beitv2-base --private

It prints the commit; pass it on when you train and push prompts on that backbone: `run_classification.py ...
--push_to_hub --backbone_hub_id me/tiny-beit-fashion-mnist --backbone_hub_revision <commit>`.
"""

from __future__ import annotations

import argparse

from modeling_vptm.deploy import push_backbone
from modeling_vptm.standalone import run


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="A packaged name (vptm:...) or a local backbone folder.")
    parser.add_argument("--repo_id", required=True, help="The Hub repository to create or update.")
    parser.add_argument("--private", action="store_true", help="Create the repository private.")
    parser.add_argument("--revision", default=None, help="Branch to push to (created if needed); default main.")
    parser.add_argument("--card", default=None, help="A model card (README.md) to push instead of the generated one.")
    parser.add_argument("--token", default=None, help="Hub token (default: the one huggingface_hub finds).")
    args = parser.parse_args(argv)
    commit = push_backbone(
        args.backbone, args.repo_id, token=args.token, private=args.private or None, revision=args.revision,
        card_path=args.card,
    )  # fmt: skip
    print(f"pushed {args.backbone} to {args.repo_id} at commit {commit}")
    print(f"train on it with: --backbone_hub_id {args.repo_id} --backbone_hub_revision {commit}")
    return commit


if __name__ == "__main__":
    run(main)  # an anticipated error: one line and exit status 2, no traceback
