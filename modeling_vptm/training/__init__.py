"""Training VPTM and its baselines with transformers' Trainer: the trainer and its data path, the command line's
arguments, the table of methods (VPTM, VPT, linear probe, full fine-tuning, PEFT's), the hyperparameter search, run
folders and metrics.

Everything is imported when first used (`Trainer` brings accelerate), so `import modeling_vptm.training` is cheap.
"""

from .. import lazy_exports


__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "trainer": ("PixelValuesCollator", "VPTMTrainer", "label_names", "prepare_images"),
        "arguments": (
            "METHODS",
            "DataTrainingArguments",
            "ModelArguments",
            "VPTMTrainingArguments",
            "build_parser",
            "parse_arguments",
        ),  # fmt: skip
        "methods": ("METHODS", "Method", "add_adapter", "build_model", "save_final_model"),
        "peft_methods": (
            "ATTENTION_AND_MLP",
            "LORA_DEFAULTS",
            "QUERY_VALUE",
            "apply_peft",
            "classifier_from_mim",
            "load_classifier",
            "load_peft_classifier",
            "lora_config",
            "read_peft_config",
        ),  # fmt: skip
        "search": ("search_hyperparameters",),
        "runs": ("RUN_ARGS_FILE", "check_output_dir", "run_arguments", "write_run_summary"),
        "evaluation": ("DEFAULT_METRICS", "compute_metrics", "load_metric"),
    },
)
