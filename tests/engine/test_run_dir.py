"""Runs and checkpoints under hostile use (issue 18, items 2, 3 and 9): a run identity per out_dir,
refusal of a second run, --overwrite, run-scoped pruning, --resume past a corrupt checkpoint and in
a moved folder, and no checkpoint written from non-finite state (tiny models, CPU).

Each test is written from the reproduction named in its docstring.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clipdistill.engine.config import ConfigError
from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.training import checkpoint as ckpt
from clipdistill.engine.training.builder import build_run
from clipdistill.engine.training.run_dir import RUN_FILE, read_identity
from clipdistill.engine.training.trainer import NonFiniteLossError, Trainer, distill


def _fit(cfg: dict, logs: list | None = None) -> Trainer:
    log = (lambda m: None) if logs is None else logs.append
    trainer = Trainer(build_run(load_run_config(cfg), log=log), log=log)
    trainer.fit()
    return trainer


def _steps_and_runs(folder: Path) -> list[tuple[int, str | None]]:
    return [(s, ckpt.read_checkpoint_run_id(p)) for s, p in ckpt.list_checkpoints(folder)]


def test_a_second_run_is_refused_and_overwrite_moves_the_first_aside(shape_data, tiny_run_config, tmp_path):
    """Reproduction: a 6-step run (checkpoints 2, 4, 6) then a 2-step run into the same out_dir pruned the
    second run's own step-2 checkpoint, exited 0, and a later --resume continued the first run."""
    first = _fit(tiny_run_config(shape_data, tmp_path, train={"max_steps": 6, "checkpoint_every": 2,
                                                              "keep_last": 2}))
    first_id = first.identity.run_id
    assert read_identity(tmp_path).run_id == first_id
    assert _steps_and_runs(tmp_path / "checkpoints") == [(4, first_id), (6, first_id)]
    before = {p.name: p.read_bytes() for _, p in ckpt.list_checkpoints(tmp_path / "checkpoints")}

    second = tiny_run_config(shape_data, tmp_path, train={"max_steps": 2, "checkpoint_every": 2, "keep_last": 2})
    with pytest.raises(ConfigError, match=rf"already holds run {first_id} .*--resume.*--overwrite"):
        distill(load_run_config(second), log=lambda m: None)  # refused before anything is built
    with pytest.raises(ConfigError, match=r"train\.out_dir '.*a_file/run' cannot be written \(Not a directory\)"):
        (tmp_path / "a_file").write_text("")
        distill(load_run_config({**second, "train": {**second["train"], "out_dir": str(tmp_path / "a_file" / "run")}}),
                log=lambda m: None)
    assert {p.name: p.read_bytes() for _, p in ckpt.list_checkpoints(tmp_path / "checkpoints")} == before

    logs: list[str] = []
    replaced = _fit({**second, "train": {**second["train"], "overwrite": True, "checkpoint_every": 1,
                                         "keep_last": 1}}, logs)
    new_id = replaced.identity.run_id
    assert new_id != first_id and read_identity(tmp_path).run_id == new_id
    # The new run's newest checkpoint survives its own pruning; the old run is whole, elsewhere.
    assert _steps_and_runs(tmp_path / "checkpoints") == [(2, new_id)]
    previous = tmp_path / "previous" / first_id
    assert any(f"moved to {previous}" in m for m in logs), logs
    assert {p.name: p.read_bytes() for _, p in ckpt.list_checkpoints(previous / "checkpoints")} == before
    assert json.loads((previous / RUN_FILE).read_text())["run_id"] == first_id
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["step"] for x in (previous / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_resume_falls_back_past_a_corrupt_checkpoint_in_a_moved_folder(shape_data, tiny_run_config, tmp_path):
    """Reproduction: a garbled latest checkpoint made --resume end in a CheckpointError traceback; a moved
    run folder was refused ("train.out_dir differ")."""
    sections = {"max_steps": 4, "checkpoint_every": 1, "keep_last": 4}
    full = _fit(tiny_run_config(shape_data, tmp_path / "full", train=sections))
    expected = {k: v.detach().clone() for k, v in full.run.step.trainable_parameters().items()}

    _fit(tiny_run_config(shape_data, tmp_path / "here", train=sections))
    latest = ckpt.checkpoint_path(tmp_path / "here" / "checkpoints", 4)
    raw = bytearray(latest.read_bytes())
    for i in range(1, 9):  # the tensor bytes garbled: only the header's checksum can tell
        raw[-i] ^= 0xFF
    latest.write_bytes(bytes(raw))
    ckpt.checkpoint_path(tmp_path / "here" / "checkpoints", 3).write_bytes(raw[:100])  # and step 3 truncated
    shutil.move(tmp_path / "here", tmp_path / "moved")

    logs: list[str] = []
    resumed = _fit(tiny_run_config(shape_data, tmp_path / "moved", train={**sections, "resume": True}), logs)
    notes = [m for m in logs if "--resume:" in m]
    assert len(notes) == 2 and "step-000000004.safetensors' is corrupt" in notes[0], logs
    assert "step-000000003.safetensors' is unreadable" in notes[1] and "set aside as" in notes[1]
    assert any("resumed from" in m and "step-000000002" in m for m in logs), logs
    assert resumed.global_step == 4
    for key, value in expected.items():  # exactly where the uninterrupted run ends
        assert torch.equal(resumed.run.step.trainable_parameters()[key], value), key
    folder = tmp_path / "moved" / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.corrupt")) == ["step-000000003.safetensors.corrupt",
                                                                "step-000000004.safetensors.corrupt"]
    run_id = read_identity(tmp_path / "moved").run_id
    assert _steps_and_runs(folder) == [(s, run_id) for s in (1, 2, 3, 4)]


