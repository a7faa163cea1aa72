"""What every command shares: one argument definition per concept, input checks, exit codes, logging.

- **Arguments.** One helper per concept, so that a concept has one spelling in every command:
  :func:`add_teacher`, :func:`add_class_names`, :func:`add_checkpoint`, :func:`add_out_file` (``--out``
  is always a file) and :func:`add_out_dir` (``--out-dir`` always a folder). A spelling that a
  release renamed stays for one release as a hidden alias (:func:`add_old_spelling`): it works, is
  left out of ``--help`` and logs what it is now called.
- **Input checks.** A command checks every path and name it was given (:func:`named`,
  :func:`require_file`, :func:`require_dir`, :func:`require_out_file`, :func:`require_out_dir`,
  :func:`check_model_input`, :func:`check_run_inputs`) before it builds any model, so a typo costs a
  second, not a teacher's load; the error names the flag or config key.
- **Exit codes** (:func:`exit_code_for`): 0 done; 1 a failure while running; 2 bad input (a flag, a
  config key, a path, a file's content); 3 a non-finite loss stopped ``distill``; 130 interrupted
  (Ctrl-C). The command line prints one line on stderr; ``-v`` or ``--debug`` add the traceback.
- **Logging** (:func:`configure_logging`): the command line configures Python's ``logging`` once;
  the loggers of ``clipdistill.*`` (engine, loaders, kernels) and of third-party libraries (root)
  print through one format on stderr. Results stay on stdout (the one-line JSON summaries).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

from safetensors import safe_open

from clipdistill.engine.config.run import RunConfig
from clipdistill.engine.datafree.dataset import is_synthetic_set
from clipdistill.engine.datafree.student import build_timm_backbone, import_timm
from clipdistill.engine.io import read_class_names, read_templates
from clipdistill.engine.models.clip import CHECKPOINT_SUFFIXES, check_model
from clipdistill.engine.training.checkpoint import CheckpointError, latest_checkpoint
from clipdistill.engine.training.sources import datafree_config
from clipdistill.engine.training.trainer import NonFiniteLossError
from clipdistill.loaders.sources import check_source

logger = logging.getLogger("clipdistill.cli")

EXIT_OK = 0
EXIT_RUNTIME = 1  # a failure while running: out of memory, a file that went bad mid-run, a bug
EXIT_INPUT = 2  # bad input: a flag, a config key, a path, a file's content (also argparse's own code)
EXIT_NONFINITE = 3  # distill: the loss became NaN or infinite (the last good checkpoint is intact)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class InputError(ValueError):
    """Bad input to a command; the message names the flag or config key."""


# Exceptions that mean "the input is wrong", not "the run failed". CheckpointError is a
# RuntimeError only for its library callers: to a command it is a file that cannot be used.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                CheckpointError)


def exit_code_for(error: BaseException) -> int:
    """The documented exit code of an exception that ended a command."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, NonFiniteLossError):
        return EXIT_NONFINITE
    if isinstance(error, INPUT_ERRORS):
        return EXIT_INPUT
    return EXIT_RUNTIME


def one_line(error: BaseException) -> str:
    """An exception as one line: its message with newlines folded (the type added when it says little)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = f"missing key {error.args[0]!r}"
    if not isinstance(error, INPUT_ERRORS + (NonFiniteLossError,)) or not text:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


# ------------------------------------------------------------------------------------------ arguments


class HelpFormatter(argparse.HelpFormatter):
    """Help with every non-trivial default shown, once: ``(default: X)`` unless the text already
    says ``default``, and never for None, False, a counter's 0 or a suppressed default."""

    @staticmethod
    def _default(action: argparse.Action) -> Optional[str]:
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or default == []
                or isinstance(action, argparse._CountAction) or "default" in (action.help or "")
                or not action.option_strings and action.nargs not in ("?", "*")):
            return None
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"(default: {default})".replace("%", "%%")

    def _format_action(self, action: argparse.Action) -> str:
        default = self._default(action)
        if default is not None and action.help != argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = f"{action.help} {default}" if action.help else default
        return super()._format_action(action)


