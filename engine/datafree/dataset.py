"""A synthetic set as a torch Dataset: the manifest's images with the class each was made for.

The images are ordinary files (``clipdistill.loaders`` can read the folder as a source); this
small reader exists because the data-free student also needs the intended class of each image
(for reporting how often teacher and student agree with it) and the plan the set was made with
(teacher and class names), which only the manifest and ``synthesis.json`` hold.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from clipdistill.engine.datafree.synthesize import MANIFEST_FILE, PLAN_FILE, SynthesisPlan, read_manifest


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
