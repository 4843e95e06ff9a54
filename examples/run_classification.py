r"""Fine-tunes VPTM, or one of its baselines, for image classification with the Trainer.

Follows transformers' `examples/pytorch/image-classification/run_image_classification.py`. Every method runs on
the same backbone, data pipeline and schedule, so their numbers compare:

* `vptm`: prompts + [MASK] read out through the frozen MIM head and a prototypical verbalizer (prompts in the first
  half of the blocks unless `--prompt_layers` says otherwise);
* `vpt`: the same prompts, a linear head on the final CLS state (VPT; deep by default, shallow or another location
  via `--prompt_layers`);
* `linear`: frozen backbone, linear head on the final CLS state (linear probe);
* `full`: every backbone weight trained (`BeitForImageClassification` initialised from the MIM checkpoint);
* `lora`: PEFT's LoRA in the frozen backbone's attention and a fresh linear head (`BeitForImageClassification`);
* `peft`: any PEFT config of yours (`--peft_config FILE.json`: LoRA, LoHa, IA3, BOFT, ...) the same way;
* `vptm_lora`: VPTM with PEFT's LoRA in its backbone's attention, trained together
  (`modeling_vptm/training/peft_methods.py`; the PEFT methods need peft: `pip install -e ".[peft]"`).

    # the main job: VPTM on the shipped backbone and the shipped 1,000-image Fashion-MNIST subset (offline)
    python examples/run_classification.py --output_dir runs/vptm
    # VPT-shallow on your own image folders, pushed to the Hub
    python examples/run_classification.py --method vpt --prompt_layers shallow --train_dir data/train \
        --validation_dir data/val --output_dir runs/vpt --push_to_hub --hub_model_id me/vpt-mydata
    # any Hub dataset and BEiT MIM backbone
    python examples/run_classification.py --dataset_name cifar10 --image_column_name img \
        --model_name_or_path microsoft/beit-base-patch16-224-pt22k --output_dir runs/cifar
    # PEFT's LoRA on the same backbone and data, or a PEFT config of your own
    python examples/run_classification.py --method lora --output_dir runs/lora
    python examples/run_classification.py --method peft --peft_config my_loha.json --output_dir runs/loha
    # several processes (CPU or GPUs)
    torchrun --nproc_per_node 2 examples/run_classification.py --output_dir runs/ddp
    accelerate launch --multi_gpu --num_processes 2 examples/run_classification.py --output_dir runs/ddp

Arguments can also come from one JSON file: `python run_classification.py args.json`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
from transformers import AutoImageProcessor, set_seed

import modeling_vptm
from modeling_vptm import SHIPPED_BACKBONE, VPTMConfig, VPTMForImageClassification  # noqa: F401
from modeling_vptm.data import SPLITS, collate, load_data
from modeling_vptm.deploy import CardInfo, prompt_checkpoint_card, push_checkpoint
from modeling_vptm.modeling_vptm import parameter_counts
from modeling_vptm.shipped import resolve_backbone_path
from modeling_vptm.standalone import run
from modeling_vptm.training import (  # noqa: F401  (the argument groups are also read off this script by the tests)
    RUN_ARGS_FILE,
    DataTrainingArguments,
    ModelArguments,
    VPTMTrainer,
    VPTMTrainingArguments,
    add_adapter,
    build_model,
    check_output_dir,
    compute_metrics,
    label_names,
    load_classifier,
    parse_arguments,
    prepare_images,
    run_arguments,
    save_final_model,
    search_hyperparameters,
)
from modeling_vptm.training.arguments import given_flags, gpu_defaults  # noqa: F401


logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Runs the script on `argv` (default: the command line); `callbacks`, extra `TrainerCallback`s of the final
    training (experiments/benchmark_training.py times its steps with one). Returns the run's results."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_arguments(argv, __doc__)
    # we push the final, prompt-only folder ourselves: Trainer would also push checkpoints and its own card
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    run_args = run_arguments(model_args, data_args, training_args)
    # the main process checks (and, if asked, clears) output_dir first; the others then find it as it left it
    with training_args.main_process_first(desc="checking output_dir"):
        last = check_output_dir(training_args.output_dir, run_args, data_args.overwrite_output_dir)
    resume = training_args.resume_from_checkpoint or last
    if resume:
        logger.warning("resuming from %s (same arguments); pass --overwrite_output_dir true to start over", resume)

    dataset = load_data(data_args, model_args, training_args.seed)
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no" and "validation" not in dataset:
        raise ValueError(
            f"--eval_strategy {strategy} selects on a validation split, and this dataset has none "
            "(only train and test, and the test images must not choose the model): pass --validation_split 0.1 to "
            "carve one from train"
        )
    labels = label_names(dataset)
    id2label = dict(enumerate(labels))
    if training_args.hp_search_trials and "validation" not in dataset:
        raise ValueError(
            f"--hp_search_trials {training_args.hp_search_trials} scores each trial on a validation split, and this "
            "dataset has none (the test images must not choose hyperparameters): pass --validation_split 0.1 to carve "
            "one from train"
        )
    if training_args.do_train:
        model = build_model(model_args, id2label)
    else:  # evaluate what an earlier run left in output_dir
        saved = ("config.json", "adapter_config.json")  # a model, or a PEFT adapter
        if not any(os.path.isfile(os.path.join(training_args.output_dir, name)) for name in saved):
            raise ValueError(
                f"--do_train false scores the checkpoint in --output_dir, and {training_args.output_dir} holds none"
            )
        model = load_classifier(training_args.output_dir)
    # the backbone's processor, loaded after the backbone itself, whose loading errors say more
    processor = AutoImageProcessor.from_pretrained(
        resolve_backbone_path(model_args.model_name_or_path), revision=model_args.model_revision,
        cache_dir=model_args.cache_dir, token=model_args.token,
    )  # fmt: skip
    # the splits this run reads (an unread test split is not even decoded), decoded and resized once; one process
    # fills the cache of `datasets`, then the others read it
    needed = [name for name in SPLITS if name in dataset and (name != "train" or training_args.do_train)
              and (name != "test" or training_args.do_predict)]  # fmt: skip
    with training_args.main_process_first(desc="decoding images"):
        images, image_transform = prepare_images(
            processor, dataset, needed, crop_scale=data_args.augment_crop_scale, shift=data_args.augment_shift,
            flip=data_args.augment_flip, workers=training_args.dataloader_num_workers,
        )  # fmt: skip
    splits = {name: images[name] for name in ("validation", "test") if name in images}
    train_data = images.get("train")

    def initialize(model):
        if model_args.prototype_init == "class_mean" and training_args.do_train:
            batches = torch.utils.data.DataLoader(train_data, batch_size=64, collate_fn=collate)
            model.initialize_prototypes(image_transform.model_inputs(batch, train=False) for batch in batches)
        return add_adapter(model, model_args) if training_args.do_train else model

    trainer_inputs = dict(
        train_dataset=train_data, eval_dataset=splits.get("validation"), data_collator=collate,
        compute_metrics=compute_metrics(data_args.metric_names), processing_class=processor,
        image_transform=image_transform,
    )  # fmt: skip
    if training_args.do_train and training_args.should_save:  # before any search or training: rerun as this run
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, RUN_ARGS_FILE), "w") as f:
            json.dump(run_args, f, indent=2, sort_keys=True)
    search = model_init = None
    if training_args.do_train and training_args.hp_search_trials:

        def model_init(trial=None):
            return initialize(build_model(model_args, id2label))

        rates = (1e-5, 1e-2) if model_args.method == "full" else (1e-4, 1e-1)
        search = search_hyperparameters(model_init, training_args, trainer_inputs, data_args.metric_names, rates)
        for name in ("learning_rate", "weight_decay"):
            if name in given_flags(argv):
                logger.warning("--%s %s is replaced by the search's best value", name, getattr(training_args, name))
            setattr(training_args, name, search["best"][name])
    else:
        model = initialize(model)

    trainable, total = parameter_counts(model)
    logger.info("method %s: %s trainable of %s parameters", model_args.method, f"{trainable:,d}", f"{total:,d}")
    # after a search, the final model is built and trained as the trials were (same seed, same random draws)
    trainer = VPTMTrainer(model=None if model_init else model, model_init=model_init, args=training_args,
                            callbacks=callbacks, **trainer_inputs)  # fmt: skip
    train_seconds, train_loss = 0.0, None
    if training_args.do_train:
        start = time.perf_counter()
        train_result = trainer.train(resume_from_checkpoint=resume)
        train_seconds, train_loss = time.perf_counter() - start, train_result.training_loss
        save_final_model(trainer, model_args, id2label)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics, combined=False)
        trainer.save_state()
    # validation when asked (--do_eval), then the test split scored once, at the end (--do_predict)
    scored = {}
    for split, asked, prefix in (("validation", training_args.do_eval, "eval"), ("test", training_args.do_predict,
                                                                                   "test")):  # fmt: skip
        if asked and split in splits:
            metrics = trainer.evaluate(splits[split], metric_key_prefix=prefix)
            trainer.log_metrics(prefix, metrics)
            trainer.save_metrics(prefix, metrics, combined=False)  # eval_results.json, test_results.json
            scored[split] = {name: metrics[f"{prefix}_{name}"] for name in data_args.metric_names}
    if not scored:
        raise ValueError(
            f"nothing was scored: the dataset has the held-out splits {sorted(set(dataset) - {'train'})} and "
            f"--do_eval {training_args.do_eval}, --do_predict {training_args.do_predict}"
        )
    eval_split = "test" if "test" in scored else "validation"  # the figure a run reports: test when it was scored
    scores = scored[eval_split]

    results = {
        "method": model_args.method,
        "accuracy": scores["accuracy"],
        "metrics": scores,
        "eval_split": eval_split,
        "eval_images": len(splits[eval_split]),
        "scored": scored,
        "train_images": len(dataset["train"]),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": train_loss,
        "train_seconds": round(train_seconds, 1),
        "resumed_from": resume,
        "learning_rate": training_args.learning_rate,
        "weight_decay": training_args.weight_decay,
    }
    if search is not None:
        results["hp_search"] = search
    if trainer.is_world_process_zero():
        out = training_args.output_dir
        processor.save_pretrained(out)
        results["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out)
                                          if name.endswith(".safetensors"))  # fmt: skip
        device = (
            torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        )
        repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(out))
        import huggingface_hub
        import transformers

        card = CardInfo(
            model_name=os.path.basename(os.path.abspath(out)), method=model_args.method,
            backbone=model_args.model_name_or_path, backbone_revision=model_args.model_revision,
            dataset=data_args.dataset_name if not data_args.train_dir else "imagefolder", eval_split=eval_split,
            eval_images=results["eval_images"], train_images=results["train_images"], labels=labels,
            metrics=scores, trainable_parameters=trainable, total_parameters=total,
            checkpoint_bytes=results["checkpoint_bytes"], train_seconds=train_seconds, device=device, repo_id=repo_id,
            arguments=json.dumps({**run_args, "learning_rate": training_args.learning_rate,
                                  "weight_decay": training_args.weight_decay}, indent=2, sort_keys=True),
            versions={"vptm": modeling_vptm.__version__, "transformers": transformers.__version__,
                      "torch": torch.__version__, "huggingface_hub": huggingface_hub.__version__},
        )  # fmt: skip
        prompt_checkpoint_card(card).save(os.path.join(out, "README.md"))
        with open(os.path.join(out, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(
            f"{model_args.method}: {eval_split} accuracy {results['accuracy']:.4f} on {results['eval_images']} images "
            f"| trainable parameters {trainable:,d} of {total:,d} | checkpoint {results['checkpoint_bytes']:,d}"
            f" bytes | {train_seconds:.1f} s" + (f" (resumed from {os.path.basename(resume)})" if resume else "")
        )
        if push_to_hub:
            results.update(push_checkpoint(
                out, card, token=model_args.token or training_args.hub_token, private=training_args.hub_private_repo,
                revision=training_args.hub_revision, backbone_hub_id=model_args.backbone_hub_id,
                backbone_hub_revision=model_args.backbone_hub_revision,
            ))  # fmt: skip
    return results


if __name__ == "__main__":
    run(main)  # an anticipated error (a name not found, bad data, a bad flag value): one line, exit status 2
