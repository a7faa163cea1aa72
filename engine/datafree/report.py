"""Diversity report: how spread out the teacher sees each synthetic set.

For a set of N images with teacher image features x_i (normalized, images resized to the teacher's
input side) and intended classes y_i:

    per_class[c] = mean over pairs i < j with y_i = y_j = c of (1 - <x_i, x_j>)
    overall      = mean over all pairs i < j of (1 - <x_i, x_j>)
    mean_per_class = mean over classes with >= 2 images of per_class[c]

Higher is more diverse. ``overall`` also counts pairs across classes, so it mixes style diversity
with class separation; ``mean_per_class`` is the within-class (style) diversity the prompt
diversifiers aim at. Several sets (one per diversifier, say) go into one report: a JSON file and a
PNG with a box plot of the per-class values and the overall values side by side.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from clipdistill.engine.datafree.dataset import SyntheticImages
from clipdistill.engine.datafree.generators import resize_to, teacher_image_features, teacher_input_spec

log = logging.getLogger(__name__)


def pairwise_cosine_distance(features: torch.Tensor) -> float:
    """Mean of 1 - cos over the pairs i < j of features (N, D) normalized; NaN when N < 2."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    sims = features.double() @ features.double().t()
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return float((1.0 - sims[upper]).mean())


def diversity(features: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """features (N, D) normalized, labels (N,) -> {"per_class", "mean_per_class", "overall", "n_images"}."""
    per_class = {}
    for c, name in enumerate(class_names):
        rows = features[labels == c]
        if rows.shape[0] >= 2:
            per_class[name] = pairwise_cosine_distance(rows)
    values = list(per_class.values())
    return {
        "per_class": per_class,
        "mean_per_class": sum(values) / len(values) if values else float("nan"),
        "overall": pairwise_cosine_distance(features),
        "n_images": int(features.shape[0]),
    }


@torch.no_grad()
def teacher_features_of(dataset, teacher, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) normalized teacher features of every image in a SyntheticImages, and labels (N,)."""
    side, _, _ = teacher_input_spec(teacher)
    device = teacher.model.logit_scale.device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    features, labels = [], []
    for images, classes in loader:
        features.append(teacher_image_features(teacher, resize_to(images.to(device), side)).cpu())
        labels.append(classes)
    return torch.cat(features), torch.cat(labels)


def _label(dataset, taken: set) -> str:
    label = f"{dataset.plan.diversifier}/{dataset.plan.generator}"
    if label in taken:
        label = f"{label} ({dataset.root.name})"
    taken.add(label)
    return label


def diversity_report(
    folders: Sequence[Union[str, Path]],
    teacher,
    *,
    out_json: Union[str, Path],
    out_png: Optional[Union[str, Path]] = None,
    batch_size: int = 64,
) -> dict:
    """Measure each synthetic set in ``folders`` with ``teacher``; write the JSON (and the plot)."""
    report = {"metric": "mean pairwise cosine distance of the teacher's image features", "sets": {}}
    taken: set = set()
    for folder in folders:
        dataset = SyntheticImages(folder)
        features, labels = teacher_features_of(dataset, teacher, batch_size)
        entry = diversity(features, labels, dataset.class_names)
        entry["folder"] = str(Path(folder))
        entry["diversifier"] = dataset.plan.diversifier
        entry["generator"] = dataset.plan.generator
        report["sets"][_label(dataset, taken)] = entry
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    report["plot"] = str(out_png) if out_png is not None and plot_report(report, out_png) else None
    out_json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def plot_report(report: dict, out_png: Union[str, Path]) -> bool:
    """Box plot of per-class diversity and bars of overall diversity per set; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("diversity report: matplotlib is missing (pip install 'clipdistill[plots]'); no plot written")
        return False
    labels = list(report["sets"])
    per_class = [list(report["sets"][k]["per_class"].values()) or [float("nan")] for k in labels]
    overall = [report["sets"][k]["overall"] for k in labels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(labels), 4), constrained_layout=True)
    left.boxplot(per_class)
    left.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right")
    left.set_title("within class")
    left.set_ylabel("mean pairwise cosine distance")
    right.bar(range(len(labels)), overall, color="tab:blue")
    right.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    right.set_title("overall")
    fig.suptitle("Teacher-feature diversity of synthetic sets")
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return True
