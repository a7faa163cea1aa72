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
from typing import Any, ClassVar, Literal, Optional, Sequence

from clipdistill.engine.config.schema import (ConfigError, _coerce, apply_overrides, deep_merge, from_dict, load_yaml,
                                              to_dict)
from clipdistill.engine.datafree.student import KIND as DATAFREE_KIND
from clipdistill.engine.datafree.student import TimmStudent
from clipdistill.engine.prompts.registry import LEARNERS

RECIPES = ("kdpl", "kdpl-ca", "promptkd", "promptkd-xd", "datafree")
LEARNER_KINDS = ("coop", "cocoop", "vpt", "maple", "ivlp", "promptsrc", "promptkd", DATAFREE_KIND)
# Constructor arguments the builder supplies itself (never user options).
_BUILDER_ARGS = {"self", "clip", "tokenizer", "class_names", "teacher_dim", "templates", "prompt_placement",
                 "backbone", "logit_scale"}
# A recipe's own keys that are not run settings: read by load_run_config, never part of a RunConfig.
# ``extends``: another shipped recipe this one starts from; ``learner_presets``: per learner kind, the
# settings its paper published (applied under the user's own settings); ``dataset_presets``: per
# ``data.dataset``, the same (e.g. PromptKD's kd_weight table).
_RECIPE_KEYS = ("extends", "learner_presets", "dataset_presets")
# Keys a checkpoint written before they existed lacks, and the behaviour that code had (where it is
# not the key's default today). Every other absent key reads as its default.
LEGACY_VALUES: dict[str, Any] = {
    "learner.prompt_placement": "after_ln_pre",  # vision prompts went in after ln_pre until this key came
    "learner.gpa": False,  # distill did not aggregate PromptSRC's prompts
    "learner.frozen_templates": None,  # PromptSRC's frozen text target was data.templates
}


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

    # timm: the data-free recipe's student, a timm network (student.name) trained whole, not a prompt learner
    kind: Literal["coop", "cocoop", "vpt", "maple", "ivlp", "promptsrc", "promptkd", "timm"] = "coop"
    options: dict[str, Any] = field(default_factory=dict)
    # Where vision prompts (VPT, MaPLe, IVLP/PromptSRC, PromptKD's student) join the image tokens:
    # before the vision tower's ln_pre, as the published code does, or after it (this engine's
    # placement before the key existed, kept to reproduce runs made then).
    prompt_placement: Literal["before_ln_pre", "after_ln_pre"] = "before_ln_pre"
    # PromptSRC: the frozen text target of its self-regularization, a template set or file (the
    # published code: the 60 ImageNet templates); null: data.templates.
    frozen_templates: Optional[str] = "imagenet_60"
    # PromptSRC: Gaussian prompt aggregation over epochs; the aggregate is the run's result. The mean is
    # a fraction of the run's epochs, the std in epochs: 0.75 and 1 are the published 15 and 1 at 20
    # epochs, and keep averaging a few neighbouring epochs in a short run.
    gpa: bool = True
    gpa_mean: float = 0.75
    gpa_std: float = 1.0


