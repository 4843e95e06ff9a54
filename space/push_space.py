"""Publishes the demo as a Hugging Face Space: this folder, plus the ``modeling_vptm`` package beside ``app.py``
(the Space's working directory), so that the shipped backbone and the bundled tasks resolve there as they do here.

    python space/push_space.py --repo_id you/vptm-demo
    python space/push_space.py --repo_id you/vptm-demo --private --model you/tiny-beit-fashion-mnist

``--model`` (repeatable) lists, in the Space card's ``models`` field, the Hub repositories the Space uses: a
backbone or tasks published with ``examples/push_backbone.py`` and ``run_classification.py --push_to_hub``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard


HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "modeling_vptm"
SPACE_FILES = ["app.py", "requirements.txt", "examples", "tasks"]
# the app needs the package and its backbone, not the shipped training data or bytecode
PACKAGE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "fashion-mnist-1k")
# files of an earlier push that this one does not bring are removed, so that no stale task is served
REPLACED = ["tasks/**", "examples/**", "modeling_vptm/**"]


def stage(folder: Path, models: list[str]) -> None:
    """Lays out the Space repository in ``folder``: the card (with ``models``), the app, and the package."""
    card = SpaceCard.load(HERE / "README.md")
    card.data.models = sorted(set(card.data.models or []) | set(models))
    card.save(folder / "README.md")
    for name in SPACE_FILES:
        source = HERE / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=PACKAGE_IGNORE)
        else:
            shutil.copy(source, folder / name)
    shutil.copytree(PACKAGE, folder / PACKAGE.name, ignore=PACKAGE_IGNORE)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo_id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--model", action="append", default=[], help="A Hub model the Space uses (repeatable).")
    args = parser.parse_args(argv)
    api = HfApi()
    api.create_repo(args.repo_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        stage(Path(folder), args.model)
        # one commit, so the Space rebuilds once, with the app and the package it imports together
        api.upload_folder(repo_id=args.repo_id, repo_type="space", folder_path=folder, delete_patterns=REPLACED,
                          commit_message="VPTM demo: app, examples, tasks and the vptm package")  # fmt: skip
    url = f"https://huggingface.co/spaces/{args.repo_id}"
    print(url)
    return url


if __name__ == "__main__":
    main()
