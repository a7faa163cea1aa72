"""The run configuration (engine/config/schema.py, run.py): errors name the key and suggest the nearest one."""
from __future__ import annotations

import pytest

from clipdistill.engine.config import ConfigError
from clipdistill.engine.config.run import load_run_config


def test_config_errors_name_the_key(shape_data, tiny_run_config, tmp_path):
    good = tiny_run_config(shape_data, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'"):
        load_run_config(good, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian\.epochs'; did you mean 'train\.epochs'"):
        load_run_config(good, ["trian.epochs=2"])
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got 'fast'"):
        load_run_config(good, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"learner\.options\.n_ctxx.*did you mean 'learner\.options\.n_ctx'"):
        load_run_config(good, ["learner.options.n_ctxx=3"])
    with pytest.raises(ConfigError, match=r"data\.backend: 'dali' is not one of"):
        load_run_config(good, ["data.backend=dali"])
    with pytest.raises(ConfigError, match=r"train\.epochs must be >= 1"):
        load_run_config(good, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"unknown recipe 'kdp'; did you mean 'kdpl'"):
        load_run_config({**good, "recipe": "kdp"})
    with pytest.raises(ConfigError, match="needs learner.kind=promptkd"):
        load_run_config(good, ["method=promptkd"])
