"""The ONNX Runtime backend of the Inference Endpoints handler: exported backbone graphs, one per sequence layout,
each serving its tasks in one batch, the heads in numpy.

It exists because the stock Inference Endpoints container (huggingface-inference-toolkit) pins transformers 4.51 and
its own modules import `transformers.file_utils.is_tf_available`, which transformers 5 removed: a repository whose
requirements upgrade transformers to the 5.x this package needs stops the container from starting. This backend needs
neither (numpy, Pillow, onnxruntime), so it runs on the stock container whatever transformers it holds. This file is
copied with its siblings into such repositories and imported there as a top-level module.
"""

from __future__ import annotations

import os
import sys


try:
    from .endpoint_requests import RequestHandler, read_endpoint_config
    from .onnx_runtime import OnnxMultiTask
    from .predictions import top_predictions
except ImportError:  # the standalone copy in an ONNX endpoint repository: its siblings are the files beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from endpoint_requests import RequestHandler, read_endpoint_config
    from onnx_runtime import OnnxMultiTask
    from predictions import top_predictions


class OnnxEndpointHandler(RequestHandler):
    """The handler on ONNX Runtime: one exported backbone graph per sequence layout (`onnx/<layout>/`), each serving
    its tasks in one batch, the heads in numpy."""

    def __init__(self, path: str = "", threads: int | None = None) -> None:
        path = path or "."
        config = read_endpoint_config(path)
        self.graphs = {
            name: OnnxMultiTask(os.path.join(path, folder), threads) for name, folder in config["graphs"].items()
        }
        self.task_graph = dict(config["onnx_tasks"])  # task name -> the graph that serves it
        self.tasks = list(self.task_graph)
        # every graph's tasks were saved with the same image processor (checked when the repository was written)
        self.image_size = next(iter(self.graphs.values())).preprocessor.size

    def classify(self, images: list, tasks: list[str], top_k: int) -> list[list[dict]]:
        out: list = [None] * len(tasks)
        for name, graph in self.graphs.items():
            rows = [i for i, task in enumerate(tasks) if self.task_graph[task] == name]
            if not rows:
                continue
            logits = graph.run(graph.preprocessor([images[i] for i in rows]), [tasks[i] for i in rows])
            for row, row_logits in zip(rows, logits, strict=True):
                out[row] = top_predictions(row_logits, graph.tasks[tasks[row]].id2label, top_k)[0]
        return out


__all__ = ["OnnxEndpointHandler"]
