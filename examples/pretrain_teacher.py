"""Trains the semantic teacher of the VQ-KD tokenizer on the Fashion-MNIST training images, without labels (SimCLR).

The teacher (``modeling_vptm.pretraining.ContrastiveTeacher``) is a small CNN whose output map has one feature per BEiT
patch; contrastive instance discrimination between two augmented views of each image makes those features semantic.
Saved as ``teacher.safetensors`` in ``--output_dir``; ``experiments/evaluate_backbone.py --teacher DIR`` gives its
linear probe, and ``examples/train_vqkd.py --teacher DIR`` distils visual tokens from it.

    # the recipe of the shipped backbone v3's teacher (2 CPU cores: 1,172 s)
    python examples/pretrain_teacher.py --output_dir runs/teacher --num_train_epochs 16 \
        --per_device_train_batch_size 256 --learning_rate 2e-3 --weight_decay 1e-4 --warmup_steps 0.05 \
        --lr_scheduler_type cosine --save_strategy no --report_to none
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from modeling_vptm.atomic_write import give_default_permissions
from modeling_vptm.data import load_fashion_mnist
from modeling_vptm.pretraining import ContrastiveTeacher, ImageTensorDataset, TwoViewCollator
from modeling_vptm.standalone import run
from modeling_vptm.training import write_run_summary


logger = logging.getLogger(__name__)


@dataclass
class TeacherArguments:
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the Fashion-MNIST IDX files."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    patch_size: int = field(default=4, metadata={"help": "The backbone's patch size: one teacher feature per patch."})
    width: int = 32
    feature_dim: int = 96
    projection_dim: int = 64
    temperature: float = 0.2
    min_scale: float = field(default=0.35, metadata={"help": "Smallest random crop, as a fraction of the area."})
    jitter: float = field(default=0.4, metadata={"help": "Brightness and contrast jitter."})
    init_from: str | None = field(
        default=None, metadata={"help": "Continue from the teacher saved in this folder (its layout, not the flags')."}
    )


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((TeacherArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    training_args.remove_unused_columns = False  # the collator's two views are the model's inputs
    set_seed(training_args.seed)

    images, _ = load_fashion_mnist("train", args.data_dir)  # labels are never used
    if args.max_train_samples is not None:
        images = images[: args.max_train_samples]
    if args.init_from is not None:
        teacher = ContrastiveTeacher.from_pretrained(args.init_from).train()
    else:
        sizes = (args.patch_size, args.width, args.feature_dim, args.projection_dim)
        teacher = ContrastiveTeacher(*sizes, temperature=args.temperature)
    trainer = Trainer(
        model=teacher,
        args=training_args,
        train_dataset=ImageTensorDataset(images),
        data_collator=TwoViewCollator(args.min_scale, max_shift=2, jitter=args.jitter, seed=training_args.seed),
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    summary = {}
    if trainer.is_world_process_zero():
        teacher.save_pretrained(training_args.output_dir)
        give_default_permissions(training_args.output_dir)
        summary = {
            "train_loss": result.training_loss,
            "train_seconds": round(time.perf_counter() - start, 1),
            "epochs": training_args.num_train_epochs,
            "train_images": len(images),
            "parameters": sum(p.numel() for p in teacher.encoder.parameters()),
            "teacher_args": asdict(args),
        }
        summary = write_run_summary(training_args.output_dir, "teacher_summary.json", summary)
        logger.info("Teacher summary: %s", summary)
    return summary


if __name__ == "__main__":
    run(main)  # an anticipated error: one line and exit status 2, no traceback
