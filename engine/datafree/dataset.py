"""A synthetic set (made by ``clipdistill synthesize``) as a training source and as a torch Dataset.

:func:`read_synthetic_set`: the manifest's images as the engine loader's
:class:`~clipdistill.loaders.sources.SampleList` (only the images the manifest lists: a style bank
or a half-written image of an interrupted synthesis is never trained on), with the class each image
was made for and the plan (teacher, class names). ``clipdistill distill --recipe datafree`` reads
``data.train`` and ``data.heldout`` with it.

:class:`SyntheticImages`: the same images as a small torch Dataset for the diversity report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from clipdistill.engine.datafree.synthesize import MANIFEST_FILE, PLAN_FILE, SynthesisPlan, read_manifest
from clipdistill.loaders.sources import SampleList


def is_synthetic_set(path: Union[str, Path]) -> bool:
    """``path`` is a folder made by ``clipdistill synthesize`` (it holds the plan file)."""
    return (Path(path) / PLAN_FILE).is_file()


@dataclass
class SyntheticSet:
    """A synthetic set's images (in manifest order), the class each was made for, and its plan."""

    root: Path
    plan: SynthesisPlan
    samples: SampleList
    labels: np.ndarray  # (N,) int64 class index of each image

    @property
    def class_names(self) -> list[str]:
        return list(self.plan.class_names)


def read_synthetic_set(root: Union[str, Path], *, what: str = "data.train") -> SyntheticSet:
    """The set in folder ``root``; an unreadable plan or an empty manifest is refused in one line
    naming ``what``."""
    root = Path(root)
    try:
        plan = SynthesisPlan.from_json(json.loads((root / PLAN_FILE).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}={str(root)!r} is not a synthetic set (no {PLAN_FILE}); make one with "
                                f"clipdistill synthesize") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{what}: {root / PLAN_FILE} cannot be read as a synthesis plan ({exc})") from exc
    entries = read_manifest(root / MANIFEST_FILE)
    if not entries:
        raise ValueError(f"{what}: {root / MANIFEST_FILE} lists no images yet (is clipdistill synthesize "
                         f"still running, or was it stopped before the first batch?)")
    # One entry per image (a resumed synthesis rewrites the manifest without repeats; a set copied
    # mid-run may still hold one). A listed file that is gone or corrupt is the loader's to skip and count.
    first: dict[str, dict] = {}
    for entry in entries:
        first.setdefault(str(entry["path"]), entry)
    entries = list(first.values())
    paths = list(first)
    labels = np.asarray([int(e["class_index"]) for e in entries], dtype=np.int64)
    return SyntheticSet(root=root, plan=plan, samples=SampleList(root=str(root.resolve()), paths=paths),
                        labels=labels)


class SyntheticImages(torch.utils.data.Dataset):
    """``dataset[i]`` -> (image (3, H, W) float32 in [0, 1], intended class index)."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        plan_path = self.root / PLAN_FILE
        if not plan_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a synthetic set (no {PLAN_FILE}); make one with clipdistill synthesize")
        self.plan = SynthesisPlan.from_json(json.loads(plan_path.read_text(encoding="utf-8")))
        self.entries = read_manifest(self.root / MANIFEST_FILE)
        if not self.entries:
            raise ValueError(f"{self.root / MANIFEST_FILE} lists no images yet")
        self.labels = torch.tensor([e["class_index"] for e in self.entries])

    @property
    def class_names(self) -> list[str]:
        return list(self.plan.class_names)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        entry = self.entries[index]
        with Image.open(self.root / entry["path"]) as image:
            array = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy
        return torch.from_numpy(array).permute(2, 0, 1).float().div(255), int(entry["class_index"])
