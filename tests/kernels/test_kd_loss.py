"""clipdistill.kernels.kd_loss: the Triton path against a float64 reference, values and gradients.

On the CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET),
which costs milliseconds per program step: shapes are small, the option matrix runs on one shape
and the awkward shapes on one option set. bf16 math is proven on a GPU only (the interpreter's
bf16 arithmetic is broken), in the tests marked ``gpu``.
"""
import importlib
import logging
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clipdistill.kernels import KDLoss, kd_loss, kd_loss_reference, resolve_backend

kd_module = importlib.import_module("clipdistill.kernels.kd_loss")

# Errors relative to the largest magnitude of the float64 result, at logit_scale / temperature =
# 100; they grow with the scale (logits of size a_s carry a_s times the products' rounding).
TOLERANCE = {
    torch.float64: 1e-10,
    # fp32 products (ieee) and accumulation. Plain float32 PyTorch (kd_loss_reference in fp32)
    # itself reaches 5e-4 on the gradients of these inputs at scale 100 (measured over 160 draws).
    torch.float32: 1e-3,
    torch.float16: 2e-3,   # fp16 dot operands, including G in the backward product
    torch.bfloat16: 2e-2,  # bf16 dot operands (GPU only)
}


def make_inputs(batch, n_classes, d_student, d_teacher=None, *, separate=False,
                dtype=torch.float32, device="cpu", seed=0):
    d_teacher = d_student if d_teacher is None else d_teacher
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device,
                                                                          dtype=dtype)

    return dict(
        student_features=rand(batch, d_student).requires_grad_(),
        teacher_features=rand(batch, d_teacher),
        class_vectors=rand(n_classes, d_teacher),
        student_class_vectors=rand(n_classes, d_student).requires_grad_() if separate else None,
    )


def _leaves(inputs):
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def _as_float64(inputs):
    out = {}
    for key, value in inputs.items():
        if value is None:
            out[key] = None
        else:
            out[key] = value.detach().double().requires_grad_(value.requires_grad)
    return out


def run_and_compare(inputs, *, dtype, backend="triton", tol_scale=1.0, **options):
    """Run kd_loss and the float64 reference; compare the loss and every gradient."""
    out = kd_loss(**inputs, backend=backend, **options)
    ref_inputs = _as_float64(inputs)
    ref_options = dict(options)
    ref_options.pop("backward_memory_budget", None)  # the Triton backward's, not the math's
    if ref_options.get("row_weights") is not None:
        ref_options["row_weights"] = ref_options["row_weights"].double()
    ref = kd_loss_reference(**ref_inputs, **ref_options)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    leaves, ref_leaves = _leaves(inputs), _leaves(ref_inputs)
    weights = (torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(out.numel()))
               if out.dim() else None)
    upstream = out.double() if weights is None else (out.double() * weights).sum()
    ref_upstream = ref if weights is None else (ref * weights).sum()
    grads = torch.autograd.grad(upstream, list(leaves.values()))
    ref_grads = torch.autograd.grad(ref_upstream, list(ref_leaves.values()))

    scale = options.get("logit_scale", 100.0) / options.get("temperature", 1.0)
    tol = TOLERANCE[dtype] * max(1.0, scale / 100.0) * tol_scale
    pairs = [("loss", out, ref)] + [(f"grad of {k}", g, r)
                                    for k, g, r in zip(leaves, grads, ref_grads)]
    for name, got, want in pairs:
        assert torch.isfinite(got).all(), f"{name} has NaN or Inf"
        assert got.shape == want.shape, name
        err = (got.double() - want).abs().max().item()
        bound = tol * max(want.abs().max().item(), 0.05)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
    return out, ref


