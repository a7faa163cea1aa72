"""Distributed distillation (engine/distributed.py): launcher detection, DeepSpeed config checks,
the ZeRO-3-sharded teacher, two ranks against one process, resume across world sizes.

The multi-process tests are marked ``distributed`` (run with ``--run-distributed``): they
start 2 CPU processes with ``torchrun`` (gloo) on the tiny models and generated images.
DeepSpeed compiles a shared-memory op with g++ on its first distributed start (22-83 s
here); it is cached in ``TORCH_EXTENSIONS_DIR`` (default below), so later runs take seconds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipdistill.engine.training import checkpoint as ckpt
from clipdistill.engine.config import ConfigError
from clipdistill.engine.parallel.launch import check_world, detect_launch
from clipdistill.engine.parallel.zero import load_deepspeed_config

_spec = importlib.util.spec_from_file_location("_gloo", Path(__file__).with_name("_gloo.py"))
_gloo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gloo)
_spec = importlib.util.spec_from_file_location("_run_config", Path(__file__).with_name("_run_config.py"))
_run_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_run_config)

CLASSES = ["circle", "square", "triangle", "cross", "ring"]
TORCHRUN = Path(sys.executable).with_name("torchrun")
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "clipdistill" / "torch_extensions"))
DS_CONFIG = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
LAUNCH = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


# --------------------------------------------------------------------------------- default tier


def test_no_launcher_environment_is_a_single_process_run():
    assert detect_launch({}) is None


def test_launcher_environment_is_read():
    env = detect_launch({**LAUNCH, "RANK": "1", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        (1, 2, 1, "127.0.0.1", 29500)


def test_deepspeed_without_launcher_names_what_is_missing():
    with pytest.raises(ConfigError, match="RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.*torchrun"):
        detect_launch({}, required=True, reason="train.deepspeed is set.")


def test_partial_launcher_environment_names_the_missing_variables():
    partial = {k: v for k, v in LAUNCH.items() if k not in ("MASTER_PORT", "LOCAL_RANK")}
    with pytest.raises(ConfigError, match="lacks LOCAL_RANK, MASTER_PORT"):
        detect_launch(partial)
    with pytest.raises(ConfigError, match="integers"):
        detect_launch({**LAUNCH, "WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="do not describe a rank"):
        detect_launch({**LAUNCH, "RANK": "2"})


def _ds_file(tmp_path: Path, content) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON file"),
    ([3], "must be a JSON object"),
    ({"zero_optimization": {"stage": 2}}, "stage must be 3.*got 2"),
    ({}, "stage must be 3.*got None"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "tape"}}}, "none, cpu, nvme, got 'tape'"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "needs offload_param.nvme_path"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/no/such/folder"}}},
     "nvme_path '/no/such/folder' is not a folder this process can write to"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
])
def test_bad_deepspeed_config_is_refused(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        load_deepspeed_config(_ds_file(tmp_path, content), micro_batch_size=4)


def test_missing_deepspeed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_deepspeed_config(tmp_path / "nope.json", micro_batch_size=4)


def test_good_deepspeed_config_gets_a_micro_batch(tmp_path):
    cfg = load_deepspeed_config(_ds_file(tmp_path, {"zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu"}}}), micro_batch_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_nvme_offload_without_libaio_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """DeepSpeed's async_io op links libaio; without it DeepSpeed would fail deep inside the engine
    ("Unable to JIT load the async_io op ..."), after the teacher was built. Said up front instead."""
    pytest.importorskip("deepspeed", reason="checks DeepSpeed's own op builder")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from clipdistill.engine.parallel.zero import require_deepspeed

    nvme = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}}
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(ConfigError, match="nvme' needs DeepSpeed's async_io op.*libaio.*or offload to 'cpu'"):
        require_deepspeed(nvme)
    require_deepspeed({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})  # no aio needed
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    require_deepspeed(nvme)


def test_missing_deepspeed_is_named(monkeypatch):
    from clipdistill.engine.parallel.zero import require_deepspeed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"DeepSpeed is not installed; pip install -e '.\[deepspeed\]'"):
        require_deepspeed({"zero_optimization": {"stage": 3}})


def test_teacher_precision_sets_the_deepspeed_dtype():
    from clipdistill.engine.parallel.zero import with_teacher_precision

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    base = {"zero_optimization": {"stage": 3}}
    assert with_teacher_precision(base, None, cpu) == base  # fp32 on the CPU, as the plain engine
    assert with_teacher_precision(base, None, gpu)["bf16"] == {"enabled": True}  # bf16 on a GPU
    assert with_teacher_precision(base, "fp16", gpu)["fp16"] == {"enabled": True}
    assert "bf16" not in base, "the caller's dict is not changed"
    own = {**base, "fp16": {"enabled": True}}
    assert with_teacher_precision(own, None, gpu) == own  # the config's own choice wins over a default
    with pytest.raises(ConfigError, match="teacher.precision='bf16' but the DeepSpeed config enables fp16"):
        with_teacher_precision(own, "bf16", gpu)
    fp32 = {**base, "bf16": {"enabled": False}}
    assert with_teacher_precision(fp32, None, gpu) == fp32  # explicitly off: fp32 partitions on a GPU too
    with pytest.raises(ConfigError, match="disables bf16 and fp16"):
        with_teacher_precision(fp32, "bf16", gpu)
    with pytest.raises(ConfigError, match="enables both bf16 and fp16"):
        with_teacher_precision({**own, "bf16": {"enabled": True}}, None, gpu)
    with pytest.raises(ConfigError, match="teacher.precision='fp8'.*fp32, bf16"):
        with_teacher_precision(base, "fp8", gpu)


def test_more_ranks_than_samples_or_an_uneven_batch_is_refused():
    with pytest.raises(ConfigError, match="4 ranks but only 3 training images"):
        check_world(4, global_batch_size=4, num_samples=3)
    with pytest.raises(ConfigError, match="multiple of the number of ranks"):
        check_world(2, global_batch_size=5, num_samples=None)
    check_world(2, global_batch_size=4, num_samples=2)


def test_distill_with_deepspeed_but_no_launcher_fails_plainly(tmp_path, shape_folder, monkeypatch):
    from clipdistill.engine.config.run import load_run_config
    from clipdistill.engine.training.builder import build_run

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    data = shape_folder("ds_nolaunch", CLASSES, 4, 40)
    cfg = load_run_config(_config(data, tmp_path / "out", deepspeed=str(_ds_file(tmp_path, DS_CONFIG))))
    with pytest.raises(ConfigError, match="environment lacks RANK"):
        build_run(cfg, log=lambda m: None)


def test_deepspeed_override_is_short_for_train_deepspeed(tmp_path, shape_folder, monkeypatch):
    """`clipdistill distill ... deepspeed=FILE` reaches train.deepspeed (here: refused without a launcher)."""
    from clipdistill.engine.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    data = shape_folder("ds_override", CLASSES, 4, 40)
    config = _write_config(_config(data, tmp_path / "out"), tmp_path / "run.yaml")
    bad = _ds_file(tmp_path, {"zero_optimization": {"stage": 1}})
    assert main(["distill", "--config", str(config), f"deepspeed={bad}"]) == 2


# --------------------------------------------------------------------------------- helpers


def _config(data_dir: Path, out_dir: Path, *, max_steps: int = 4, deepspeed: str | None = None, **train) -> dict:
    """conftest's tiny run (``_run_config.py``) with lr 0.05, 4 steps, the last 5 checkpoints, ``train.deepspeed``."""
    return _run_config.tiny_run_config(data_dir, out_dir, optim={"lr": 0.05},
                                       train={"max_steps": max_steps, "keep_last": 5, "deepspeed": deepspeed,
                                              **train})