def test_resume_falls_back_past_a_latest_checkpoint_whose_header_is_torn(shape_data, tiny_run_config, tmp_path):
    """Review finding: the config --resume adopts was read from the latest checkpoint's header before the
    trainer's fallback ran, so a torn header ended the command (exit 2) instead of falling back."""
    sections = {"max_steps": 3, "checkpoint_every": 1, "keep_last": 3}
    full = _fit(tiny_run_config(shape_data, tmp_path / "full", train=sections))
    expected = {k: v.detach().clone() for k, v in full.run.step.trainable_parameters().items()}
    _fit(tiny_run_config(shape_data, tmp_path / "run", train=sections))
    latest = ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 3)
    latest.write_bytes(latest.read_bytes()[:100])  # the header itself cut short

    logs: list[str] = []
    resumed = _fit(tiny_run_config(shape_data, tmp_path / "run", train={**sections, "resume": True}), logs)
    assert any("step-000000003.safetensors' is unreadable" in m and "set aside as" in m for m in logs), logs
    assert any("resumed from" in m and "step-000000002" in m for m in logs), logs
    assert resumed.global_step == 3
    for key, value in expected.items():
        assert torch.equal(resumed.run.step.trainable_parameters()[key], value), key


def test_resume_continues_only_the_run_recorded_in_out_dir(shape_data, tiny_run_config, tmp_path):
    """A checkpoint of another run that lands in the folder (copied in, newer step) is never resumed."""
    _fit(tiny_run_config(shape_data, tmp_path / "a", train={"max_steps": 2, "checkpoint_every": 1}))
    _fit(tiny_run_config(shape_data, tmp_path / "b", train={"max_steps": 3, "checkpoint_every": 1}))
    shutil.copy(ckpt.checkpoint_path(tmp_path / "b" / "checkpoints", 3), tmp_path / "a" / "checkpoints")
    logs: list[str] = []
    _fit(tiny_run_config(shape_data, tmp_path / "a", train={"max_steps": 3, "checkpoint_every": 1,
                                                            "resume": True}), logs)
    assert any("resumed from" in m and "step-000000002" in m for m in logs), logs


def test_no_checkpoint_is_written_from_non_finite_parameters(shape_data, tiny_run_config, tmp_path):
    """Reproduction: with optim.lr 3.0e+38 the stop message named step 2's checkpoint as intact, but its
    prompts were inf/NaN: only the loss was checked."""
    cfg = tiny_run_config(shape_data, tmp_path, optim={"lr": 3.0e38},  # step 0 warms up at 1e-5
                          train={"max_steps": 6, "checkpoint_every": 1, "log_every": 3})
    trainer = Trainer(build_run(load_run_config(cfg), log=lambda m: None), log=lambda m: None)
    with pytest.raises(NonFiniteLossError, match=r"non-finite trainable tensors or optimizer state after step 2 "
                                                 r".*/step-000000001\.safetensors, is intact and finite"):
        trainer.fit()
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in saved] == [1]
    state = ckpt.load_checkpoint(saved[0][1])
    assert all(torch.isfinite(v).all() for v in state["learner"].values())


def _distill_cli(*argv) -> int:
    """``clipdistill distill ARGV`` in this process, through the real command line; the exit code."""
    from clipdistill.engine.cli import main

    return main(["distill", *map(str, argv)])


def test_cli_errors_are_one_line(shape_data, tiny_run_config, tmp_path, capsys):
    """A refused out_dir, a folder that cannot be written (reproduction: NotADirectoryError traceback from
    the class-vector cache), --resume with --overwrite, and lr = 1e300 (reproduction: RuntimeError
    "value cannot be converted to type float without overflow" mid-step) end with exit 2 and one line."""
    import yaml

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps({"format": "clipdistill-run/1", "run_id": "other"}))
    (tmp_path / "a_file").write_text("")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(shape_data, tmp_path / "run")))
    for overrides, message in (
        ([], "already holds run other (run.json); continue it with --resume"),
        ([f"train.out_dir={tmp_path / 'a_file' / 'run'}"], "train.out_dir"),
        (["--overwrite", "--resume"], "--resume and --overwrite exclude each other"),
        ([f"train.out_dir={tmp_path / 'lr'}", "optim.lr=1.0e+300"], "learning rate 1e+300 is out of range"),
    ):
        assert _distill_cli("--config", config, *overrides) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("clipdistill distill: error: ") and message in err[-1], err
