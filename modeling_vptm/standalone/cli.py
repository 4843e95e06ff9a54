"""What every command-line tool shares: numeric flags checked by the parser, the output file checked before any work
and written whole (never half, never a stale one left from an earlier run), names escaped in text output, and the
errors a tool anticipates printed as one line with exit status 2 instead of a traceback.

This file imports only the standard library: it is copied beside `onnx_runtime.py`, whose command line uses it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable


# errors a tool raises on purpose for bad input (a name not found, a file that is no image, a flag out of range):
# one line each; anything else is a bug and keeps its traceback
ANTICIPATED = (ValueError, OSError, ImportError, KeyError)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def escape(text: str) -> str:
    """`text` with its control characters (a newline, a tab) written as escapes: a file name cannot forge a line or a
    column of text output."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def text_line(*fields: str, top: list[dict]) -> str:
    """One line of a tool's text output: the escaped `fields` (a file name, a task), then `label=score` per
    prediction, tab-separated."""
    return "\t".join([*map(escape, fields), *(f"{escape(str(p['label']))}={p['score']:.4f}" for p in top)])


def json_line(row: dict) -> str:
    """One JSON line; a NaN or infinite number is refused (strict JSON parsers reject it) rather than written."""
    return json.dumps(row, allow_nan=False)


def check_finite_scores(rows: Iterable[dict], what: str) -> None:
    """Refuses predictions whose scores are not finite numbers, naming `what` gave them."""
    for row in rows:
        if not all(math.isfinite(p["score"]) for p in row["predictions"]):
            raise ValueError(
                f"{what} gave non-finite scores for {escape(str(row.get('file', 'an image')))}: its weights or inputs "
                "hold NaN or infinite values; nothing was written"
            )


class OutputFile:
    """A tool's output file, checked when the tool starts (before any work) and written whole at the end.

    An existing file is refused unless `overwrite`; with it, the old file is removed at once, so that a run that
    fails leaves no earlier result to be taken for its own. The lines go to a temporary file beside the target, which
    is renamed onto it: a reader sees no file or the whole one.
    """

    def __init__(self, path: str | None, overwrite: bool = False, flag: str = "--output") -> None:
        self.path = path
        if path is None:
            return
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} is a folder; expected a file name")
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} {path!r}: its folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{flag} {path!r}: its folder {folder} is not writable")
        if os.path.lexists(path):
            if not overwrite:
                raise ValueError(f"{flag} {path!r} exists; pass --overwrite to replace it, or choose another name")
            os.remove(path)

    def write_lines(self, lines: Iterable[str]) -> None:
        if self.path is None:
            return
        folder, name = os.path.split(os.path.abspath(self.path))
        partial = os.path.join(folder, f".{name}.{os.urandom(6).hex()}.partial")
        # made with the permissions any new file gets here (the umask's), as the output would have been
        handle = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        try:
            with os.fdopen(handle, "w") as f:
                for line in lines:
                    f.write(line + "\n")
            os.replace(partial, self.path)
        except BaseException:
            os.remove(partial)
            raise


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Runs a tool's `main`; an anticipated error (`ANTICIPATED`) is printed as one line on stderr with exit status 2
    (`VPTM_TRACEBACK=1` shows its traceback too)."""
    try:
        main(argv)
    except ANTICIPATED as error:
        if os.environ.get("VPTM_TRACEBACK") == "1":
            raise
        message = " ".join(str(error.args[0] if isinstance(error, KeyError) and error.args else error).split())
        print(f"error: {message or type(error).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = ["OutputFile", "check_finite_scores", "escape", "json_line", "positive_int", "run", "text_line"]