class _OldSpelling(argparse.Action):
    """A renamed flag's old spelling: stores into the new flag's ``dest`` and notes the rename."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if self.nargs == 0 else values)
        notes = list(getattr(namespace, "old_spellings", None) or [])
        namespace.old_spellings = notes + [f"{option_string} is now {self.new}; the old spelling "
                                           f"goes in the next release"]


def add_old_spelling(parser: argparse.ArgumentParser | argparse._ActionsContainer, old: str, new: str,
                     dest: str, *, flag: bool = False) -> None:
    """Accept ``old`` as a hidden alias of ``new`` (same ``dest``) for one release."""
    parser.add_argument(old, dest=dest, action=_OldSpelling, new=new, nargs=0 if flag else None,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def old_spelling_notes(args: argparse.Namespace) -> list[str]:
    """The renamed flags this command line used (logged as warnings once logging is configured)."""
    return list(getattr(args, "old_spellings", None) or [])


def _with_old(parser, new: str, dest: str, old: Sequence[str], *, required: bool, **kwargs) -> None:
    """``new`` plus its hidden old spellings; ``required`` holds for the group (one spelling must be given)."""
    target = parser.add_mutually_exclusive_group(required=True) if required and old else parser
    target.add_argument(new, dest=dest, required=required and not old, **kwargs)
    for spelling in old:
        add_old_spelling(target, spelling, new, dest)


def add_teacher(parser: argparse.ArgumentParser, *, default: Optional[str] = None, required: bool = False,
                name_help: Optional[str] = None, weights_help: Optional[str] = None,
                old_weights: Sequence[str] = ()) -> None:
    """``--teacher NAME`` (an open_clip model name, or ``hf-hub:org/repo``) and ``--teacher-weights``."""
    parser.add_argument("--teacher", default=default, required=required, metavar="NAME",
                        help=name_help or "teacher: an open_clip model name, or hf-hub:org/repo")
    _with_old(parser, "--teacher-weights", "teacher_weights", old_weights, required=False, default=None,
              metavar="TAG|FILE",
              help=weights_help or "teacher weights: an open_clip pretrained tag or a local .safetensors/.pt "
                                   "file (default: random init, for tests)")


def add_class_names(parser: argparse.ArgumentParser, *, help: str, required: bool = False,
                    repeat: bool = False, old: Sequence[str] = ()) -> None:
    """``--class-names FILE``: one class name per line (``builtin:imagenet21k`` where a vocabulary fits)."""
    kwargs = {"action": "append"} if repeat else {}
    _with_old(parser, "--class-names", "class_names", old, required=required, default=None, metavar="FILE",
              help=help, **kwargs)


def add_checkpoint(parser: argparse.ArgumentParser, *, help: str, required: bool = True,
                   old: Sequence[str] = (), positional: bool = False) -> None:
    """``--checkpoint PATH``: a training checkpoint, an export file or a checkpoint folder, per command.

    ``positional``: the old positional form (``export CHECKPOINT``) is accepted too.
    """
    group = parser.add_mutually_exclusive_group(required=required)
    if positional:
        group.add_argument("checkpoint_positional", nargs="?", default=None, metavar="CHECKPOINT",
                           help=argparse.SUPPRESS)
    group.add_argument("--checkpoint", default=None, metavar="PATH", help=help)
    for spelling in old:
        add_old_spelling(group, spelling, "--checkpoint", "checkpoint")


def checkpoint_arg(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint given by ``--checkpoint`` or, where allowed, positionally."""
    return getattr(args, "checkpoint", None) or getattr(args, "checkpoint_positional", None)


