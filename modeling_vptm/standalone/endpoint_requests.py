"""The request side of the Inference Endpoints handler, with no torch or transformers: reading a request, checking
its parameters, decoding its images and shaping the answer as `pipeline("image-classification")` does.

Both handlers (`modeling_vptm.deploy.endpoint.EndpointHandler` on PyTorch, `onnx_endpoint.OnnxEndpointHandler` on
ONNX Runtime) are a `RequestHandler` with a `classify` method. This file is copied beside `onnx_runtime.py` into ONNX
endpoint repositories and imported there as a top-level module.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field


try:
    from ..limits import MAX_IMAGES, listed
    from .image_input import PixelBudget, read_image
except ImportError:  # the standalone copy in an ONNX endpoint repository: its siblings are the files beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from image_input import PixelBudget, read_image
    from limits import MAX_IMAGES, listed


logger = logging.getLogger(__name__)

ENDPOINT_CONFIG = "endpoint.json"
DEFAULT_TOP_K = 5  # pipeline("image-classification")'s default
PARAMETERS = ("function_to_apply", "tasks", "top_k")


def check_top_k(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"top_k must be a whole number >= 1, got {value!r:.80}")
    return value  # above the number of labels, every label is returned (as pipeline does)


def requested_tasks(tasks, known: str = "") -> list[str] | None:
    """The task names a request asks for, each once, in the order given: a list, or a comma-separated string as query
    parameters give it; `None` when it names none. `known` (what the tasks are) ends the message of a bad value."""
    if tasks is None:
        return None
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        shown = listed(tasks) if isinstance(tasks, list) else f"{tasks!r:.80}"
        raise ValueError(f"tasks must be a non-empty list of task names, got {shown}{known}")
    return list(dict.fromkeys(tasks))


def read_endpoint_config(path: str) -> dict:
    """`endpoint.json`, or for a bare prompt checkpoint with the handler copied in, one PyTorch task at the root."""
    config_path = os.path.join(path, ENDPOINT_CONFIG)
    if not os.path.isfile(config_path):
        return {"backend": "pytorch", "tasks": {"default": "."}}
    with open(config_path) as f:
        return json.load(f)


@dataclass
class ParsedRequest:
    """A request read and checked: its images decoded (or the error of each that was not), and the `(image, task)`
    rows to classify."""

    single: bool
    tasks: list[str]
    top_k: int
    answers: list  # one per input: None until answered, or its error
    rows: list[tuple[int, object, str]] = field(default_factory=list)  # (input index, image, task)


def error_answer(error: Exception) -> dict:
    """What a request that provoked `error` gets: `{"error": message}` (a KeyError's str() is its message quoted)."""
    if isinstance(error, KeyError) and error.args:
        return {"error": str(error.args[0])}
    if isinstance(error, (ValueError, TypeError, KeyError)):
        return {"error": str(error)}
    return {"error": f"{type(error).__name__}: {error}"}  # unexpected: the caller logs the traceback


class RequestHandler:
    """What every server shares: `__call__(data)` answers one deserialised request body, or `{"error": message}`.

    Subclasses set `tasks` (the task names) and `image_size` (their image processor's resize setting, so that images
    are decoded no larger than the model needs), and implement `classify(images, tasks, top_k)`: the top-k
    `{"label", "score"}` list of each `(image, task)` pair, computed in one batch (or `{"error": message}` for a pair
    that could not be). Each request's images share one `PixelBudget` of `request_pixels` decoded pixels. A server
    that classifies asynchronously uses `parse` and `assemble` around its own classification.
    """

    tasks: list[str]
    image_size: dict | None = None
    request_pixels: int = PixelBudget().total

    def classify(self, images: list, tasks: list[str], top_k: int) -> list[list[dict] | dict]:
        raise NotImplementedError

    def __call__(self, data: dict) -> list | dict:
        try:
            return self.answer(data)
        except Exception as error:  # anything a request provokes gets an answer, not a dead worker
            if not isinstance(error, (ValueError, KeyError, TypeError)):
                logger.exception("request failed")  # unexpected: the traceback goes to the server's logs
            return error_answer(error)

    def answer(self, data: dict) -> list | dict:
        request = self.parse(data)
        rows = request.rows
        tops = self.classify([image for _, image, _ in rows], [task for _, _, task in rows], request.top_k)
        return self.assemble(request, tops)

    def parse(self, data: dict) -> ParsedRequest:
        """The request's parameters checked and its images decoded; a `ValueError` for a request that is wrong as a
        whole, an error in its answer for an input that is."""
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError(f'the request body must be {{"inputs": ..., "parameters": {{...}}}}, got {data!r:.80}')
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f"parameters must be an object, got {type(parameters).__name__}")
        unknown = sorted(map(str, set(parameters) - set(PARAMETERS)))
        if unknown:
            raise ValueError(f"unknown parameters {listed(unknown)}; the parameters are {list(PARAMETERS)}")
        # InferenceClient.image_classification may send pipeline's parameter; the scores are its softmax
        if parameters.get("function_to_apply", "softmax") != "softmax":
            function = parameters["function_to_apply"]
            raise ValueError(f"function_to_apply must be 'softmax' (single-label tasks), got {function!r:.80}")
        top_k = check_top_k(parameters.get("top_k", DEFAULT_TOP_K))
        tasks = self.check_tasks(parameters.get("tasks"))
        inputs = data["inputs"]
        single = not isinstance(inputs, list)
        inputs = [inputs] if single else inputs
        if not 1 <= len(inputs) <= MAX_IMAGES:
            raise ValueError(f"inputs must hold 1 to {MAX_IMAGES} images, got {len(inputs)}")
        request = ParsedRequest(single, tasks, top_k, answers=[None] * len(inputs))
        budget = PixelBudget(self.request_pixels)
        for index, item in enumerate(inputs):
            try:
                # a request never opens the server's files; its images share one budget of decoded pixels
                image = read_image(item, allow_paths=False, size=self.image_size, budget=budget)
            except ValueError as error:
                request.answers[index] = {"error": f"input {index}: {error}" if not single else str(error)}
                continue
            request.rows += [(index, image, task) for task in tasks]  # one row per (image, task): all in one batch
        return request

    def assemble(self, request: ParsedRequest, tops: list[list[dict] | dict]) -> list | dict:
        """The answer, shaped as `pipeline("image-classification")` answers: each row's top-k (or error) in its input's
        place, by task when several were asked for."""
        answers = request.answers
        for (index, _, task), top in zip(request.rows, tops, strict=True):
            answers[index] = top if len(request.tasks) == 1 else {**(answers[index] or {}), task: top}
        return answers[0] if request.single else answers

    def check_tasks(self, tasks) -> list[str]:
        """The tasks asked for (a list, or a comma-separated string as query parameters give it); all by default."""
        names = requested_tasks(tasks, known=f"; tasks are {listed(self.tasks)}")
        if names is None:
            return list(self.tasks)
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {listed(unknown)}; the tasks are {listed(self.tasks)}")
        return names


__all__ = [
    "ParsedRequest",
    "RequestHandler",
    "check_top_k",
    "error_answer",
    "read_endpoint_config",
    "requested_tasks",
]
