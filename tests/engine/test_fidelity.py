"""Method fidelity: what the published KDPL / PromptKD / PromptSRC code does, and this engine's options.

PromptKD's student predicts with the tuned teacher's class vectors (stored with the run);
PromptSRC aggregates its prompts over epochs in distill and regularizes towards the 60-template
target; the recipes carry each learner's published settings; few-shot and base-class runs; vision
prompts before ``ln_pre``; KDPL's vocabulary CSV.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clipdistill.engine.commands.distill import run_config_from_args
from clipdistill.engine.config.run import RESUME_NEVER_TAKEN, dump_run_config, load_run_config, resume_config
from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.io import read_class_names
from clipdistill.engine.models import TINY_STUDENT, TINY_TEACHER, load_clip
from clipdistill.engine.models.tuned import load_tuned_teacher
from clipdistill.engine.prompts.learners import GaussianPromptAggregator
from clipdistill.engine.prompts.registry import build_learner
from clipdistill.engine.templates import templates_for
from clipdistill.engine.training.builder import build_run
from clipdistill.engine.training.checkpoint import load_checkpoint
from clipdistill.engine.training.trainer import Trainer, distill
from clipdistill.engine.training.tune_teacher import TuneSettings, tune_teacher

_spec = importlib.util.spec_from_file_location("_eval_data", Path(__file__).with_name("_eval_data.py"))
data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return data.World(tmp_path_factory.mktemp("fidelity"))


def _tiny(world, out: Path, recipe: str, **sections) -> dict:
    config = {
        "recipe": recipe,
        "teacher": {"name": TINY_TEACHER, "weights": str(world.teacher_weights)},
        "student": {"name": TINY_STUDENT, "weights": str(world.student_weights)},
        "data": {"train": str(world.unlabeled), "class_names": str(world.names), "templates": "generic",
                 "batch_size": 4, "backend": "torch", "workers": 0, "interpolation": "bilinear"},
        "train": {"max_steps": 2, "device": "cpu", "out_dir": str(out), "log_every": 1, "checkpoint_every": 2,
                  "progress": False},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


# ------------------------------------------------------------------------------ PromptKD's class vectors


def test_promptkd_tune_distill_export_predict_uses_the_tuned_teachers_class_vectors(world, tmp_path, capsys):
    tuned_path = tmp_path / "tuned.safetensors"
    tuned = tune_teacher(TINY_TEACHER, str(world.teacher_weights), world.labeled, out=tuned_path,
                         class_names=world.names, learner_options={"n_text_ctx": 2, "text_depth": 2,
                                                                  "n_vision_ctx": 2, "vision_depth": 2},
                         settings=TuneSettings(shots=2, epochs=1, lr=0.05, batch_size=4, warmup_epochs=0,
                                               min_scale=0.5, backend="torch", workers=0),
                         device="cpu", log=lambda m: None)
    assert tuned.class_names == data.CLASS_NAMES
    logs: list[str] = []
    cfg = load_run_config(_tiny(world, tmp_path / "run", "promptkd", teacher={"prompts": str(tuned_path)},
                                learner={"kind": "promptkd", "options": {"n_ctx": 2, "depth": 2}}))
    summary = distill(cfg, log=logs.append)
    assert not any("teacher.prompts" in m for m in logs), logs  # no untuned-teacher warning
    checkpoint = Path(summary["checkpoint"])
    record = load_checkpoint(checkpoint)["class_vectors"]
    assert record["source"] == "tuned" and (checkpoint.parent / record["file"]).is_file()

    out = tmp_path / "student.safetensors"
    assert data.run_cli("export", checkpoint, "--out", out, "--device", "cpu") == 0
    exported = load_file(str(out))["class_vectors"]
    tuned_vectors = load_tuned_teacher(tuned_path).class_vectors(data.CLASS_NAMES)
    untuned_vectors = world.teacher_vectors(data.CLASS_NAMES)
    torch.testing.assert_close(exported, tuned_vectors.float(), atol=1e-6, rtol=1e-5)
    assert (exported - untuned_vectors.float()).abs().max() > 1e-2  # the zero-shot teacher's are others
    with safe_open(str(out), framework="pt") as fh:
        header = json.loads(fh.metadata()["header"])
    assert header["class_vectors_sha256"] == record["sha256"] and header["teacher"]["prompts"] == str(tuned_path)

    # eval's teacher row is the tuned teacher that was distilled from, scored with its class vectors
    from clipdistill.engine.evaluation.evaluate import Dataset, LoaderSettings, run_evaluation

    report = run_evaluation([Dataset(str(world.labeled), str(world.names), "generic")], distilled=str(checkpoint),
                            settings=LoaderSettings(batch_size=8, workers=0, cache_dir=str(tmp_path / "lists")))
    assert report["models"]["teacher"]["prompts"] == str(tuned_path)
    assert report["datasets"][0]["top1"]["teacher"] == pytest.approx(_top1(tuned_path, world, tuned_vectors))

    capsys.readouterr()
    assert data.run_cli("predict", world.unlabeled, "--model", out, "--top-k", "2", "--device", "cpu",
                        "--cache-dir", tmp_path / "lists") == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 7 and all(line["top"][0]["class"] in data.CLASS_NAMES for line in lines)

    # The stored vectors serve the run's names even when the tuned file is gone; new names need it.
    tuned_path.rename(tmp_path / "moved.safetensors")
    assert data.run_cli("export", checkpoint, "--out", tmp_path / "again.safetensors", "--device", "cpu") == 0
    torch.testing.assert_close(load_file(str(tmp_path / "again.safetensors"))["class_vectors"], exported)
    capsys.readouterr()
    assert data.run_cli("export", checkpoint, "--out", tmp_path / "other.safetensors", "--device", "cpu",
                        "--class-names", world.other_names) != 0
    assert "teacher.prompts" in capsys.readouterr().err


def _top1(tuned_path: Path, world, vectors: torch.Tensor) -> float:
    """The tuned teacher's top-1 (percent) on the labeled folder, as eval reads its images."""
    from clipdistill.engine.evaluation.evaluate import scan_labeled_folder

    teacher = load_tuned_teacher(tuned_path)
    folder = scan_labeled_folder(world.labeled, world.names)
    ids, images = data.loader_images(folder.samples, size=teacher.model.visual.image_size[0])
    predicted = teacher.logits(images, vectors, teacher.logit_scale).argmax(-1)
    return 100.0 * float((predicted == torch.from_numpy(folder.labels)[ids]).float().mean())


