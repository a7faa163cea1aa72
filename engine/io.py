"""Small readers every command shares: class names, templates, devices, a model's image spec.

A leaf: it imports only the config schema's error type, the shipped templates and the
shipped vocabulary, never the training loop or a command, so any module may use it.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.templates import check_templates, templates_for
from clipdistill.engine.vocabulary import BUILTIN_PREFIX, builtin_path

# The normalization CLIP was trained with (open_clip's OPENAI_DATASET_MEAN/STD); used when a
# model's image tower records none of its own.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
KDPL_CSV_PREFIX = "kdpl-csv:"  # data.class_names=kdpl-csv:PATH: KDPL's vocabulary CSV
KDPL_CSV_COLUMN = "ClassName"


def _kdpl_csv_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, name) of a KDPL vocabulary CSV: a header row naming a ``ClassName`` column,
    then one row per name (fields may be quoted; other columns are ignored)."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or KDPL_CSV_COLUMN not in [h.strip().lstrip("\ufeff") for h in header]:
            raise ConfigError(f"{what}: {path}: not a KDPL vocabulary CSV (its first row must name a "
                              f"{KDPL_CSV_COLUMN!r} column; found {header!r})")
        column = [h.strip().lstrip("\ufeff") for h in header].index(KDPL_CSV_COLUMN)
        rows = []
        for row in reader:
            line = reader.line_num
            if not row:
                rows.append((line, ""))
            elif len(row) <= column:
                raise ConfigError(f"{what}: {path}: line {line} has no {KDPL_CSV_COLUMN!r} field")
            else:
                rows.append((line, row[column]))
    return rows


def read_class_names(path: str | Path, *, what: str = "data.class_names") -> list[str]:
    """One class name per line; lines starting with ``#`` are comments; empty lines and duplicates
    are errors naming their line numbers (an empty line would shift every later class index).

    ``builtin:imagenet21k`` names the shipped concept vocabulary (see :mod:`.vocabulary`);
    ``kdpl-csv:PATH`` reads KDPL's vocabulary CSV (a ``ClassName`` column under a header row).
    ``what`` names the setting or flag the path came from, for the error messages.
    """
    kdpl_csv = str(path).startswith(KDPL_CSV_PREFIX)
    if kdpl_csv:
        path = str(path)[len(KDPL_CSV_PREFIX):]
    elif str(path).startswith(BUILTIN_PREFIX):
        try:
            path = builtin_path(str(path)[len(BUILTIN_PREFIX):])
        except ValueError as exc:
            raise ConfigError(f"{what}: {exc}") from exc
    path = Path(path)
    if not str(path) or not path.is_file():
        raise ConfigError(f"{what}: class-name file {str(path)!r} does not exist (one class name per line)")
    names, seen, problems = [], {}, []
    lines = (_kdpl_csv_lines(path, what) if kdpl_csv
             else enumerate(path.read_text(encoding="utf-8").splitlines(), 1))
    for lineno, line in lines:
        name = line.strip()
        if name.startswith("#") and not kdpl_csv:
            continue
        if not name:
            problems.append(f"line {lineno} is empty")
            continue
        if name in seen:
            problems.append(f"line {lineno} repeats {name!r} (first on line {seen[name]})")
            continue
        seen[name] = lineno
        names.append(name)
    if problems:
        raise ConfigError(f"{what}: {path}: " + "; ".join(problems[:5])
                          + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    if not names:
        raise ConfigError(f"{what}: {path} holds no class names")
    return names


def read_templates(spec: str, *, what: str = "data.templates") -> list[str]:
    """A shipped template set by name, or a file of templates (one per line, each with "{}")."""
    if os.path.isfile(spec):
        templates = [t.strip() for t in Path(spec).read_text(encoding="utf-8").splitlines() if t.strip()]
    else:
        try:
            templates = list(templates_for(spec))
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{what}: {spec!r} is neither a file nor a shipped template set ({exc})")
    try:
        check_templates(templates)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from exc
    return templates


def resolve_device(spec: str | torch.device | None, *, what: str = "train.device") -> torch.device:
    """``auto`` (or None): CUDA when visible, else the CPU; otherwise the named device, which must exist."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}={str(spec)!r} but no CUDA device is available")
    return device


def image_spec(model: torch.nn.Module) -> tuple[int, tuple, tuple]:
    """(side, mean, std) of a CLIP model's image input, read from its image tower."""
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", None) or {}  # open_clip records it here too
    size = getattr(visual, "image_size", None) or cfg.get("size") or 224
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(getattr(visual, "image_mean", None) or cfg.get("mean") or OPENAI_MEAN)
    std = tuple(getattr(visual, "image_std", None) or cfg.get("std") or OPENAI_STD)
    return size, mean, std
