"""The run configuration's schema, the shipped recipes and the one builder of a run's parts.

A run is described by :class:`RunConfig`, read from a shipped recipe
(``engine/configs/<recipe>.yaml``), a user's YAML file (which may name its
recipe with ``recipe: kdpl``) and ``key=value`` overrides, in that order.
:func:`load_run_config` checks every key and type (see :mod:`.config`).

The learner's options (``learner.options``) are checked against the chosen
learner's constructor: an unknown option is named with the nearest valid one,
and values are type-checked against its annotations.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from clipdistill.engine.config.schema import (ConfigError, _coerce, apply_overrides, deep_merge, from_dict, load_yaml,
                                              to_dict)
from clipdistill.engine.prompts.registry import LEARNERS

RECIPES = ("kdpl", "kdpl-ca", "promptkd")
LEARNER_KINDS = ("coop", "cocoop", "vpt", "maple", "ivlp", "promptsrc", "promptkd")
# Constructor arguments the builder supplies itself (never user options).
_BUILDER_ARGS = {"self", "clip", "tokenizer", "class_names", "teacher_dim", "templates"}


@dataclass
class ModelConfig:
    """An open_clip model: its name and its weights (a pretrained tag or a local checkpoint path)."""

    name: str
    weights: Optional[str] = None
    precision: Optional[str] = None  # open_clip precision; default bf16 teacher on GPU, fp32 otherwise


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher; with ``cache`` its features come from a teacher cache and no model is loaded."""

    cache: Optional[str] = None  # a folder made by `clipdistill cache-teacher`
    prompts: Optional[str] = None  # a prompt-tuned teacher made by `clipdistill tune-teacher` (PromptKD stage 1)


@dataclass
class LearnerConfig:
    """Which prompt learner the student gets, and its constructor options."""

    kind: Literal["coop", "cocoop", "vpt", "maple", "ivlp", "promptsrc", "promptkd"] = "coop"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Unlabeled images, class names and how views are made."""

    train: str = ""  # folder, list file or tar shard(s) of images
    class_names: str = ""  # a text file, one class name per line; or builtin:imagenet21k (20,070 concepts)
    templates: str = "imagenet"  # a shipped template set name, or a text file of templates with "{}"
    batch_size: int = 32
    backend: Literal["auto", "dali-gpu", "dali-cpu", "torch"] = "auto"
    workers: Optional[int] = None
    min_scale: float = 0.08  # random resized crop's smallest area fraction
    max_scale: float = 1.0
    flip: bool = True
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    precheck: bool = True
    holdout_fraction: float = 0.0  # unlabeled images held out for model selection (never trained on)


@dataclass
class LossConfig:
    """kd_loss's options; null takes the recipe's published value."""

    temperature: Optional[float] = None
    forward_weight: Optional[float] = None
    reverse_weight: Optional[float] = None
    reduction: Optional[Literal["batchmean", "mean", "sum"]] = None
    temperature_squared: Optional[bool] = None
    kd_weight: float = 1.0
    promptsrc_weights: Optional[dict[str, float]] = None
    top_k: Optional[int] = None  # class-agnostic KDPL: distill on the teacher's top K vocabulary names per batch
    backend: Literal["auto", "triton", "torch"] = "auto"


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    warmup_lr: Optional[float] = 1e-5  # constant lr during warm-up (CoOp/KDPL); null: linear ramp from 0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_accum: int = 1
    clip_grad_norm: Optional[float] = None


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    log_every: int = 10  # steps between host synchronizations (metrics, progress, non-finite check)
    checkpoint_every: int = 100
    keep_last: int = 3
    out_dir: str = "runs/clipdistill"
    resume: bool = False
    overwrite: bool = False  # a new run in an out_dir holding another run: move that run to out_dir/previous/
    progress: bool = True
    tensorboard: bool = False
    class_vector_cache: Optional[str] = None  # default: <out_dir>/class_vectors
    select_metric: Literal["kl", "agreement"] = "kl"  # held-out teacher-student metric for best.safetensors
    deepspeed: Optional[str] = None  # a DeepSpeed JSON config (ZeRO-3): shard the teacher (see engine/distributed.py)


@dataclass
class RunConfig:
    method: Literal["kdpl", "promptkd"]
    teacher: TeacherConfig
    student: ModelConfig
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.method == "promptkd" and self.learner.kind != "promptkd":
            raise ConfigError(f"method 'promptkd' needs learner.kind=promptkd, got {self.learner.kind!r}")
        if self.method == "kdpl" and self.learner.kind == "promptkd":
            raise ConfigError("method 'kdpl' takes learner.kind coop, cocoop, vpt, maple, ivlp or promptsrc")
        positive = {"data.batch_size": self.data.batch_size, "train.epochs": self.train.epochs,
                    "train.log_every": self.train.log_every, "train.checkpoint_every": self.train.checkpoint_every,
                    "train.keep_last": self.train.keep_last, "optim.grad_accum": self.optim.grad_accum}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if self.train.max_steps is not None and self.train.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.train.max_steps}")
        if self.loss.top_k is not None:
            if self.method != "kdpl":
                raise ConfigError(f"loss.top_k (class-agnostic selection) needs method 'kdpl', got {self.method!r}")
            if self.loss.top_k < 1:
                raise ConfigError(f"loss.top_k must be >= 1, got {self.loss.top_k}")
        if not 0 < self.data.min_scale <= self.data.max_scale <= 1:
            raise ConfigError(f"data.min_scale/max_scale must satisfy 0 < min <= max <= 1, "
                              f"got {self.data.min_scale}, {self.data.max_scale}")
        if not 0 <= self.data.holdout_fraction < 1:
            raise ConfigError(f"data.holdout_fraction must be in [0, 1), got {self.data.holdout_fraction}")
        if self.teacher.cache and self.teacher.prompts:
            raise ConfigError("teacher.cache and teacher.prompts exclude each other: a cache built from a tuned "
                              "teacher already holds its features")
        if self.teacher.cache and self.data.holdout_fraction > 0:
            raise ConfigError("data.holdout_fraction needs the live teacher (held-out images are not in the "
                              "teacher cache); unset teacher.cache or data.holdout_fraction")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if self.optim.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}")
        learner_options(self.learner.kind, self.learner.options)  # names and types


def learner_class(kind: str) -> type:
    if kind not in LEARNERS:
        raise ConfigError(f"learner.kind {kind!r} is unknown; choose from {sorted(LEARNERS)}")
    return LEARNERS[kind]


def learner_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check ``options`` against the learner's constructor; return them type-checked."""
    cls = learner_class(kind)
    signature = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    allowed = [name for name in signature.parameters if name not in _BUILDER_ARGS]
    checked = {}
    for name, value in options.items():
        if name not in allowed:
            near = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean 'learner.options.{near[0]}'?" if near else f"; valid: {', '.join(allowed)}"
            raise ConfigError(f"unknown config key 'learner.options.{name}' for learner {kind!r}{hint}")
        checked[name] = _coerce(value, hints.get(name, Any), f"learner.options.{name}")
    return checked