def test_promptkd_on_an_untuned_teacher_warns_naming_teacher_prompts(world, tmp_path):
    logs: list[str] = []
    cfg = load_run_config(_tiny(world, tmp_path / "run", "promptkd",
                                learner={"kind": "promptkd", "options": {"n_ctx": 2, "depth": 2}}))
    run = build_run(cfg, log=logs.append)
    assert run.class_vectors_source == "teacher"
    assert any("WARNING" in m and "teacher.prompts" in m for m in logs), logs


# ------------------------------------------------------------------------------ PromptSRC


def test_imagenet_60_is_promptsrcs_set_and_the_default_frozen_target(world, tmp_path):
    sixty, eighty = templates_for("imagenet_60"), templates_for("imagenet_80")
    # PromptSRC's list: "a photo of a {}." first, then 59 of CLIP's 80 in CLIP's order, ending at "itap of the {}."
    assert len(sixty) == len(set(sixty)) == 60 and set(sixty) <= set(eighty)
    assert (sixty[0], sixty[1], sixty[39], sixty[40], sixty[-1]) == ("a photo of a {}.", "a bad photo of a {}.",
                                                                     "a close-up photo of the {}.", "the origami {}.",
                                                                     "itap of the {}.")
    assert sorted(sixty[1:], key=eighty.index) == list(sixty[1:])
    options = {"n_text_ctx": 2, "text_depth": 2, "n_vision_ctx": 2, "vision_depth": 2}
    cfg = load_run_config(_tiny(world, tmp_path / "a", "kdpl", learner={"kind": "promptsrc", "options": options}))
    assert build_run(cfg, log=lambda m: None).learner.frozen.templates == list(sixty)
    cfg = load_run_config(_tiny(world, tmp_path / "b", "kdpl", learner={"kind": "promptsrc", "options": options,
                                                                        "frozen_templates": None}))
    assert build_run(cfg, log=lambda m: None).learner.frozen.templates == ["a photo of a {}."]  # data.templates


