"""Generated data and distilled students for test_evaluate.py and test_export.py (tiny models, CPU).

Loaded by path from both test files (the tests folder is not a package; importlib mode).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipdistill.engine.models import TINY_STUDENT, TINY_TEACHER

CLASS_NAMES = ["cat", "golden retriever", "sea lion", "x-wing fighter", "tulip"]  # C = 5, a prime
OTHER_NAMES = ["maple leaf", "sailboat", "stop sign"]
TEMPLATES = "generic"  # "a photo of a {}."


def write_image(path: Path, rng: np.random.Generator, size=(40, 48)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def labeled_folder(root: Path, names, per_class, seed: int) -> Path:
    """One subfolder per class (spaces written as underscores), ``per_class[i]`` PNGs of varied sizes."""
    rng = np.random.default_rng(seed)
    for name, count in zip(names, per_class):
        for i in range(count):
            write_image(root / name.replace(" ", "_") / f"{i:03d}.png", rng, (int(rng.integers(32, 64)), 40))
    return root


def names_file(path: Path, names) -> Path:
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return path


class World:
    """Files of one test module: labeled folders, unlabeled images, teacher and student weights."""

    def __init__(self, root: Path):
        from clipdistill.engine.models import load_clip

        self.root = root
        self.labeled = labeled_folder(root / "pets", CLASS_NAMES, [3, 2, 4, 3, 2], seed=0)
        self.labeled_other = labeled_folder(root / "things", OTHER_NAMES, [2, 3, 2], seed=1)
        rng = np.random.default_rng(2)
        self.unlabeled = root / "unlabeled"
        for i in range(7):
            write_image(self.unlabeled / f"u{i}.png", rng, (int(rng.integers(32, 70)), 36))
        self.names = names_file(root / "names.txt", CLASS_NAMES)
        self.other_names = names_file(root / "other_names.txt", OTHER_NAMES)
        torch.manual_seed(0)
        self.student_weights = save_weights(load_clip(TINY_STUDENT, None), root / "student.safetensors")
        torch.manual_seed(1)
        self.teacher_weights = save_weights(load_clip(TINY_TEACHER, None), root / "teacher.safetensors")
        self.cache = root / "cache"

    def student_clip(self):
        from clipdistill.engine.models import build_student

        return build_student(TINY_STUDENT, str(self.student_weights))

    def teacher(self):
        from clipdistill.engine.models import build_teacher

        return build_teacher(TINY_TEACHER, str(self.teacher_weights))

    def teacher_vectors(self, names, templates=("a photo of a {}.",)):
        from clipdistill.engine.models import get_tokenizer
        from clipdistill.engine.models.class_vectors import encode_class_names

        teacher = self.teacher()
        return encode_class_names(teacher.encode_text, get_tokenizer(TINY_TEACHER), list(names), list(templates))

    def distilled(self, kind: str, options: dict, *, seed: int = 0, out: str = "run"):
        """A learner with perturbed ("distilled") state and a training checkpoint holding it.

        Returns (checkpoint path, learner in eval mode).
        """
        from clipdistill.engine.config.run import dump_run_config, load_run_config
        from clipdistill.engine.evaluation.export import construct_learner
        from clipdistill.engine.training.checkpoint import save_checkpoint

        method = "promptkd" if kind == "promptkd" else "kdpl"
        cfg = load_run_config({
            "method": method,
            "teacher": {"name": TINY_TEACHER, "weights": str(self.teacher_weights)},
            "student": {"name": TINY_STUDENT, "weights": str(self.student_weights)},
            "learner": {"kind": kind, "options": options},
            "data": {"train": str(self.unlabeled), "class_names": str(self.names), "templates": TEMPLATES},
            "train": {"out_dir": str(self.root / out)},
        }, recipe=method)
        from clipdistill.engine.models import get_tokenizer

        torch.manual_seed(seed)
        learner = construct_learner(kind, self.student_clip(), tokenizer=get_tokenizer(TINY_STUDENT),
                                    class_names=CLASS_NAMES, templates=["a photo of a {}."], teacher_dim=48,
                                    options=cfg.learner.options)
        generator = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, tensor in learner.state_dict().items():
                if name.startswith("clip.") or not tensor.is_floating_point():
                    continue
                noise = torch.randn(tensor.shape, generator=generator) * 0.3
                tensor.copy_(tensor.abs() + 0.5 + noise.abs() if "running_var" in name else tensor + noise)
        learner.eval()
        state = {"step": 7, "learner": learner.state_to_save(), "config": dump_run_config(cfg)}
        path = save_checkpoint(self.root / out / "checkpoints", 7, state)
        return path, learner


def loader_images(samples, size: int = 32):
    """Every image of ``samples`` as the evaluation loader makes it: (sample ids (N,), images (N, 3, S, S))."""
    from clipdistill.loaders.loader import ImageLoader, OutputSpec
    from clipdistill.loaders.views import CenterCrop

    loader = ImageLoader(samples, global_batch_size=4, outputs=[OutputSpec("x", size)], transform=CenterCrop(),
                         backend="torch", workers=1, interpolation="bicubic")
    ids, images = [], []
    for batch in loader:
        ids.append(batch.sample_ids[batch.mask])
        images.append(batch.images["x"][batch.mask])
    ids, images = torch.cat(ids), torch.cat(images)
    order = ids.argsort()
    return ids[order], images[order]


def run_cli(*argv) -> int:
    """``clipdistill eval|export|predict ARGV`` through the real command line; the exit code."""
    from clipdistill.engine.cli import main

    return main([str(a) for a in argv])
