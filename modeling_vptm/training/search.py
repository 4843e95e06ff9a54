"""Choosing the learning rate and weight decay on the validation split with `Trainer.hyperparameter_search`
(optuna), before the final model trains; never on the test split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Sequence

import torch

from .trainer import VPTMTrainer


logger = logging.getLogger(__name__)

HP_SEARCH_FILE = "hp_search.json"
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def search_hyperparameters(
    model_init, training_args, trainer_inputs: dict, metric_names: Sequence[str], learning_rates: tuple[float, float]
) -> dict:
    """Learning rate (log-uniform in `learning_rates`) and weight decay (`WEIGHT_DECAYS`) by
    `Trainer.hyperparameter_search` (optuna) on the validation split, with `training_args.hp_search_trials` trials.

    Each trial trains a fresh model (`model_init`, seeded by the training seed) as configured, without checkpoints
    and without pruning, in a temporary folder; it is scored by `metric_for_best_model` (default accuracy; one of
    `metric_names` or the loss), maximised or, for a loss, minimised. The trials and the best pair are written to
    `output_dir/hp_search.json`, which a rerun (resumed or not) reads instead of searching again.
    """
    saved = os.path.join(training_args.output_dir, HP_SEARCH_FILE)
    if os.path.isfile(saved):  # the caller has made sure this folder holds this same run
        with open(saved) as f:
            return json.load(f)
    try:
        import optuna
    except ImportError as error:
        raise ImportError(
            "--hp_search_trials needs optuna: pip install optuna (or the package's hpo extra)"
        ) from error
    metric, maximize = search_objective(training_args, metric_names)
    low, high = learning_rates

    def space(trial) -> dict:
        return {
            "learning_rate": trial.suggest_float("learning_rate", low, high, log=True),
            "weight_decay": trial.suggest_categorical("weight_decay", WEIGHT_DECAYS),
        }

    with tempfile.TemporaryDirectory(prefix="vptm-hp-search-") as folder:
        search_args = dataclasses.replace(
            training_args, output_dir=folder, save_strategy="no", load_best_model_at_end=False, hp_search_trials=0
        )
        trainer = VPTMTrainer(model_init=model_init, args=search_args, **trainer_inputs)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.InMemoryStorage()  # kept, to read every trial back
        best = trainer.hyperparameter_search(
            hp_space=space, compute_objective=lambda metrics: metrics[metric],
            n_trials=training_args.hp_search_trials, direction="maximize" if maximize else "minimize",
            backend="optuna", sampler=optuna.samplers.TPESampler(seed=training_args.seed),
            pruner=optuna.pruners.NopPruner(), study_name="vptm", storage=storage,
        )  # fmt: skip
    result = None
    if best is not None:  # the main process ran the study; the others followed its trials
        trials = optuna.load_study(study_name="vptm", storage=storage).trials
        trials = [{"number": t.number, **t.params, metric: t.value} for t in trials]
        result = {"metric": metric, "maximize": maximize, "trials": trials, "best": best.hyperparameters,
                  "best_objective": best.objective}  # fmt: skip
    if training_args.world_size > 1:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    if trainer.is_world_process_zero():
        with open(saved, "w") as f:
            json.dump(result, f, indent=2)
    logger.info("hyperparameter search: best %s (%s %.4f)", result["best"], metric, result["best_objective"])
    return result


def search_objective(training_args, metric_names: Sequence[str]) -> tuple[str, bool]:
    """The metric a search scores trials by (`metric_for_best_model`, default accuracy) and whether it maximises."""
    metric = training_args.metric_for_best_model or "accuracy"
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    known = ["eval_loss", *(f"eval_{name}" for name in metric_names)]
    if metric not in known:
        raise ValueError(f"--metric_for_best_model {metric} is not computed; it must be one of {known}")
    if training_args.greater_is_better is not None:
        return metric, training_args.greater_is_better
    return metric, metric != "eval_loss"


__all__ = ["HP_SEARCH_FILE", "search_hyperparameters", "search_objective"]
