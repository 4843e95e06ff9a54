"""The image processor of a task and of tasks served together: one backbone pass feeds every task of a batch the
same pixels, so tasks saved with processors that make different pixels cannot share it.
"""

from __future__ import annotations

from ..configuration_vptm import VPTMConfig


# an image processor's bookkeeping fields, which do not change the pixels it makes
PROCESSOR_NAME_KEYS = {"processor_class", "image_processor_type", "_processor_class"}


def image_processor_differences(processor, other) -> list[str]:
    """The settings in which two image processors differ, bookkeeping aside: empty when they make the same pixels
    (what one backbone pass shared by several tasks needs)."""
    mine = {k: v for k, v in processor.to_dict().items() if k not in PROCESSOR_NAME_KEYS}
    theirs = {k: v for k, v in other.to_dict().items() if k not in PROCESSOR_NAME_KEYS}
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def image_processor_of(source: str, config: VPTMConfig, **hub_kwargs):
    """The image processor saved with the checkpoint, else (only when it has no `preprocessor_config.json`) its
    backbone's."""
    from transformers import AutoImageProcessor
    from transformers.utils import cached_file

    from ..shipped import resolve_backbone_path

    # looked up first rather than caught: a missing file makes transformers raise ValueError, and an OSError from a
    # file that is there (unreadable, a download failing) must not swap in the backbone's preprocessing unnoticed
    if cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs):
        return AutoImageProcessor.from_pretrained(source, **hub_kwargs)
    backbone = resolve_backbone_path(config.backbone_name_or_path)
    return AutoImageProcessor.from_pretrained(backbone, revision=config.backbone_revision)


def same_image_processor(sources: dict[str, str], configs: dict[str, VPTMConfig], **hub_kwargs):
    """The image processor every task (`{name: folder or Hub id}`, with its config) was saved with; tasks saved with
    different ones are refused, because one backbone pass feeds every task the same pixels."""
    processors = {name: image_processor_of(sources[name], configs[name], **hub_kwargs) for name in sources}
    (first_name, first), *others = processors.items()
    for name, processor in others:
        differ = image_processor_differences(first, processor)
        if differ:
            raise ValueError(
                f"task {name!r} was saved with an image processor that differs from {first_name!r}'s in {differ}; "
                "one backbone pass feeds every task the same pixels"
            )
    return first


def processor_size(processor) -> dict | None:
    """An image processor's resize setting as a plain dict (what `standalone.read_image` takes to decode no more pixels
    than the processor keeps), or None when it does not resize."""
    settings = processor.to_dict()
    return settings.get("size") if settings.get("do_resize", True) else None


__all__ = ["image_processor_differences", "image_processor_of", "processor_size", "same_image_processor"]