def run_checkpoint(path: Optional[str], key: str) -> Optional[str]:
    """A checkpoint file as given, or a run folder's: its ``best.safetensors`` (held-out selection),
    else its newest checkpoint (also a folder of checkpoints itself); a folder without one is an
    input error naming ``key``."""
    if path is None or not Path(path).is_dir():
        return path
    folder = Path(path)
    best = folder / "best.safetensors"
    found = best if best.is_file() else latest_checkpoint(folder / "checkpoints") or latest_checkpoint(folder)
    if found is None:
        raise InputError(f"{key}: {path!r} is a folder without best.safetensors or a checkpoint")
    return str(found)


def add_out_file(parser: argparse.ArgumentParser, *, help: str, required: bool = True,
                 default: Optional[str] = None) -> None:
    """``--out FILE``: in every command, ``--out`` is a file."""
    parser.add_argument("--out", required=required, default=default, metavar="FILE", help=help)


def add_out_dir(parser: argparse.ArgumentParser, *, help: str, required: bool = True,
                default: Optional[str] = None) -> None:
    """``--out-dir DIR``: in every command, a folder; ``--out`` stays for one release where it was a folder."""
    _with_old(parser, "--out-dir", "out_dir", ("--out",), required=required, default=default, metavar="DIR",
              help=help)


def add_device(parser: argparse.ArgumentParser, *, default: Optional[str] = "auto", help: str = "") -> None:
    parser.add_argument("--device", default=default, help=help or "auto (cuda when visible), cpu, cuda, cuda:1, ...")


def common_options(*, for_subcommand: bool) -> argparse.ArgumentParser:
    """The options every command takes (before or after its name): verbosity, tracebacks, progress.

    In a subcommand their defaults are suppressed, so ``clipdistill -v distill`` keeps the ``-v``.
    """
    parser = argparse.ArgumentParser(add_help=False)
    suppress = argparse.SUPPRESS if for_subcommand else None
    group = parser.add_argument_group("common options")
    group.add_argument("-v", "--verbose", action="count", default=suppress or 0,
                       help="more messages (-vv: debug level); errors show their traceback")
    group.add_argument("-q", "--quiet", action="count", default=suppress or 0, help="warnings and errors only")
    group.add_argument("--debug", action="store_true", default=suppress or False,
                       help="debug messages, and an error's full traceback")
    group.add_argument("--no-progress", action="store_true", default=suppress or False,
                       help="no progress bars (they are drawn only when stderr is a terminal anyway)")
    return parser


def verbosity(args: argparse.Namespace) -> int:
    """-1 (quiet), 0 (default), 1 (-v), 2 (-vv or --debug)."""
    if getattr(args, "debug", False):
        return 2
    return max(-1, min(2, int(getattr(args, "verbose", 0) or 0) - int(getattr(args, "quiet", 0) or 0)))


