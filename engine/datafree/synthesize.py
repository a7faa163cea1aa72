"""``clipdistill synthesize``: a folder of surrogate images from class names and diversified prompts.

Output folder layout (an ordinary image folder: ``clipdistill.loaders`` reads ``OUT`` or
``OUT/images`` as a folder source, and the manifest gives each file's class)::

    OUT/synthesis.json        the plan: teacher, classes, diversifier, generator, seeds, steps
    OUT/styles.safetensors    the style bank (per_class styles, shared by all classes)
    OUT/manifest.jsonl        one JSON line per finished image
    OUT/images/<cccc>-<slug>/<cccc>-<jjjjj>.png

Image ``j`` of class ``c`` uses style ``j`` of the bank: the prompt is "a [style j] style of a
[c]". Work is ordered round-robin (style 0 for every class, then style 1, ...), so a run cut short
still covers every class evenly.

Each manifest line holds ``path`` (relative to OUT), ``class_index``, ``class``, ``prompt`` (the
readable prompt, the style shown by its description), ``style_index``, ``style_seed``,
``image_seed`` and ``similarity`` (the teacher's cosine similarity of the finished image to its
prompt).

Resuming (running the same command again) is exact and never duplicates: an image is identified
by (class, style index) and has one fixed path. An image is written first under a hidden
temporary name and renamed into place, then its manifest line is appended and the file fsynced,
once per batch. On start the manifest is read: a torn last line (a crash mid-write) is dropped,
lines whose image is missing are dropped, repeated keys keep their first line; the cleaned
manifest is rewritten, and only the remaining (class, style) pairs are generated. An image file
without a manifest line (a crash between the rename and the append) is regenerated over itself.
A plan that differs from the folder's ``synthesis.json`` is refused: use a new folder.

Reproducibility: styles, each image's initialization and each image's cutouts come from seeds
derived from ``seed``, so an image does not depend on the other images of its batch (up to the
floating-point differences of batched kernels: bit-identical with the same batch composition,
the default on an uninterrupted run). The generator defaults to ``"vqgan"`` (the paper's), which
needs decoder weights (``vqgan``); ``"fourier"`` needs none.
Concurrent runs into one folder are not supported.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from clipdistill.engine.datafree.diversify import StyleBank, StyledPrompts, build_diversifier
from clipdistill.engine.datafree.generators import (CUTOUT_AUGMENTS, DEFAULT_AUGMENT, DEFAULT_GENERATOR,
                                                    VQGAN_WEIGHTS_NEEDED, build_generator, teacher_input_spec)
from clipdistill.engine.models.clip import build_teacher
from clipdistill.engine.models.towers import TextTower

log = logging.getLogger(__name__)

PLAN_FILE = "synthesis.json"
STYLES_FILE = "styles.safetensors"
MANIFEST_FILE = "manifest.jsonl"
IMAGES_DIR = "images"
PLAN_FORMAT = "clipdistill-synthesis/1"
IMAGE_SEED_TAG = 0x1A6E  # see diversify.STYLE_SEED_TAG
# What a plan written before per-image cutouts (no "augment" key) made: one crop box per step shared
# by the batch, flip and noise. Such a set still reads and trains; it cannot be resumed.
LEGACY_AUGMENT = "batch-shared-crops"


@dataclass(frozen=True)
class SynthesisPlan:
    """Everything that determines a synthetic set; stored as ``synthesis.json`` and compared on resume."""

    teacher: str
    teacher_weights: Optional[str]
    class_names: tuple[str, ...]
    diversifier: str = "contrastive"
    generator: str = DEFAULT_GENERATOR  # "vqgan": needs ``vqgan`` (weights) unless a generator is passed
    per_class: int = 10
    seed: int = 0
    steps: int = 100
    image_size: Optional[int] = None  # None: the teacher's input side
    n_cutouts: int = 16
    augment: str = DEFAULT_AUGMENT  # the cutouts' augmentations (generators.CUTOUT_AUGMENTS)
    lr: Optional[float] = None  # None: the generator's default
    n_style_tokens: int = 1
    contrastive_steps: int = 50
    vqgan: Optional[str] = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        return {"format": PLAN_FORMAT, **data}

    @classmethod
    def from_json(cls, data: dict) -> "SynthesisPlan":
        data = {k: v for k, v in data.items() if k != "format"}
        data.setdefault("augment", LEGACY_AUGMENT)
        data["class_names"] = tuple(data["class_names"])
        return cls(**data)

    def style_key(self) -> dict:
        """What the style bank depends on."""
        keys = ("teacher", "teacher_weights", "class_names", "diversifier", "per_class", "seed",
                "n_style_tokens", "contrastive_steps")
        return {k: self.to_json()[k] for k in keys}


@dataclass
class SynthesisResult:
    out_dir: Path
    total: int
    existing: int
    generated: int
    complete: bool
    dropped: dict = field(default_factory=dict)


def image_seed(seed: int, class_index: int, style_index: int) -> int:
    return int(np.random.SeedSequence([int(seed), IMAGE_SEED_TAG, int(class_index), int(style_index)]).generate_state(1)[0] & 0x7FFFFFFF)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "class"


def image_relpath(class_index: int, class_name: str, style_index: int) -> str:
    folder = f"{class_index:04d}-{_slug(class_name)}"
    return f"{IMAGES_DIR}/{folder}/{class_index:04d}-{style_index:05d}.png"


def read_manifest(path: Union[str, Path]) -> list[dict]:
    """The manifest's complete lines (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # torn by a crash mid-write
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def _clean_manifest(out_dir: Path) -> tuple[list[dict], dict]:
    """Read, drop torn/orphan/duplicate lines, rewrite if anything changed; (entries, counts)."""
    path = out_dir / MANIFEST_FILE
    raw = path.read_text(encoding="utf-8") if path.is_file() else ""
    entries = read_manifest(path)
    kept, seen = [], set()
    dropped = {"missing_image": 0, "duplicate": 0, "torn": 0}
    n_lines = raw.count("\n") + (0 if raw.endswith("\n") or not raw else 1)
    dropped["torn"] = n_lines - len(entries)
    for entry in entries:
        key = (entry["class_index"], entry["style_index"])
        if key in seen:
            dropped["duplicate"] += 1
        elif not (out_dir / entry["path"]).is_file():
            dropped["missing_image"] += 1
        else:
            seen.add(key)
            kept.append(entry)
    if any(dropped.values()):
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
        os.replace(tmp, path)
        log.warning("synthesize: cleaned the manifest (%s)", dropped)
    return kept, dropped