def _write_config(cfg: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch_env(accelerator: str = "cpu") -> dict:
    """The environment a launcher starts from: DeepSpeed's accelerator, the op cache, no rank variables."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": EXTENSIONS, "DS_ACCELERATOR": accelerator, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = 600,
              accelerator: str = "cpu") -> subprocess.CompletedProcess:
    env = _launch_env(accelerator)
    cmd = [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_gloo.free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _final_state(out_dir: Path) -> dict:
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(out_dir / "checkpoints"))


def _run_in_process(cfg: dict) -> dict:
    from clipdistill.engine.config.run import load_run_config
    from clipdistill.engine.training.trainer import distill

    return distill(load_run_config(cfg), log=lambda m: None)


# --------------------------------------------------------------------------------- distributed tier

SHARD_WORKER = r'''
import json, os, sys
import torch
from clipdistill.engine.distributed import (build_sharded_teacher, detect_launch, init_process_group,
                                            load_deepspeed_config)
env = detect_launch()
init_process_group(env, torch.device("cpu"))
ds = load_deepspeed_config(sys.argv[1], micro_batch_size=2)
vectors_made = []
def class_vectors(teacher):
    vectors_made.append(torch.distributed.get_rank())
    return torch.nn.functional.normalize(teacher.encode_text(torch.randint(0, 400, (3, 16))), dim=-1)
teacher, vectors = build_sharded_teacher("clipdistill-tiny-teacher", None, ds, device=torch.device("cpu"),
                                         class_vectors=class_vectors, seed=0)
params = {name: [int(p.ds_numel), int(p.ds_tensor.numel()), int(p.data.numel())]
          for name, p in teacher.model.visual.named_parameters()}
images = torch.load(sys.argv[2])
teacher.train()
features = teacher.encode_image(images)
json.dump({"params": params, "features": features.tolist(), "vectors": vectors.tolist(),
           "logit_scale": float(teacher.logit_scale), "output_dim": teacher.output_dim,
           "training": teacher.training or any(m.training for m in teacher.model.visual.modules()), "made_by": vectors_made,
           "dtypes": sorted({str(p.dtype) for p in teacher.model.visual.parameters()}),
           "features_dtype": str(features.dtype)},
          open(os.path.join(sys.argv[3], f"rank{env.rank}.json"), "w"))
torch.distributed.barrier()  # then destroy: a rank leaving a live group may abort at exit
torch.distributed.destroy_process_group()
'''


@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_rank_holds_half_of_every_teacher_parameter(tmp_path, precision):
    """Half of every parameter per rank, none gathered outside a forward, the unsharded teacher's
    features; with DeepSpeed's bf16 section the partitions are bf16 (features within bf16 error)."""
    pytest.importorskip("deepspeed", reason="the distributed tier needs DeepSpeed: pip install -e '.[deepspeed]'")
    from clipdistill.engine.models import build_teacher

    (tmp_path / "worker.py").write_text(SHARD_WORKER)
    ds = _ds_file(tmp_path, {**DS_CONFIG, "bf16": {"enabled": precision == "bf16"}})
    images = torch.randn(3, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    _torchrun(2, [str(tmp_path / "worker.py"), str(ds), str(tmp_path / "images.pt"), str(tmp_path)], cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    torch.manual_seed(0)
    reference = build_teacher("clipdistill-tiny-teacher", None, device="cpu")
    full = dict(reference.model.visual.named_parameters())
    assert set(ranks[0]["params"]) == set(full)
    for name, p in full.items():
        held = [r["params"][name] for r in ranks]
        for ds_numel, local, materialized in held:
            assert ds_numel == p.numel(), name
            assert local == -(-p.numel() // 2), (name, local, p.numel())  # half, rounded up (padded partition)
            assert materialized == 0, name  # nothing gathered outside a forward (persistence threshold 0)
    expected = reference.encode_image(images)
    tolerance = 1e-5 if precision == "fp32" else 2e-2  # features are L2-normalized; bf16 measured 2.3e-3
    for r in ranks:
        assert r["dtypes"] == [f"torch.{'float32' if precision == 'fp32' else 'bfloat16'}"]
        assert r["features_dtype"] == "torch.float32"
        torch.testing.assert_close(torch.tensor(r["features"]), expected, rtol=tolerance, atol=tolerance)
        assert r["logit_scale"] == pytest.approx(float(reference.logit_scale))
        assert r["output_dim"] == expected.shape[1] and not r["training"]
    assert ranks[0]["vectors"] == ranks[1]["vectors"], "class vectors broadcast from rank 0"
    assert ranks[0]["made_by"] == [0] and ranks[1]["made_by"] == []


@pytest.fixture(scope="module")
def two_rank_runs(shape_folder, tmp_path_factory):
    """One 2-rank DeepSpeed run of 4 steps (16 images, global batch 8: 2 epochs, no padding)."""
    pytest.importorskip("deepspeed", reason="the distributed tier needs DeepSpeed: pip install -e '.[deepspeed]'")
    root = tmp_path_factory.mktemp("two_ranks")
    data = shape_folder("dist_data", CLASSES, 16, 40)
    ds = _ds_file(root, DS_CONFIG)
    config = _write_config(_config(data, root / "two"), root / "two.yaml")
    _torchrun(2, ["-m", "clipdistill.engine.cli", "distill", "--config", str(config), f"deepspeed={ds}"], cwd=root)
    # The resume tests rewind root/two itself; this copy is the reference.
    shutil.copytree(root / "two", root / "two_full")
    return {"root": root, "data": data, "ds": ds, "out": root / "two_full", "work": root / "two"}


@pytest.mark.distributed
def test_two_ranks_equal_one_process(two_rank_runs, tmp_path):
    one = tmp_path / "one"
    _run_in_process(_config(two_rank_runs["data"], one))  # the plain engine: no launcher, no DeepSpeed
    got, want = _metrics(two_rank_runs["out"]), _metrics(one)
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        assert g["images_seen"] == w["images_seen"]
        assert g["loss/loss"] == pytest.approx(w["loss/loss"], rel=1e-5, abs=1e-6), g["step"]
    assert [s for s, _ in ckpt.list_checkpoints(two_rank_runs["out"] / "checkpoints")] == [2, 4]
    two_state, one_state = _final_state(two_rank_runs["out"]), _final_state(one)
    assert set(two_state["learner"]) == set(one_state["learner"])
    for key, value in one_state["learner"].items():
        torch.testing.assert_close(two_state["learner"][key], value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(value, torch.zeros_like(value))


def _interrupted_copy(runs: dict) -> Path:
    """The 2-rank run's folder as a kill after step 2 leaves it: its step-2 checkpoint, metrics up to it."""
    out = runs["work"]
    shutil.rmtree(out)
    shutil.copytree(runs["out"], out)
    (out / "checkpoints" / "step-000000004.safetensors").unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()[:2]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.distributed
def test_resume_a_two_rank_checkpoint_with_two_ranks(two_rank_runs, tmp_path):
    out = _interrupted_copy(two_rank_runs)
    config = _write_config(_config(two_rank_runs["data"], out), tmp_path / "resume.yaml")
    proc = _torchrun(2, ["-m", "clipdistill.engine.cli", "distill", "--config", str(config), "--resume",
                         f"deepspeed={two_rank_runs['ds']}"], cwd=tmp_path)
    assert "resumed from" in proc.stderr
    _assert_same_end(two_rank_runs["out"], out)


@pytest.mark.distributed
def test_resume_a_two_rank_checkpoint_in_one_process(two_rank_runs, tmp_path):
    out = _interrupted_copy(two_rank_runs)
    _run_in_process(_config(two_rank_runs["data"], out, resume=True))
    _assert_same_end(two_rank_runs["out"], out)


def _assert_same_end(full: Path, resumed: Path) -> None:
    a, b = _final_state(full), _final_state(resumed)
    assert a["step"] == b["step"] == 4 and a["images_seen"] == b["images_seen"] == 32
    assert a["loader"]["samples_consumed"] == b["loader"]["samples_consumed"]
    for key, value in a["learner"].items():
        torch.testing.assert_close(b["learner"][key], value, rtol=1e-5, atol=1e-6)
    got, want = _metrics(resumed), _metrics(full)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for g, w in zip(got[2:], want[2:]):
        assert g["loss/loss"] == pytest.approx(w["loss/loss"], rel=1e-5, abs=1e-6)


def _run_2_ranks(config: dict, ds: Path, cwd: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    path = _write_config(config, cwd / f"{name}.yaml")
    return _torchrun(2, ["-m", "clipdistill.engine.cli", "distill", "--config", str(path), *extra,
                         f"deepspeed={ds}"], cwd=cwd)


def _assert_same_run(got_dir: Path, want_dir: Path, *, steps: int, rtol: float = 1e-5, atol: float = 1e-6,
                     loss_rel: float = 1e-5) -> None:
    """Same losses at every step and the same final learner state (every saved tensor)."""
    # The last loss line per step (a resumed run repeats some; held-out lines are separate).
    got = {m["step"]: m for m in _metrics(got_dir) if "loss/loss" in m}
    want = {m["step"]: m for m in _metrics(want_dir) if "loss/loss" in m}
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step, w in want.items():
        assert got[step]["images_seen"] == w["images_seen"], step
        assert got[step]["loss/loss"] == pytest.approx(w["loss/loss"], rel=loss_rel, abs=1e-6), step
    a, b = _final_state(got_dir), _final_state(want_dir)
    assert a["step"] == b["step"] == steps
    assert set(a["learner"]) == set(b["learner"])
    for key, value in b["learner"].items():
        torch.testing.assert_close(a["learner"][key], value, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


PROMPTKD = {"recipe": "promptkd", "learner": {"kind": "promptkd",
                                              "options": {"n_ctx": 2, "depth": 2, "projector": "conv_bn"}}}


@pytest.mark.distributed
def test_promptkd_batch_norm_is_synchronized_across_ranks(two_rank_runs, tmp_path):
    """2 ranks (4 images each) with the conv_bn projector equal one process on the same 8-image batches:
    losses, prompts, projector weights and the batch norm's running statistics (which a per-rank
    batch norm would get wrong: each rank would normalize with its own half's mean and variance)."""
    data, ds = two_rank_runs["data"], two_rank_runs["ds"]
    _run_2_ranks({**_config(data, tmp_path / "two"), **PROMPTKD}, ds, tmp_path, "two")
    _run_in_process({**_config(data, tmp_path / "one"), **PROMPTKD})
    # PromptKD's loss (kd_weight 1000, lr 0.05) amplifies float32 reduction-order noise: the two
    # runs differ by ~5e-6 at most on tensors of scale ~1 (an unsynchronized batch norm: ~1e-2).
    _assert_same_run(tmp_path / "two", tmp_path / "one", steps=4, rtol=1e-4, atol=2e-5)
    learner = _final_state(tmp_path / "two")["learner"]
    bn = "projector.layers.1."
    assert {bn + s for s in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")} <= set(learner)
    assert int(learner[bn + "num_batches_tracked"]) == 4
    assert not torch.equal(learner[bn + "running_mean"], torch.zeros_like(learner[bn + "running_mean"]))


@pytest.mark.distributed
def test_offload_param_to_cpu_trains_like_no_offload(two_rank_runs, tmp_path):
    """`offload_param: cpu` in the DeepSpeed config: the sharded teacher's partitions live in (pinned)
    host memory; the 2-rank run gives the same losses and prompts as the run without offload."""
    ds = _ds_file(tmp_path, {"zero_optimization": {**DS_CONFIG["zero_optimization"],
                                                   "offload_param": {"device": "cpu"}}})
    proc = _run_2_ranks(_config(two_rank_runs["data"], tmp_path / "offload"), ds, tmp_path, "offload")
    # The engine itself reports the offload it took from the config (on a CPU accelerator the
    # "device" is host memory too, so this shows the path runs, not that memory moves).
    assert proc.stderr.count("teacher sharded with ZeRO-3 (offload_param: cpu)") == 2, proc.stderr[-3000:]
    _assert_same_run(tmp_path / "offload", two_rank_runs["out"], steps=4)


def _promptkd_padded(data: Path, out: Path, **train) -> dict:
    """PromptKD (conv-BN projector) with gradient accumulation and held-out selection, on images
    whose epochs end with a short step and one of which is corrupt."""
    cfg = _config(data, out, max_steps=4, checkpoint_every=2, **train)
    cfg.update(PROMPTKD)
    cfg["optim"] = {**cfg["optim"], "grad_accum": 2}
    cfg["data"] = {**cfg["data"], "holdout_fraction": 0.25}
    return cfg


@pytest.fixture(scope="module")
def padded_data(shape_folder) -> Path:
    data = shape_folder("padded_data", CLASSES, 23, 40)
    (data / "images" / "999.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return data


@pytest.mark.distributed
# The compiled variant (about 80 s on 2 cores, mostly compilation) runs in the slow tier.
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["eager", "compiled"])
def test_unequal_real_rows_per_rank_train_as_one_process(two_rank_runs, padded_data, tmp_path, compiled):
    """Ranks holding unequal numbers of real rows (an epoch's short last step, where rank 1 holds
    padding only; a corrupt image rejected by whichever rank draws it), with gradient accumulation
    and PromptKD's synchronized batch norm: 2 ranks equal one (eager) process in losses,
    batch-norm statistics, prompts, and the held-out selection (metrics and best.safetensors),
    which runs on every rank over its slice of the held-out images. Also with ``train.compile``:
    the sharded teacher runs eagerly (dynamo cannot trace DeepSpeed's gathering hooks), the
    rest of the step compiled."""
    data, ds = padded_data, two_rank_runs["ds"]
    _run_2_ranks(_promptkd_padded(data, tmp_path / "two", compile=compiled), ds, tmp_path, "two")
    _run_in_process(_promptkd_padded(data, tmp_path / "one"))

    one = [m for m in _metrics(tmp_path / "one") if "loss/loss" in m]
    seen = [m["images_seen"] for m in one]
    assert any(b - a not in (16,) for a, b in zip([0] + seen, seen)), f"no step had padding: {seen}"
    assert one[-1]["rejected_images"] == 1
    # PromptKD's loss (kd_weight 1000, lr 0.05) amplifies float32 rounding: eager 2 ranks vs 1
    # process differ by ~5e-6 on tensors of scale ~1 with the vision prompts after ln_pre, and by up
    # to 5.3e-5 (3 of 256 elements, CI 2026-11-30) with the published placement before it, where
    # the prompts' gradient passes through ln_pre's normalization; the compiled step (inductor's
    # fused, reordered arithmetic) vs eager by up to 6e-5 (seen in CI); a per-rank batch norm or
    # padding counted in its statistics: ~1e-2.
    rtol, atol, loss_rel = (1e-3, 2e-4, 1e-4) if compiled else (1e-3, 1e-4, 1e-5)
    _assert_same_run(tmp_path / "two", tmp_path / "one", steps=4, rtol=rtol, atol=atol, loss_rel=loss_rel)
    assert [m["rejected_images"] for m in _metrics(tmp_path / "two") if "loss/loss" in m] == \
        [m["rejected_images"] for m in one]
    selected = {d: [m for m in _metrics(tmp_path / d) if "heldout/agreement" in m] for d in ("one", "two")}
    assert [m["step"] for m in selected["two"]] == [m["step"] for m in selected["one"]] == [2, 4]
    for got, want in zip(selected["two"], selected["one"]):
        if not compiled:  # a near-tie's argmax may flip under the compiled step's rounding
            assert got["heldout/agreement"] == pytest.approx(want["heldout/agreement"], abs=1e-9)
        assert got["heldout/kl"] == pytest.approx(want["heldout/kl"], rel=10 * loss_rel, abs=1e-6)
    best = {d: ckpt.load_checkpoint(tmp_path / d / "best.safetensors") for d in ("one", "two")}
    assert best["two"]["step"] == best["one"]["step"]
    for key, value in best["one"]["learner"].items():
        torch.testing.assert_close(best["two"]["learner"][key], value, rtol=rtol, atol=atol)


@pytest.mark.distributed
def test_teacher_cache_trains_data_parallel(two_rank_runs, tmp_path):
    """teacher.cache with 2 ranks (and the class-agnostic top-K): no teacher is loaded, so
    train.deepspeed has nothing to shard and says so; the ranks equal one process."""
    from clipdistill.engine.config.run import load_run_config
    from clipdistill.engine.training.teacher_cache import build_teacher_cache

    data, ds = two_rank_runs["data"], two_rank_runs["ds"]
    cache = tmp_path / "cache"
    build_teacher_cache(load_run_config(_config(data, tmp_path / "build")), views=2, out=cache, shard_size=8,
                        batch_size=8, progress=False, log=lambda m: None)

    def config(out: Path) -> dict:
        cfg = _config(data, out, max_steps=6)
        cfg["teacher"] = {**cfg["teacher"], "cache": str(cache)}
        cfg["data"] = {**cfg["data"], "batch_size": 6}  # 16 images: every third step is short
        cfg["loss"] = {"top_k": 3}
        return cfg

    proc = _run_2_ranks(config(tmp_path / "two"), ds, tmp_path, "two")
    assert proc.stderr.count("train.deepspeed has nothing to shard") == 2, proc.stderr[-3000:]
    _run_in_process(config(tmp_path / "one"))
    _assert_same_run(tmp_path / "two", tmp_path / "one", steps=6)


@pytest.mark.distributed
def test_two_nodes_of_one_process_each_equal_one_node_of_two(two_rank_runs, tmp_path):
    """Multi-node, simulated on one machine: two torchrun agents (--nnodes 2, --node_rank 0 and
    1, one process each, static rendezvous at node 0), so RANK and LOCAL_RANK differ on node 1.
    The run equals the one-node 2-rank run, and node 1 writes nothing of its own."""
    config = _write_config(_config(two_rank_runs["data"], tmp_path / "nodes"), tmp_path / "nodes.yaml")
    env = _launch_env()
    port = str(_gloo.free_port())
    nodes = []
    for node in range(2):
        cmd = [str(TORCHRUN), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", port, "-m", "clipdistill.engine.cli", "distill",
               "--config", str(config), f"deepspeed={two_rank_runs['ds']}"]
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=600) for p in nodes]
    for node, (p, (out, err)) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {node} failed ({p.returncode}):\n{out[-2000:]}\n{err[-5000:]}"
    assert "rank 0 of 2" in outputs[0][1] and "rank 1 of 2" in outputs[1][1]
    # Rank 1 writes nothing of the run (its loader's own list cache aside, logged since the CLI configures logging).
    rank1 = "\n".join(line for line in outputs[1][1].splitlines() if "clipdistill.loaders" not in line)
    assert "saved" not in rank1 and "best held-out" not in rank1
    _assert_same_run(tmp_path / "nodes", two_rank_runs["out"], steps=4)


@pytest.mark.distributed
def test_the_deepspeed_launcher_runs_the_same_job(two_rank_runs, tmp_path):
    """`deepspeed --no_local_rank --num_gpus 2 $(which clipdistill) distill ...`, as documented,
    runs the same 2-rank job as torchrun. (With a hostfile the launcher reaches every host,
    localhost included, over ssh: not available here.)"""
    config = _write_config(_config(two_rank_runs["data"], tmp_path / "ds_launcher"), tmp_path / "run.yaml")
    env = _launch_env()
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--no_local_rank", "--num_gpus", "2",
           "--master_port", str(_gloo.free_port()), str(Path(sys.executable).with_name("clipdistill")), "distill",
           "--config", str(config), f"deepspeed={two_rank_runs['ds']}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "rank 1 of 2" in proc.stdout + proc.stderr
    _assert_same_run(tmp_path / "ds_launcher", two_rank_runs["out"], steps=4)


@pytest.mark.gpu
def test_one_rank_with_deepspeed_on_a_gpu_trains_like_the_plain_engine(shape_folder, tmp_path):
    """The CUDA path (nccl, bf16 partitions by default, bf16 autocast) on one GPU: the sharded
    teacher's run follows the plain engine's (bf16 teacher) within bf16 error."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (carry its wheel to the GPU machine)")
    data = shape_folder("gpu_ds_data", CLASSES, 16, 40)
    ds = _ds_file(tmp_path, DS_CONFIG)
    config = _write_config(_config(data, tmp_path / "zero3", device="cuda"), tmp_path / "zero3.yaml")
    proc = _torchrun(1, ["-m", "clipdistill.engine.cli", "distill", "--config", str(config), f"deepspeed={ds}"],
                     cwd=tmp_path, accelerator="cuda")
    assert "teacher sharded with ZeRO-3" in proc.stderr
    _run_in_process(_config(data, tmp_path / "plain", device="cuda"))
    got, want = _metrics(tmp_path / "zero3"), _metrics(tmp_path / "plain")
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        assert g["loss/loss"] == pytest.approx(w["loss/loss"], rel=5e-2), g["step"]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; torchrun starts each worker in a session of its own)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's process group and every worker's (a node going down: no handler runs)."""
    import signal

    groups = {proc.pid}
    for pid in _descendants(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.mark.distributed
def test_sigkill_a_two_rank_job_then_resume_with_two_ranks_or_one(two_rank_runs, tmp_path):
    """A real kill: the 2-rank job is SIGKILLed (torchrun and its workers) as soon as its first
    checkpoint exists; resuming with 2 ranks, and (from the same killed state) in one plain
    process, ends with the uninterrupted 2-rank run's losses and prompts."""
    import time

    steps = 40  # long enough that the kill lands mid-run (a step takes tens of ms here)
    data, ds = two_rank_runs["data"], two_rank_runs["ds"]
    killed = tmp_path / "killed"
    config = _write_config(_config(data, killed, max_steps=steps, checkpoint_every=2), tmp_path / "killed.yaml")
    env = _launch_env()
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_gloo.free_port()),
           "-m", "clipdistill.engine.cli", "distill", "--config", str(config), f"deepspeed={ds}"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 45
        while ckpt.latest_checkpoint(killed / "checkpoints") is None:
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 45 s"
            time.sleep(0.01)
    finally:
        _kill_job(proc)
        log.close()
    assert proc.returncode == -9
    saved = [s for s, _ in ckpt.list_checkpoints(killed / "checkpoints")]
    assert saved and saved[-1] < steps, f"the kill came after the run finished ({saved})"
    _run_2_ranks(_config(data, tmp_path / "full", max_steps=steps, checkpoint_every=2), ds, tmp_path, "full")

    # Both resumes run in `killed`: the 1-process one on a copy of the killed state, which is then
    # put back for the 2-rank one.
    shutil.copytree(killed, tmp_path / "killed_state")
    _run_in_process(_config(data, killed, max_steps=steps, checkpoint_every=2, resume=True))
    _assert_same_run(killed, tmp_path / "full", steps=steps)
    shutil.rmtree(killed)
    shutil.copytree(tmp_path / "killed_state", killed)

    proc = _run_2_ranks(_config(data, killed, max_steps=steps, checkpoint_every=2), ds, tmp_path, "resume",
                        "--resume")
    assert f"resumed from {killed / 'checkpoints'}" in proc.stderr
    _assert_same_run(killed, tmp_path / "full", steps=steps)


# --------------------------------------------------------------------------------- the tuned teacher under ZeRO-3

TUNED_SHARD_WORKER = r'''
import json, os, sys
import torch
from clipdistill.engine.distributed import (build_sharded_tuned_teacher, detect_launch, init_process_group,
                                            load_deepspeed_config)
from clipdistill.engine.models.tuned import tuned_teacher_class_vectors
env = detect_launch()
init_process_group(env, torch.device("cpu"))
ds = load_deepspeed_config(sys.argv[1], micro_batch_size=2)
names = json.loads(sys.argv[3])
vectors_made = []
def class_vectors(tuned):
    vectors_made.append(torch.distributed.get_rank())
    return tuned_teacher_class_vectors(tuned, names)
teacher, vectors = build_sharded_tuned_teacher(sys.argv[2], ds, device=torch.device("cpu"),
                                               class_vectors=class_vectors)
def held():
    return {name: [int(p.ds_numel), int(p.ds_tensor.numel()), int(p.data.numel())]
            for name, p in teacher.engine.module.named_parameters()}
before = held()
images = torch.load(sys.argv[4])
teacher.train()
features = [teacher.encode_image(images).tolist() for _ in range(2)]  # the second with ZeRO-3's recorded trace
json.dump({"before": before, "after": held(), "features": features, "vectors": vectors.tolist(),
           "logit_scale": float(teacher.logit_scale), "output_dim": teacher.output_dim,
           "training": teacher.training or any(m.training for m in teacher.engine.module.modules()),
           "made_by": vectors_made}, open(os.path.join(sys.argv[5], f"rank{env.rank}.json"), "w"))
torch.distributed.barrier()  # then destroy: a rank leaving a live group may abort at exit
torch.distributed.destroy_process_group()
'''


@pytest.fixture(scope="module")
def tuned_teacher_file(shape_folder, tmp_path_factory) -> Path:
    """A PromptSRC-tuned tiny teacher (random init, 2 shots of each class, 2 epochs): vision prompts
    at 2 of the tower's 3 layers, so one layer runs unprompted."""
    from clipdistill.engine.models import TINY_TEACHER
    from clipdistill.engine.training.tune_teacher import TuneSettings, tune_teacher

    root = tmp_path_factory.mktemp("tuned_teacher")
    data = shape_folder("tuned_shots", CLASSES, 10, 40)
    for i, image in enumerate(sorted((data / "images").glob("*.jpg"))):  # image i shows class i % 5
        folder = root / "labeled" / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / image.name)
    result = tune_teacher(
        TINY_TEACHER, None, root / "labeled", out=root / "tuned.safetensors", templates="generic",
        learner_options={"n_text_ctx": 2, "text_depth": 2, "n_vision_ctx": 3, "vision_depth": 2},
        settings=TuneSettings(shots=2, seed=3, epochs=2, batch_size=4, warmup_epochs=0, min_scale=0.5,
                              backend="torch", workers=0),
        device="cpu", log=lambda m: None)
    return Path(result.path)


@pytest.mark.distributed
def test_each_rank_holds_half_of_every_tuned_teacher_parameter(tuned_teacher_file, tmp_path):
    """The tuned teacher under ZeRO-3: every parameter of the tower and of the vision prompts is
    split over the 2 ranks (also the tower's own class_embedding, positional_embedding and proj,
    gathered by the wrapper's forward and released after it); features equal the unsharded tuned
    teacher's; class vectors (for other names than the tuned ones) come from the tuned prompts on
    rank 0 only."""
    pytest.importorskip("deepspeed", reason="the distributed tier needs DeepSpeed: pip install -e '.[deepspeed]'")
    from clipdistill.engine.models.tuned import load_tuned_teacher, tuned_teacher_class_vectors

    (tmp_path / "worker.py").write_text(TUNED_SHARD_WORKER)
    ds = _ds_file(tmp_path, DS_CONFIG)
    names = ["circle", "ring", "star", "hexagon"]
    images = torch.randn(3, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    _torchrun(2, [str(tmp_path / "worker.py"), str(ds), str(tuned_teacher_file), json.dumps(names),
                  str(tmp_path / "images.pt"), str(tmp_path)], cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    reference = load_tuned_teacher(tuned_teacher_file, device="cpu")
    full = {f"visual.{name}": p for name, p in reference.model.visual.named_parameters()}
    full["vision_prompts"] = reference.learner.vision_prompts
    assert tuple(full["vision_prompts"].shape) == (2, 3, reference.model.visual.conv1.out_channels)
    for r in ranks:
        assert set(r["before"]) == set(r["after"]) == set(full)
        for name, p in full.items():
            for when in ("before", "after"):
                ds_numel, local, materialized = r[when][name]
                assert ds_numel == p.numel(), name
                assert local == -(-p.numel() // 2), (name, local, p.numel())  # half, rounded up
                assert materialized == 0, (when, name)  # gathered only inside a forward
    expected = reference.encode_image(images)
    unprompted = torch.nn.functional.normalize(reference.model.encode_image(images).float(), dim=-1)
    assert (expected - unprompted).abs().max() > 1e-3, "the vision prompts must change the features"
    for r in ranks:
        for features in r["features"]:
            torch.testing.assert_close(torch.tensor(features), expected, rtol=1e-5, atol=1e-5)
        assert r["logit_scale"] == pytest.approx(float(reference.logit_scale))
        assert r["output_dim"] == expected.shape[1] and not r["training"]
    torch.testing.assert_close(torch.tensor(ranks[0]["vectors"]), tuned_teacher_class_vectors(reference, names),
                               rtol=1e-6, atol=1e-6)
    assert ranks[0]["vectors"] == ranks[1]["vectors"], "class vectors broadcast from rank 0"
    assert ranks[0]["made_by"] == [0] and ranks[1]["made_by"] == []


PROMPTKD_LN = {"recipe": "promptkd", "learner": {"kind": "promptkd",
                                                 "options": {"n_ctx": 2, "depth": 2, "projector": "ln_mlp"}}}


@pytest.mark.distributed
def test_tuned_teacher_with_deepspeed_equals_one_process(tuned_teacher_file, shape_folder, tmp_path):
    """`promptkd` with teacher.prompts and deepspeed=ds.json on 2 ranks (the tuned teacher sharded
    with ZeRO-3) equals the single-process run with the same tuned teacher: losses at every step
    and the final prompts and projector."""
    pytest.importorskip("deepspeed", reason="the distributed tier needs DeepSpeed: pip install -e '.[deepspeed]'")
    data = shape_folder("tuned_dist_data", CLASSES, 16, 40)
    ds = _ds_file(tmp_path, DS_CONFIG)

    def config(out: Path) -> dict:
        cfg = {**_config(data, out), **PROMPTKD_LN}
        cfg["teacher"] = {**cfg["teacher"], "prompts": str(tuned_teacher_file)}
        return cfg

    proc = _run_2_ranks(config(tmp_path / "two"), ds, tmp_path, "two")
    assert proc.stderr.count("teacher sharded with ZeRO-3") == 2, proc.stderr[-3000:]
    _run_in_process(config(tmp_path / "one"))
    # PromptKD's loss (kd_weight 1000) amplifies float32 reduction-order noise, as in the conv_bn test.
    _assert_same_run(tmp_path / "two", tmp_path / "one", steps=4, rtol=1e-4, atol=2e-5)


@pytest.mark.slow  # DeepSpeed's start on 2 ranks: about 90 s on 2 cores; the slow tier runs it in CI
@pytest.mark.distributed
def test_datafree_recipe_on_two_ranks_with_a_sharded_teacher(tmp_path):
    """distill --recipe datafree over 2 ranks with the ZeRO-3 teacher: the run finishes, the sharded
    random-init teacher is the synthetic set's (its class vectors equal a single process's), and the
    student trains data-parallel (every rank takes the same steps)."""
    pytest.importorskip("deepspeed", reason="the distributed tier needs DeepSpeed: pip install -e '.[deepspeed]'")
    from clipdistill.engine.datafree import synthesize
    from clipdistill.engine.models import TINY_TEACHER, get_tokenizer

    plan = synthesize.SynthesisPlan(teacher=TINY_TEACHER, teacher_weights=None, class_names=("cat", "dog"),
                                    diversifier="random", generator="fourier", per_class=4, seed=0, steps=2,
                                    n_cutouts=2)
    synthesize.synthesize(plan, tmp_path / "syn", synthesize.load_teacher(TINY_TEACHER, None, "cpu"),
                          get_tokenizer(TINY_TEACHER), batch_size=8, progress=False)
    keys = ["--recipe", "datafree", f"data.train={tmp_path / 'syn'}", "student.name=test_efficientnet",
            "learner.options.image_size=32", "data.batch_size=4", "data.backend=torch", "data.workers=1",
            "train.epochs=2", "train.checkpoint_every=2", "train.progress=false"]
    ds = _ds_file(tmp_path, DS_CONFIG)
    _torchrun(2, ["-m", "clipdistill.engine.cli", "distill", *keys, f"train.out_dir={tmp_path / 'two'}",
                  f"deepspeed={ds}"], cwd=tmp_path)
    two = _final_state(tmp_path / "two")
    assert two["step"] == 4 and two["config"]["method"] == "datafree"
    assert all(torch.isfinite(t).all() for t in two["learner"].values() if t.is_floating_point())
    assert all(m["images_seen"] == 4 * m["step"] for m in _metrics(tmp_path / "two"))  # both ranks' rows count
    one_cfg = ["distill", *keys, "train.max_steps=1", f"train.out_dir={tmp_path / 'one'}"]
    proc = subprocess.run([str(Path(sys.executable).with_name("clipdistill")), *one_cfg], cwd=tmp_path,
                          env=_launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    one = _final_state(tmp_path / "one")
    vectors_two, _ = ckpt.load_class_vectors(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints"),
                                             two["class_vectors"])
    vectors_one, _ = ckpt.load_class_vectors(ckpt.latest_checkpoint(tmp_path / "one" / "checkpoints"),
                                             one["class_vectors"])
    torch.testing.assert_close(vectors_two, vectors_one)