def recipe_path(name: str) -> Path:
    if name not in RECIPES:
        near = difflib.get_close_matches(name, RECIPES, n=1)
        raise ConfigError(f"unknown recipe {name!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                          + f" (shipped: {', '.join(RECIPES)})")
    return Path(str(resources.files("clipdistill.engine") / "config" / "recipes" / f"{name}.yaml"))


def load_run_config(
    config: str | Path | dict | None = None,
    overrides: Sequence[str] = (),
    *,
    recipe: str | None = None,
) -> RunConfig:
    """Recipe defaults, then the config file (or mapping), then ``key=value`` overrides.

    The recipe comes from ``recipe``, else the file's own ``recipe:`` key, else the
    ``method=`` override. Errors name the key that is wrong.
    """
    data: dict = {}
    if isinstance(config, dict):
        data = dict(config)
    elif config is not None:
        data = load_yaml(config)
    recipe = recipe or data.pop("recipe", None)
    data.pop("recipe", None)
    if recipe is None:
        for text in overrides:
            if text.startswith("method="):
                recipe = text.split("=", 1)[1].strip()
    base = load_yaml(recipe_path(recipe)) if recipe else {}
    user = apply_overrides(data, list(overrides), RunConfig)
    base_kind = base.get("learner", {}).get("kind")
    user_kind = user.get("learner", {}).get("kind")
    if user_kind is not None and user_kind != base_kind and "learner" in base:
        # The recipe's learner options belong to its own learner, not to the one chosen instead.
        base["learner"] = {k: v for k, v in base["learner"].items() if k != "options"}
    merged = deep_merge(base, user)
    if "method" not in merged:
        raise ConfigError("no method: name a recipe (--recipe kdpl|promptkd, 'recipe:' in the file, "
                          "or method=...)")
    cfg = from_dict(RunConfig, merged)
    cfg.learner.options = learner_options(cfg.learner.kind, cfg.learner.options)
    return cfg


def dump_run_config(cfg: RunConfig) -> dict:
    return to_dict(cfg)


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config mappings."""
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


__all__ = [
    "RunConfig", "ModelConfig", "TeacherConfig", "LearnerConfig", "DataConfig", "LossConfig", "OptimConfig", "TrainConfig",
    "load_run_config", "learner_options", "recipe_path", "dump_run_config", "config_differences", "RECIPES",
]
_ = dataclasses  # re-exported helpers above rely on dataclasses at import time