@dataclass
class DataConfig:
    """Unlabeled images, class names and how views are made."""

    train: str = ""  # folder, list file or tar shard(s) of images
    # a text file, one class name per line; builtin:imagenet21k (20,070 concepts); or kdpl-csv:PATH (KDPL's
    # vocabulary CSV, a ClassName column)
    class_names: str = ""
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
    # A separate held-out image source for model selection (e.g. a second synthetic set), instead of a fraction
    heldout: Optional[str] = None
    # Few-shot distillation: ``shots`` images per class drawn (seeded by shot_seed) from data.train, a
    # folder with one subfolder of images per class (the labels are never used, only the layout).
    shots: Optional[int] = None
    shot_seed: int = 1
    # Base-to-novel: train on the first half of the classes (rounded up), as CoOp/KDPL split them.
    # Needs class subfolders in data.train; the class names become the base half.
    base_classes_only: bool = False
    dataset: Optional[str] = None  # a dataset key (e.g. dtd, fgvc_aircraft) selecting a recipe's dataset_presets


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
    # data-free: weight of mean(1 - cos(student, teacher image feature)) added to the KL (0: none)
    feature_weight: float = 0.0
    backend: Literal["auto", "triton", "torch"] = "auto"


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    warmup_epochs: int = 0  # warm-up in epochs (the papers' unit); exclusive with warmup_steps
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
    # Dotted keys the user set (file or overrides), as load_run_config saw them; not part of the config.
    # None (a config built otherwise): unknown, every key counts as set.
    explicit_keys: ClassVar[Optional[frozenset]] = None

    method: Literal["kdpl", "promptkd", "datafree"]
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
        if self.method == "kdpl" and self.learner.kind in ("promptkd", DATAFREE_KIND):
            raise ConfigError("method 'kdpl' takes learner.kind coop, cocoop, vpt, maple, ivlp or promptsrc")
        if (self.method == "datafree") != (self.learner.kind == DATAFREE_KIND):
            raise ConfigError(f"method 'datafree' and learner.kind={DATAFREE_KIND} go together (a timm student "
                              f"named by student.name), got method {self.method!r} with learner.kind "
                              f"{self.learner.kind!r}")
        if self.method == "datafree":
            ignored = {"data.shots": self.data.shots is not None,
                       "data.base_classes_only": self.data.base_classes_only,
                       "student.precision": self.student.precision is not None}
            for key, is_set in ignored.items():
                if is_set:
                    raise ConfigError(f"{key} does not apply to the data-free recipe (a synthetic set's images, a "
                                      f"timm student trained in float32 with train.precision's autocast): unset it")
            size = self.learner.options.get("image_size")
            if isinstance(size, int) and size < 8:  # another type: the options' type check names it
                raise ConfigError(f"learner.options.image_size must be >= 8 (the student's input side), got {size}")
        if self.loss.feature_weight < 0 or (self.loss.feature_weight and self.method != "datafree"):
            raise ConfigError(f"loss.feature_weight must be >= 0 and belongs to method 'datafree', got "
                              f"{self.loss.feature_weight} with method {self.method!r}")
        if self.data.heldout and self.data.holdout_fraction > 0:
            raise ConfigError("data.heldout (a held-out source) and data.holdout_fraction (a share of data.train) "
                              "both set: choose one")
        if self.data.heldout and self.teacher.cache:
            raise ConfigError("data.heldout needs the live teacher (held-out images are not in the teacher "
                              "cache); unset teacher.cache or data.heldout")
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
        if self.optim.warmup_steps < 0 or self.optim.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_steps and optim.warmup_epochs must be >= 0, got "
                              f"{self.optim.warmup_steps}, {self.optim.warmup_epochs}")
        if self.optim.warmup_steps and self.optim.warmup_epochs:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} and optim.warmup_epochs="
                              f"{self.optim.warmup_epochs} both set: give the warm-up in one unit")
        if self.data.shots is not None and self.data.shots < 1:
            raise ConfigError(f"data.shots must be >= 1 or null, got {self.data.shots}")
        if (self.data.shots is not None or self.data.base_classes_only) and self.loss.top_k is not None:
            raise ConfigError("data.shots / data.base_classes_only need a labeled folder's classes; the "
                              "class-agnostic recipe (loss.top_k) has none")
        if (self.data.shots is not None or self.data.base_classes_only) and self.teacher.cache:
            raise ConfigError("data.shots / data.base_classes_only choose images and classes that a teacher cache "
                              "was not built for; unset teacher.cache")
        if self.learner.gpa_std <= 0 or not 0 < self.learner.gpa_mean <= 1:
            raise ConfigError(f"learner.gpa_mean (a fraction of the run's epochs, in (0, 1]; 0.75 of 20 epochs is "
                              f"PromptSRC's epoch 15) and learner.gpa_std (epochs, > 0): got "
                              f"{self.learner.gpa_mean}, {self.learner.gpa_std}")
        learner_options(self.learner.kind, self.learner.options)  # names and types


def learner_class(kind: str) -> type:
    if kind == DATAFREE_KIND:
        return TimmStudent
    if kind not in LEARNERS:
        raise ConfigError(f"learner.kind {kind!r} is unknown; choose from {sorted([*LEARNERS, DATAFREE_KIND])}")
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


def _read_recipe(name: str, seen: tuple[str, ...] = ()) -> dict:
    """A shipped recipe's mapping, with the recipe it ``extends`` merged under it."""
    if name in seen:
        raise ConfigError(f"recipe {name!r} extends itself (through {' -> '.join(seen)})")
    data = load_yaml(recipe_path(name))
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return deep_merge(_read_recipe(str(parent), seen + (name,)), data)


def _leaf_keys(data: Any, prefix: str = "") -> set[str]:
    """Dotted keys of every value (not section) in a nested mapping."""
    if not isinstance(data, dict):
        return {prefix.rstrip(".")}
    out: set[str] = set()
    for key, value in data.items():
        out |= _leaf_keys(value, f"{prefix}{key}.")
    return out


def _preset(presets: Any, key: Optional[str], what: str) -> dict:
    if key is None or not isinstance(presets, dict):
        return {}
    preset = presets.get(str(key).lower().replace("-", "_"), {})
    if not isinstance(preset, dict):
        raise ConfigError(f"recipe {what} preset for {key!r} is not a mapping")
    return preset


