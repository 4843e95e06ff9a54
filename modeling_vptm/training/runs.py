"""One run in one folder: the arguments that make a run, recorded in its output folder so that a rerun of the same
run resumes and a different one is refused; and the summary a pre-training run leaves there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from transformers.trainer_utils import get_last_checkpoint


# the run's arguments, written to its output_dir before any training: a rerun of the same run resumes from them
RUN_ARGS_FILE = "vptm_run_args.json"


def check_output_dir(output_dir: str, run_args: dict, overwrite: bool) -> str | None:
    """Returns the checkpoint to resume from (same run) or None; refuses a folder that holds a different run."""
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return None
    previous_path = os.path.join(output_dir, RUN_ARGS_FILE)
    previous = json.load(open(previous_path)) if os.path.isfile(previous_path) else None
    if previous is not None:  # runs recorded before some arguments were renamed or added
        for old, new in (("verbalizer_input", "head_input"), ("vptm_head", "classifier")):
            if old in previous:
                previous[new] = previous.pop(old)
        previous.setdefault("hp_search_trials", 0)
        previous.setdefault("metric_for_best_model", None)
    if previous == run_args:
        return get_last_checkpoint(output_dir)
    if not overwrite:
        what = "files of another program" if previous is None else "a run with different arguments"
        differing = sorted(k for k in run_args if previous and previous.get(k) != run_args[k])
        raise ValueError(
            f"output_dir {output_dir} already holds {what}"
            + (f" (differs in {differing})" if differing else "")
            + "; pass --overwrite_output_dir to replace it, or choose another --output_dir"
        )
    shutil.rmtree(output_dir)
    return None


def run_arguments(model_args, data_args, training_args) -> dict:
    """What makes a run of the script: its arguments but those that only say where things go or are shown, as
    recorded in `RUN_ARGS_FILE`; a rerun with the same ones resumes, with others is refused (`check_output_dir`)."""
    ignore = {
        "output_dir",
        "logging_dir",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
        "backbone_hub_id",
        "backbone_hub_revision",
        "token",
        "local_rank",
        "disable_tqdm",
        "metric_names",  # what is reported, not what is trained (the search's metric is metric_for_best_model)
    }
    args = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args)}
    args.update({k: v for k, v in training_args.to_dict().items() if k in ("learning_rate", "num_train_epochs",
                 "per_device_train_batch_size", "weight_decay", "seed", "lr_scheduler_type", "warmup_steps",
                 "max_steps", "hp_search_trials", "metric_for_best_model")})  # fmt: skip
    return {k: v for k, v in sorted(args.items()) if k not in ignore and not k.startswith("_")}


def write_run_summary(output_dir: str, file_name: str, summary: dict) -> dict:
    """Adds the machine (``device``) to a pre-training run's ``summary`` and writes it as JSON in ``output_dir``."""
    import torch

    gpu = torch.cuda.is_available()
    summary = {**summary, "device": torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}"}
    with open(os.path.join(output_dir, file_name), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


__all__ = ["RUN_ARGS_FILE", "check_output_dir", "run_arguments", "write_run_summary"]
