"""What runs without torch or transformers: reading images from outside, answering with the top labels, the ONNX
Runtime classifier, and the request side of the Inference Endpoints handler.

These files import only the standard library, numpy, Pillow (and onnxruntime, when a graph is run) and each other, so
that they can be copied beside an ONNX export or into an endpoint repository and imported there as top-level modules
(`copy_standalone`). The rest of the package imports them as `modeling_vptm.standalone.*`.
"""

from __future__ import annotations

import os
import shutil

from .cli import OutputFile, check_finite_scores, escape, json_line, positive_int, run, text_line
from .endpoint_requests import RequestHandler, read_endpoint_config
from .image_input import IMAGE_EXTENSIONS, MAX_PIXELS, PixelBudget, list_images, read_image, read_image_files, read_rgb
from .onnx_endpoint import OnnxEndpointHandler
from .onnx_runtime import OnnxImageClassifier, OnnxMultiTask
from .predictions import top_predictions


FOLDER = os.path.dirname(os.path.abspath(__file__))
# what an ONNX export folder carries to run with numpy, Pillow and onnxruntime only (limits.py is the package's)
EXPORT_FILES = ("onnx_runtime.py", "image_input.py", "predictions.py", "cli.py", "limits.py")
# and an ONNX endpoint repository, for its handler
ENDPOINT_FILES = (*EXPORT_FILES, "endpoint_requests.py", "onnx_endpoint.py")


def copy_standalone(folder: str, files: tuple[str, ...] = EXPORT_FILES) -> None:
    """Copies the standalone `files` into `folder`, where they import each other as top-level modules."""
    for name in files:
        source = os.path.join(FOLDER, name)
        if not os.path.isfile(source):  # the limits shared with the package's root
            source = os.path.join(os.path.dirname(FOLDER), name)
        shutil.copy(source, os.path.join(folder, name))


__all__ = [
    "ENDPOINT_FILES",
    "EXPORT_FILES",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "OnnxEndpointHandler",
    "OnnxImageClassifier",
    "OnnxMultiTask",
    "OutputFile",
    "PixelBudget",
    "RequestHandler",
    "check_finite_scores",
    "copy_standalone",
    "escape",
    "json_line",
    "list_images",
    "positive_int",
    "read_endpoint_config",
    "read_image",
    "read_image_files",
    "read_rgb",
    "run",
    "text_line",
    "top_predictions",
]