def _save_png(image, path: Path) -> None:
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _check_plan(out_dir: Path, plan: SynthesisPlan) -> None:
    plan_path = out_dir / PLAN_FILE
    if plan_path.is_file():
        stored = json.loads(plan_path.read_text(encoding="utf-8"))
        if "augment" not in stored:
            raise ValueError(
                f"{out_dir} was made by an earlier clipdistill whose cutouts were shared by the batch; "
                f"its images still read and train, but it cannot be resumed with today's per-image "
                f"cutouts: choose a new --out folder"
            )
        if stored != plan.to_json():
            diff = sorted(k for k in set(stored) | set(plan.to_json()) if stored.get(k) != plan.to_json().get(k))
            raise ValueError(
                f"{out_dir} holds a synthetic set made with other settings (differs in {diff}); "
                f"rerun with the same settings to resume it, or choose a new --out folder"
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = plan_path.with_name(plan_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(plan.to_json(), indent=1), encoding="utf-8")
        os.replace(tmp, plan_path)


def build_style_bank(plan: SynthesisPlan, teacher, tokenizer, out_dir: Optional[Path] = None):
    """The plan's style bank, from ``OUT/styles.safetensors`` when it was made for this plan."""
    key = plan.style_key()
    path = None if out_dir is None else out_dir / STYLES_FILE
    if path is not None and path.is_file():
        return StyleBank.load(path, key)
    tower = TextTower.of(teacher.model)
    diversifier = build_diversifier(
        plan.diversifier, tower, tokenizer, plan.class_names,
        n_style_tokens=plan.n_style_tokens, contrastive_steps=plan.contrastive_steps,
    )
    bank = diversifier.styles(plan.per_class, plan.seed)
    if path is not None:
        bank.save(path, key)
    return bank


def synthesize(
    plan: SynthesisPlan,
    out_dir: Union[str, Path],
    teacher,
    tokenizer,
    *,
    batch_size: int = 8,
    generator=None,
    limit: Optional[int] = None,
    progress: bool = True,
) -> SynthesisResult:
    """Make (or finish) the synthetic set described by ``plan`` in ``out_dir``.

    Args:
        plan: the settings (see :class:`SynthesisPlan`).
        out_dir: the output folder; an existing one made with the same plan is resumed.
        teacher: the frozen :class:`~clipdistill.engine.models.Teacher` named by ``plan.teacher``.
        tokenizer: its tokenizer.
        batch_size: images optimized together.
        generator: an :class:`~clipdistill.engine.datafree.generators.ImageGenerator` to use
            instead of building ``plan.generator`` (e.g. a preloaded VQGAN).
        limit: make at most this many new images, then stop (resumable; for time-limited jobs).
        progress: show a progress bar.
    """
    if plan.per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {plan.per_class}")
    if plan.augment not in CUTOUT_AUGMENTS:
        raise ValueError(f"unknown cutout augmentation {plan.augment!r}; choose one of {sorted(CUTOUT_AUGMENTS)}")
    if generator is None and plan.generator == "vqgan" and plan.vqgan is None:
        raise ValueError(VQGAN_WEIGHTS_NEEDED)  # before anything is written or computed
    out_dir = Path(out_dir)
    _check_plan(out_dir, plan)
    entries, dropped = _clean_manifest(out_dir)
    done = {(e["class_index"], e["style_index"]) for e in entries}
    n_classes = len(plan.class_names)
    pending = [(c, j) for j in range(plan.per_class) for c in range(n_classes) if (c, j) not in done]
    total = n_classes * plan.per_class
    if limit is not None:
        pending = pending[: max(0, limit)]
    if not pending:
        return SynthesisResult(out_dir, total, len(done), 0, len(done) == total, dropped)

    bank = build_style_bank(plan, teacher, tokenizer, out_dir)
    tower = TextTower.of(teacher.model)
    prompts = StyledPrompts(tower, tokenizer, plan.class_names, n_style_tokens=plan.n_style_tokens)
    side, _, _ = teacher_input_spec(teacher)
    image_size = plan.image_size or side
    device = teacher.model.logit_scale.device
    if generator is None:
        generator = build_generator(plan.generator, image_size, vqgan=plan.vqgan, device=device)

    generated = 0
    with open(out_dir / MANIFEST_FILE, "a", encoding="utf-8") as manifest, tqdm(
        total=total, initial=len(done), disable=not progress, unit="img", desc=f"synthesize {plan.diversifier}/{plan.generator}"
    ) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            classes = torch.tensor([c for c, _ in batch])
            styles = torch.tensor([j for _, j in batch])
            with torch.no_grad():
                targets = prompts.encode_pairs(bank.embeddings[styles], classes)
            seeds = [image_seed(plan.seed, c, j) for c, j in batch]
            images, similarity = generator.generate(
                teacher, targets, seeds, steps=plan.steps, lr=plan.lr, n_cutouts=plan.n_cutouts,
                augment=plan.augment,
            )
            lines = []
            for row, (c, j) in enumerate(batch):
                rel = image_relpath(c, plan.class_names[c], j)
                _save_png(images[row], out_dir / rel)
                lines.append({
                    "path": rel, "class_index": c, "class": plan.class_names[c],
                    "prompt": prompts.text(c, f"<{bank.descriptions[j]}>"), "style_index": j,
                    "style_seed": bank.seeds[j], "image_seed": seeds[row],
                    "similarity": round(float(similarity[row]), 6),
                })
            manifest.write("".join(json.dumps(line) + "\n" for line in lines))
            manifest.flush()
            os.fsync(manifest.fileno())
            generated += len(batch)
            bar.update(len(batch))
    finished = len(done) + generated
    return SynthesisResult(out_dir, total, len(done), generated, finished == total, dropped)


# ----------------------------------------------------------------------------- teacher


RANDOM_TEACHER_SEED = 0


def load_teacher(name: str, weights: Optional[str], device, *, precision: Optional[str] = None):
    """The frozen teacher; a random-init one (``weights=None``, for smoke tests) is built from a
    fixed seed so that ``synthesize``, the data-free run, its teacher cache and the evaluation all
    see the same one."""
    if weights is not None:
        return build_teacher(name, weights, device=device, precision=precision)
    log.warning("teacher %s has random weights (no --teacher-weights): fine for smoke tests only", name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TEACHER_SEED)
        return build_teacher(name, None, device=device, precision=precision)
