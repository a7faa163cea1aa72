"""Reading YAML configs and overrides: numbers as YAML 1.2 reads them, non-finite numbers refused,
hostile documents refused fast with one line naming the file (issue 18, items 3, 5 and 9)."""
from __future__ import annotations

import time

import pytest

from clipdistill.engine.config import ConfigError
from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.config.schema import MAX_YAML_BYTES, parse_override

BILLION_LAUGHS = "\n".join(
    [f"{chr(97)}: &a [{', '.join(['lol'] * 9)}]"]
    + [f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]" for i in range(1, 9)]
) + "\n"


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("5e-4", 0.0005), (".5", 0.5), ("1E+3", 1000.0),
                                         ("-2.5e-2", -0.025), ("3", 3), ("[1e-3, 2]", [0.001, 2])])
def test_overrides_read_exponent_numbers_as_numbers(text, value):
    key, got = parse_override(f"optim.lr={text}")
    assert key == "optim.lr" and got == value and type(got) is type(value)


def test_exponent_numbers_in_yaml_files_and_overrides_reach_the_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: kdpl\noptim:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    cfg = load_run_config(str(path), ["optim.warmup_lr=2e-6"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_lr) == (0.001, 0.0005, 2e-6)


@pytest.mark.parametrize("override, key", [("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
                                           ("optim.lr=1e400", "optim.lr"), ("optim.momentum=-.inf", "optim.momentum"),
                                           ("optim.betas=[0.9, .nan]", r"optim.betas\[1\]"),
                                           ("loss.kd_weight=" + "9" * 400, "loss.kd_weight")])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number"):
        load_run_config(None, [override], recipe="kdpl")


def test_non_finite_numbers_in_a_yaml_file_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: kdpl\noptim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected a finite number, got nan$"):
        load_run_config(str(path), [])


def test_a_billion_laughs_config_fails_fast_with_one_line_naming_the_file(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_run_config(str(path), ["optim.lr=1e-3"], recipe="kdpl")
    assert time.perf_counter() - started < 1.0
    message = str(err.value)
    assert message.startswith(f"{path}: expands to more than") and "\n" not in message
    # the same document as an override value, and a document that contains itself
    with pytest.raises(ConfigError, match="^override learner.options: expands to more than"):
        parse_override("learner.options=" + "{" + BILLION_LAUGHS.replace("\n", ", ").rstrip(", ") + "}")
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="refers to a node that contains it"):
        load_run_config(str(path), [])


def test_small_aliases_oversized_files_deep_nesting_and_bad_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: kdpl\nx: &lr 0.01\noptim: {lr: *lr}\n")
    with pytest.raises(ConfigError, match="unknown config key 'x'"):  # aliases within bounds still work
        load_run_config(str(path), [])
    path.write_text("recipe: kdpl\n# " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}: \d+ bytes, more than a config may hold"):
        load_run_config(str(path), [])
    path.write_text("[" * 20000)
    with pytest.raises(ConfigError, match=rf"^{path}: nested too deeply"):
        load_run_config(str(path), [])
    path.write_text("optim: {lr: 0.1\n  bad: [\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(str(path), [])
    assert str(err.value).startswith(f"{path}: not valid YAML (") and "\n" not in str(err.value)
