"""The tasks a server holds, by name: where each name's prompt checkpoint comes from (`TaskSources`), and which are
loaded (`TaskCache`: loaded on first use, the least recently used evicted when their tensors pass a byte budget).

A task is 50 KB of prompts and a head, so a replica can hold thousands; the budget keeps a catalogue larger than that
from growing without bound, and a task that fails to load is remembered for a while instead of being tried again on
every request. Every load goes through `MultiTaskVPTM.add_task`, with its fingerprint check and every limit on
untrusted checkpoints.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..hub_names import is_hub_id
from ..limits import listed
from .multitask import MultiTaskVPTM
from .task_names import check_task_name


# a Hub task is named "namespace/name@<commit>": pinned to a commit, so what it is cannot change under a server
HUB_TASK = re.compile(r"(?P<repo>[^@\s]+)@(?P<revision>[0-9a-f]{40})")
# failed loads remembered at once (the oldest forgotten first): names that resolve to no checkpoint are not remembered
# (answering them costs a look at a folder), so this bounds what a stream of broken checkpoints can make it hold
MAX_REMEMBERED_FAILURES = 10_000


@dataclass(frozen=True)
class TaskSource:
    """Where a task's prompt checkpoint is: a folder or a Hub id, at a revision (Hub ids only)."""

    checkpoint: str
    revision: str | None = None


class TaskSources:
    """Which task names a server answers to, and where their checkpoints are: names given one by one
    (`{name: folder or Hub id}`), the folders under `task_root` (a task's name is its folder's), and, when
    `allow_hub_tasks`, Hub repositories named with a pinned commit (`namespace/name@<40-hex commit>`)."""

    def __init__(
        self, named: Mapping[str, str] | None = None, task_root: str | None = None, allow_hub_tasks: bool = False
    ) -> None:
        self.named = dict(named or {})
        for name in self.named:
            check_task_name(name)
        if task_root is not None and not os.path.isdir(task_root):
            raise ValueError(f"task_root {task_root!r} is not a folder")
        self.task_root, self.allow_hub_tasks = task_root, allow_hub_tasks

    @property
    def only_named(self) -> bool:
        """Whether the tasks are the named ones and no others."""
        return self.task_root is None and not self.allow_hub_tasks

    def describe(self) -> str:
        kinds = [f"the tasks {listed(sorted(self.named))}"] if self.named else []
        kinds += [f"a folder of {self.task_root}"] if self.task_root else []
        kinds += (
            ["a Hub repository at a pinned commit, 'namespace/name@<40-hex commit>'"] if self.allow_hub_tasks else []
        )
        return ", ".join(kinds) or "nothing: no task is configured"

    def resolve(self, name: str) -> TaskSource:
        """Where task `name`'s checkpoint is; a `ValueError` naming what a task may be for a name that is none."""
        if not isinstance(name, str):
            raise ValueError(f"a task name is a string, got {type(name).__name__}")
        if name in self.named:
            return TaskSource(self.named[name])
        hub = HUB_TASK.fullmatch(name)
        if hub and self.allow_hub_tasks and is_hub_id(hub["repo"]):
            return TaskSource(hub["repo"], hub["revision"])
        if self.task_root is not None and re.fullmatch(r"[\w.-]+", name) and name not in (".", ".."):
            folder = os.path.join(self.task_root, name)  # a plain folder name: it cannot leave task_root
            if os.path.isfile(os.path.join(folder, "config.json")):
                return TaskSource(folder)
        raise ValueError(f"unknown task {name!r:.120}; a task is {self.describe()}")


class TaskCache:
    """The tasks of `server`, loaded from `sources` on first use; when their tensors pass `max_bytes`, the least
    recently used are removed (reloaded on their next use). A task that fails to load is refused with the same
    error for `failure_ttl_s` seconds without another try. Thread-safe."""

    def __init__(
        self,
        server: MultiTaskVPTM,
        sources: TaskSources,
        max_bytes: int = 256 * 2**20,
        failure_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server, self.sources = server, sources
        self.max_bytes, self.failure_ttl_s, self.clock = max_bytes, failure_ttl_s, clock
        self.sizes: OrderedDict[str, int] = OrderedDict()  # loaded task -> its tensors' bytes, least recent first
        self.bytes = 0  # their sum, kept as tasks come and go (a sum over thousands per load would grow with them)
        self.failures: OrderedDict[str, tuple[float, str]] = OrderedDict()  # task -> (when it failed, why)
        self.loads = self.evictions = 0
        self._lock = threading.Lock()

    def ensure(self, names: Iterable[str]) -> dict[str, str]:
        """Loads the tasks among `names` that are not loaded, and marks them all as just used; returns the error of
        each that cannot be served (`{name: message}`). Tasks of this call are never evicted by one another."""
        names = list(dict.fromkeys(names))
        errors: dict[str, str] = {}
        with self._lock:
            for name in names:
                if name in self.sizes:
                    self.sizes.move_to_end(name)
                    continue
                failed = self.failures.get(name)
                if failed is not None and self.clock() - failed[0] < self.failure_ttl_s:
                    errors[name] = failed[1]
                    continue
                try:
                    source = self.sources.resolve(name)
                except ValueError as error:
                    errors[name] = str(error)
                    continue
                try:
                    self._load(name, source, keep=set(names))
                    self.failures.pop(name, None)
                except (ValueError, OSError, ImportError, KeyError) as error:  # the checkpoint's fault, not ours
                    message = " ".join(str(error.args[0] if isinstance(error, KeyError) else error).split())
                    self.failures[name] = (self.clock(), message)
                    self.failures.move_to_end(name)
                    while len(self.failures) > MAX_REMEMBERED_FAILURES:
                        self.failures.popitem(last=False)
                    errors[name] = message
        return errors

    def _load(self, name: str, source: TaskSource, keep: set[str]) -> None:
        hub = {"revision": source.revision} if source.revision else {}
        self.server.add_task(name, source.checkpoint, **hub)
        size = sum(t.numel() * t.element_size() for t in self.server.tasks[name].state_dict().values())
        self.sizes[name] = size
        self.bytes += size
        self.loads += 1
        for old in list(self.sizes):  # least recently used first
            if self.bytes <= self.max_bytes:
                break
            if old not in keep:
                self.server.remove_task(old)
                self.bytes -= self.sizes.pop(old)
                self.evictions += 1
        if self.bytes > self.max_bytes:  # the call's own tasks alone are over the budget
            self.server.remove_task(name)
            self.bytes -= self.sizes.pop(name)
            raise ValueError(
                f"task {name!r} does not fit the task cache: its budget of {self.max_bytes:,} bytes is taken by this "
                "batch's other tasks"
            )

    def stats(self) -> dict:
        return {"loaded": len(self.sizes), "bytes": self.bytes, "max_bytes": self.max_bytes, "loads": self.loads,
                "evictions": self.evictions, "failed": len(self.failures)}  # fmt: skip


__all__ = ["TaskCache", "TaskSource", "TaskSources"]
