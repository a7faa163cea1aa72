"""The training loop: run a built :class:`~clipdistill.engine.training.builder.Run`, checkpoint, resume exactly.

The command line is ``clipdistill distill`` (:mod:`clipdistill.engine.commands.distill`).

What a step does (no host synchronization inside it): the loader's batch (one
view per image, at the teacher's and the student's resolution) -> the frozen
teacher's image features under no_grad -> the student's prompted features and
class vectors -> :func:`clipdistill.kernels.kd_loss` (through
:class:`~clipdistill.engine.step.DistillStep`) -> backward -> every
``grad_accum`` micro-batches: clip, optimizer step, learning rate of the next
step. Loss parts accumulate on the device; every ``log_every`` steps one
synchronization reads them, checks that they are finite, writes a metrics line
(JSON) and advances the progress bar.

Checkpoints (``<out_dir>/checkpoints/step-*.safetensors``) hold the learner's
state, the optimizer's state, every RNG state, the loader's position and the
counters; they are written atomically and only after the losses since the
last check, and the trainable tensors and the optimizer's state at the check,
were found finite (the same synchronization), so a checkpoint never holds
non-finite state and the stop message names one that is finite.

A run has an identity (:mod:`.run_dir`): a new run refuses a ``train.out_dir`` that
holds another run unless told to replace it (``train.overwrite``); pruning and
``--resume`` consider this run's checkpoints only. ``--resume`` continues from the
newest one that reads back whole and finite (a torn or garbled file is set aside
as ``*.corrupt``, with one line saying so) and ends where an uninterrupted run
ends; the folder may have moved since.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from clipdistill.engine.config.run import RunConfig, config_differences, dump_run_config, with_absent_keys
from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.evaluation.evaluate import heldout_agreement_kl, is_better
from clipdistill.engine.parallel.launch import all_reduce_sum, rank_and_world, row_share, sum_gradients
from clipdistill.engine.progress import progress_bar
from clipdistill.engine.prompts.learners import GaussianPromptAggregator
from clipdistill.engine.training.builder import Run, build_run
from clipdistill.engine.training.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint,
                                                    read_checkpoint_run_id, rng_state, save_checkpoint,
                                                    save_class_vectors, save_state, set_rng_state)
from clipdistill.engine.training.loop import OptimizerCore, make_optimizer
from clipdistill.engine.training.run_dir import RunIdentity, check_out_dir, claim_out_dir, read_identity
from clipdistill.engine.training.teacher_cache import TeacherCacheError


class NonFiniteLossError(RuntimeError):
    """The loss, the trainable tensors or the optimizer's state became NaN or infinite; the message
    names the step and the last good (finite) checkpoint."""

# Resuming may ignore these differences: how long and how visibly the run goes on, where its folder
# is (a location, not an identity: the run id in run.json is), and how the teacher is sharded.
RESUME_MAY_CHANGE = ("train.resume", "train.overwrite", "train.max_steps", "train.epochs", "train.progress",
                     "train.log_every", "train.checkpoint_every", "train.keep_last", "train.tensorboard",
                     "train.deepspeed", "train.out_dir", "train.class_vector_cache")



class Trainer:
    """Runs a built :class:`Run`: the loop, metrics, checkpoints and resume."""

    def __init__(self, run: Run, *, log: Callable[[str], None] = print):
        self.run = run
        self.cfg = run.config
        self.log = log
        self._gpa_last: Optional[dict] = None
        self.out_dir = Path(self.cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        params = list(run.step.trainable_parameters().values())
        if not params:
            raise ConfigError("the learner has no trainable tensors (prompt length or depth 0?)")
        self.params = params
        o = self.cfg.optim
        self.optimizer = make_optimizer(params, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                        momentum=o.momentum, betas=o.betas)
        micro_per_epoch = len(run.loader)
        self.total_steps = (self.cfg.train.max_steps if self.cfg.train.max_steps is not None
                            else (self.cfg.train.epochs * micro_per_epoch) // o.grad_accum)
        # Warm-up in epochs (the papers' unit) counts the optimizer steps of that many epochs.
        warmup_steps = o.warmup_steps or (o.warmup_epochs * micro_per_epoch) // o.grad_accum
        if self.total_steps < 1:
            raise ConfigError(f"the run has no optimizer step: {micro_per_epoch} batches per epoch, "
                              f"grad_accum {o.grad_accum}, epochs {self.cfg.train.epochs}")
        # Several ranks: every rank runs the same steps on its slice; rank 0 alone writes files.
        self.rank, self.world = rank_and_world()
        self.is_main = self.rank == 0
        if self.is_main and warmup_steps >= self.total_steps:
            source = (f"optim.warmup_steps={o.warmup_steps}" if o.warmup_steps
                      else f"optim.warmup_epochs={o.warmup_epochs} ({micro_per_epoch} batches an epoch)")
            self.log(f"WARNING: {source} gives {warmup_steps} warm-up steps, which cover the whole run of "
                     f"{self.total_steps} optimizer steps: the learning rate never reaches optim.lr")
        self.core = OptimizerCore(
            self.optimizer, params, base_lr=o.lr, total_steps=self.total_steps, warmup_steps=warmup_steps,
            warmup_lr=o.warmup_lr, schedule=o.schedule, grad_accum=o.grad_accum, clip_grad_norm=o.clip_grad_norm,
            # Several ranks: each rank's loss was scaled by its share of the global batch's real rows, so
            # the summed gradients are the single-process ones.
            before_step=(lambda: sum_gradients(self.params)) if self.world > 1 else None,
        )
        self.images_seen = 0
        self.best: Optional[dict] = None  # {"step", metric: value} of the best held-out evaluation
        self.identity: Optional[RunIdentity] = None  # set by fit() when it takes out_dir
        self.resumed_from: Optional[Path] = None
        self.step_fn = torch.compile(run.step) if self.cfg.train.compile else run.step
        self.class_vectors_record: Optional[dict] = None  # written with the first checkpoint
        # PromptSRC's Gaussian prompt aggregation over the run's epochs; the aggregate is the result.
        self.gpa: Optional[GaussianPromptAggregator] = None
        self.gpa_epoch: Optional[int] = None  # the (0-based) epoch whose batches are being trained on
        if self.cfg.learner.kind == "promptsrc" and self.cfg.learner.gpa:
            epochs = max(1, math.ceil(self.total_steps * o.grad_accum / micro_per_epoch))
            self.gpa = GaussianPromptAggregator.over_run(epochs, self.cfg.learner.gpa_mean, self.cfg.learner.gpa_std)
            self.gpa_epochs = epochs

    @property
    def global_step(self) -> int:
        """Optimizer steps taken."""
        return self.core.step

    @global_step.setter
    def global_step(self, step: int) -> None:
        self.core.step = int(step)
        self.core.set_lr()

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        state = {
            "step": self.global_step,
            "images_seen": self.images_seen,
            "learner": self.run.step.state_to_save(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "loader": self.run.loader.state_dict(),
            "config": dump_run_config(self.cfg),
            "best": self.best,
            "class_vectors": self.class_vectors_record,
        }
        if self.gpa is not None:
            state["gpa"] = {"epochs": self.gpa_epochs, "epoch": self.gpa_epoch, "sum": self.gpa.state_dict(),
                            "learner_last": self._gpa_last}
        return state

    def _store_class_vectors(self) -> None:
        """The teacher's class vectors the run trains against, stored once beside the checkpoints."""
        if self.class_vectors_record is None:
            run = self.run
            self.class_vectors_record = save_class_vectors(
                self.ckpt_dir, run.step.teacher_class_vectors, class_names=run.class_names,
                source=run.class_vectors_source, templates=run.templates)

    def save(self) -> Path:
        if self.world > 1:
            self.run.loader.sync_rejects()  # a collective: the checkpoint carries every rank's rejects
            if not self.is_main:
                return self.ckpt_dir / f"step-{self.global_step:09d}.safetensors"
        self._store_class_vectors()
        return save_checkpoint(self.ckpt_dir, self.global_step, self.state(), keep_last=self.cfg.train.keep_last,
                               run_id=self._run_id)

    @property
    def _run_id(self) -> Optional[str]:
        return self.identity.run_id if self.identity is not None else None

    def finite_state(self) -> torch.Tensor:
        """A device bool: the trainable tensors and the optimizer's floating state are all finite (no sync)."""
        device = self.params[0].device
        tensors = list(self.params) + [value for state in self.optimizer.state.values() for value in state.values()
                                       if torch.is_tensor(value) and value.is_floating_point()
                                       and value.device == device]
        return torch.stack([torch.isfinite(t).all() for t in tensors]).all()

    # -- PromptSRC's Gaussian prompt aggregation ------------------------------------------------
    def _gpa_batch(self, epoch: int) -> None:
        """Before training on a batch of ``epoch`` (0-based): an epoch that ended goes into the aggregate."""
        if self.gpa is not None and self.gpa_epoch != epoch:
            if self.gpa_epoch is not None:
                self._gpa_add(self.gpa_epoch)
            self.gpa_epoch = epoch

    def _gpa_add(self, epoch: int) -> None:
        index = min(epoch + 1, self.gpa_epochs)  # 1-based; a run cut by max_steps ends within its last epoch
        self.gpa.add(self.run.step.state_to_save(), index)

    def _gpa_finish(self) -> None:
        """The run's last epoch goes in, and the learner becomes the aggregate (the run's result)."""
        if self.gpa is None or self.gpa_epoch is None:
            return
        self._gpa_add(self.gpa_epoch)
        self.gpa_epoch = None
        self._gpa_last = self.run.step.state_to_save()  # what a resume continues training from
        self.run.step.load_saved_state(self.gpa.result())
        mean, std = self.cfg.learner.gpa_mean * self.gpa_epochs, self.cfg.learner.gpa_std
        self.log(f"clipdistill: PromptSRC prompts aggregated over {self.gpa_epochs} epoch(s) (Gaussian, mean "
                 f"{mean:.3g}, std {std:.3g})")

    def _cached_features(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's teacher features from the cache, and its mask less rows the cache rejected.

        The loader replays the stored views; every real row's crop and flip are compared with
        the stored numbers (CPU arrays, no device work), so a changed image or transform can
        never pair a student view with another view's teacher features.
        """

        ids, views = batch.sample_ids.numpy(), batch.view_ids.numpy()
        features, stored, valid = self.run.feature_cache.lookup(ids, views)
        real = batch.mask.numpy()
        differs = ((stored[real, :4] != batch.crops.numpy()[real]).any(axis=1)
                   | (stored[real, 4].astype(bool) != batch.flips.numpy()[real]))
        if differs.any():
            bad = int(ids[real][np.flatnonzero(differs)[0]])
            raise TeacherCacheError(f"the loader's view of sample {bad} differs from the cached one: the image "
                                    f"or the transform changed since the cache was built; rebuild the cache")
        mask = torch.from_numpy(real & valid)
        return torch.from_numpy(features).to(self.run.device, non_blocking=True), mask

    def select(self) -> dict:
        """Held-out teacher-student agreement and KL (no labels); keep the best learner state.

        Runs at every checkpoint when ``data.holdout_fraction`` > 0. The best state (by
        ``train.select_metric``) is written to ``<out_dir>/best.safetensors``; without a
        held-out set the last checkpoint is the result.
        """
        run = self.run
        if run.heldout_loader is None:
            return {}

        run.heldout_loader.set_epoch(0)
        # Several ranks: each scores its slice of every held-out batch; the tallies are summed, so
        # every rank sees the same result, takes the same decision, and rank 0 writes the file.
        result = heldout_agreement_kl(run.step, run.heldout_loader, teacher_input=run.teacher_input,
                                      student_input=run.student_input, autocast_dtype=run.autocast_dtype,
                                      all_reduce=self.world > 1)
        metric = self.cfg.train.select_metric
        out = {"heldout/agreement": result["agreement"], "heldout/kl": result["kl"]}
        if is_better(metric, result[metric], None if self.best is None else self.best[metric]):
            self.best = {"step": self.global_step, "agreement": result["agreement"], "kl": result["kl"]}
            if self.is_main:
                self._store_class_vectors()
                stored = self.class_vectors_record
                record = dict(stored, file=f"{self.ckpt_dir.name}/{stored['file']}")  # relative to best's folder
                save_state(self.out_dir / "best.safetensors", {"step": self.global_step, "best": self.best,
                                                               "learner": run.step.state_to_save(),
                                                               "config": dump_run_config(self.cfg),
                                                               "class_vectors": record},
                           run_id=self._run_id)
                self.log(f"clipdistill: step {self.global_step}: best held-out {metric} so far "
                         f"({result[metric]:.4g}); saved {self.out_dir / 'best.safetensors'}")
        return out

    def _claim_out_dir(self) -> RunIdentity:
        """Rank 0 takes out_dir for this run (refusal, overwrite, run.json); every rank learns the identity."""
        train = self.cfg.train
        identity, error = None, None
        if self.is_main:
            try:
                identity = claim_out_dir(self.out_dir, resume=train.resume, overwrite=train.overwrite, log=self.log)
            except ConfigError as exc:
                error = exc
        if self.world > 1:  # also a barrier: run.json is written before the other ranks read it
            refused = all_reduce_sum([float(error is not None)], self.run.device)[0]
            if error is None and refused:
                error = ConfigError("rank 0 could not take train.out_dir (its message says why)")
            if error is None and not self.is_main:
                identity = read_identity(self.out_dir)
        if error is not None:
            raise error
        return identity

    def _intact_checkpoint(self) -> Optional[tuple[Path, dict]]:
        """The newest checkpoint of this run that reads back whole and finite, with its state.

        Newer ones that do not (a torn or garbled file, non-finite tensors) are renamed
        ``*.corrupt`` by rank 0, each with one line saying so, and never pruned or resumed again.
        """
        for _, path in reversed(list_checkpoints(self.ckpt_dir)):
            run_id = read_checkpoint_run_id(path)  # None: no id recorded, or a header that cannot be read
            if run_id is not None and not self.identity.owns(run_id):
                continue  # another run's
            try:
                state = load_checkpoint(path)
                tensors = [v for part in ("learner", "optimizer") for v in _tensors(state.get(part))]
                if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
                    raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite values")
            except (CheckpointError, OSError) as exc:
                aside = path.with_name(path.name + ".corrupt")
                if self.is_main and path.exists():
                    path.replace(aside)
                self.log(f"clipdistill: --resume: {exc}; set aside as {aside.name}, trying the previous checkpoint")
                continue
            if self.identity.owns(run_id):
                return path, state
        return None

    def resume(self) -> bool:
        found = self._intact_checkpoint()
        if found is None:
            self.log(f"clipdistill: --resume: no checkpoint of run {self.identity.run_id} in {self.ckpt_dir}; "
                     f"starting from scratch")
            return False
        path, state = found
        saved, now = with_absent_keys(state["config"]), dump_run_config(self.cfg)
        different = [k for k in config_differences(saved, now) if k not in RESUME_MAY_CHANGE]
        if different:
            raise ConfigError(f"--resume: the checkpoint {path} was made with a different config: "
                              f"{', '.join(different)} differ")
        gpa = state.get("gpa")
        self.run.step.load_saved_state(gpa["learner_last"] if gpa and gpa.get("learner_last") else state["learner"])
        if self.gpa is not None and gpa is not None:
            if int(gpa["epochs"]) != self.gpa_epochs:
                raise ConfigError(f"--resume: the checkpoint {path} aggregates PromptSRC's prompts over "
                                  f"{gpa['epochs']} epochs, this run has {self.gpa_epochs}: the Gaussian's weights "
                                  f"would differ (keep the run's length, or set learner.gpa=false)")
            self.gpa.load_state_dict(gpa["sum"])
            self.gpa_epoch = gpa["epoch"]
        self.class_vectors_record = state.get("class_vectors")
        self.optimizer.load_state_dict(state["optimizer"])
        self.run.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.global_step = int(state["step"])
        self.images_seen = int(state["images_seen"])
        self.best = state.get("best")
        self.resumed_from = path
        self.log(f"clipdistill: resumed from {path} (step {self.global_step})")
        return True

    # -- the loop -----------------------------------------------------------------------------
    def _forward(self, batch) -> tuple[dict[str, torch.Tensor], int]:
        """One micro-batch's loss parts (scaled for this rank) and its number of real rows."""
        run, device = self.run, self.run.device
        mask = batch.mask
        teacher_images = batch.images[run.teacher_input] if run.teacher_input else None
        student_images = batch.images[run.student_input]
        teacher_features = None
        if run.feature_cache is not None:
            teacher_features, mask = self._cached_features(batch)
        real_rows = int(mask.sum())  # the mask lives on the CPU: no device sync
        row_weights = row_mask = None  # a batch without padding: plain means and statistics
        if 0 < real_rows < len(mask):
            row_mask = mask.to(device=device, non_blocking=True)
            row_weights = row_mask.to(torch.float32)
        elif real_rows == 0:
            # A rank whose share of the step is all padding still takes it (ranks stay in
            # step; its batch norm joins the others' statistics with no rows), with a zero
            # loss instead of 0/0.
            row_mask = mask.to(device=device, non_blocking=True)
        with torch.autocast(device.type, dtype=run.autocast_dtype or torch.float32,
                            enabled=run.autocast_dtype is not None):
            parts = self.step_fn(teacher_images, student_images, row_weights,
                                 teacher_features=teacher_features, row_mask=row_mask)
        if real_rows == 0:
            parts = {name: value * 0.0 for name, value in parts.items()}
        if self.world > 1:
            # Scaled by this rank's share of the global batch's real rows, the ranks' losses sum
            # to the global batch's mean: the summed gradients are the single-process ones
            # (the optimizer core's before_step), and so are the logged sums.
            share = row_share(real_rows, device)
            parts = {name: value * share for name, value in parts.items()}
        return parts, real_rows

    def _close_interval(self, interval: "_Interval", lr_used: float, last_good_ckpt: Optional[Path]) -> dict:
        """The interval's one synchronization: mean losses, the non-finite check, the metrics record."""
        names = list(interval.sums)
        # One synchronization reads the mean losses, whether the state after the optimizer step is
        # finite (then a checkpoint may be written from it) and the first step with a non-finite loss.
        # (float64: a step number stays exact, and the float32 losses read back as before.)
        values = torch.cat([(torch.stack([interval.sums[n] for n in names]) / interval.micro_batches).double(),
                            self.finite_state().double().reshape(1),
                            interval.first_bad.double().reshape(1)]).tolist()
        finite_state, bad, values = values[-2] > 0, int(values[-1]), values[:-2]
        images = interval.images
        if self.world > 1:
            # The global batch's losses (the ranks' shares sum to them) and counts; every rank
            # sees a non-finite loss anywhere, so all stop together.
            summed = all_reduce_sum(values + [images, float(bad >= 0), float(not finite_state)], self.run.device)
            images = int(summed[len(names)])
            values = summed[:len(names)]
            if summed[len(names) + 1] > 0 and bad < 0:
                bad = max(0, self.global_step - 1)
            finite_state = summed[len(names) + 2] == 0
            self.images_seen = interval.images_before + images
        good = f"the last good checkpoint, {last_good_ckpt}, is intact and finite" if last_good_ckpt else \
            "no checkpoint was written before it"
        if bad >= 0 or not all(math.isfinite(v) for v in values):
            where = bad if bad >= 0 else self.global_step - 1
            state = "" if finite_state else " (the trained tensors are non-finite too)"
            raise NonFiniteLossError(f"non-finite loss at step {where}{state}; stopping ({good})")
        if not finite_state:
            raise NonFiniteLossError(
                f"non-finite trainable tensors or optimizer state after step {self.global_step} (checked every "
                f"train.log_every steps and before each checkpoint; the learning rate may be too large); "
                f"stopping ({good})")
        elapsed = time.perf_counter() - interval.start
        return {"step": self.global_step, "epoch": self.run.loader.epoch, "lr": lr_used,
                **{f"loss/{n}": v for n, v in zip(names, values)},
                "images_per_s": images / max(elapsed, 1e-9),
                "images_seen": self.images_seen, "rejected_images": len(self.run.loader.rejects)}

    def _write_metrics(self, record: dict, tb, progress) -> None:
        if self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if tb is not None:
            for key, value in record.items():
                if key != "step":
                    tb.add_scalar(key, value, self.global_step)
        if progress is not None and "loss/loss" in record:
            progress.update(self.global_step - progress.n)
            progress.set_postfix(loss=f"{record['loss/loss']:.4g}", img_s=f"{record['images_per_s']:.0f}")

    def fit(self) -> dict:
        cfg, run = self.cfg, self.run
        self.identity = self._claim_out_dir()
        if cfg.train.resume:
            self.resume()
        if self.is_main:
            (self.out_dir / "config.json").write_text(json.dumps(dump_run_config(cfg), indent=2))
        tb = self._tensorboard() if self.is_main else None
        progress = self._progress() if self.is_main else None
        run.step.train()
        self.core.micro = 0  # a new fit starts at a fresh accumulation window
        interval = _Interval(run.device, self.images_seen)
        last_good_ckpt = self.resumed_from  # read back finite; None for a new run
        summary: dict = {}
        while self.global_step < self.total_steps:
            for batch in run.loader:
                self._gpa_batch(int(batch.epoch))
                parts, real_rows = self._forward(batch)
                lr_used = self.core.lr
                interval.add(parts, real_rows)
                self.images_seen += real_rows
                if not self.core.backward(parts["loss"]):
                    continue  # mid-accumulation
                interval.check_finite(parts["loss"], self.global_step - 1)
                done = self.global_step >= self.total_steps
                checkpoint = self.global_step % cfg.train.checkpoint_every == 0 or done
                if done:
                    self._gpa_finish()
                if self.global_step % cfg.train.log_every == 0 or checkpoint:
                    summary = self._close_interval(interval, lr_used, last_good_ckpt)
                    self._write_metrics(summary, tb, progress)
                    interval = _Interval(run.device, self.images_seen)
                    if checkpoint:
                        selection = self.select()
                        if selection:
                            self._write_metrics({"step": self.global_step, **selection}, None, None)
                            summary = {**summary, **selection}
                        last_good_ckpt = self.save()
                if done:
                    break
        if progress is not None:
            progress.close()
        if tb is not None:
            tb.close()
        return {**summary, "checkpoint": str(last_good_ckpt) if last_good_ckpt else None}

    def _progress(self):
        if not self.cfg.train.progress:
            return None
        return progress_bar(total=self.total_steps, initial=self.global_step, desc="distill", unit="step")

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"train.tensorboard=true needs the tensorboard package ({exc})") from exc
        return SummaryWriter(str(self.out_dir / "tensorboard"))


