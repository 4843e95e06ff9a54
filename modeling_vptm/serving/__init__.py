"""Serving many tasks on one loaded backbone: mixed-task batches in one backbone pass per sequence layout, the image
processor tasks share, task names, and looking inside a prediction."""

from .inspection import (
    heatmap_overlay,
    patch_attention_map,
    patch_attention_share,
    render_visual_token,
    top_visual_tokens,
)
from .multitask import MAX_STACKED_HEADS, MultiTaskVPTM, TaskPrediction
from .processors import image_processor_differences, image_processor_of, processor_size, same_image_processor
from .task_names import check_task_name, parse_named_sources


__all__ = [
    "MAX_STACKED_HEADS",
    "MultiTaskVPTM",
    "TaskPrediction",
    "check_task_name",
    "heatmap_overlay",
    "image_processor_differences",
    "image_processor_of",
    "parse_named_sources",
    "patch_attention_map",
    "patch_attention_share",
    "processor_size",
    "render_visual_token",
    "same_image_processor",
    "top_visual_tokens",
]
