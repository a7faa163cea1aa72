"""Per-dataset prompt templates for class vectors, as the prompt-learning papers use them.

The single hand-written template per dataset is the one CoOp, CoCoOp, MaPLe, PromptSRC,
KDPL and PromptKD use for zero-shot CLIP and for text initialization. ``"imagenet_80"`` is
CLIP's 80-template ImageNet ensemble, taken from open_clip rather than copied.
``"imagenet_60"`` is the 60-template set PromptSRC's published code averages for the frozen
text target of its self-regularization: "a photo of a {}." moved to the front of the first 60
of CLIP's 80, the others in CLIP's order.
Every template has exactly one ``{}`` where the class name goes.
"""
from __future__ import annotations

from clipdistill.engine.models.clip import import_open_clip

DATASET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "imagenet": ("a photo of a {}.",),
    "imagenet_v2": ("a photo of a {}.",),
    "imagenet_sketch": ("a photo of a {}.",),
    "imagenet_a": ("a photo of a {}.",),
    "imagenet_r": ("a photo of a {}.",),
    "caltech101": ("a photo of a {}.",),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "stanford_cars": ("a photo of a {}.",),
    "oxford_flowers": ("a photo of a {}, a type of flower.",),
    "food101": ("a photo of {}, a type of food.",),
    "fgvc_aircraft": ("a photo of a {}, a type of aircraft.",),
    "sun397": ("a photo of a {}.",),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "ucf101": ("a photo of a person doing {}.",),
    # class-agnostic vocabularies (KDPL's variant) have no dataset: the generic template
    "generic": ("a photo of a {}.",),
}


def _imagenet_80() -> tuple[str, ...]:
    return tuple(template("{}") for template in import_open_clip().OPENAI_IMAGENET_TEMPLATES)


def _imagenet_60() -> tuple[str, ...]:
    first = "a photo of a {}."
    return (first,) + tuple(t for t in _imagenet_80()[:60] if t != first)


ENSEMBLES = {"imagenet_80": _imagenet_80, "imagenet_60": _imagenet_60}


def templates_for(dataset: str) -> tuple[str, ...]:
    """Templates for ``dataset`` (case and dashes ignored), e.g. ``templates_for("Oxford-Pets")``."""
    key = dataset.lower().replace("-", "_").replace(" ", "_")
    if key in ENSEMBLES:
        return ENSEMBLES[key]()
    if key not in DATASET_TEMPLATES:
        raise KeyError(
            f"no templates for dataset {dataset!r}; known: {sorted(DATASET_TEMPLATES) + sorted(ENSEMBLES)}. "
            f"Pass your own templates (strings with one '{{}}') instead."
        )
    return DATASET_TEMPLATES[key]


def check_templates(templates: tuple[str, ...] | list[str]) -> None:
    """Raise ValueError unless every template has exactly one ``{}``."""
    if not templates:
        raise ValueError("templates is empty")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name; got {bad}")