def test_distill_saves_promptsrcs_gaussian_aggregate_of_the_epochs(world, tmp_path, monkeypatch):
    per_epoch: list[tuple[int, dict]] = []
    original = Trainer._gpa_add

    def record(self, epoch):
        per_epoch.append((epoch, {k: v.clone() for k, v in self.run.step.state_to_save().items()}))
        original(self, epoch)

    monkeypatch.setattr(Trainer, "_gpa_add", record)
    options = {"n_text_ctx": 2, "text_depth": 2, "n_vision_ctx": 2, "vision_depth": 2}
    config = _tiny(world, tmp_path / "run", "kdpl", learner={"kind": "promptsrc", "options": options,
                                                            "gpa_mean": 0.5, "gpa_std": 1.0},
                   optim={"lr": 0.05}, train={"max_steps": None, "epochs": 3, "checkpoint_every": 100})
    summary = distill(load_run_config(config), log=lambda m: None)
    assert [epoch for epoch, _ in per_epoch] == [0, 1, 2]  # 7 images, batch 4: 2 steps an epoch
    weights = GaussianPromptAggregator.over_run(3, 0.5, 1.0).weights
    assert min(weights) > 0.05  # every epoch counts: the result is not the last epoch's prompts
    state = load_checkpoint(summary["checkpoint"])
    for key, value in state["learner"].items():
        expected = sum(w * s[key].double() for w, (_, s) in zip(weights, per_epoch)).float()
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)
    last = per_epoch[-1][1]
    assert any((state["learner"][k] - last[k]).abs().max() > 1e-6 for k in last)
    torch.testing.assert_close(state["gpa"]["learner_last"], last)  # what a resume would continue from


# ------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("kind, batch, epochs, lr, options", [
    ("coop", 32, 50, 0.002, {"n_ctx": 4, "init_words": "a photo of a"}),
    ("cocoop", 1, 10, 0.002, {"n_ctx": 4, "init_words": "a photo of a"}),
    ("vpt", 4, 5, 0.0025, {"n_tokens": 8, "depth": 12}),
    ("maple", 4, 5, 0.0035, {"n_ctx": 2, "depth": 9, "init_words": "a photo of a"}),
    ("promptsrc", 4, 20, 0.0025, {"n_text_ctx": 4, "text_depth": 9, "n_vision_ctx": 4, "vision_depth": 9,
                                  "init_words": "a photo of a"}),
])
def test_kdpl_presets_resolve_per_learner(kind, batch, epochs, lr, options):
    cfg = load_run_config(None, [f"learner.kind={kind}"], recipe="kdpl")
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.optim.lr, cfg.learner.options) == (batch, epochs, lr, options)
    assert (cfg.optim.warmup_epochs, cfg.optim.warmup_steps, cfg.optim.warmup_lr) == (1, 0, 1e-5)


def test_explicit_settings_win_over_presets_and_warmup_in_one_unit():
    cfg = load_run_config(None, ["learner.kind=vpt", "data.batch_size=16", "learner.options.depth=3",
                                 "optim.warmup_steps=7"], recipe="kdpl")
    assert (cfg.data.batch_size, cfg.learner.options, cfg.optim.lr) == (16, {"n_tokens": 8, "depth": 3}, 0.0025)
    assert (cfg.optim.warmup_steps, cfg.optim.warmup_epochs) == (7, 0)  # explicit steps replace the recipe's epoch
    with pytest.raises(ConfigError, match="warmup_steps=7 and optim.warmup_epochs=2"):
        load_run_config(None, ["optim.warmup_steps=7", "optim.warmup_epochs=2"], recipe="kdpl")


def test_one_warm_up_epoch_runs_at_the_constant_rate(world, tmp_path):
    cfg = load_run_config(_tiny(world, tmp_path / "run", "kdpl", learner={"options": {"n_ctx": 2}},
                                train={"max_steps": 3, "checkpoint_every": 100}))
    trainer = Trainer(build_run(cfg, log=lambda m: None), log=lambda m: None)
    assert trainer.core.warmup_steps == len(trainer.run.loader) == 2  # 7 images, batch 4: one epoch, 2 steps
    trainer.fit()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == [1e-5, 1e-5] and lrs[2] == pytest.approx(0.002)  # then cosine from the base rate


def test_promptkd_kd_weight_table_and_cross_dataset_recipe():
    assert load_run_config(None, [], recipe="promptkd").loss.kd_weight == 1000.0
    for dataset in ("dtd", "fgvc_aircraft", "oxford_flowers", "FGVC-Aircraft"):
        assert load_run_config(None, [f"data.dataset={dataset}"], recipe="promptkd").loss.kd_weight == 200.0
    assert load_run_config(None, ["data.dataset=food101"], recipe="promptkd").loss.kd_weight == 1000.0
    assert load_run_config(None, ["data.dataset=dtd", "loss.kd_weight=50"], recipe="promptkd").loss.kd_weight == 50
    xd = load_run_config(None, [], recipe="promptkd-xd")
    assert xd.learner.options == {"n_ctx": 4, "depth": 3, "projector": "conv_bn"}
    assert (xd.loss.kd_weight, xd.optim.lr, xd.optim.warmup_epochs, xd.train.epochs) == (1000.0, 0.005, 1, 20)


