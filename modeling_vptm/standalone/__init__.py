"""What runs without torch or transformers: reading images from outside, answering with the top labels, the ONNX
Runtime classifier, and the request side of the Inference Endpoints handler.

These files import only the standard library, numpy, Pillow (and onnxruntime, when a graph is run) and each other, so
that they can be copied beside an ONNX export or into an endpoint repository and imported there as top-level modules
(`copy_standalone`). The rest of the package imports them as `modeling_vptm.standalone.*`.
"""

from __future__ import annotations

import os
import shutil


FOLDER = os.path.dirname(os.path.abspath(__file__))
# what an ONNX export folder carries to run with numpy, Pillow and onnxruntime only
EXPORT_FILES = ("onnx_runtime.py", "image_input.py", "predictions.py")
# and an ONNX endpoint repository, for its handler
ENDPOINT_FILES = (*EXPORT_FILES, "endpoint_requests.py", "onnx_endpoint.py")


def copy_standalone(folder: str, files: tuple[str, ...] = EXPORT_FILES) -> None:
    """Copies the standalone `files` into `folder`, where they import each other as top-level modules."""
    for name in files:
        shutil.copy(os.path.join(FOLDER, name), os.path.join(folder, name))


__all__ = ["ENDPOINT_FILES", "EXPORT_FILES", "copy_standalone"]
