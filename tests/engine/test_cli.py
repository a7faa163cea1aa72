"""The command line as a whole: inputs checked before any model is built, one-line errors with
documented exit codes, logging, progress switches, one spelling per concept (old ones hidden but
working), --print-config, and `clipdistill plot`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clipdistill.engine.cli import build_parser, main
from clipdistill.engine.commands import common
from clipdistill.engine.config.run import dump_run_config, load_run_config
from clipdistill.engine.models import clip
from clipdistill.engine.progress import progress_bar, set_progress
from clipdistill.engine.training.trainer import NonFiniteLossError


@pytest.fixture
def no_models(monkeypatch, forbid):
    """Building any open_clip model (or loading any weights) fails the test."""
    open_clip = clip.import_open_clip()

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    for name in ("create_model", "create_model_and_transforms", "create_model_from_pretrained"):
        monkeypatch.setattr(open_clip, name, refuse)
    forbid(clip.load_clip, "a model was built")


@pytest.fixture(autouse=True)
def _progress_back_on():
    yield
    set_progress(True)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_distill_with_a_missing_data_path_exits_2_before_any_model(no_models, capsys):
    assert main(["distill", "--recipe", "kdpl-ca", "data.train=/nonexistent"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("clipdistill distill: error: data.train: ") and "/nonexistent" in lines[0]


@pytest.mark.parametrize("override, key", [
    ("data.class_names={missing}/names.txt", "data.class_names"),
    ("teacher.weights={missing}/teacher.safetensors", "teacher.weights"),
    ("student.name=ViT-Q-99", "student.name"),
    ("student.weights=not-a-tag", "student.weights"),
    ("teacher.prompts={missing}/tuned.safetensors", "teacher.prompts"),
    ("train.out_dir={data}/classes.txt", "train.out_dir"),
    ("data.train={missing}/shards-{{000..003}}.tar", "data.train"),
])
def test_distill_names_the_bad_key_before_any_model(no_models, capsys, shape_data, tiny_run_config, tmp_path,
                                                     override, key):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(shape_data, tmp_path / "out")))
    override = override.format(missing=tmp_path / "missing", data=shape_data)
    assert main(["distill", "--config", str(config), override]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"clipdistill distill: error: {key}: "), lines


def test_other_commands_check_their_inputs_before_any_model(no_models, capsys, shape_data, tmp_path):
    missing = str(tmp_path / "missing")
    cases = [
        (["tune-teacher", "--teacher", clip.TINY_TEACHER, "--data", missing, "--out", str(tmp_path / "t.safetensors")],
         "--data"),
        (["tune-teacher", "--teacher", clip.TINY_TEACHER, "--teacher-weights", missing + ".pt", "--data",
          str(shape_data / "images"), "--out", str(tmp_path / "t.safetensors")], "--teacher-weights"),
        (["eval", "--data", str(shape_data / "images"), "--class-names", missing], "--class-names"),
        (["eval", "--checkpoint", missing, "--data", str(shape_data / "images")], "--checkpoint"),
        (["export", "--checkpoint", missing, "--out", str(tmp_path / "e.safetensors")], "--checkpoint"),
        (["predict", str(shape_data / "images"), "--checkpoint", missing], "--checkpoint"),
        (["predict", missing, "--checkpoint", str(shape_data / "classes.txt")], "IMAGES"),
        (["cache-teacher", "--recipe", "kdpl", f"data.train={missing}", "--views", "2", "--out-dir",
          str(tmp_path / "c")], "data.train"),
        (["synthesize", "--class-names", missing, "--out-dir", str(tmp_path / "s"), "--generator", "fourier"],
         "--class-names"),
        (["distill-datafree", "--data", missing, "--out-dir", str(tmp_path / "d")], "--data"),
        (["demo", "--out-dir", str(shape_data / "classes.txt")], "--out-dir"),
        (["plot", missing], "RUN_DIR"),
        (["index", missing, "--out", str(tmp_path / "x.list")], missing),
    ]
    for argv, key in cases:
        assert main(argv) == 2, argv
        lines = _error_lines(capsys)
        assert len(lines) == 1 and key in lines[0] and "error" in lines[0], (argv, lines)


def test_errors_become_one_line_and_documented_exit_codes(monkeypatch, capsys):
    def failing(error):
        def command(args):
            raise error
        return command

    for error, code in ((RuntimeError("CUDA out of memory\nTried to allocate"), 1), (ValueError("bad"), 2),
                        (FileNotFoundError("gone"), 2), (NonFiniteLossError("non-finite loss at step 3"), 3),
                        (KeyboardInterrupt(), 130)):
        monkeypatch.setattr("clipdistill.engine.commands.plot._cmd_plot", failing(error))
        assert main(["plot", "run"]) == code
        lines = _error_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith("clipdistill plot: error: "), lines
        assert "\n" not in lines[0] and ("Traceback" in lines[0]) is False
    assert lines[0] == "clipdistill plot: error: interrupted"
    monkeypatch.setattr("clipdistill.engine.commands.plot._cmd_plot", failing(RuntimeError("boom")))
    assert main(["plot", "run"]) == 1
    assert _error_lines(capsys) == ["clipdistill plot: error: RuntimeError: boom (-v or --debug: the traceback)"]
    for flag in ("-v", "--debug"):
        assert main(["plot", "run", flag]) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.rstrip().endswith("RuntimeError: boom")


def test_print_config_prints_the_resolved_config_and_builds_nothing(no_models, capsys, tmp_path):
    assert main(["distill", "--recipe", "kdpl-ca", "optim.lr=0.5", "--print-config", "--out-dir", "runs/x",
                 "optim.momentum=0.5"]) == 0  # overrides on both sides of a flag
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed["optim"]["lr"] == 0.5 and printed["optim"]["momentum"] == 0.5
    assert printed["train"]["out_dir"] == "runs/x"
    with pytest.raises(SystemExit):
        main(["plot", "run", "stray=1"])  # only a command with overrides takes key=value
    assert printed["data"]["class_names"] == "builtin:imagenet21k" and printed["loss"]["top_k"] == 1000
    (tmp_path / "printed.yaml").write_text(text)
    expected = dump_run_config(load_run_config(None, ["optim.lr=0.5", "optim.momentum=0.5", "train.out_dir=runs/x"],
                                               recipe="kdpl-ca"))
    assert dump_run_config(load_run_config(tmp_path / "printed.yaml")) == expected


def test_every_command_takes_the_common_options_and_shows_defaults(capsys):
    parser = build_parser()
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    assert {"distill", "demo", "eval", "export", "predict", "plot", "tune-teacher", "cache-teacher", "index",
            "synthesize", "distill-datafree", "datafree-eval", "datafree-report", "info"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        for flag in ("--no-progress", "-v, --verbose", "-q, --quiet", "--debug"):
            assert flag in text, (name, flag)
    distill_help = commands["distill"].format_help()
    assert "kdpl-ca" in distill_help and "--print-config" in distill_help
    tune_help = " ".join(commands["tune-teacher"].format_help().split())
    assert "--epochs EPOCHS (default: 20)" in tune_help  # a flag without help text shows its default too
    assert "(default: demo_out)" in " ".join(commands["demo"].format_help().split())
    # before or after the command's name
    assert parser.parse_args(["-v", "--no-progress", "plot", "r"]).verbose == 1
    args = parser.parse_args(["plot", "r", "-vv", "--no-progress"])
    assert args.verbose == 2 and args.no_progress and not args.quiet


def test_old_spellings_still_work_hidden_from_help(capsys):
    parser = build_parser()
    cases = [
        (["tune-teacher", "--teacher", "t", "--weights", "w.pt", "--data", "d", "--out", "o"], "teacher_weights", "w.pt"),
        (["eval", "--distilled", "c.safetensors"], "checkpoint", "c.safetensors"),
        (["predict", "img", "--model", "e.safetensors"], "checkpoint", "e.safetensors"),
        (["synthesize", "--classes", "c.txt", "--out-dir", "o"], "class_names", "c.txt"),
        (["synthesize", "--class-names", "c.txt", "--out", "o"], "out_dir", "o"),
        (["demo", "--out", "d"], "out_dir", "d"),
        (["cache-teacher", "--views", "2", "--out", "c"], "out_dir", "c"),
        (["distill-datafree", "--data", "s", "--out", "o"], "out_dir", "o"),
    ]
    for argv, dest, value in cases:
        args = parser.parse_args(argv)
        assert getattr(args, dest) == value, argv
        old = next(a for a in argv if a in ("--weights", "--distilled", "--model", "--classes", "--out"))
        assert [note.split()[0] for note in common.old_spelling_notes(args)] == [old], argv
    args = parser.parse_args(["export", "ckpt.safetensors", "--out", "e.safetensors"])  # the old positional form
    assert common.checkpoint_arg(args) == "ckpt.safetensors"
    assert common.checkpoint_arg(parser.parse_args(["export", "--checkpoint", "c", "--out", "e"])) == "c"
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    for name, old in (("tune-teacher", "--weights"), ("eval", "--distilled"), ("predict", "--model"),
                      ("synthesize", "--classes"), ("demo", "--out ")):
        assert old not in commands[name].format_help(), (name, old)
    # a required flag is still required under either spelling
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "img"])
    assert "--checkpoint" in capsys.readouterr().err


def test_an_old_spelling_runs_and_says_what_it_is_now(capsys, tmp_path):
    assert main(["eval", "--distilled", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "warning: --distilled is now --checkpoint" in err and "error: --checkpoint:" in err


def test_hf_hub_names_reach_open_clip_unchanged(monkeypatch):
    open_clip = clip.import_open_clip()
    seen = {}
    monkeypatch.setattr(open_clip, "create_model",
                        lambda name, **kw: seen.setdefault("model", (name, kw)) and torch.nn.Identity())
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name, **kw: seen.setdefault("tokenizer", name))
    clip.load_clip("hf-hub:timm/ViT-B-16-SigLIP", None)
    assert seen["model"][0] == "hf-hub:timm/ViT-B-16-SigLIP" and seen["model"][1]["pretrained"] is None
    clip.get_tokenizer("hf-hub:timm/ViT-B-16-SigLIP")
    assert seen["tokenizer"] == "hf-hub:timm/ViT-B-16-SigLIP"
    clip.check_model("hf-hub:org/repo")
    with pytest.raises(ValueError, match="brings its own weights"):
        clip.check_model("hf-hub:org/repo", "openai")  # open_clip would silently ignore the tag
    with pytest.raises(ValueError, match="names nothing"):
        clip.check_model("hf-hub:")
    assert clip._check_model_name("ViT-B/32") == "ViT-B-32"  # OpenAI's spelling still maps


def test_logging_goes_through_one_format_at_the_chosen_level(capsys):
    try:
        common.configure_logging(0)
        logging.getLogger("clipdistill.loaders").info("scanned 3 samples")
        logging.getLogger("clipdistill.kernels.kd_loss").debug("tile sizes")
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")  # open_clip's
        logging.warning("something else from a library")
        logging.getLogger("clipdistill.loaders").warning("skipped 2 files")
        assert capsys.readouterr().err.splitlines() == [
            "scanned 3 samples", "warning: something else from a library", "warning: skipped 2 files"]
        common.configure_logging(-1)
        logging.getLogger("clipdistill.loaders").info("scanned 3 samples")
        assert capsys.readouterr().err == ""
        common.configure_logging(1)
        logging.getLogger("clipdistill.kernels.kd_loss").debug("tile sizes")
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and err[0].endswith("clipdistill.kernels.kd_loss: tile sizes")
        assert "root: warning: No pretrained weights" in err[1]
        assert len([h for h in logging.getLogger().handlers if isinstance(h, common._StderrHandler)]) == 1
    finally:
        common.configure_logging(0)


def test_progress_bars_follow_the_switch_and_the_terminal(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Terminal())
    set_progress(True)
    assert not progress_bar(range(3), desc="x").disable
    set_progress(False)
    assert progress_bar(range(3), desc="x").disable
    set_progress(True)
    monkeypatch.setattr(sys, "stderr", open(Path(__file__), encoding="utf-8"))  # not a terminal
    assert progress_bar(range(3), desc="x").disable
    sys.stderr.close()


def test_plot_draws_a_real_runs_metrics(tmp_path, shape_data, tiny_run_config, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    run = tmp_path / "run"
    config.write_text(yaml.safe_dump(tiny_run_config(shape_data, run, data={"holdout_fraction": 0.25},
                                                     train={"max_steps": 2, "checkpoint_every": 1})))
    assert main(["distill", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])  # the one-line JSON summary stays last on stdout
    assert "heldout/kl" in summary and "clipdistill: loader backend" in out.err
    # A resumed run repeats steps: the later rows win.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"lr", "images_per_s", "loss/loss"} <= set(rows[0]) and any("heldout/agreement" in r for r in rows)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({**rows[0], "lr": 123.0}) + "\n" + '{"step": 9, "lr"')  # a cut-off last line
    from clipdistill.engine.commands.plot import read_metrics

    train, heldout = read_metrics(run / "metrics.jsonl")
    assert train[rows[0]["step"]]["lr"] == 123.0 and len(heldout) == 2 and 9 not in train

    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the optional extra is missing
    assert main(["plot", str(run)]) == 2
    assert _error_lines(capsys) == ["clipdistill plot: error: plot needs matplotlib: pip install 'clipdistill[plots]'"]