# ---------------------------------------------------------------------------------------------
# The option matrix, on one small shape
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("separate", [False, True], ids=["shared", "separate"])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.3, 1.7)],
                         ids=["sym", "fwd", "rev", "mixed"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("weighted_t2", [False, True], ids=["plain", "rowweights_t2"])
def test_option_matrix_matches_float64(dtype, separate, weights, reduction, weighted_t2):
    inputs = make_inputs(5, 13, 24, 40 if separate else 24, separate=separate, dtype=dtype,
                         seed=zlib.crc32(repr((separate, weights, reduction)).encode()) % 1000)
    options = dict(forward_weight=weights[0], reverse_weight=weights[1], reduction=reduction)
    if weighted_t2:
        options.update(row_weights=torch.tensor([1.0, 0.0, 2.5, 0.3, 1.0]), temperature=2.0,
                       temperature_squared=True, teacher_logit_scale=50.0)
    run_and_compare(inputs, dtype=dtype, **options)


@pytest.mark.parametrize("normalize", [True, False])
def test_normalize_flag_matches_float64(normalize):
    inputs = make_inputs(6, 11, 24, 32, separate=True)
    # Unnormalized features with a small scale keep the logits in a sensible range.
    run_and_compare(inputs, dtype=torch.float32, normalize=normalize,
                    logit_scale=100.0 if normalize else 2.0)


# ---------------------------------------------------------------------------------------------
# Awkward shapes, on one option set
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [24, 200])
@pytest.mark.parametrize("n_classes", [1, 7, 997])
@pytest.mark.parametrize("batch", [1, 3, 37])
def test_awkward_shapes_shared(batch, n_classes, dim):
    inputs = make_inputs(batch, n_classes, dim, seed=batch * 1000 + n_classes + dim)
    run_and_compare(inputs, dtype=torch.float32)


@pytest.mark.parametrize("batch,n_classes,d_student,d_teacher",
                         [(1, 997, 24, 200), (37, 7, 200, 24), (3, 1, 24, 24)])
def test_awkward_shapes_separate(batch, n_classes, d_student, d_teacher):
    inputs = make_inputs(batch, n_classes, d_student, d_teacher, separate=True, seed=batch)
    run_and_compare(inputs, dtype=torch.float32)


