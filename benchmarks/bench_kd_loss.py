"""Benchmark of clipdistill.kernels.kd_loss against the published eager losses and peers.

    python -m benchmarks.bench_kd_loss [--quick] [--shapes NAME ...] [--providers NAME ...]

Providers (all run forward, backward, and both; peak memory from the harness):
- ``ours``: ``kd_loss(backend="triton")`` on the inputs' dtype (bf16 on a GPU).
- ``eager``: the published formulation of each recipe in eager PyTorch under bf16 autocast
  (PromptKD: ``kl_div(log_softmax(s/T), softmax(t/T), "sum") * T^2 / (B*C)``; KDPL:
  ``0.5 kl_div(..., "batchmean", log_target=True)`` both ways), B x C logits materialized.
- ``compiled``: ``torch.compile`` of the eager formulation above (bf16 autocast on a GPU): the
  strongest thing a user gets from PyTorch alone, and the one ours must never be slower than.
- ``compiled_fp32``: ``torch.compile(kd_loss_reference)``, fp32 math (three fp32 products
  without tensor cores) on the bf16 inputs; kept for continuity, it flatters ours.
- ``ours_budget0``: ours with ``backward_memory_budget=0``: the backward's G-tile buffer holds
  one row block, so the backward runs B/64 small chunks. Ablation: ``ours - ours_budget0`` is
  the cost (or gain) of chunking. There is no atomic left to ablate: the backward writes G
  tiles and leaves both reductions to matrix products, so the parts read by difference are
  ``ours`` fwd vs bwd against ``matmul_products`` fwd vs bwd.
- ``liger``: liger-kernel's ``LigerFusedLinearJSD`` where importable. Mapping: Liger has no
  normalization or logit scale, so its inputs are the normalized features times
  logit_scale / temperature (normalization inside the timed call) and the normalized class
  vectors, at temperature 1; its ``jsd_beta=0`` is forward KL(p_t || p_s) with a per-row mean,
  i.e. ours with forward_weight=1, reverse_weight=0, reduction="batchmean". It is timed at that
  direction on every shape (the symmetric KDPL loss is not a generalized JSD), so read it
  against ``ours_fwdkl``, which runs ours at the same direction.
- ``matmul_products``: the matrix products the design performs, timed as plain ``torch.mm``
  (cuBLAS on a GPU) with materialized outputs whose rows are padded to 16 bytes (an unaligned
  row stride, e.g. C = 21843 bf16, slows cuBLAS and would inflate the floor): forward = the
  teacher and student logit products; backward = those two again (recomputation) plus G @ Cs
  (and G^T @ S when the student class vectors take a gradient). The floor the fused kernel is
  judged against.
- ``matmul_math``: the products the math itself needs, without recomputation: forward = the
  two logit products, backward = G @ Cs (and G^T @ S); fwd_bwd = 3 (or 4) products. The floor
  of any implementation that keeps the logits.

Shapes: the recipes' own (PromptKD B=256, C=1000, D=768, shared vectors, forward KL with "mean"
and T^2; KDPL-CA B=256, K=1000, Ds=512, Dt=1024, separate student vectors with a gradient,
symmetric KL, "batchmean"), a large vocabulary (B=4096, C=21843, D=768, shared, KDPL loss) and
few-shot (B=32, C=100, D=512, shared, KDPL loss), bf16. ``--quick`` runs tiny fp32 shapes on
the CPU (Triton interpreter) to check that everything runs; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from benchmarks.harness import measure, print_table, record
from clipdistill.kernels import kd_loss, kd_loss_reference

BENCHMARK = "kd_loss"
LOGIT_SCALE = 100.0


class Shape(NamedTuple):
    name: str
    batch: int
    n_classes: int
    d_student: int
    d_teacher: int
    separate: bool  # the student has its own class vectors, which take a gradient
    recipe: str  # "promptkd" or "kdpl": which published loss the options reproduce

    def label(self) -> str:
        dims = (f"Ds={self.d_student},Dt={self.d_teacher}" if self.d_student != self.d_teacher
                else f"D={self.d_student}")
        return f"{self.name}:B={self.batch},C={self.n_classes},{dims}" + (
            ",separate" if self.separate else ",shared")


GPU_SHAPES = (
    Shape("large_vocab", 4096, 21843, 768, 768, False, "kdpl"),
    Shape("promptkd", 256, 1000, 768, 768, False, "promptkd"),
    Shape("kdpl_ca", 256, 1000, 512, 1024, True, "kdpl"),
    Shape("few_shot", 32, 100, 512, 512, False, "kdpl"),
)
QUICK_SHAPES = (
    Shape("quick_shared", 16, 64, 32, 32, False, "kdpl"),
    Shape("quick_separate", 16, 64, 32, 48, True, "promptkd"),
)
PROVIDERS = ("ours", "ours_fwdkl", "ours_budget0", "eager", "compiled", "compiled_fp32", "liger",
             "matmul_products", "matmul_math")
MATMUL_PROVIDERS = ("matmul_products", "matmul_math")


def recipe_options(recipe: str) -> dict:
    """kd_loss keyword options that reproduce a recipe's published loss."""
    if recipe == "promptkd":
        return dict(forward_weight=1.0, reverse_weight=0.0, reduction="mean",
                    temperature_squared=True, temperature=1.0)
    return dict(forward_weight=0.5, reverse_weight=0.5, reduction="batchmean", temperature=1.0)


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size, grad=False):
        x = torch.randn(*size, generator=gen).to(device=device, dtype=dtype)
        return x.requires_grad_(grad)

    return dict(
        student_features=rand(shape.batch, shape.d_student, grad=True),
        teacher_features=rand(shape.batch, shape.d_teacher),
        class_vectors=rand(shape.n_classes, shape.d_teacher),
        student_class_vectors=rand(shape.n_classes, shape.d_student, grad=True)
        if shape.separate else None,
    )


