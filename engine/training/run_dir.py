"""A run's folder (``train.out_dir``): whose run it holds, and what a new run may do there.

Every distillation run gets an identity when it starts: a random id, written to
``<out_dir>/run.json`` and into the header of each of its checkpoints (see
:mod:`.checkpoint`). The id, not the folder's path, says which run a checkpoint belongs
to, so

- a new run refuses a folder that already holds a run (:func:`check_out_dir`) unless it
  continues that run (``--resume``) or replaces it (``--overwrite``): replacing moves the
  old run's files, whole, to ``<out_dir>/previous/<old id>/`` and deletes nothing;
- pruning (``train.keep_last``) and ``--resume`` consider the current run's checkpoints
  only;
- a run folder can be moved or copied elsewhere and resumed there: ``train.out_dir`` is
  where the run lives, not what it is.

Caches that are keyed by their contents (``class_vectors/``, ``lists/``) are not part of a
run: they stay where they are and serve the next run.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.training.checkpoint import list_checkpoints, read_checkpoint_run_id

FORMAT = "clipdistill-run/1"
RUN_FILE = "run.json"
PREVIOUS = "previous"
# What a run writes into its folder; RUN_FILE is moved last, so an interrupted move still says whose files remain.
RUN_ENTRIES = ("checkpoints", "best.safetensors", "metrics.jsonl", "config.json", "tensorboard", RUN_FILE)


@dataclass(frozen=True)
class RunIdentity:
    """Which run a folder holds. ``legacy``: checkpoints without a run id (written before run
    identities existed) belong to this run too (it resumed from one of them)."""

    run_id: str
    legacy: bool = False

    def owns(self, checkpoint_run_id: Optional[str]) -> bool:
        return checkpoint_run_id == self.run_id or (checkpoint_run_id is None and self.legacy)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(4)


def read_identity(out_dir: str | Path) -> Optional[RunIdentity]:
    """The identity recorded in ``out_dir/run.json``; None when there is none."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); move it away to start a new run there") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("run_id"), str) \
            or not data["run_id"]:
        raise ConfigError(f"{path} is not a clipdistill run file (format {FORMAT} with a run_id)")
    return RunIdentity(data["run_id"], legacy=bool(data.get("legacy", False)))


def _probe_writable(out_dir: Path) -> None:
    probe = out_dir / f".write-probe-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"train.out_dir {str(out_dir)!r} cannot be written ({exc.strerror or exc}); "
                          f"choose a writable folder") from exc


def write_identity(out_dir: str | Path, identity: RunIdentity) -> Path:
    """Write ``out_dir/run.json`` atomically; a folder that cannot be written is a one-line error."""
    out_dir = Path(out_dir)
    path = out_dir / RUN_FILE
    tmp = out_dir / f".{RUN_FILE}.tmp-{os.getpid()}"
    record = {"format": FORMAT, "run_id": identity.run_id, "legacy": identity.legacy,
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"train.out_dir {str(out_dir)!r} cannot be written ({exc.strerror or exc}); "
                          f"choose a writable folder") from exc
    return path


def run_entries(out_dir: str | Path) -> list[Path]:
    """The run files present in ``out_dir`` (an empty checkpoints folder does not count)."""
    out_dir = Path(out_dir)
    found = []
    for name in RUN_ENTRIES:
        path = out_dir / name
        if name == "checkpoints":
            if list_checkpoints(path):
                found.append(path)
        elif path.exists():
            found.append(path)
    return found


def check_out_dir(out_dir: str | Path, *, resume: bool, overwrite: bool, writable: bool = False) -> None:
    """Refuse a new run (neither ``resume`` nor ``overwrite``) in a folder that holds a run.

    Callers run it before building anything, so a refusal costs nothing. ``writable``: also
    create the folder and a probe file in it (removed at once), so that a folder that cannot
    be written is a one-line error now rather than a failed checkpoint later.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in train.out_dir, "
                          "or replace it")
    if writable:
        _probe_writable(Path(out_dir))
    if resume or overwrite:
        return
    present = run_entries(out_dir)
    if present:
        identity = read_identity(out_dir)
        whose = f"run {identity.run_id}" if identity else "a run"
        raise ConfigError(
            f"train.out_dir {str(out_dir)!r} already holds {whose} ({', '.join(p.name for p in present)}); "
            f"continue it with --resume, replace it with --overwrite (its files move to "
            f"{str(Path(out_dir) / PREVIOUS)!r}), or choose another train.out_dir")


def move_aside(out_dir: str | Path, *, log=print) -> Optional[Path]:
    """Move the run files of ``out_dir`` to ``out_dir/previous/<run id>[-n]/``; return that folder.

    Renames only (same file system, nothing copied or deleted). Returns None when there was
    nothing to move.
    """
    out_dir = Path(out_dir)
    present = [out_dir / name for name in RUN_ENTRIES if (out_dir / name).exists()]
    if not present:
        return None
    try:
        identity = read_identity(out_dir)
    except ConfigError:
        identity = None
    base = out_dir / PREVIOUS / (identity.run_id if identity else "unidentified-" + time.strftime("%Y%m%d-%H%M%S"))
    target, n = base, 1
    while target.exists():
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
    try:
        target.mkdir(parents=True)
        for path in present:
            os.replace(path, target / path.name)
    except OSError as exc:
        raise ConfigError(f"--overwrite: cannot move the previous run's files out of {str(out_dir)!r} "
                          f"({exc.strerror or exc})") from exc
    log(f"clipdistill: --overwrite: the previous run's files ({', '.join(p.name for p in present)}) "
        f"moved to {target}")
    return target


def claim_out_dir(out_dir: str | Path, *, resume: bool, overwrite: bool, log=print) -> RunIdentity:
    """Make ``out_dir`` this run's folder and return the run's identity (rank 0 only).

    A new run: refuse a folder holding a run (:func:`check_out_dir`), or move that run aside
    with ``overwrite``; then write a fresh identity. ``resume``: keep the recorded identity;
    a folder without ``run.json`` (made before run identities, or whose ``run.json`` was lost)
    takes its identity from its newest checkpoint that records one, or else adopts the
    checkpoints without an id as its own (``legacy``).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume=resume, overwrite=overwrite)
    if resume:
        identity = read_identity(out_dir) or _identity_from_checkpoints(out_dir / "checkpoints")
    else:
        if overwrite:
            move_aside(out_dir, log=log)
        identity = RunIdentity(new_run_id())
    write_identity(out_dir, identity)
    return identity


def _identity_from_checkpoints(folder: Path) -> RunIdentity:
    from_checkpoints = [read_checkpoint_run_id(path) for _, path in reversed(list_checkpoints(folder))]
    recorded = [run_id for run_id in from_checkpoints if run_id]
    if recorded:
        return RunIdentity(recorded[0], legacy=False)
    return RunIdentity(new_run_id(), legacy=bool(from_checkpoints))

