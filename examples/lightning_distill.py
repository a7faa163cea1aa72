"""Prompt distillation inside PyTorch Lightning, with clipdistill's DistillStep.

Lightning owns the loop, devices, precision, logging and checkpoints; the module below only
calls the step. Its checkpoints hold the prompts (and PromptKD's projector) only: a DistillStep's
state_dict leaves out the teacher and the student's backbone, which come from their weights when
the module is built again, so ``fit(ckpt_path=...)`` resumes from a file of a few kilobytes.

    python examples/lightning_distill.py --images DIR --class-names classes.txt \\
        --teacher ViT-L-14 --teacher-weights openai --student ViT-B-16 --student-weights openai

Several GPUs: add ``--devices 8`` (DDP). PromptKD's projector batch norm is synchronized by
clipdistill (``clipdistill.engine.parallel.batchnorm.synchronize``, in ``setup`` below), over the
real rows of every rank and on any backend; keep Lightning's ``sync_batchnorm`` off: it swaps
the batch norm for torch's SyncBatchNorm, which the projector refuses with that advice.
"""
from __future__ import annotations

import argparse
import sys

import torch

# isort: off
# clipdistill.engine first: importing it applies its torchvision measure, so that lightning imports
# next to a CPU-only torch too
from clipdistill import DistillStep
from clipdistill.engine.parallel.batchnorm import synchronize
import lightning as L
# isort: on
from common import UnlabeledImages, add_arguments, build_step  # examples/common.py


class DistillModule(L.LightningModule):
    def __init__(self, step: DistillStep, lr: float = 2e-3):
        super().__init__()
        self.step = step
        self.lr = lr

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            synchronize(self.step)  # batch statistics over every rank's real rows

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        parts = self.step(batch["teacher_images"], batch["student_images"])
        self.log_dict({f"train/{name}": value for name, value in parts.items()}, prog_bar=True,
                      batch_size=batch["teacher_images"].shape[0])
        return parts["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # only the learner's tensors: the teacher and the student's backbone are frozen
        return torch.optim.SGD(self.step.trainable_parameters().values(), lr=self.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> L.Trainer:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--devices", default="auto", help="Lightning's devices (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="a checkpoint of an earlier run to continue from")
    args = parser.parse_args(argv)
    module = DistillModule(build_step(args), lr=args.lr)
    data = torch.utils.data.DataLoader(UnlabeledImages(args.images, module.step), batch_size=args.batch_size,
                                       shuffle=True, drop_last=True, num_workers=0)
    trainer = L.Trainer(max_steps=args.max_steps, accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                        devices=args.devices, default_root_dir=args.out, log_every_n_steps=1, logger=False,
                        enable_model_summary=False)
    trainer.fit(module, data, ckpt_path=args.resume)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