def test_split_class_axis_matches_float64(monkeypatch):
    """The GPU path splits the class axis across programs; force that path here."""
    real = kd_module._launch_config

    def split_config(*args):
        cfg = real(*args)
        n_cols = args[1]
        block_n = 16
        n_tiles = -(-n_cols // block_n)
        tiles_per_split = -(-n_tiles // 3)
        return cfg._replace(block_n=block_n, tiles_per_split=tiles_per_split,
                            n_splits=-(-n_tiles // tiles_per_split))

    monkeypatch.setattr(kd_module, "_launch_config", split_config)
    assert kd_module._launch_config(9, 100, 24, torch.float32, None).n_splits == 3
    inputs = make_inputs(9, 100, 24, 40, separate=True)
    run_and_compare(inputs, dtype=torch.float32, forward_weight=0.7, reverse_weight=0.4)


# ---------------------------------------------------------------------------------------------
# Extreme settings: finite wherever the float64 reference is
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 0.3, 10.0])
def test_extreme_temperatures(temperature):
    inputs = make_inputs(7, 29, 24, seed=int(temperature * 100))
    run_and_compare(inputs, dtype=torch.float32, temperature=temperature)


def test_near_one_hot_teacher():
    inputs = make_inputs(6, 19, 24, seed=3)
    with torch.no_grad():
        # Each teacher row is almost exactly one class vector: a one-hot teacher at a_t = 2000.
        inputs["teacher_features"].copy_(inputs["class_vectors"][:6] + 1e-4 *
                                         torch.randn(6, 24, generator=torch.Generator().manual_seed(1)))
    run_and_compare(inputs, dtype=torch.float32, temperature=0.05)


def test_rows_of_identical_logits():
    inputs = make_inputs(4, 9, 24, separate=True, seed=5)
    with torch.no_grad():
        inputs["teacher_features"][1].zero_()  # every teacher logit of row 1 is 0: uniform p_t
        inputs["student_class_vectors"][:] = inputs["student_class_vectors"][0]  # uniform p_s
    run_and_compare(inputs, dtype=torch.float32)


def test_single_class_gives_zero_loss_and_gradient():
    inputs = make_inputs(3, 1, 24, seed=7)
    out, _ = run_and_compare(inputs, dtype=torch.float32)
    assert abs(out.item()) < 1e-5


def test_all_zero_row_weights_but_one():
    inputs = make_inputs(8, 13, 24, seed=9)
    weights = torch.zeros(8)
    weights[5] = 0.25
    for reduction in ("batchmean", "mean", "sum", "none"):
        run_and_compare(inputs, dtype=torch.float32, row_weights=weights, reduction=reduction)
    # batchmean with one counted row is exactly that row's loss.
    rows = kd_loss(**inputs, backend="triton", reduction="none")
    one = kd_loss(**inputs, backend="triton", row_weights=weights)
    assert torch.allclose(one, rows[5] / 1.0, rtol=1e-6)


@pytest.mark.parametrize("scale", [100.0, 1000.0, 2000.0])
def test_fp32_gradient_error_at_high_scale_within_eager_fp32(scale):
    """fp32 gradient error vs float64 at most 1.5x that of fp32 eager PyTorch (the reference
    run in fp32), forward, reverse and symmetric KL. Error pooled over rows: sum_i max_k
    |g_ik - g64_ik| / sum_i max_k |g64_ik| (a row-wise maximum relative to the whole batch's would
    be one row's luck; rows with tiny gradients would dominate a mean of row-relative errors).
    One draw of 64 rows, a teacher correlated with the student as in distillation."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(64, 48, generator=gen, dtype=torch.float64)
    teacher = student + 0.5 * torch.randn(64, 48, generator=gen, dtype=torch.float64)
    vectors = torch.randn(97, 48, generator=gen, dtype=torch.float64)

    def pooled_error(fn, **options):
        x = student.float().requires_grad_()
        got, = torch.autograd.grad(fn(x, teacher.float(), vectors.float(), reduction="sum",
                                      logit_scale=scale, **options), x)
        x64 = student.clone().requires_grad_()
        want, = torch.autograd.grad(kd_loss_reference(x64, teacher, vectors, reduction="sum",
                                                      logit_scale=scale, **options), x64)
        assert torch.isfinite(got).all()
        return ((got.double() - want).abs().amax(1).sum() / want.abs().amax(1).sum()).item()

    for weights in [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]:
        options = dict(forward_weight=weights[0], reverse_weight=weights[1])
        ours = pooled_error(lambda *a, **k: kd_loss(*a, backend="triton", **k), **options)
        eager = pooled_error(kd_loss_reference, **options)
        assert ours <= 1.5 * eager, (weights, ours, eager)


# ---------------------------------------------------------------------------------------------
# gradcheck, detached teacher, dtype handling, memory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("separate,normalize", [(False, True), (True, True), (True, False)])
def test_gradcheck_through_kernel(separate, normalize):
    inputs = make_inputs(3, 5, 8, 12 if separate else 8, separate=separate, dtype=torch.float64)
    teacher, vectors = inputs["teacher_features"], inputs["class_vectors"]

    def fn(student, *student_vectors):
        return kd_loss(student, teacher, vectors,
                       student_class_vectors=student_vectors[0] if student_vectors else None,
                       backend="triton", temperature=2.0, normalize=normalize,
                       logit_scale=10.0 if normalize else 1.0, forward_weight=0.3,
                       reverse_weight=0.9, reduction="none")

    args = tuple(_leaves(inputs).values())
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_teacher_inputs_are_detached(backend):
    inputs = make_inputs(4, 6, 16)
    inputs["teacher_features"].requires_grad_()
    inputs["class_vectors"].requires_grad_()
    loss = kd_loss(**inputs, backend=backend)
    loss.backward()
    assert inputs["teacher_features"].grad is None
    assert inputs["class_vectors"].grad is None
    assert inputs["student_features"].grad is not None


def test_student_class_vectors_without_grad():
    inputs = make_inputs(4, 6, 16, 24, separate=True)
    inputs["student_class_vectors"].requires_grad_(False)
    loss = kd_loss(**inputs, backend="triton")
    loss.backward()
    assert inputs["student_features"].grad is not None
    assert inputs["student_class_vectors"].grad is None


def test_mixed_input_dtypes_follow_the_student():
    inputs = make_inputs(4, 6, 16)
    mixed = dict(inputs, teacher_features=inputs["teacher_features"].half(),
                 class_vectors=inputs["class_vectors"].double())
    got = kd_loss(**mixed, backend="triton")
    want = kd_loss(**dict(inputs, teacher_features=inputs["teacher_features"].half().float()),
                   backend="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0  # bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


@pytest.mark.parametrize("budget_rows", [0, 2, None], ids=["budget0", "two_blocks", "all_rows"])
def test_backward_memory_stays_within_the_budget(budget_rows):
    """The only B x C-sized buffer is the backward's G tiles, bounded by the documented budget:
    at budget 0 one row block of it, never B x C; at a budget of B x C bytes, all rows."""
    batch, n_classes, dim = 150, 600, 16
    inputs = make_inputs(batch, n_classes, dim, dim + 8, separate=True)
    block_m = kd_module._launch_config(batch, n_classes, dim + 8, torch.float32, None).block_m
    row_bytes = n_classes * 4  # fp32, 600 classes: already a multiple of 16 bytes
    budget = batch * row_bytes if budget_rows is None else budget_rows * block_m * row_bytes
    with _LargestAllocation() as mode:
        loss = kd_loss(**inputs, backend="triton", backward_memory_budget=budget)
        loss.backward()
    features_bound = max(batch, n_classes) * (dim + 8) * 2 * 4  # O(B*D + C*D) fp32
    tiles = (batch if budget_rows is None else max(1, budget_rows) * block_m) * row_bytes
    assert mode.largest <= max(features_bound, tiles, budget)
    if budget_rows == 0:
        assert mode.largest < batch * n_classes * 4  # no B x C allocation at budget 0
    with _LargestAllocation() as mode:
        kd_loss(**inputs, backend="torch")
    assert mode.largest >= batch * n_classes * 4  # the reference does materialize it


def test_chunked_backward_matches_float64(monkeypatch):
    """Budget 0 with 16-row blocks: the backward runs three chunks, the last one partial."""
    real = kd_module._launch_config
    monkeypatch.setattr(kd_module, "_launch_config",
                        lambda *args: real(*args)._replace(block_m=16))
    inputs = make_inputs(37, 29, 24, 40, separate=True, seed=21)
    run_and_compare(inputs, dtype=torch.float32, backward_memory_budget=0,
                    row_weights=torch.rand(37, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("budget", [-1, 1.5, True, None])
def test_bad_memory_budget_raises(budget):
    inputs = make_inputs(2, 3, 8)
    with pytest.raises(ValueError, match="backward_memory_budget"):
        kd_loss(**inputs, backend="triton", backward_memory_budget=budget)
    with pytest.raises(ValueError, match="backward_memory_budget"):
        KDLoss(backward_memory_budget=budget)


# ---------------------------------------------------------------------------------------------
# Backend choice, module, torch.compile
# ---------------------------------------------------------------------------------------------


def test_resolve_backend_is_visible(caplog, monkeypatch):
    monkeypatch.setattr(kd_module, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="clipdistill.kernels.kd_loss"):
        assert resolve_backend("auto", "cpu") == "torch"
        assert resolve_backend("auto", "cuda") == "triton"
        assert resolve_backend("torch", "cuda") == "torch"
        assert resolve_backend("triton", "cpu") == "triton"  # the interpreter is on
    assert "backend='auto' on cpu tensors runs 'torch'" in caplog.text
    assert KDLoss().backend_for("cpu") == "torch"


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton'"):
        resolve_backend("triton", "cpu")


def test_auto_on_cpu_runs_the_reference():
    inputs = make_inputs(4, 9, 16, 24, separate=True)
    got = kd_loss(**inputs, backend="auto")
    want = kd_loss_reference(**inputs)
    torch.testing.assert_close(got, want)
    run_and_compare(inputs, dtype=torch.float32, backend="torch")


def test_module_matches_functional():
    inputs = make_inputs(5, 9, 16, 24, separate=True)
    options = dict(temperature=2.0, forward_weight=1.0, reverse_weight=0.0, reduction="mean",
                   temperature_squared=True)
    module = KDLoss(backend="triton", **options)
    weights = torch.rand(5) + 0.1
    got = module(**inputs, row_weights=weights)
    want = kd_loss(**inputs, backend="triton", row_weights=weights, **options)
    torch.testing.assert_close(got, want)
    assert "backend='triton'" in repr(module)
    assert list(module.parameters()) == []


def test_torch_compile_fullgraph():
    inputs = make_inputs(6, 11, 16, 24, separate=True, seed=11)
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0])
    module = KDLoss(backend="triton", temperature=2.0, temperature_squared=True)
    compiled = torch.compile(module, fullgraph=True)
    got = compiled(**inputs, row_weights=weights)
    got_grads = torch.autograd.grad(got, list(_leaves(inputs).values()))
    want = module(**inputs, row_weights=weights)
    want_grads = torch.autograd.grad(want, list(_leaves(inputs).values()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_registered_with_torch_library():
    assert hasattr(torch.ops.clipdistill, "kd_loss_rows")
    assert hasattr(torch.ops.clipdistill, "kd_loss_rows_backward")
    inputs = make_inputs(3, 5, 16)
    args = (inputs["student_features"].detach(), inputs["teacher_features"],
            inputs["class_vectors"], None, 100.0, 100.0, 0.5, 0.5, True, 2**20)
    torch.library.opcheck(torch.ops.clipdistill.kd_loss_rows.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Every error path: ValueError naming the argument
# ---------------------------------------------------------------------------------------------


def _bad_cases():
    s, t, c = torch.randn(4, 8), torch.randn(4, 8), torch.randn(5, 8)
    v = torch.randn(5, 8)
    base = dict(student_features=s, teacher_features=t, class_vectors=c)
    meta = torch.randn(5, 8, device="meta")
    return [
        ("student_features", dict(base, student_features=torch.randn(4, 8, 1))),
        ("student_features", dict(base, student_features=torch.randint(0, 3, (4, 8)))),
        ("student_features", dict(base, student_features=[[1.0]])),
        ("empty batch", dict(base, student_features=torch.randn(0, 8),
                             teacher_features=torch.randn(0, 8))),
        ("teacher_features", dict(base, teacher_features=torch.randn(3, 8))),
        ("teacher_features", dict(base, teacher_features=torch.randn(4, 6))),
        ("class_vectors", dict(base, class_vectors=torch.randn(0, 8))),
        ("class_vectors", dict(base, student_features=torch.randn(4, 6))),
        ("student_class_vectors", dict(base, student_class_vectors=torch.randn(4, 8))),
        ("student_class_vectors", dict(base, student_class_vectors=meta)),
        ("class_vectors", dict(base, class_vectors=c.to("meta"))),
        ("logit_scale", dict(base, logit_scale=0.0)),
        ("logit_scale", dict(base, logit_scale=float("inf"))),
        ("logit_scale", dict(base, logit_scale=-1.0)),
        ("teacher_logit_scale", dict(base, teacher_logit_scale=float("nan"))),
        ("temperature", dict(base, temperature=0.0)),
        ("temperature", dict(base, temperature=float("inf"))),
        ("forward_weight", dict(base, forward_weight=-0.1)),
        ("reverse_weight", dict(base, reverse_weight=float("nan"))),
        ("both zero", dict(base, forward_weight=0.0, reverse_weight=0.0)),
        ("reduction", dict(base, reduction="avg")),
        ("backend", dict(base, backend="cuda")),
        ("row_weights", dict(base, row_weights=torch.ones(3))),
        ("row_weights", dict(base, row_weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))),
        ("row_weights", dict(base, row_weights=torch.zeros(4))),
        ("row_weights", dict(base, row_weights=torch.tensor([1.0, float("nan"), 1.0, 1.0]))),
        ("row_weights", dict(base, row_weights=torch.ones(4, device="meta"))),
        ("row_weights", dict(base, row_weights=torch.ones(4, dtype=torch.long))),
        ("student_class_vectors", dict(base, student_class_vectors=v.half()[:, :4])),
    ]


@pytest.mark.parametrize("needle,kwargs", _bad_cases(),
                         ids=[f"{i}-{n}" for i, (n, _) in enumerate(_bad_cases())])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_arguments_raise_value_error(needle, kwargs, backend):
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", backend)
    with pytest.raises(ValueError, match=needle):
        kd_loss(**kwargs)


def test_module_validates_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        KDLoss(backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU tier: bf16 included, tolerances scale with logit_scale / temperature
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 4.0])
@pytest.mark.parametrize("separate", [False, True], ids=["shared", "separate"])
def test_gpu_matches_float64(cuda_device, dtype, temperature, separate):
    inputs = make_inputs(300, 2011, 200, 264 if separate else 200, separate=separate,
                         dtype=dtype, device=cuda_device, seed=17)
    assert resolve_backend("auto", cuda_device) == "triton"
    run_and_compare(inputs, dtype=dtype, backend="auto", temperature=temperature,
                    row_weights=torch.rand(300, device=cuda_device))


@pytest.mark.gpu
def test_gpu_recipe_shapes_bf16(cuda_device):
    for batch, n_classes, d_student, d_teacher, separate in [(256, 1000, 768, 768, False),
                                                             (256, 1000, 512, 1024, True),
                                                             (32, 100, 512, 512, False)]:
        inputs = make_inputs(batch, n_classes, d_student, d_teacher, separate=separate,
                             dtype=torch.bfloat16, device=cuda_device)
        run_and_compare(inputs, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(cuda_device):
    inputs = make_inputs(64, 500, 128, 256, separate=True, dtype=torch.bfloat16,
                         device=cuda_device)
    module = KDLoss()
    compiled = torch.compile(module, fullgraph=True)
    got = compiled(**inputs)
    want = module(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.autograd.grad(got, list(_leaves(inputs).values()))


def test_kl_rows_reference_is_both_kls_of_explicit_logits():
    from clipdistill.kernels import kl_rows_reference

    g = torch.Generator().manual_seed(7)
    s = torch.randn(5, 13, dtype=torch.float64, generator=g) * 3
    t = torch.randn(5, 13, dtype=torch.float64, generator=g) * 3
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    forward = (p_t * (p_t.log() - p_s.log())).sum(-1)
    reverse = (p_s * (p_s.log() - p_t.log())).sum(-1)
    for fw, rw in ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.3, 0.7)):
        torch.testing.assert_close(kl_rows_reference(s, t, forward_weight=fw, reverse_weight=rw),
                                   fw * forward + rw * reverse, rtol=1e-12, atol=1e-12)
    # The teacher side is detached: only the student's logits receive a gradient.
    s32, t32 = s.float().requires_grad_(), t.float().requires_grad_()
    kl_rows_reference(s32, t32).sum().backward()
    assert s32.grad is not None and t32.grad is None