def load_run_config(
    config: str | Path | dict | None = None,
    overrides: Sequence[str] = (),
    *,
    recipe: str | None = None,
) -> RunConfig:
    """Recipe defaults, then the config file (or mapping), then ``key=value`` overrides.

    The recipe comes from ``recipe``, else the file's own ``recipe:`` key, else the
    ``method=`` override. Between the recipe and the user's settings come the recipe's
    presets: ``learner_presets[learner.kind]`` (the chosen learner's published batch size,
    epochs, learning rate and options) and ``dataset_presets[data.dataset]``; whatever the
    user sets wins over both. An explicit ``optim.warmup_steps`` replaces the recipe's
    warm-up in epochs. Errors name the key that is wrong. The keys the user set are kept
    in ``cfg.explicit_keys`` (a resumed run takes the others from its checkpoint).
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
    base = _read_recipe(recipe) if recipe else {}
    learner_presets, dataset_presets = base.pop("learner_presets", None), base.pop("dataset_presets", None)
    user = apply_overrides(data, list(overrides), RunConfig)
    explicit = _leaf_keys(user)
    base_kind = base.get("learner", {}).get("kind")
    user_kind = user.get("learner", {}).get("kind")
    if user_kind is not None and user_kind != base_kind and "learner" in base:
        # The recipe's learner options belong to its own learner, not to the one chosen instead.
        base["learner"] = {k: v for k, v in base["learner"].items() if k != "options"}
    base = deep_merge(base, _preset(learner_presets, user_kind or base_kind, "learner"))
    dataset = user.get("data", {}).get("dataset", base.get("data", {}).get("dataset"))
    base = deep_merge(base, _preset(dataset_presets, dataset, "dataset"))
    if "optim.warmup_steps" in explicit and "optim.warmup_epochs" not in explicit:
        base.setdefault("optim", {})["warmup_epochs"] = 0
    merged = deep_merge(base, user)
    if "method" not in merged:
        raise ConfigError(f"no method: name a recipe (--recipe {'|'.join(RECIPES)}, 'recipe:' in the file, "
                          "or method=...)")
    cfg = from_dict(RunConfig, merged)
    cfg.learner.options = learner_options(cfg.learner.kind, cfg.learner.options)
    cfg.explicit_keys = frozenset(explicit)
    return cfg


def _schema_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default of every leaf the schema gives a default."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name]):
            out.update(_schema_defaults(hints[f.name], f"{key}."))
        elif f.default is not dataclasses.MISSING:
            out[key] = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[key] = to_dict(f.default_factory())
    return out


def _get(tree: dict, key: str, missing: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def with_absent_keys(saved: dict) -> dict:
    """A saved config (checkpoint, export) with the keys it predates filled in.

    A key the saving code did not know reads as the behaviour that code had: its
    :data:`LEGACY_VALUES` entry, else today's default. So a checkpoint written before a key
    existed compares equal on ``--resume`` and rebuilds as it was trained.
    """
    out = to_dict(saved)
    missing = object()
    for key, default in _schema_defaults(RunConfig).items():
        if _get(out, key, missing) is missing and isinstance(_get(out, key.rsplit(".", 1)[0], {}), dict):
            _set(out, key, LEGACY_VALUES.get(key, default))
    return out


# Keys a resumed run never takes from its checkpoint: they say how this invocation runs (where the
# folder is now, whether it resumes or overwrites, progress output, the sharding of this machine's
# teacher, the cache folder), not what the run is.
RESUME_NEVER_TAKEN = ("train.resume", "train.overwrite", "train.out_dir", "train.progress", "train.deepspeed",
                      "train.class_vector_cache")


def resume_config(cfg: RunConfig, saved: dict) -> tuple[RunConfig, list[str]]:
    """The config a resumed run continues with: ``cfg``, but every key the user did not set
    (``cfg.explicit_keys``) and that differs from the checkpoint's ``saved`` config is taken from
    the checkpoint, so changed recipe defaults (presets, warm-up, placement) never change or block
    a run started before them. The keys of :data:`RESUME_NEVER_TAKEN` stay as this invocation has
    them. Returns the config and the keys taken; keys the user did set and that differ are left for
    the resume check to refuse."""
    explicit = cfg.explicit_keys
    if explicit is None:
        return cfg, []
    saved = with_absent_keys(saved)
    now = dump_run_config(cfg)
    missing = object()
    taken = []
    for key in config_differences(saved, now):
        if key in RESUME_NEVER_TAKEN or any(key == e or key.startswith(e + ".") for e in explicit):
            continue
        if key.startswith("learner.options.") and saved["learner"].get("kind") != now["learner"]["kind"]:
            continue  # options of another learner: the resume check names learner.kind
        value = _get(saved, key, missing)
        if value is missing:  # an option the saved run did not have
            *parents, leaf = key.split(".")
            _get(now, ".".join(parents)).pop(leaf, None)
        else:
            _set(now, key, value)
        taken.append(key)
    if not taken:
        return cfg, []
    resumed = from_dict(RunConfig, now)
    resumed.learner.options = learner_options(resumed.learner.kind, resumed.learner.options)
    resumed.explicit_keys = explicit
    return resumed, taken


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
    "LEGACY_VALUES", "with_absent_keys", "resume_config",
]
_ = dataclasses  # re-exported helpers above rely on dataclasses at import time