# -------------------------------------------------------------------------------------------- logging


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (tests replace it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _Formatter(logging.Formatter):
    """``message`` for our INFO lines (as the commands always printed them), ``warning: message`` for
    warnings and errors, and, verbose, the time and the logger's name on every line."""

    def __init__(self, verbose: bool):
        super().__init__(datefmt="%H:%M:%S")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if self.verbose:
            text = f"{self.formatTime(record, self.datefmt)} {record.name}: {text}"
        return text


# open_clip's messages that are noise on the command line at the default level (shown with -v):
# creating a model without pretrained weights is what the tiny demo and test models do on purpose.
_QUIET_THIRD_PARTY = ("No pretrained weights loaded for model",)


class _QuietThirdParty(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("clipdistill") or not any(
            str(record.msg).startswith(prefix) for prefix in _QUIET_THIRD_PARTY)


def configure_logging(level: int) -> None:
    """Configure ``logging`` for a command: one stderr handler on the root logger, our format.

    ``level`` is :func:`verbosity`'s: -1 shows warnings and errors; 0 adds clipdistill's progress
    messages (INFO); 1 adds third-party INFO and our DEBUG; 2 everything. Third-party libraries that
    call ``logging.warning`` on the root logger (open_clip does) go through the same handler instead
    of Python's ``WARNING:root:`` fallback. Calling it again replaces the previous configuration.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(verbose=level >= 1))
    if level < 1:
        handler.addFilter(_QuietThirdParty())
    root.addHandler(handler)
    root.setLevel({-1: logging.WARNING, 0: logging.WARNING, 1: logging.INFO}.get(level, logging.DEBUG))
    ours = {-1: logging.WARNING, 0: logging.INFO}.get(level, logging.DEBUG)
    logging.getLogger("clipdistill").setLevel(ours)
    logging.captureWarnings(True)


def reporter(command: str):
    """The ``log`` callback a command hands to the library: its logger's ``info``."""
    return logging.getLogger(f"clipdistill.{command}").info


# ------------------------------------------------------------------------------------------ input checks


@contextlib.contextmanager
def named(key: str) -> Iterator[None]:
    """Turn a bad-input error raised inside into an :class:`InputError` that starts with ``key``."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, OSError, CheckpointError) as exc:
        text = one_line(exc)
        raise InputError(text if text.startswith(key) else f"{key}: {text}") from exc


def require_file(path: Optional[str], key: str, what: str = "file") -> None:
    """``path`` must be an existing, readable file."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise InputError(f"{key}: {what} {str(path)!r} does not exist")
    if p.is_dir():
        raise InputError(f"{key}: {str(path)!r} is a folder; expected a {what}")
    if not os.access(p, os.R_OK):
        raise InputError(f"{key}: {what} {str(path)!r} is not readable")


def require_dir(path: Optional[str], key: str, what: str = "folder") -> None:
    """``path`` must be an existing, readable folder."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise InputError(f"{key}: {what} {str(path)!r} does not exist")
    if not p.is_dir():
        raise InputError(f"{key}: {str(path)!r} is a file; expected a {what}")
    if not os.access(p, os.R_OK | os.X_OK):
        raise InputError(f"{key}: {what} {str(path)!r} is not readable")


def require_path(path: Optional[str], key: str, what: str = "file or folder") -> None:
    """``path`` must exist (a file or a folder)."""
    if path is not None and not Path(path).exists():
        raise InputError(f"{key}: {what} {str(path)!r} does not exist")


def _creatable(path: Path, key: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{key}: cannot create {str(path)!r}: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{key}: cannot create {str(path)!r}: {str(parent)!r} is not writable")


def require_out_file(path: Optional[str], key: str = "--out") -> None:
    """``path`` can be written as a file: not a folder, and its folder exists or can be made."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{key}: {str(path)!r} is a folder; expected a file to write")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise InputError(f"{key}: {str(path)!r} is not writable")
        return
    _creatable(p, key)


def require_out_dir(path: Optional[str], key: str = "--out-dir") -> None:
    """``path`` can hold output: an existing writable folder, or one that can be made."""
    if path is None:
        return
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{key}: {str(path)!r} is a file; expected a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"{key}: folder {str(path)!r} is not writable")
        return
    _creatable(p, key)


def require_source(source, key: str) -> None:
    """Images a loader can resolve: a folder, a list file, tar shards (globs and brace patterns)."""
    if not source:
        raise InputError(f"{key}: no image source given (a folder, a list file or tar shards)")
    with named(key):
        check_source(source)


def check_class_names(spec: Optional[str], key: str) -> None:
    """A class-name file (or ``builtin:...``) that reads cleanly."""
    if spec is not None:
        with named(key):
            read_class_names(spec, what=key)


def check_templates(spec: Optional[str], key: str) -> None:
    """A shipped template set or a template file that reads cleanly."""
    if spec is not None:
        with named(key):
            read_templates(spec, what=key)