def test_resume_takes_changed_defaults_from_the_checkpoint_but_keeps_explicit_settings():
    # A run started as kdpl + VPT before presets existed: CoOp's batch, rate and epochs, no warm-up epoch.
    old = load_run_config(None, ["learner.kind=vpt", "data.batch_size=32", "optim.lr=0.002", "train.epochs=50",
                                 "optim.warmup_epochs=0"], recipe="kdpl")
    saved = dump_run_config(old)
    saved["learner"]["options"] = {}
    for section, key in (("learner", "prompt_placement"), ("optim", "warmup_epochs")):
        del saved[section][key]  # keys today's main does not write
    now = load_run_config(None, ["learner.kind=vpt", "train.resume=true"], recipe="kdpl")
    resumed, taken = resume_config(now, saved)
    assert (resumed.data.batch_size, resumed.optim.lr, resumed.train.epochs) == (32, 0.002, 50)
    assert (resumed.optim.warmup_epochs, resumed.learner.prompt_placement, resumed.learner.options) == \
        (0, "after_ln_pre", {})
    assert "train.resume" not in taken and resumed.train.resume
    explicit = load_run_config(None, ["learner.kind=vpt", "data.batch_size=8", "train.resume=true"], recipe="kdpl")
    assert resume_config(explicit, saved)[0].data.batch_size == 8  # the resume check then refuses it


def test_resume_never_takes_how_the_first_invocation_ran():
    """Review finding: a run started with --overwrite could not be resumed (the adopted train.overwrite met
    --resume), and a moved run resumed into its old folder, both taken from the checkpoint."""
    first = load_run_config(None, ["train.overwrite=true", "train.out_dir=/old/place", "train.progress=false",
                                   "train.class_vector_cache=/old/cache", "train.epochs=7"], recipe="kdpl")
    now = load_run_config(None, ["train.resume=true"], recipe="kdpl")
    resumed, taken = resume_config(now, dump_run_config(first))
    assert set(RESUME_NEVER_TAKEN).isdisjoint(taken), taken
    assert (resumed.train.overwrite, resumed.train.out_dir, resumed.train.progress,
            resumed.train.class_vector_cache) == (now.train.overwrite, now.train.out_dir, now.train.progress,
                                                  now.train.class_vector_cache)
    assert resumed.train.epochs == 7 and "train.epochs" in taken  # what the run is still comes from it


def test_distill_out_dir_flag_is_a_path_not_yaml(tmp_path):
    """Review finding: --out-dir went through the YAML reader (`runs/exp #2` became `runs/exp`)."""
    for text in ("runs/exp #2", "null", "1e-3", "a: b", "runs/ünï"):
        args = argparse.Namespace(overrides=[], resume=False, overwrite=False, out_dir=text, config=None,
                                  recipe="kdpl")
        assert run_config_from_args(args).train.out_dir == text


# ------------------------------------------------------------------------------ protocols


def test_few_shot_base_class_selection(tmp_path):
    counts = [5, 4, 6, 5, 3]
    root = data.labeled_folder(tmp_path / "labeled", data.CLASS_NAMES, counts, seed=3)
    names = data.names_file(tmp_path / "names.txt", data.CLASS_NAMES)

    def run(*overrides):
        cfg = load_run_config({"data": {"train": str(root), "class_names": str(names), "backend": "torch",
                                        "workers": 0, "batch_size": 2},
                               "teacher": {"name": TINY_TEACHER, "weights": None},
                               "student": {"name": TINY_STUDENT, "weights": None},
                               "learner": {"kind": "coop", "options": {"n_ctx": 2, "init_words": None}},
                               "train": {"device": "cpu", "out_dir": str(tmp_path / "out")}},
                              list(overrides), recipe="kdpl")
        built = build_run(cfg, log=lambda m: None)
        return built.class_names, sorted(built.loader.samples.paths)

    names_b, files_b = run("data.shots=2", "data.base_classes_only=true")
    assert names_b == data.CLASS_NAMES[:3]  # ceil(5 / 2) base classes, in class order
    assert len(files_b) == 6 and all(Path(f).parent.name in {"cat", "golden_retriever", "sea_lion"} for f in files_b)
    assert run("data.shots=2", "data.base_classes_only=true")[1] == files_b  # seeded
    assert run("data.shots=2", "data.base_classes_only=true", "data.shot_seed=7")[1] != files_b
    names_all, files_all = run("data.base_classes_only=true")
    assert names_all == names_b and len(files_all) == sum(counts[:3])
    with pytest.raises(ConfigError, match="class-agnostic"):
        load_run_config(None, ["data.shots=4"], recipe="kdpl-ca")
    csv = tmp_path / "vocab.csv"
    csv.write_text("ClassName\n" + "\n".join(data.CLASS_NAMES) + "\n")
    with pytest.raises(ConfigError, match="is a vocabulary"):  # not "need data.train to be a folder"
        run("data.shots=2", f"data.class_names=kdpl-csv:{csv}")