def _grad_leaves(inputs: dict) -> list:
    return [x for x in inputs.values() if isinstance(x, torch.Tensor) and x.requires_grad]


def eager_loss(inputs: dict, recipe: str, temperature: float = 1.0) -> torch.Tensor:
    """The published formulation, B x C logits materialized, under bf16 autocast on a GPU."""
    device = inputs["student_features"].device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                        enabled=device.type == "cuda"):
        class_vectors = F.normalize(inputs["class_vectors"], dim=-1)
        student_vectors = (class_vectors if inputs["student_class_vectors"] is None
                           else F.normalize(inputs["student_class_vectors"], dim=-1))
        student_logits = LOGIT_SCALE * F.normalize(inputs["student_features"], dim=-1) \
            @ student_vectors.t()
        with torch.no_grad():
            teacher_logits = LOGIT_SCALE * F.normalize(inputs["teacher_features"], dim=-1) \
                @ class_vectors.t()
        if recipe == "promptkd":
            loss = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                            F.softmax(teacher_logits / temperature, dim=1), reduction="sum")
            return loss * temperature * temperature / student_logits.numel()
        log_s = F.log_softmax(student_logits, dim=1)
        log_t = F.log_softmax(teacher_logits, dim=1)
        return (0.5 * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
                + 0.5 * F.kl_div(log_t, log_s, reduction="batchmean", log_target=True))


def _liger_loss_fn() -> Optional[Callable[[dict], torch.Tensor]]:
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)

    def loss(inputs: dict) -> torch.Tensor:
        class_vectors = F.normalize(inputs["class_vectors"], dim=-1)
        student_vectors = (class_vectors if inputs["student_class_vectors"] is None
                           else F.normalize(inputs["student_class_vectors"], dim=-1))
        student = LOGIT_SCALE * F.normalize(inputs["student_features"], dim=-1)
        teacher = LOGIT_SCALE * F.normalize(inputs["teacher_features"], dim=-1)
        return jsd(student, student_vectors, teacher, class_vectors)

    return loss


def loss_fn(provider: str, shape: Shape) -> Optional[Callable[[dict], torch.Tensor]]:
    """A callable inputs -> scalar loss for a provider, or None if it cannot run here."""
    options = recipe_options(shape.recipe)
    if provider == "ours":
        return lambda inputs: kd_loss(**_kd_args(inputs), logit_scale=LOGIT_SCALE,
                                      backend="triton", **options)
    if provider == "ours_fwdkl":
        return lambda inputs: kd_loss(**_kd_args(inputs), logit_scale=LOGIT_SCALE,
                                      backend="triton", forward_weight=1.0, reverse_weight=0.0)
    if provider == "ours_budget0":
        return lambda inputs: kd_loss(**_kd_args(inputs), logit_scale=LOGIT_SCALE,
                                      backend="triton", backward_memory_budget=0, **options)
    if provider == "eager":
        return lambda inputs: eager_loss(inputs, shape.recipe, options["temperature"])
    if provider == "compiled":
        compiled_eager = torch.compile(eager_loss)
        return lambda inputs: compiled_eager(inputs, shape.recipe, options["temperature"])
    if provider == "compiled_fp32":
        compiled = torch.compile(kd_loss_reference)
        return lambda inputs: compiled(**_kd_args(inputs), logit_scale=LOGIT_SCALE, **options)
    if provider == "liger":
        return _liger_loss_fn()
    raise ValueError(f"unknown provider {provider!r}")


def _kd_args(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("student_features", "teacher_features", "class_vectors",
                                   "student_class_vectors")}


def _clear_grads(inputs: dict) -> None:
    for x in _grad_leaves(inputs):
        x.grad = None


