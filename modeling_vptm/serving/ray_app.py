"""VPTM on Ray Serve: one deployment holds one frozen backbone and serves any number of tasks on it, loaded by name on
first use, with the requests of every client gathered into mixed-task batches that run through the backbone in one
pass (`@serve.batch`). Replicas, autoscaling and clusters of several machines are Ray Serve's.

    python examples/serve_ray.py --backbone vptm:tiny-beit-fashion-mnist --task fashion=runs/vptm --task_root tasks/
    serve run modeling_vptm.serving.ray_app:build backbone=vptm:tiny-beit-fashion-mnist task_root=tasks/

HTTP, in the Inference Endpoints handler's formats (docs/deployment.md), so that one client serves both:

* `POST /`: `{"inputs": <base64 image or list of them>, "parameters": {"tasks": [...], "top_k": k}}` as JSON, or the
  image's bytes with `?tasks=a,b&top_k=3`; the answer is `pipeline("image-classification")`'s, by task when several
  are named. A task a request names that is unknown or does not load gets an error in its rows' answers only.
* `GET /tasks`: the default tasks, where others may come from, what is loaded, the batch settings and counts.
* `GET /health`: the backbone and its weights' fingerprint.

This module needs Ray Serve (`pip install -e ".[serve]"`); nothing else in the package imports it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..limits import MAX_REQUEST_BYTES
from ..shipped import SHIPPED_BACKBONE, resolve_backbone_path
from ..standalone.endpoint_requests import error_answer
from .multitask import MultiTaskVPTM
from .service import TaskService
from .task_cache import TaskSources


logger = logging.getLogger(__name__)

# the rows (image, task) a batch gathers at most, and how long the first of them waits for others
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01
DEFAULT_TASK_CACHE_MB = 256


@serve.deployment(name="vptm", max_ongoing_requests=4 * DEFAULT_MAX_BATCH_SIZE)
class VPTMDeployment:
    """One backbone, its tasks (`TaskService`), and the batching of every client's rows. Its batch settings and task
    cache budget can change while it runs, through Ray Serve's `user_config` (`reconfigure`)."""

    def __init__(
        self,
        backbone: str = SHIPPED_BACKBONE,
        revision: str | None = None,
        tasks: dict[str, str] | None = None,
        task_root: str | None = None,
        allow_hub_tasks: bool = False,
        task_cache_mb: float = DEFAULT_TASK_CACHE_MB,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
        torch_threads: int | None = None,
    ) -> None:
        from transformers import AutoImageProcessor

        if torch_threads:  # a replica takes the cores Ray gives it, not every core of the machine
            torch.set_num_threads(torch_threads)
        server = MultiTaskVPTM(backbone, revision=revision)
        processor = AutoImageProcessor.from_pretrained(resolve_backbone_path(backbone), revision=revision)
        sources = TaskSources(tasks, task_root, allow_hub_tasks)
        self.service = TaskService(server, sources, processor, cache_bytes=int(task_cache_mb * 2**20))
        self.backbone, self.batches, self.rows = backbone, 0, 0
        self.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})

    def reconfigure(self, config: dict) -> None:
        """Ray Serve's `user_config`: `max_batch_size`, `batch_wait_timeout_s`, `task_cache_mb` (each optional)."""
        settings = check_settings(config)
        if "max_batch_size" in settings:
            self.run_rows.set_max_batch_size(settings["max_batch_size"])
        if "batch_wait_timeout_s" in settings:
            self.run_rows.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        if "task_cache_mb" in settings:
            self.service.cache.max_bytes = int(settings["task_cache_mb"] * 2**20)
        self.settings = {**getattr(self, "settings", {}), **settings}

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def run_rows(self, rows: list[tuple[torch.Tensor, str]]) -> list:
        """The rows of every request waiting, in one backbone pass; a row whose task cannot run gets its error,
        returned in its place (Ray Serve hands it to that caller alone; the batch's other rows are unaffected)."""
        self.batches, self.rows = self.batches + 1, self.rows + len(rows)
        pixels, tasks = [pixel for pixel, _ in rows], [task for _, task in rows]
        try:  # the forward in a thread: the replica goes on reading and decoding the next requests meanwhile
            return await asyncio.to_thread(self.service.run_rows, pixels, tasks)
        except Exception as error:  # the pass itself failed: every row of it says so, the server goes on
            logger.exception("a batch failed")
            return [RuntimeError(f"the batch failed: {type(error).__name__}: {error}")] * len(rows)

    async def __call__(self, http: Request) -> JSONResponse:
        path, method = http.url.path.rstrip("/") or "/", http.method
        if method == "GET" and path == "/health":
            return JSONResponse({"status": "ok", "backbone": self.backbone,
                                 "fingerprint": self.service.server.fingerprint})  # fmt: skip
        if method == "GET" and path == "/tasks":
            return JSONResponse(self.describe())
        if method != "POST" or path != "/":
            return JSONResponse({"error": f"no route {method} {path}; the routes are POST /, GET /tasks, GET /health"},
                                status_code=404)  # fmt: skip
        try:
            request = self.service.parse(await read_request(http))
        except ValueError as error:
            return JSONResponse(error_answer(error), status_code=413 if isinstance(error, BodyTooLarge) else 400)
        try:
            images = {index: image for index, image, _ in request.rows}  # each image once, whatever its tasks
            pixels = dict(zip(images, self.service.pixel_values(list(images.values())), strict=True)) if images else {}
            results = await asyncio.gather(*(self.run_rows((pixels[index], task)) for index, _, task in request.rows))
            return JSONResponse(self.service.assemble(request, self.service.answer_rows(results, request.top_k)))
        except Exception as error:  # a bug, not the request: logged, answered, and the replica serves on
            logger.exception("request failed")
            return JSONResponse(error_answer(error), status_code=500)

    def describe(self) -> dict:
        return {
            "default_tasks": self.service.tasks,
            "tasks_from": self.service.cache.sources.describe(),
            "loaded": list(self.service.cache.sizes),
            "cache": self.service.cache.stats(),
            "batches": self.batches,
            "rows": self.rows,
            **self.settings,
        }