# ------------------------------------------------------------------------------ prompt placement


@pytest.mark.parametrize("kind, options", [("vpt", {"n_tokens": 3, "depth": 2}),
                                           ("promptkd", {"n_ctx": 3, "depth": 2})])
@pytest.mark.parametrize("placement", ["before_ln_pre", "after_ln_pre"])
def test_vision_prompts_enter_where_the_placement_says(kind, options, placement, tokenizer):
    torch.manual_seed(0)
    learner = build_learner(kind, load_clip(TINY_STUDENT, None), tokenizer=tokenizer, class_names=["a", "b"],
                            teacher_dim=48, prompt_placement=placement, **options)
    visual = learner.clip.visual
    with torch.no_grad():  # a LayerNorm with its own scale and shift, so that it visibly changes tokens
        visual.ln_pre.weight.copy_(torch.rand_like(visual.ln_pre.weight) + 0.5)
        visual.ln_pre.bias.copy_(torch.randn_like(visual.ln_pre.bias))
    seen: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda module, args, kw: seen.append(args[0] if args else kw["x"]),
                                             with_kwargs=True) for block in visual.transformer.resblocks[:2]]
    learner.encode_image(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    prompts = learner.vision_prompts.detach()
    first, second = (x if getattr(visual.transformer, "batch_first", True) else x.transpose(0, 1) for x in seen)
    entered = first[:, -3:]  # layer 0's prompt tokens as the first block sees them
    expected = visual.ln_pre(prompts[0]) if placement == "before_ln_pre" else prompts[0]
    torch.testing.assert_close(entered, expected.expand_as(entered))
    torch.testing.assert_close(second[:, -3:], prompts[1].expand_as(second[:, -3:]))  # deeper: as learned


def test_legacy_checkpoints_and_exports_keep_the_old_placement(tmp_path):
    from clipdistill.engine.evaluation.export import read_distilled

    legacy = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_eeb4a4a"
    assert read_distilled(legacy / "runs/promptkd/checkpoints/step-000000002.safetensors").prompt_placement == \
        "after_ln_pre"
    assert read_distilled(legacy / "export_promptkd.safetensors").prompt_placement == "after_ln_pre"


# ------------------------------------------------------------------------------ KDPL's vocabulary


def test_kdpl_csv_class_names(tmp_path):
    path = tmp_path / "classnames.csv"
    path.write_text('ClassName\n10 cane\n"Adapter (Computer), small"\nAbelia\nAdÃ©lie penguin\n', encoding="utf-8")
    assert read_class_names(f"kdpl-csv:{path}") == ["10 cane", "Adapter (Computer), small", "Abelia",
                                                    "AdÃ©lie penguin"]
    path.write_text("Name\nAbelia\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="ClassName"):
        read_class_names(f"kdpl-csv:{path}")
    path.write_text("ClassName\nAbelia\nAbacus\nAbelia\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 4 repeats 'Abelia'"):
        read_class_names(f"kdpl-csv:{path}")


def test_learner_gpa_mean_is_a_fraction_of_the_run():
    assert load_run_config(None, ["learner.kind=promptsrc"], recipe="kdpl").learner.gpa_mean == 0.75
    for bad in ("15", "0", "-0.5"):  # 15 is the published epoch, not a fraction
        with pytest.raises(ConfigError, match=r"learner.gpa_mean \(a fraction"):
            load_run_config(None, ["learner.kind=promptsrc", f"learner.gpa_mean={bad}"], recipe="kdpl")