def loss_cases(provider: str, shape: Shape, inputs: dict) -> list[tuple[str, Callable[[], object]]]:
    """(metric, zero-argument callable) for forward, backward and both; [] if unavailable."""
    fn = loss_fn(provider, shape)
    if fn is None:
        return []
    leaves = _grad_leaves(inputs)
    state = {}

    def forward():
        return fn(inputs)

    def backward():
        if "loss" not in state:
            state["loss"] = fn(inputs)
        torch.autograd.grad(state["loss"], leaves, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(fn(inputs), leaves)

    return [("fwd_ms", forward), ("bwd_ms", backward), ("fwd_bwd_ms", forward_backward)]


def _padded_rows(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """x with zero rows appended up to a multiple of ``multiple`` (16 bytes of bf16/fp16)."""
    pad = -x.shape[0] % multiple
    return x if pad == 0 else torch.cat([x, x.new_zeros(pad, x.shape[1])])


def matmul_cases(shape: Shape, inputs: dict, recompute: bool = True
                 ) -> list[tuple[str, Callable[[], object]]]:
    """The products of the fused design (``recompute``) or of the math alone, as torch.mm.

    The class axis is padded to a multiple of 8, so that the (B, C) outputs' rows start on
    16-byte boundaries, as cuBLAS prefers; the padding adds at most 7 of C columns.
    """
    s, t = inputs["student_features"].detach(), inputs["teacher_features"]
    c = _padded_rows(inputs["class_vectors"])
    v = c if inputs["student_class_vectors"] is None else \
        _padded_rows(inputs["student_class_vectors"].detach())
    g = torch.randn(shape.batch, c.shape[0], device=s.device, dtype=s.dtype)

    def forward():
        torch.mm(t, c.t())
        torch.mm(s, v.t())

    def gradient_products():
        torch.mm(g, v)
        if shape.separate:
            torch.mm(g.t(), s)

    def backward():
        if recompute:
            forward()  # the backward sweep recomputes both logit tiles
        gradient_products()

    def forward_backward():
        forward()
        backward()

    return [("fwd_ms", forward), ("bwd_ms", backward), ("fwd_bwd_ms", forward_backward)]


def run(shapes, providers, device: torch.device, dtype: torch.dtype, quick: bool) -> list[dict]:
    warmup, repeats, max_seconds = (1, 3, 2.0) if quick else (10, 100, 6.0)
    rows = []
    for shape in shapes:
        for provider in providers:
            inputs = make_inputs(shape, device, dtype)
            cases = (matmul_cases(shape, inputs, recompute=provider == "matmul_products")
                     if provider in MATMUL_PROVIDERS else loss_cases(provider, shape, inputs))
            if not cases:
                print(f"# {provider}: not importable here, skipped", flush=True)
                continue
            for metric, case in cases:
                try:
                    stats = measure(case, device=device, warmup=warmup, repeats=repeats,
                                    max_seconds=max_seconds)
                except Exception as exc:  # keep going: one failing provider is itself a result
                    print(f"# {provider} {shape.label()} {metric}: {type(exc).__name__}: {exc}",
                          flush=True)
                    continue
                _clear_grads(inputs)
                row = dict(provider=provider, shape=shape.label(), dtype=str(dtype).split(".")[-1],
                           metric=metric, **stats)
                rows += record(BENCHMARK, [row], device=device, quick=quick)
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def speedups(rows: list[dict]) -> dict:
    """Per shape, ours' fwd_bwd speedup over each other provider (>1: ours is faster)."""
    table: dict = {}
    by_key = {(r["provider"], r["shape"], r["metric"]): r for r in rows}
    for (provider, shape, metric), row in by_key.items():
        ours = by_key.get(("ours_fwdkl" if provider == "liger" else "ours", shape, metric))
        if metric != "fwd_bwd_ms" or provider.startswith("ours") or ours is None:
            continue
        table.setdefault(shape, {})[f"vs_{provider}"] = round(row["median"] / ours["median"], 3)
    return table


def cpu_cases() -> list[tuple[str, Callable[[], object]]]:
    """Zero-argument, CPU-sized cases (Triton interpreter) for the pytest-benchmark tier."""
    shape = Shape("cpu_tiny", 8, 16, 32, 32, False, "kdpl")
    cases = []
    for provider in ("ours", "eager"):
        inputs = make_inputs(shape, torch.device("cpu"), torch.float32)
        for metric, case in loss_cases(provider, shape, inputs):
            if metric == "fwd_bwd_ms":
                cases.append((f"kd_loss/{provider}/{shape.label()}/fwd_bwd", case))
    return cases


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny fp32 shapes on the CPU (Triton interpreter)")
    parser.add_argument("--shapes", nargs="*", default=None, help="shape names to run")
    parser.add_argument("--providers", nargs="*", default=None, choices=PROVIDERS)
    args = parser.parse_args(argv)
    if args.quick or not torch.cuda.is_available():
        device, dtype, shapes = torch.device("cpu"), torch.float32, QUICK_SHAPES
        if not args.quick:
            print("# no CUDA device: running the --quick CPU shapes", flush=True)
        args.quick = True
    else:
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, GPU_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes]
    providers = args.providers or PROVIDERS
    rows = run(shapes, providers, device, dtype, args.quick)
    print_table(rows)
    print(json.dumps({"benchmark": BENCHMARK, "rows": len(rows),
                      "device": rows[0]["device"] if rows else str(device),
                      "quick": args.quick, "fwd_bwd_speedup_of_ours": speedups(rows)}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
