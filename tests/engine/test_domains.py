"""Out-of-distribution evaluation (engine/evaluation/domains.py, ``eval --domains`` and ``--few-shot``):
a generated ROOT/<domain>/<class>/<images> on tiny random-init models (CPU).

The per-domain figures are checked against ``eval --data`` of each domain folder, whose own numbers
test_evaluate.py checks against a direct computation."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

_spec = importlib.util.spec_from_file_location("_eval_data", Path(__file__).with_name("_eval_data.py"))
data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data)

run_cli = data.run_cli
DOMAIN_CLASSES = ["dog", "sea lion", "tulip"]  # "sea lion": the folder sea_lion
DOMAINS = ["cartoon", "photo", "sketch"]
COMMON = ("--device", "cpu", "--workers", "1", "--batch-size", "4")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return data.World(tmp_path_factory.mktemp("domains"))


def _tinted_domain(folder: Path, rng: np.random.Generator, contrast: float) -> None:
    """Three images per class, each class a hue (red, green, blue) in noise: something a few shots can learn."""
    from PIL import Image

    for c, name in enumerate(DOMAIN_CLASSES):
        for i in range(3):
            pixels = rng.uniform(0, 255 * (1 - contrast), (36, int(rng.integers(32, 48)), 3))
            pixels[..., c] += 255 * contrast
            (folder / name.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name.replace(" ", "_") / f"{i}.png")


@pytest.fixture(scope="module")
def root(world):
    """Three domains (hue contrast 0.6, 0.4, 0.2) x three classes x three images, a hidden folder and a
    stray file beside them."""
    root = world.root / "pacs"
    rng = np.random.default_rng(10)
    for domain, contrast in zip(DOMAINS, (0.6, 0.4, 0.2)):
        _tinted_domain(root / domain, rng, contrast)
    data.labeled_folder(root / ".thumbnails", ["dog"], [1], seed=99)
    (root / "README.txt").write_text("not a domain\n")
    return root


@pytest.fixture(scope="module")
def promptkd(world):
    checkpoint, _ = world.distilled("promptkd", {"n_ctx": 2, "depth": 2}, out="domains_promptkd")
    return checkpoint


def _run(capsys, *argv) -> tuple[list[str], dict]:
    assert run_cli("eval", *argv, *COMMON) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    return printed, json.loads(printed[-1])


def test_domains_equal_eval_of_each_domain_folder(world, root, promptkd, capsys, tmp_path):
    out = tmp_path / "report.json"
    printed, report = _run(capsys, "--domains", root, "--checkpoint", promptkd, "--out", out)
    assert json.loads(out.read_text()) == report  # the table, then the same report as one line of JSON
    assert report["domains"]["names"] == DOMAINS and report["domains"]["class_names"] == DOMAIN_CLASSES
    assert set(report["models"]) == {"teacher", "student_zero_shot", "student_distilled"}
    assert printed[0].startswith("top-1 accuracy (%)") and "distilled student" in printed[0]
    assert [line.split()[0] for line in printed[1:5]] == DOMAINS + ["average"]

    _, separately = _run(capsys, *(arg for d in DOMAINS for arg in ("--data", root / d)), "--checkpoint", promptkd)
    assert [d["name"] for d in report["datasets"]] == DOMAINS
    for got, expected in zip(report["datasets"], separately["datasets"]):
        assert got["images"] == expected["images"] == 9
        assert got["top1"] == expected["top1"], got["name"]
    assert report["cross_dataset"]["average"] == separately["cross_dataset"]["average"]
    for model, value in report["cross_dataset"]["average"].items():
        assert value == pytest.approx(np.mean([d["top1"][model] for d in report["datasets"]]))


def _domain(root: Path, name: str, classes, seed: int) -> None:
    data.labeled_folder(root / name, classes, [1] * len(classes), seed=seed)


def test_domains_refuses_what_it_cannot_evaluate(world, root, promptkd, tmp_path, capsys):
    def refused(*argv) -> str:
        assert run_cli("eval", *argv, *COMMON) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        return err

    mismatched = tmp_path / "mismatched"
    _domain(mismatched, "art", DOMAIN_CLASSES, 0)
    _domain(mismatched, "clipart", ["dog", "sea lion", "zebra"], 1)  # lacks tulip, has zebra
    err = refused("--domains", mismatched, "--checkpoint", promptkd)
    assert "'clipart'" in err and "'tulip'" in err and "'zebra'" in err and "--data" in err

    names = data.names_file(tmp_path / "names.txt", ["dog", "sea lion", "rose"])
    err = refused("--domains", root, "--class-names", names, "--checkpoint", promptkd)
    assert "'cartoon'" in err and "'rose'" in err

    (tmp_path / "none").mkdir()
    assert "no domain subfolders" in refused("--domains", tmp_path / "none")
    (tmp_path / "flat" / "art").mkdir(parents=True)
    err = refused("--domains", tmp_path / "flat")
    assert "'art'" in err and "no class subfolders" in err

    err = refused("--domains", root, "--checkpoint", promptkd, "--few-shot", "2", "--few-shot-domain", "quickdraw")
    assert "'quickdraw'" in err and all(d in err for d in DOMAINS)
    assert "fewer" in refused("--domains", root, "--checkpoint", promptkd, "--few-shot", "4")
    assert "--data" in refused("--domains", root, "--data", root / "photo")
    assert "--checkpoint" in refused("--domains", root, "--few-shot", "2")
    assert "--few-shot" in refused("--domains", root, "--few-shot-lr", "0.1")


@pytest.mark.parametrize("kind, options, export", [("promptkd", {"n_ctx": 2, "depth": 2}, False),
                                                   ("coop", {"n_ctx": 4, "init_words": "a photo of a"}, True)])
def test_few_shot_tunes_a_copy_reproducibly(world, root, kind, options, export, capsys):
    """PromptKD from a checkpoint (against the teacher's class vectors); CoOp from an export holding its
    class features, which the tuned copy must recompute from its tuned prompts to score differently."""
    from clipdistill.engine.evaluation.export import export_from_checkpoint

    checkpoint = world.distilled(kind, options, out=f"domains_few_{kind}")[0]
    if export:
        checkpoint = export_from_checkpoint(checkpoint, checkpoint.parent / "student.safetensors",
                                            class_names=DOMAIN_CLASSES, include_backbone=True)
    before = checkpoint.read_bytes()
    few_shot = ("--domains", root, "--checkpoint", checkpoint, "--few-shot", "2",
                "--few-shot-domain", "photo", "--few-shot-epochs", "4", "--few-shot-lr", "0.05")
    printed, report = _run(capsys, *few_shot)
    _, again = _run(capsys, *few_shot)
    assert checkpoint.read_bytes() == before  # the checkpoint is never written

    assert report == again | {"versions": report["versions"]}  # the same seed: the same figures, losses, shots
    shots = report["domains"]["few_shot"]
    assert shots["domain"] == "photo" and shots["shots"] == 2 and shots["images"] == 6 and shots["seed"] == 1
    assert np.isfinite(shots["loss"]) and len(shots["files"]) == 6
    distilled = [d["top1"]["student_distilled"] for d in report["datasets"]]
    tuned = [d["top1"]["student_few_shot"] for d in report["datasets"]]
    assert tuned != distilled
    for model in report["models"]:
        others = [d["top1"][model] for d in report["datasets"] if d["name"] != "photo"]
        assert shots["average_other_domains"][model] == pytest.approx(np.mean(others))
    assert "few-shot student" in printed[0]
    assert any(line.startswith("photo *") for line in printed)
    assert any(line.startswith("average w/o photo") for line in printed)


def test_fine_tune_moves_only_the_copys_trainable_parameters(world, root, promptkd):
    from clipdistill.engine.evaluation.domains import FewShot, draw_domain_shots, fine_tune, scan_domains
    from clipdistill.engine.evaluation.evaluate import LoaderSettings, distilled_classifier
    from clipdistill.engine.evaluation.export import read_distilled
    from clipdistill.engine.io import image_spec
    from clipdistill.loaders.loader import OutputSpec

    clip = world.student_clip()
    distilled = distilled_classifier(read_distilled(promptkd), clip, DOMAIN_CLASSES, ["a photo of a {}."],
                                     teacher=world.teacher())
    before = {k: v.clone() for k, v in distilled.state_dict().items()}
    few_shot = FewShot(2, epochs=2, lr=0.05)
    shots = draw_domain_shots(scan_domains(root)[1], None, few_shot)
    tuned, record = fine_tune(distilled, shots, OutputSpec("student", *image_spec(clip)), few_shot,
                              LoaderSettings(batch_size=4, workers=1))

    assert record["images"] == 6 and record["steps"] == 4
    for key, value in distilled.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key]), key
    trainable = {f"learner.{name}" for name in tuned.learner.trainable_parameters()}
    assert trainable and tuned.learner.clip is not clip and not tuned.training and not tuned.learner.training
    moved = {k for k, v in tuned.state_dict().items() if k in before and not torch.equal(v, before[k])}
    # exactly the trainable parameters move (and the projector's batch-norm statistics, in training mode)
    assert trainable <= moved and all(k in trainable or "running_" in k or "num_batches" in k for k in moved)
    assert torch.equal(tuned.class_vectors, distilled.class_vectors)  # the teacher's class vectors stay
