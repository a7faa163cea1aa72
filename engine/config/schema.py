"""Run configuration as data: YAML files, ``key=value`` overrides, one typed schema.

A run's configuration is a tree of dataclasses (the schema). It is read from a
YAML file, updated by dotted command-line overrides (``optim.lr=0.01``), checked
against the schema's types, and then handed to one builder that turns it into
plain constructor arguments: modules never see a config object.

Errors name what was wrong: an unknown key is reported with its full dotted
path and the nearest valid key; a value of the wrong type with the expected
type; a non-finite number (``.nan``, ``.inf``, ``1e400``) as such.

YAML is read by one loader (:func:`parse_yaml`), for files and overrides alike:
PyYAML's safe loader, plus YAML 1.2's numbers without a dot (``1e-3`` and
``1E+3`` are floats; YAML 1.1 reads them as strings), bounded: a file over
:data:`MAX_YAML_BYTES`, or a document whose aliases expand to more than
:data:`MAX_YAML_VALUES` values (a "billion laughs"), is refused before anything
is built from it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")

# A run's config is a few KiB; these bounds only stop hostile or broken input.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what was expected."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads exponent floats without a dot and bounds alias expansion."""

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _check_expansion(root: yaml.Node | None) -> None:
    """Refuse a document whose aliases expand to more than MAX_YAML_VALUES values, or that refers to itself.

    Counts each node once per reference (what building the document would copy), in time
    linear in the distinct nodes.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)] if root is not None else []
    while stack:
        node, done = stack.pop()
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise ConfigError(f"expands to more than {MAX_YAML_VALUES} values through aliases (*name); "
                                  "write the values out")
        elif id(node) not in sizes:
            if id(node) in on_path:
                raise ConfigError("an alias (*name) refers to a node that contains it")
            on_path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)


def parse_yaml(text: str, what: str) -> Any:
    """``text`` read as YAML by the bounded loader; errors are one-line ConfigErrors that begin with ``what``."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{what}: {len(text)} characters, more than a config may hold ({MAX_YAML_BYTES})")
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply to be a config") from None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            raise ConfigError(
                f"{key}: {value!r} is not one of {choices}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float's range
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric pretrained tag
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (sections and leaves)."""
    keys = []
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        keys.append(key)
        if _is_dataclass_type(hints[field.name]):
            keys += valid_keys(hints[field.name], prefix=f"{key}.")
    return keys


def _unknown_key(cls: type, key: str, root: type | None = None) -> ConfigError:
    candidates = valid_keys(root or cls)
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not near:  # try the last component alone against leaf names
        leaf = key.rsplit(".", 1)[-1]
        near = [c for c in candidates if c.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [c.rsplit(".", 1)[-1] for c in candidates], n=1, cutoff=0.6)][:1]
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "", root: type | None = None) -> T:
    """Build the dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    root = root or cls
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, f"{prefix}{key}", root)
        tp = hints[key]
        if _is_dataclass_type(tp) and isinstance(value, Mapping):
            kwargs[key] = from_dict(tp, value, prefix=f"{prefix}{key}.", root=root)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(prefix + m for m in missing)}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (for YAML/JSON dumps and checkpoint metadata)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.01"`` -> ``("optim.lr", 0.01)``; the value is read as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = parse_yaml(raw, f"override {key}") if raw.strip() else ""
    except ConfigError as exc:
        if "not valid YAML" not in str(exc):
            raise  # too large, or a bomb: never taken as a plain string
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: Sequence[str], cls: type) -> dict:
    """Apply dotted ``key=value`` overrides to a plain config mapping, naming unknown keys."""
    out = to_dict(data)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        section_cls = cls
        node = out
        for depth, part in enumerate(parts):
            hints = _hints(section_cls) if _is_dataclass_type(section_cls) else {}
            if part not in hints:
                raise _unknown_key(cls, key)
            if depth == len(parts) - 1:
                node[part] = value
            elif typing.get_origin(hints[part]) in (dict, Mapping) and depth == len(parts) - 2:
                # a free-form mapping (e.g. learner.options): its keys are checked by its owner
                mapping = node.setdefault(part, {})
                if not isinstance(mapping, dict):
                    raise ConfigError(f"{'.'.join(parts[:depth + 1])} is not a mapping")
                mapping[parts[-1]] = value
                break
            else:
                section_cls = hints[part]
                if not _is_dataclass_type(section_cls):
                    raise ConfigError(f"{'.'.join(parts[:depth + 1])} is a value, not a section: cannot set {key!r}")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{'.'.join(parts[:depth + 1])} is not a section")
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size} bytes, more than a config may hold ({MAX_YAML_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """``update`` over ``base``, recursively for nested mappings."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
