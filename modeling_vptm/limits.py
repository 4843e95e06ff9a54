"""The bounds on what comes from outside (prompt checkpoints and their configs, requests, image files), in one place,
and how a message names a list of what was wrong without growing with it. docs/security.md lists each bound with where
it is enforced.

This file imports only the standard library: it is a Hub code file (the checkpoint loaders read it) and it is copied
beside the standalone runtimes, which import it as a top-level module.
"""

from __future__ import annotations

from collections.abc import Iterable


# ------------------------------------------------------------------------------------------- prompt checkpoints
# config.json of a prompt checkpoint: ImageNet-21k's 21,843 labels take about 0.6 MB
MAX_CONFIG_BYTES = 4 * 2**20
# classes of a task, and the characters of one class name
MAX_LABELS = 65_536
MAX_LABEL_CHARS = 1_000
# prompts per prompted block, as a multiple of the backbone's own sequence (1 + patches): the prompted sequence stays
# within 5 times the one the backbone was pre-trained on (VPT's largest setting, 200 prompts for 196 patches, is 1x)
PROMPT_LENGTH_FACTOR = 4
# prototypes per class (ProtoVerb uses a handful), and their dimension
MAX_PROTOTYPES_PER_CLASS = 64
MAX_PROTOTYPE_DIM = 4096
# a task's tensors altogether, worked out from its config before anything is allocated (256 MB in float32; deep
# prompts on BEiT-large and a linear head over ImageNet-21k's classes take under 25 M)
MAX_TASK_PARAMETERS = 2**26
# the safetensors header of a prompt checkpoint: a few names and shapes (a task holds at most six tensors)
MAX_HEADER_BYTES = 64 * 2**10

# ------------------------------------------------------------------------------------------------------ images
# one image, read from its header before decoding: 4096 x 4096 pixels
MAX_PIXELS = 4096 * 4096
# one image file's bytes (a 4096 x 4096 BMP takes 48 MB)
MAX_IMAGE_FILE_BYTES = 64 * 2**20
# one request's images: how many, and the pixels decoded for all of them together (16 images at MAX_PIXELS; JPEGs
# are decoded at a reduced scale when the model needs fewer pixels, and count as decoded)
MAX_IMAGES = 64
MAX_REQUEST_PIXELS = 16 * MAX_PIXELS
# a request's body, read by the Ray Serve application (the endpoints' toolkit bounds its own)
MAX_REQUEST_BYTES = 64 * 2**20
# the tasks one request of a many-task server may name (each of its images runs under each)
MAX_TASKS_PER_REQUEST = 64

# ---------------------------------------------------------------------------------------------------- messages
# items a message lists before "... and N more"
MAX_LISTED = 10


def listed(items: Iterable, limit: int = MAX_LISTED) -> str:
    """`items` as a message shows them: the first `limit` (each `repr`, cut at 80 characters), then how many more."""
    items = list(items)
    shown = [repr(item) if len(repr(item)) <= 80 else repr(item)[:77] + "..." for item in items[:limit]]
    more = f", ... and {len(items) - limit:,} more" if len(items) > limit else ""
    return f"[{', '.join(shown)}{more}]"


def check_labels(id2label: dict, owner: str) -> None:
    """`id2label` names the classes 0 .. n - 1, each once, with names of 1 to `MAX_LABEL_CHARS` characters; 1 to
    `MAX_LABELS` of them. `owner` begins the message (what holds the labels)."""
    labels = id2label or {}
    if not 1 <= len(labels) <= MAX_LABELS:
        raise ValueError(f"{owner} needs 1 to {MAX_LABELS:,} labels (num_labels or id2label), got {len(labels):,}")
    if set(labels) != set(range(len(labels))):
        odd = sorted(set(labels) - set(range(len(labels))), key=str)
        raise ValueError(
            f"{owner}.id2label must name the classes 0 to {len(labels) - 1}, each once; it has the keys "
            f"{listed(odd)} instead of {listed(sorted(set(range(len(labels))) - set(labels)))}"
        )
    bad = [k for k, v in labels.items() if not isinstance(v, str) or not 0 < len(v) <= MAX_LABEL_CHARS]
    if bad:
        raise ValueError(
            f"{owner}.id2label names must be strings of 1 to {MAX_LABEL_CHARS} characters; class {bad[0]} is "
            f"{labels[bad[0]]!r:.80}"
        )


__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_IMAGES",
    "MAX_IMAGE_FILE_BYTES",
    "MAX_LABELS",
    "MAX_LABEL_CHARS",
    "MAX_PIXELS",
    "MAX_PROTOTYPES_PER_CLASS",
    "MAX_PROTOTYPE_DIM",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_PIXELS",
    "MAX_TASKS_PER_REQUEST",
    "MAX_TASK_PARAMETERS",
    "PROMPT_LENGTH_FACTOR",
    "check_labels",
    "listed",
]
