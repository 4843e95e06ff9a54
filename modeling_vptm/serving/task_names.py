"""Task names and where their checkpoints come from, as a server or a command line takes them: each task is written
to (or looked up in) a folder of its name, so a name is a plain folder name.
"""

from __future__ import annotations

import os
import re


def check_task_name(name: str) -> None:
    """Refuses a task name that is not a plain folder name: each task is written to `tasks/<name>/`, so a name
    holding a path separator, or "." or "..", would write outside its folder."""
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise ValueError(
            f"task names are letters, digits, '_', '.' and '-' (a folder name, not '.' or '..'), got {name!r}"
        )


def parse_named_sources(values: list[str], names_required: bool = False) -> dict[str, str]:
    """Command-line checkpoints, `NAME=SOURCE` (SOURCE a folder or Hub id) or, unless `names_required`, a plain
    `SOURCE` named after its last path component -> `{name: source}`."""
    expected = "NAME=SOURCE" if names_required else "SOURCE or NAME=SOURCE"
    sources = {}
    for value in values:
        name, sep, source = value.partition("=")
        if not sep and not names_required:
            name, source = os.path.basename(os.path.normpath(value)), value
        elif not sep:
            name = source = ""
        if not name or not source:
            raise ValueError(f"a checkpoint is given as {expected} (SOURCE a folder or Hub id), got {value!r}")
        if name in sources:
            raise ValueError(f"two checkpoints are named {name!r}; name each with NAME=SOURCE")
        sources[name] = source
    return sources


__all__ = ["check_task_name", "parse_named_sources"]