def check_model_input(name: Optional[str], weights: Optional[str], *, name_key: str, weights_key: str) -> None:
    """An open_clip model name (or ``hf-hub:``) and its weights (a known tag or an existing file).

    Imports open_clip to read its registry; builds, reads and downloads nothing.
    """
    if name is None:  # the model comes from elsewhere (a checkpoint, a synthetic set): a file must exist
        if weights is not None and (os.sep in weights or str(weights).endswith(CHECKPOINT_SUFFIXES)):
            require_path(weights, weights_key, "weights file")
        return
    with named(name_key):
        check_model(name, None)
    with named(weights_key):
        check_model(name, weights)


def check_timm_input(name: str, weights: Optional[str], *, name_key: str, weights_key: str) -> None:
    """A timm model name (the data-free student) and its weights (None, or a .safetensors file of that network).

    Imports timm to read its registry; with weights, builds the (small) student to check they fit it,
    before any teacher is built.
    """
    timm = import_timm()
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        similar = f" (similar: {', '.join(near)})" if near else ""
        raise InputError(f"{name_key}: {name!r} is not a timm model{similar}")
    if weights is not None:
        require_file(weights, weights_key, "timm weights file (.safetensors)")
        if not str(weights).endswith(".safetensors"):
            raise InputError(f"{weights_key}: {weights!r}: the data-free student reads .safetensors weights only")
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors' own error types
            raise InputError(f"{weights_key}: {weights!r} cannot be read as safetensors ({exc})") from exc
        try:  # the student is small: building it here costs little beside the teacher it saves
            build_timm_backbone(name, weights)
        except ValueError as exc:
            raise InputError(f"{weights_key}: {exc}") from exc


def check_run_inputs(cfg: RunConfig) -> None:
    """Everything a distillation run reads, checked before any model is built; errors name the key."""
    require_source(cfg.data.train, "data.train")
    if cfg.method == "datafree" and is_synthetic_set(cfg.data.train) and not cfg.train.resume:
        # the teacher the run will load (a resumed run's comes from its checkpoint)
        cfg, _ = datafree_config(cfg, log=lambda message: None)
    if cfg.data.class_names or cfg.method != "datafree":  # datafree: the synthetic set names its classes
        check_class_names(cfg.data.class_names, "data.class_names")
    check_templates(cfg.data.templates, "data.templates")
    if cfg.teacher.cache:
        require_dir(cfg.teacher.cache, "teacher.cache", "teacher cache folder")
    elif cfg.teacher.prompts:
        require_file(cfg.teacher.prompts, "teacher.prompts", "tuned teacher file")
    else:
        check_model_input(cfg.teacher.name, cfg.teacher.weights, name_key="teacher.name",
                          weights_key="teacher.weights")
    if cfg.method == "datafree":
        check_timm_input(cfg.student.name, cfg.student.weights, name_key="student.name",
                         weights_key="student.weights")
    else:
        check_model_input(cfg.student.name, cfg.student.weights, name_key="student.name",
                          weights_key="student.weights")
    if cfg.data.heldout:
        require_source(cfg.data.heldout, "data.heldout")
    require_file(cfg.train.deepspeed, "train.deepspeed", "DeepSpeed config")
    require_out_dir(cfg.train.out_dir, "train.out_dir")
    if cfg.train.class_vector_cache:
        require_out_dir(cfg.train.class_vector_cache, "train.class_vector_cache")


__all__ = [
    "EXIT_OK", "EXIT_RUNTIME", "EXIT_INPUT", "EXIT_NONFINITE", "EXIT_INTERRUPTED", "InputError",
    "exit_code_for", "one_line", "HelpFormatter", "add_old_spelling", "old_spelling_notes", "add_teacher",
    "add_class_names", "add_checkpoint", "checkpoint_arg", "run_checkpoint", "add_out_file", "add_out_dir",
    "add_device",
    "common_options", "verbosity", "configure_logging", "reporter", "named", "require_file", "require_dir",
    "require_path", "require_out_file", "require_out_dir", "require_source", "check_class_names",
    "check_templates", "check_model_input", "check_timm_input", "check_run_inputs",
]