def distill(cfg: RunConfig, *, log: Callable[[str], None] = print) -> dict:
    """Build and run a distillation; return the last metrics line plus the final checkpoint path."""
    # Before anything is built (or written there: lists, class vectors): a refused out_dir costs nothing.
    check_out_dir(cfg.train.out_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite, writable=True)
    run = build_run(cfg, log=log)
    try:
        summary = Trainer(run, log=log).fit()
        if run.owns_process_group:
            torch.distributed.barrier()  # rank 0's last checkpoint is written before anyone leaves
        return summary
    finally:
        # After the barrier above: with torch 2.13's gloo, a rank that leaves with its group
        # alive, or destroys it while a peer is still in a collective, now and then aborts at exit
        # ("terminate called without an active exception", SIGABRT, after the work is done).
        # Measured on 2 CPU ranks: no destroy 4 of 12 runs, destroy without a barrier 3 of 8,
        # barrier then destroy 0 of 10; 2-rank DeepSpeed `distill` runs: 0 of 18.
        if run.owns_process_group:
            torch.distributed.destroy_process_group()


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors in a nested state (dicts, lists, tuples)."""
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


class _Interval:
    """Loss parts and counts since the last log, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device, images_before: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.images = 0  # this rank's real rows; all ranks' after the interval's all-reduce
        self.images_before = images_before  # global images seen when the interval began
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step
        self.start = time.perf_counter()

    def add(self, parts: dict[str, torch.Tensor], real_rows: int) -> None:
        for name, value in parts.items():
            value = value.detach()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.micro_batches += 1
        self.images += real_rows

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Remember ``step`` if ``loss`` is not finite and no earlier step was (on the device)."""
        bad_now = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where((self.first_bad < 0) & bad_now, torch.full_like(self.first_bad, step),
                                     self.first_bad)
