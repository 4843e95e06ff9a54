"""Many tasks on one backbone as a service: requests in the Inference Endpoints format, each `(image, task)` pair a
row, the rows of a batch (of one request, or of many gathered by a server such as Ray Serve) run through the backbone
in one `MultiTaskVPTM` pass, tasks loaded on first use by a `TaskCache`.

`TaskService` is what the PyTorch endpoint handler and the Ray Serve deployment share: the same request and answer
formats (docs/deployment.md), so one client serves both.
"""

from __future__ import annotations

import torch

from ..limits import MAX_TASKS_PER_REQUEST, listed
from ..standalone.endpoint_requests import RequestHandler, requested_tasks
from ..standalone.predictions import top_predictions
from .multitask import MultiTaskVPTM, TaskPrediction
from .processors import processor_size
from .task_cache import TaskCache, TaskSources


class TaskService(RequestHandler):
    """Serves the tasks `sources` names on `server`'s backbone, loaded by a cache of `cache_bytes` bytes of task
    tensors. `processor` makes the backbone's pixels; `default_tasks` are those a request that names none gets."""

    def __init__(
        self,
        server: MultiTaskVPTM,
        sources: TaskSources,
        processor,
        default_tasks: list[str] | None = None,
        cache_bytes: int = 256 * 2**20,
        device: str | torch.device | None = None,
    ) -> None:
        self.server, self.processor = server, processor
        self.cache = TaskCache(server, sources, max_bytes=cache_bytes)
        self.tasks = list(default_tasks if default_tasks is not None else sources.named)
        self.image_size = processor_size(processor) if processor is not None else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.server.to(self.device)

    def check_tasks(self, tasks) -> list[str]:
        """The tasks asked for: the default ones when none are named, else names this service answers to (checked
        when their rows run: a task that is unknown or fails to load gets an error in those rows' answers)."""
        tasks = requested_tasks(tasks)
        if tasks is None and not self.tasks:
            raise ValueError(f"name the tasks to run (parameters.tasks); a task is {self.cache.sources.describe()}")
        if tasks is None:
            return list(self.tasks)
        named = self.cache.sources.named
        unknown = [t for t in tasks if t not in named]
        if self.cache.sources.only_named and unknown:  # a fixed set of tasks: an unknown name is refused at once
            raise ValueError(f"unknown task(s) {listed(unknown)}; the tasks are {listed(named)}")
        if len(tasks) > MAX_TASKS_PER_REQUEST:
            raise ValueError(f"a request names at most {MAX_TASKS_PER_REQUEST} tasks, got {len(tasks):,}")
        return tasks

    def pixel_values(self, images: list) -> torch.Tensor:
        """The backbone's pixels of decoded images, `(images, C, H, W)`."""
        return self.processor(images, return_tensors="pt")["pixel_values"]

    def run_rows(self, pixels: list[torch.Tensor], tasks: list[str]) -> list[TaskPrediction | ValueError]:
        """Each row's prediction (its image `(C, H, W)` under its task) for rows of any requests, in one backbone pass
        per sequence layout; a row whose task cannot be served gets its `ValueError` instead, and the others run."""
        errors = self.cache.ensure(tasks)
        results: list[TaskPrediction | ValueError | None] = [None] * len(tasks)
        ok = [i for i, task in enumerate(tasks) if task not in errors]
        for i, task in enumerate(tasks):
            if task in errors:
                results[i] = ValueError(f"task {task!r:.120}: {errors[task]}")
        if ok:
            batch = torch.stack([pixels[i] for i in ok]).to(self.device)
            for i, prediction in zip(ok, self.server.predict(batch, [tasks[i] for i in ok]), strict=True):
                results[i] = prediction
        return results

    def answer_rows(self, results: list[TaskPrediction | Exception], top_k: int) -> list[list[dict] | dict]:
        """Each row's top-k `{"label", "score"}` list, or its `{"error": message}`."""
        return [
            {"error": str(result)}
            if isinstance(result, Exception)
            else top_predictions(result.logits.float().cpu().numpy(), result.id2label, top_k)[0]
            for result in results
        ]

    def classify(self, images: list, tasks: list[str], top_k: int) -> list[list[dict] | dict]:
        pixels = list(self.pixel_values(images)) if images else []
        return self.answer_rows(self.run_rows(pixels, tasks), top_k)


__all__ = ["TaskService"]
