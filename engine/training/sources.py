"""A run's image sources: a synthetic set's manifest or any loader source, and what a data-free run
takes from its synthetic set. The training run (:mod:`.builder`) and the teacher cache
(:mod:`.teacher_cache`) read their images here, so both see the same list.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Callable, Optional

from clipdistill.engine.config.run import RunConfig
from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.datafree.dataset import SyntheticSet, is_synthetic_set, read_synthetic_set
from clipdistill.loaders.sources import SampleList, resolve_source


def image_source(path: str, key: str, *, lists: str, resuming: bool,
                 synthetic: Optional[SyntheticSet] = None) -> SampleList:
    """The images of ``path`` (config key ``key``): a synthetic set's manifest, or any loader source.

    A synthetic set's list is saved under ``lists`` when a run starts and read back when it
    resumes, so a set that grew since (synthesis still running) does not change a resumed run's
    images; any other source is :func:`resolve_source`'s (which saves and revalidates its lists).
    """
    if synthetic is None and not is_synthetic_set(path):
        return resolve_source(path, cache_dir=lists, keep_saved=resuming)
    where = hashlib.sha1(str(Path(path).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    saved = Path(lists) / f"{key.replace('.', '_')}-synthetic-{where}.txt"  # one list per set
    if resuming and saved.is_file():
        return SampleList.load(saved)
    samples = (synthetic or read_synthetic_set(path, what=key)).samples
    samples.save(saved)
    return samples


def datafree_config(cfg: RunConfig, log: Callable[[str], None]) -> tuple[RunConfig, Optional[SyntheticSet]]:
    """The data-free run's config and its synthetic set (None when data.train is another source).

    The set's plan names the teacher it was made with; what the user did not set of ``teacher.name``
    and ``teacher.weights`` comes from it (the recipe's teacher is only a default): neither set, the
    set's teacher; the weights alone, other weights of the set's teacher; the set's teacher named
    alone, its weights. Class names come from the plan unless ``data.class_names`` is set; another
    source needs them.
    """
    if not is_synthetic_set(cfg.data.train):
        if not cfg.data.class_names:
            raise ConfigError(f"data.train={cfg.data.train!r} is not a synthetic set (clipdistill synthesize "
                              f"makes one): give its class names in data.class_names, or train on a synthetic set")
        return cfg, None
    synthetic = read_synthetic_set(cfg.data.train, what="data.train")
    plan = synthetic.plan
    explicit = cfg.explicit_keys
    name_set = explicit is None or "teacher.name" in explicit
    weights_set = explicit is None or "teacher.weights" in explicit
    name = cfg.teacher.name if name_set else plan.teacher
    if weights_set:
        weights = cfg.teacher.weights  # alone: other weights of the set's teacher
    elif name == plan.teacher:
        weights = plan.teacher_weights
    else:
        weights = cfg.teacher.weights  # another teacher named without weights: the recipe's tag
    if (name, weights) != (cfg.teacher.name, cfg.teacher.weights):
        cfg = copy.deepcopy(cfg)
        cfg.teacher.name, cfg.teacher.weights = name, weights
        cfg.explicit_keys = explicit
    if (name, weights) == (plan.teacher, plan.teacher_weights):
        if not (name_set and weights_set):
            log(f"clipdistill: teacher {name} ({weights}), the one data.train was synthesized with (set "
                f"teacher.name / teacher.weights to distill from another)")
    else:
        log(f"clipdistill: WARNING: data.train was synthesized with teacher {plan.teacher} ({plan.teacher_weights}); "
            f"distilling from {name} ({weights})")
    return cfg, synthetic
