"""The backbone shipped inside the package: a small BEiT pre-trained by the project on Fashion-MNIST.

It is named portably as ``SHIPPED_BACKBONE`` (``"vptm:tiny-beit-fashion-mnist"``): a prompt checkpoint trained on
it records that name, and any machine with the package installed resolves it to the package's data folder, with
no network. See ``model_cards/tiny-beit-fashion-mnist.md``.
"""

from __future__ import annotations

from .checkpoint_io import SHIPPED_PREFIX, resolve_backbone_path


SHIPPED_BACKBONE = SHIPPED_PREFIX + "tiny-beit-fashion-mnist"


def shipped_backbone_path(name: str = SHIPPED_BACKBONE) -> str:
    """Local folder of a shipped backbone (``config.json``, ``model.safetensors``, image processor, tokenizer)."""
    if not name.startswith(SHIPPED_PREFIX):
        name = SHIPPED_PREFIX + name
    return resolve_backbone_path(name)
