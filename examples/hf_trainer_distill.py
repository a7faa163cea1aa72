"""Prompt distillation with the Hugging Face ``Trainer``, through clipdistill's DistillStep.

The Trainer owns the loop, devices, mixed precision, logging and checkpoints; the subclass below
only says how a batch becomes a loss (``compute_loss``). The Trainer saves ``model.state_dict()``:
a DistillStep's holds the prompts (and PromptKD's projector) only, never the teacher or the
student's backbone, which come from their weights, so ``resume_from_checkpoint`` reads a file of
a few kilobytes.

    python examples/hf_trainer_distill.py --images DIR --class-names classes.txt \\
        --teacher ViT-L-14 --teacher-weights openai --student ViT-B-16 --student-weights openai

Several GPUs: ``torchrun --nproc_per_node 8 examples/hf_trainer_distill.py ...``; for PromptKD's
projector call ``clipdistill.engine.parallel.batchnorm.synchronize(step)`` first (batch statistics
over every rank's real rows).
"""
from __future__ import annotations

import argparse
import sys

import torch

# isort: off
# clipdistill's engine first: importing it applies its torchvision measure, so that transformers
# imports next to a CPU-only torch too
from clipdistill import DistillStep
import transformers
# isort: on
from common import UnlabeledImages, add_arguments, build_step  # examples/common.py


class DistillTrainer(transformers.Trainer):
    """A Trainer whose model is a DistillStep: a batch of teacher and student images in, its loss out."""

    def compute_loss(self, model: DistillStep, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch=None):
        parts = model(inputs["teacher_images"], inputs["student_images"])
        return (parts["loss"], parts) if return_outputs else parts["loss"]


def main(argv: list[str] | None = None) -> DistillTrainer:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--resume", default=None, help="a checkpoint folder of an earlier run to continue from")
    args = parser.parse_args(argv)
    step = build_step(args)
    # only the learner's tensors: the teacher and the student's backbone are frozen
    optimizer = torch.optim.SGD(step.trainable_parameters().values(), lr=args.lr, momentum=0.9)
    training = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", logging_steps=1, save_steps=max(1, args.max_steps // 4),
        report_to=[], remove_unused_columns=False, dataloader_drop_last=True,
        use_cpu=not args.device.startswith("cuda"),
    )
    trainer = DistillTrainer(model=step, args=training, train_dataset=UnlabeledImages(args.images, step),
                             optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=args.resume)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