class BodyTooLarge(ValueError):
    pass


async def read_request(http: Request) -> dict:
    """The request as the handlers take it: a JSON body as it is, or an image's bytes with the query parameters (digits
    as numbers), as the Inference Endpoints toolkit gives them; a body larger than `MAX_REQUEST_BYTES` is refused
    without being read whole."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise BodyTooLarge(f"the request body has {int(declared):,} bytes; at most {MAX_REQUEST_BYTES:,} are read")
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise BodyTooLarge(f"the request body has more than {MAX_REQUEST_BYTES:,} bytes, which are not read")
    if http.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"the request body is not JSON ({error})") from error
    parameters = {k: int(v) if v.isdigit() else v for k, v in http.query_params.items()}
    return {"inputs": bytes(body), "parameters": parameters}


SETTINGS = {"max_batch_size": int, "batch_wait_timeout_s": float, "task_cache_mb": float}


def check_settings(config: dict) -> dict:
    """The deployment's `user_config`, each value checked: a batch of 1 to 1024 rows, a wait of 0 to 10 s, a task cache
    of at least 1 KB (0.001 MB)."""
    unknown = sorted(set(config) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; the settings are {sorted(SETTINGS)}")
    bounds = {"max_batch_size": (1, 1024), "batch_wait_timeout_s": (0.0, 10.0), "task_cache_mb": (0.001, 2.0**30)}
    checked = {}
    for name, value in config.items():
        try:
            checked[name] = SETTINGS[name](value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r:.40}") from None
        low, high = bounds[name]
        if not low <= checked[name] <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value!r:.40}")
    return checked


def parse_tasks(value) -> dict[str, str]:
    """Named tasks as the builder takes them: a dict, or `NAME=CHECKPOINT` pairs joined by commas (`serve run`'s
    `key=value` arguments are strings)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    from .task_names import parse_named_sources

    return parse_named_sources([part for part in str(value).split(",") if part], names_required=True)


def local_path(value: str | None) -> str | None:
    """A folder that exists here, made absolute: replicas are other processes, whose working folder need not be this
    one's (on a cluster it is not), so a relative path would name another folder there or none."""
    return os.path.abspath(value) if value is not None and os.path.isdir(value) else value


def build(args: dict) -> serve.Application:
    """The application `serve run` and config files build (`import_path: modeling_vptm.serving.ray_app:build`, its
    `args:`): `backbone`, `revision`, `tasks` (`{name: checkpoint}` or `a=x,b=y`), `task_root`, `allow_hub_tasks`,
    `task_cache_mb`, `max_batch_size`, `batch_wait_timeout_s`, `torch_threads`, and the deployment's `num_replicas`,
    `num_cpus` (per replica) and `max_ongoing_requests`."""
    args = dict(args)

    def flag(value) -> bool:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")

    options = {}
    if "num_replicas" in args:
        replicas = args.pop("num_replicas")
        options["num_replicas"] = replicas if replicas == "auto" else number("num_replicas", replicas, int, 1)
    if "num_cpus" in args:
        cpus = number("num_cpus", args.pop("num_cpus"), float, 0.0, open_low=True)
        options["ray_actor_options"] = {"num_cpus": cpus}
    if "max_ongoing_requests" in args:
        options["max_ongoing_requests"] = number("max_ongoing_requests", args.pop("max_ongoing_requests"), int, 1)
    settings = check_settings({k: args.pop(k) for k in list(args) if k in SETTINGS})
    known = {"backbone", "revision", "tasks", "task_root", "allow_hub_tasks", "torch_threads"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; the arguments are {sorted(known | set(SETTINGS))}")
    threads = args.get("torch_threads")
    # where tasks come from, checked here, in the process that builds the application: a task root that is no folder
    # or a bad task name is one line now, not a replica that fails to start over and over on every machine
    sources = TaskSources(
        {name: local_path(source) for name, source in parse_tasks(args.get("tasks")).items()},
        local_path(args.get("task_root")),
        flag(args.get("allow_hub_tasks", False)),
    )
    deployment = VPTMDeployment.options(**options) if options else VPTMDeployment
    return deployment.bind(
        backbone=local_path(args.get("backbone", SHIPPED_BACKBONE)),
        revision=args.get("revision"),
        tasks=sources.named,
        task_root=sources.task_root,
        allow_hub_tasks=sources.allow_hub_tasks,
        torch_threads=number("torch_threads", threads, int, 1) if threads else None,
        **settings,
    )


def number(name: str, value, kind: type, low: float, open_low: bool = False):
    """An argument of `build` as `kind`, at least `low` (above it when `open_low`), or one line saying what it got."""
    try:
        checked = kind(value)
    except (TypeError, ValueError):
        checked = None
    if checked is None or checked < low or (open_low and checked == low):
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name} must be {what} {'>' if open_low else '>='} {low:g}, got {value!r:.40}")
    return checked


__all__ = ["VPTMDeployment", "build"]
