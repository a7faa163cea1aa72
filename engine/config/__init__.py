"""Configuration is data at one boundary: the run schema, YAML with overrides, shipped recipes and models.

- :mod:`.schema`: typed dataclass configs from dicts, ``key=value`` overrides, errors that name
  the key and suggest the nearest valid one.
- :mod:`.run`: the training run's config (teacher, student, learner, data, loss, optim, train)
  and the shipped recipes in ``recipes/*.yaml``.
- ``models/*.json``: the tiny open_clip model configs registered by
  :func:`clipdistill.engine.models.import_open_clip`.

The names below are the old ``clipdistill.engine.config`` module's, re-exported.
"""
from clipdistill.engine.config.schema import (ConfigError, apply_overrides, deep_merge, from_dict, load_yaml,
                                              parse_override, to_dict, valid_keys)

__all__ = ["ConfigError", "apply_overrides", "deep_merge", "from_dict", "load_yaml", "parse_override", "to_dict",
           "valid_keys"]
