"""Publishes the demo as a Hugging Face Space: this folder, plus the ``modeling_vptm`` package beside ``app.py``
(the Space's working directory), so that the shipped backbone and the bundled tasks resolve there as they do here.

    python space/push_space.py --repo_id you/vptm-demo
    python space/push_space.py --repo_id you/vptm-demo --private --model you/tiny-beit-fashion-mnist

``--model`` (repeatable) lists, in the Space card's ``models`` field, the Hub repositories the Space uses: a
backbone or tasks published with ``examples/push_backbone.py`` and ``run_classification.py --push_to_hub``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard


HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "modeling_vptm"
SPACE_FILES = ["app.py", "requirements.txt", "examples/*.png", "tasks/*/*"]
PACKAGE_IGNORE = ["**/__pycache__/**", "shipped/fashion-mnist-1k/**"]  # the app needs the backbone, not the data


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo_id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--model", action="append", default=[], help="A Hub model the Space uses (repeatable).")
    args = parser.parse_args(argv)
    api = HfApi()
    api.create_repo(args.repo_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    card = SpaceCard.load(HERE / "README.md")
    card.data.models = sorted(set(card.data.models or []) | set(args.model))
    with tempfile.TemporaryDirectory() as folder:
        card.save(Path(folder) / "README.md")
        api.upload_folder(repo_id=args.repo_id, repo_type="space", folder_path=folder,
                          commit_message="Space card")  # fmt: skip
    api.upload_folder(repo_id=args.repo_id, repo_type="space", folder_path=str(HERE), allow_patterns=SPACE_FILES,
                      commit_message="VPTM demo app, examples and tasks")  # fmt: skip
    api.upload_folder(repo_id=args.repo_id, repo_type="space", folder_path=str(PACKAGE), path_in_repo=PACKAGE.name,
                      ignore_patterns=PACKAGE_IGNORE, commit_message="The vptm package the app imports")  # fmt: skip
    url = f"https://huggingface.co/spaces/{args.repo_id}"
    print(url)
    return url


if __name__ == "__main__":
    main()
