"""The class-agnostic recipe's default vocabulary: about 20,000 WordNet concept names.

KDPL's class-agnostic variant scores each batch against a large vocabulary and
distills on the teacher's top K concepts. clipdistill ships its own list,
``engine/data/imagenet21k_concepts.txt``, assembled by :func:`build_vocabulary`
from the ImageNet-21k (fall 2011, "imagenet-21k-goog") synset metadata that
timm ships offline: for each of its 21,843 WordNet synsets, in timm's order,
the first lemma of the synset (e.g. "organism" for "organism, being"),
whitespace-normalized; a lemma already taken by an earlier synset
(homonyms such as "queen" or "jack") is skipped, so every name is unique. The
result holds 20,070 names. Run ``python -m clipdistill.engine.vocabulary
--out FILE`` to rebuild it.
"""
from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from clipdistill.engine.models.clip import import_open_clip

DEFAULT_VOCABULARY = "imagenet21k_concepts.txt"
BUILTIN_PREFIX = "builtin:"


def build_vocabulary() -> list[str]:
    """First lemmas of the ImageNet-21k synsets, unique (case-insensitive), in synset order."""
    import_open_clip()  # timm imports torchvision: the CPU compatibility measure must run first
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-21k-goog")
    names, seen = [], set()
    for index in range(info.num_classes()):
        lemma = " ".join(info.index_to_description(index).split(",")[0].split())
        if lemma and lemma.lower() not in seen:
            seen.add(lemma.lower())
            names.append(lemma)
    return names


def builtin_path(name: str) -> Path:
    """Path of a shipped vocabulary (``builtin:imagenet21k`` -> the default list)."""
    files = {"imagenet21k": DEFAULT_VOCABULARY}
    if name not in files:
        raise ValueError(f"unknown built-in vocabulary {name!r}; shipped: {', '.join(sorted(files))}")
    return Path(str(resources.files("clipdistill.engine") / "data" / files[name]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild the default concept vocabulary from timm's metadata.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    names = build_vocabulary()
    args.out.write_text("\n".join(names) + "\n", encoding="utf-8")
    print(f"{len(names)} names -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
