"""A run's image sources: a synthetic set's manifest or any loader source, and what a data-free run
takes from its synthetic set. The training run (:mod:`.builder`) and the teacher cache
(:mod:`.teacher_cache`) read their images here, so both see the same list.
"""
from __future__ import annotations

import copy
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
    saved = Path(lists) / f"{key.replace('.', '_')}-synthetic.txt"
    if resuming and saved.is_file():
        return SampleList.load(saved)
    samples = (synthetic or read_synthetic_set(path, what=key)).samples
    samples.save(saved)
    return samples


def datafree_config(cfg: RunConfig, log: Callable[[str], None]) -> tuple[RunConfig, Optional[SyntheticSet]]:
    """The data-free run's config and its synthetic set (None when data.train is another source).

    The set's plan names the teacher it was made with; unless the user set ``teacher.name`` or
    ``teacher.weights``, that teacher is the run's (the recipe's default is only a default). Class
    names come from the plan unless ``data.class_names`` is set; another source needs them.
    """
    if not is_synthetic_set(cfg.data.train):
        if not cfg.data.class_names:
            raise ConfigError(f"data.train={cfg.data.train!r} is not a synthetic set (clipdistill synthesize "
                              f"makes one): give its class names in data.class_names, or train on a synthetic set")
        return cfg, None
    synthetic = read_synthetic_set(cfg.data.train, what="data.train")
    plan = synthetic.plan
    made_with = (plan.teacher, plan.teacher_weights)
    if (cfg.teacher.name, cfg.teacher.weights) != made_with:
        explicit = cfg.explicit_keys
        if explicit is not None and not explicit & {"teacher.name", "teacher.weights"}:
            explicit_keys = explicit
            cfg = copy.deepcopy(cfg)
            cfg.teacher.name, cfg.teacher.weights = made_with
            cfg.explicit_keys = explicit_keys
            log(f"clipdistill: teacher {plan.teacher} ({plan.teacher_weights}), the one data.train was synthesized "
                f"with (set teacher.name / teacher.weights to distill from another)")
        else:
            log(f"clipdistill: WARNING: data.train was synthesized with teacher {plan.teacher} "
                f"({plan.teacher_weights}); distilling from {cfg.teacher.name} ({cfg.teacher.weights})")
    return cfg, synthetic
