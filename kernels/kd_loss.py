r"""Fused distillation loss over shared-class-vector logits: temperature, bidirectional KL.

Shapes
------
- ``student_features`` S: (B, Ds); ``teacher_features`` T: (B, Dt)
- ``class_vectors`` Ct: (C, Dt), the teacher's class vectors (text features of the class names)
- ``student_class_vectors`` Cs: (C, Ds) when the student has its own (KDPL); otherwise Cs = Ct and
  Ds must equal Dt (PromptKD: a projector maps the student into the teacher's space).
- ``row_weights`` w: (B,), optional, non-negative.

Forward math
------------
With inverse norms r(x) = 1 / max(||x||, 1e-12) (all ones when ``normalize=False``), the scaled
scales a_t = teacher_logit_scale / temperature and a_s = logit_scale / temperature:

    z_t[i, j] = a_t * r(T_i) * r(Ct_j) * <T_i, Ct_j>
    z_s[i, j] = a_s * r(S_i) * r(Cs_j) * <S_i, Cs_j>

The inverse norms are fp32 scales applied to the fp32-accumulated dot products; no normalized
(rounded) copy of any input is made. With L = logsumexp_j(z) and log p = z - L:

    KL_f(i) = KL(p_t || p_s) = E_{p_t}[z_t - z_s] - (L_t - L_s)
    KL_r(i) = KL(p_s || p_t) = E_{p_s}[z_s - z_t] - (L_s - L_t)
    l_i     = forward_weight * KL_f(i) + reverse_weight * KL_r(i)

One sweep over class tiles keeps, per row and per distribution, the running maximum m, the
rescaled partition sum l = sum_j exp(z_j - m) and the rescaled first moment
A = sum_j exp(z_j - m) * (z_j - z_other). When a tile raises the maximum to m', l and A are both
multiplied by exp(m - m'). At the end L = m + log l and E_p[z - z_other] = A / l, so both KL terms
come out of the same sweep that computes the two log-sum-exps. Each class-vector tile is loaded
once per k-step and feeds both dot products when the class vectors are shared. To fill the GPU
at small batch the class axis may be split across programs; each split writes its (m, l, A)
partials (6 numbers per row) and a small combine kernel merges them with the same rescaling.

The reduction over rows (``batchmean``, ``mean``, ``sum``, ``none``, with optional row weights and
the temperature^2 factor) is plain PyTorch on the (B,) vector of row losses.

Backward math
-------------
Let g_i = d loss / d l_i (from the reduction). Differentiating with respect to the student logits
(the teacher is detached):

    d KL_f / d z_s[i, j] = p_s[i, j] - p_t[i, j]
    d KL_r / d z_s[i, j] = p_s[i, j] * (log p_s[i, j] - log p_t[i, j] - KL_r(i))

The second line follows from d p_k / d z_j = p_k (delta_kj - p_j):
d/dz_j sum_k p_k (log p_k - log q_k) = p_j (log p_j - log q_j + 1) - p_j sum_k p_k (log p_k -
log q_k + 1) = p_j (log p_j - log q_j - KL_r). The row scalar KL_r(i) = E_{p_s}[log p_s - log p_t]
is a sum over *every* class, as are L_s and L_t: no entry of the gradient can be formed before a
full sweep over the classes has finished. That is why the work takes two sweeps: the forward sweep
produces per row (m_t, log l_t, m_s, log l_s, E_{p_s}[z_s - z_t]) (O(B) numbers, saved for
backward; L = m + log l is never rounded as one number, see the combine kernel), and the
backward sweep recomputes the logit tiles and forms

    G[i, j] = forward_weight * (p_s - p_t)
              + reverse_weight * p_s * ((z_s - z_t) - E_{p_s}[z_s - z_t])

using log p_s - log p_t - KL_r = (z_s - z_t) - E_{p_s}[z_s - z_t]: the log-sum-exps cancel
analytically, so the reverse term needs no log-sum-exp and does not carry the rounding of
L_s, L_t and KL_r, each of the size of the logits (up to a_s).

Chain rule through z_s = a_s * r(S_i) * r(Cs_j) * <S_i, Cs_j>, writing s^ = r(S_i) S_i and
H[i, j] = G[i, j] r(Cs_j):

    U_i   = g_i * sum_j H[i, j] Cs_j = g_i * (H @ Cs)_i          (B, Ds)
    dS_i  = a_s * r(S_i) * (U_i - <s^_i, U_i> s^_i)             (the projection only if normalize)
    W_j   = sum_i G[i, j] g_i s^_i = (H^T @ (g r(S) S))_j / r(Cs_j)   (C, Ds), if Cs needs a grad
    dCs_j = a_s * r(Cs_j) * (W_j - <c^_j, W_j> c^_j)

Both reductions (over classes for U, over rows for W) are matrix products, so the backward has
no atomics: ``_kd_loss_bwd_kernel`` recomputes one (BLOCK_M, BLOCK_N) logit tile per program
and writes its tile of H, in the input dtype, into a buffer of a bounded chunk of rows; the
launcher then runs U = g * (H @ Cs) and W += H^T @ X for that chunk as plain ``torch.mm``
(cuBLAS on a GPU, with TF32 and reduced-precision reductions switched off for the call). The
chunk holds as many whole row blocks as ``backward_memory_budget`` bytes allow (default
DEFAULT_BACKWARD_MEMORY_BUDGET = 64 MiB, rows padded to 16 bytes), at least one row block
(BLOCK_M rows) and at most the batch: at B = 4096, C = 21843 bf16 that is 1536 rows, three
chunks, where eager PyTorch holds several B x C fp32/bf16 tensors (358 MB each in fp32). The
row factors of X = (g / max|g|) r(S) S are divided by max|g| so that small per-row weights
cannot underflow fp16; max|g| is multiplied back after the product. The gradients are
deterministic (no atomics, a fixed order of products).

fp32 accuracy (measured on the CPU against float64, C=97, D=48, a teacher correlated with the
student): stage by stage at a_s = 2000 (B=16, three draws, forward KL), the H tiles the backward
writes are off by 4e-6 to 1.2e-5 of max|G|, eager fp32's G by 1e-6 to 8e-6, and U and the
gradient add little to that.
What matters is that p = exp(z - m - log l) in the backward uses the same logit bits as the
forward that produced m and l: recomputing z with another product order (torch.mm instead of
the kernel's tiles) against the kernel's row statistics gave 2e-4. Hence the forward and the
backward share ``_kd_loss_logit_tiles`` and one launch configuration. The gradient error pooled
over rows (sum_i max_k |err_ik| / sum_i max_k |g_ik|, B=64) was 0.45 to 1.35 times fp32
eager's over three draws at a_s = 100, 1000, 2000, forward, reverse and symmetric weights; the
CPU test holds it to 1.5 times.

Memory: O(B*D + C*D + B*splits) plus the G-tile buffer, min(B, max(BLOCK_M, budget / row
bytes)) x C elements; at budget 0 one row block, never B x C (unless B fits in one block).

Static report
-------------
``python -m benchmarks.kernel_report`` compiles every kernel at the launcher's configurations
for sm_90a on a machine without a GPU (Triton 3.7.1, SM count 132). Measured for the kernels in
this file (registers / spill instructions / wgmma shape; no atomics in any kernel):

    kernel  dtype      rows       tiles (M,N,K)  warps  registers  spills  wgmma
    fwd     bf16/fp16  aligned    64,128,64      8      173-178    0       m64n64k16 (A from smem)
    bwd     bf16/fp16  aligned    64,128,64      8      141-171    0       m64n64k16 (A from smem)
    fwd     bf16/fp16  unaligned  64,128,32      8      255        0       m64n64k16 (A from smem)
    bwd     bf16/fp16  unaligned  64,128,32      8      240        0       m64n64k16 (A from smem)
    fwd     fp32       any        64,64,16       8      128-208    0       - (ieee FMA)
    bwd     fp32       any        64,64,16       8      128-210    0       - (ieee FMA)

"aligned": every feature dimension and row stride divisible by 16 (what Triton's runtime
specializes on; the large-vocabulary shape B=4096, C=21843, D=768 is one). The backward that
this replaced (atomic accumulation of U and W) compiled to 136-188 registers aligned and 255
unaligned (with 6-16 spill instructions at D=200) and one ``MEMBAR.ALL.GPU; ATOMG.E.ADD`` per 16
(aligned) or 4 bytes of U or W per class tile, inside the tile loop.

Registration
------------
The fused row loss is a ``torch.library.custom_op`` (``clipdistill::kd_loss_rows``) with a fake
(meta) implementation and ``register_autograd``; its backward is a second custom op
(``clipdistill::kd_loss_rows_backward``). That makes ``kd_loss`` work inside
``torch.compile(fullgraph=True)`` on every device, including the CPU under the Triton
interpreter where CI tests it. ``torch.library.triton_op`` would let Inductor see into the
kernels on a GPU, but it fails to compile under the interpreter (fake-tensor tracing reaches the
interpreter's data pointers), so the compiled path could not be tested on CPU CI; the op is
almost entirely Triton already, leaving Inductor little to fuse but the O(B) reduction, which is
compiled around the op anyway.

Dtypes: fp32, fp16, bf16 (float64 too, for gradcheck: the interpreter and the reference). fp32
products use ``input_precision="ieee"`` (TF32 would cost about 2 logits at a_s = 2000). Under the
Triton interpreter bf16 arithmetic is broken, so bf16 tiles are converted to fp32 before the dot
there; on a GPU bf16 feeds the tensor cores directly with fp32 accumulation.
"""
import logging
import math
import os
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships Linux wheels only; backend="torch" still works elsewhere.
    triton = None

    class tl:  # noqa: N801 - minimal stand-in so that the kernel annotations evaluate
        constexpr = object

logger = logging.getLogger(__name__)

__all__ = ["kd_loss", "KDLoss", "kd_loss_reference", "resolve_backend",
           "DEFAULT_BACKWARD_MEMORY_BUDGET"]

REDUCTIONS = ("batchmean", "mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
_NORM_EPS = 1e-12  # F.normalize's eps: inverse norms are 1 / max(||x||, eps)
# Bytes of the backward's G-tile buffer (a chunk of rows times all classes); see the docstring.
DEFAULT_BACKWARD_MEMORY_BUDGET = 64 * 2**20


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@_jit
def _kd_loss_inv_norm_kernel(
    X_ptr, Out_ptr, n_rows, n_cols, stride_xm,
    EPS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    row_start = offs_m.to(tl.int64) * stride_xm
    sum_sq = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for d0 in range(0, n_cols, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X_ptr + row_start[:, None] + offs_d[None, :],
                    mask=mask_m[:, None] & (offs_d[None, :] < n_cols), other=0.0).to(ACC_DTYPE)
        sum_sq += tl.sum(x * x, axis=1)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(sum_sq), EPS)
    tl.store(Out_ptr + offs_m, inv_norm, mask=mask_m)


@_jit
def _kd_loss_logit_tiles(
    S_ptr, T_ptr, CT_ptr, CS_ptr, stride_sm, stride_tm, stride_ctn, stride_csn,
    offs_m, offs_n, mask_m, mask_n, d_student, d_teacher,
    SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Raw dot products <T_i, Ct_j> and <S_i, Cs_j> for a (BLOCK_M, BLOCK_N) tile."""
    rows_s = offs_m.to(tl.int64) * stride_sm
    rows_t = offs_m.to(tl.int64) * stride_tm
    cols_t = offs_n.to(tl.int64) * stride_ctn
    cols_s = offs_n.to(tl.int64) * stride_csn
    dot_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    dot_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if SHARED:
        # One class-vector tile, loaded once, feeds both products.
        for k0 in range(0, d_teacher, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < d_teacher
            c = tl.load(CT_ptr + cols_t[None, :] + offs_k[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
            t = tl.load(T_ptr + rows_t[:, None] + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
            s = tl.load(S_ptr + rows_s[:, None] + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
            dot_t = tl.dot(t, c, dot_t, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            dot_s = tl.dot(s, c, dot_s, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    else:
        for k0 in range(0, d_teacher, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < d_teacher
            c = tl.load(CT_ptr + cols_t[None, :] + offs_k[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
            t = tl.load(T_ptr + rows_t[:, None] + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
            dot_t = tl.dot(t, c, dot_t, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        for k0 in range(0, d_student, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < d_student
            c = tl.load(CS_ptr + cols_s[None, :] + offs_k[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
            s = tl.load(S_ptr + rows_s[:, None] + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
            dot_s = tl.dot(s, c, dot_s, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return dot_t, dot_s


@_jit
def _kd_loss_fwd_kernel(
    S_ptr, T_ptr, CT_ptr, CS_ptr, RowInv_ptr, ColInv_ptr, Partial_ptr,
    n_rows, n_cols, d_student, d_teacher,
    stride_sm, stride_tm, stride_ctn, stride_csn,
    tiles_per_split, scale_s, scale_t,
    SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One sweep over this split's class tiles: online (m, l, A) for teacher and student.

    RowInv holds [r(S); r(T)] as (2, n_rows); ColInv holds [r(Ct); r(Cs)] as (2, n_cols).
    Partial gets (n_splits, 6, n_rows): m_t, l_t, A_t, m_s, l_s, A_s.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    row_s = tl.load(RowInv_ptr + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE) * scale_s
    row_t = tl.load(RowInv_ptr + n_rows + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE) * scale_t

    m_t = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
    l_t = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    a_t = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    m_s = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
    l_s = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    a_s = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)

    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tl.cdiv(n_cols, BLOCK_N))
    for tile in range(tile_begin, tile_end):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_cols
        dot_t, dot_s = _kd_loss_logit_tiles(
            S_ptr, T_ptr, CT_ptr, CS_ptr, stride_sm, stride_tm, stride_ctn, stride_csn,
            offs_m, offs_n, mask_m, mask_n, d_student, d_teacher,
            SHARED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION,
        )
        col_t = tl.load(ColInv_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)
        col_s = tl.load(ColInv_ptr + n_cols + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)
        valid = mask_n[None, :]
        z_t = dot_t * row_t[:, None] * col_t[None, :]
        z_s = dot_s * row_s[:, None] * col_s[None, :]
        diff = tl.where(valid, z_t - z_s, 0.0)
        z_t = tl.where(valid, z_t, float("-inf"))
        z_s = tl.where(valid, z_s, float("-inf"))

        # Every tile holds at least one valid column, so the new maxima are finite.
        m_t_new = tl.maximum(m_t, tl.max(z_t, axis=1))
        e_t = tl.exp(z_t - m_t_new[:, None])
        alpha_t = tl.exp(m_t - m_t_new)
        l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
        a_t = a_t * alpha_t + tl.sum(e_t * diff, axis=1)
        m_t = m_t_new

        m_s_new = tl.maximum(m_s, tl.max(z_s, axis=1))
        e_s = tl.exp(z_s - m_s_new[:, None])
        alpha_s = tl.exp(m_s - m_s_new)
        l_s = l_s * alpha_s + tl.sum(e_s, axis=1)
        a_s = a_s * alpha_s - tl.sum(e_s * diff, axis=1)
        m_s = m_s_new

    out = Partial_ptr + split.to(tl.int64) * 6 * n_rows + offs_m
    tl.store(out, m_t, mask=mask_m)
    tl.store(out + n_rows, l_t, mask=mask_m)
    tl.store(out + 2 * n_rows, a_t, mask=mask_m)
    tl.store(out + 3 * n_rows, m_s, mask=mask_m)
    tl.store(out + 4 * n_rows, l_s, mask=mask_m)
    tl.store(out + 5 * n_rows, a_s, mask=mask_m)


@_jit
def _kd_loss_combine_kernel(
    Partial_ptr, RowLoss_ptr, RowStats_ptr, n_rows, n_splits, forward_weight, reverse_weight,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the splits' (m, l, A); write l_i and RowStats (5, n_rows) = (m_t, log l_t, m_s,
    log l_s, E_{p_s}[z_s - z_t])."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows
    m_t = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
    m_s = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
    for split in range(0, n_splits):
        part = Partial_ptr + split * 6 * n_rows + offs_m
        m_t = tl.maximum(m_t, tl.load(part, mask=mask_m, other=0.0))
        m_s = tl.maximum(m_s, tl.load(part + 3 * n_rows, mask=mask_m, other=0.0))
    l_t = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    a_t = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    l_s = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    a_s = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for split in range(0, n_splits):
        part = Partial_ptr + split * 6 * n_rows + offs_m
        rescale_t = tl.exp(tl.load(part, mask=mask_m, other=0.0) - m_t)
        rescale_s = tl.exp(tl.load(part + 3 * n_rows, mask=mask_m, other=0.0) - m_s)
        l_t += tl.load(part + n_rows, mask=mask_m, other=0.0) * rescale_t
        a_t += tl.load(part + 2 * n_rows, mask=mask_m, other=0.0) * rescale_t
        l_s += tl.load(part + 4 * n_rows, mask=mask_m, other=0.0) * rescale_s
        a_s += tl.load(part + 5 * n_rows, mask=mask_m, other=0.0) * rescale_s
    l_t = tl.where(mask_m, l_t, 1.0)
    l_s = tl.where(mask_m, l_s, 1.0)
    # L = m + log l is not formed: rounded to fp32 at the size of the logits (up to a_s) it is
    # off by up to a_s * 6e-8, while z - m is exact near the maximum. m and log l are kept
    # apart and the backward forms (z - m) - log l, as log_softmax does.
    log_l_t = tl.log(l_t)
    log_l_s = tl.log(l_s)
    lse_gap = (m_t - m_s) + (log_l_t - log_l_s)  # L_t - L_s
    kl_forward = a_t / l_t - lse_gap
    mean_diff_s = a_s / l_s  # E_{p_s}[z_s - z_t], what the backward needs (not KL_r)
    kl_reverse = mean_diff_s + lse_gap
    tl.store(RowLoss_ptr + offs_m, forward_weight * kl_forward + reverse_weight * kl_reverse,
             mask=mask_m)
    tl.store(RowStats_ptr + offs_m, m_t, mask=mask_m)
    tl.store(RowStats_ptr + n_rows + offs_m, log_l_t, mask=mask_m)
    tl.store(RowStats_ptr + 2 * n_rows + offs_m, m_s, mask=mask_m)
    tl.store(RowStats_ptr + 3 * n_rows + offs_m, log_l_s, mask=mask_m)
    tl.store(RowStats_ptr + 4 * n_rows + offs_m, mean_diff_s, mask=mask_m)


@_jit
def _kd_loss_bwd_kernel(
    S_ptr, T_ptr, CT_ptr, CS_ptr, RowInv_ptr, ColInv_ptr, RowStats_ptr, H_ptr,
    row_begin, chunk_rows, n_rows, n_cols, d_student, d_teacher,
    stride_sm, stride_tm, stride_ctn, stride_csn, stride_hm,
    scale_s, scale_t, forward_weight, reverse_weight,
    SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Second sweep: recompute one logit tile of a row chunk and write H = G * r(Cs_j).

    Rows row_begin .. row_begin + chunk_rows of the batch; H is (chunk_rows, n_cols) with row
    stride stride_hm, stored in its own dtype. RowStats holds (m_t, log l_t, m_s, log l_s,
    E_{p_s}[z_s - z_t]).
    No atomics: each program owns its tile of H, and the reductions over classes (U) and over
    rows (W) are matrix products of H, done by the launcher.
    """
    local_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = row_begin + local_m
    mask_m = (local_m < chunk_rows) & (offs_m < n_rows)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_cols
    row_s = tl.load(RowInv_ptr + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE) * scale_s
    row_t = tl.load(RowInv_ptr + n_rows + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE) * scale_t
    max_t = tl.load(RowStats_ptr + offs_m, mask=mask_m, other=0.0)
    log_l_t = tl.load(RowStats_ptr + n_rows + offs_m, mask=mask_m, other=0.0)
    max_s = tl.load(RowStats_ptr + 2 * n_rows + offs_m, mask=mask_m, other=0.0)
    log_l_s = tl.load(RowStats_ptr + 3 * n_rows + offs_m, mask=mask_m, other=0.0)
    mean_diff = tl.load(RowStats_ptr + 4 * n_rows + offs_m, mask=mask_m, other=0.0)

    dot_t, dot_s = _kd_loss_logit_tiles(
        S_ptr, T_ptr, CT_ptr, CS_ptr, stride_sm, stride_tm, stride_ctn, stride_csn,
        offs_m, offs_n, mask_m, mask_n, d_student, d_teacher,
        SHARED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION,
    )
    col_t = tl.load(ColInv_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)
    inv_cs = tl.load(ColInv_ptr + n_cols + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)
    # Masked rows and columns have zero logits here (finite); they are not stored.
    z_t = dot_t * row_t[:, None] * col_t[None, :]
    z_s = dot_s * row_s[:, None] * inv_cs[None, :]
    p_s = tl.exp((z_s - max_s[:, None]) - log_l_s[:, None])
    p_t = tl.exp((z_t - max_t[:, None]) - log_l_t[:, None])
    # log p_s - log p_t - KL_r = (z_s - z_t) - E_{p_s}[z_s - z_t]: the log-sum-exps cancel.
    g_tile = forward_weight * (p_s - p_t) + reverse_weight * p_s * (
        (z_s - z_t) - mean_diff[:, None])
    h = g_tile * inv_cs[None, :]
    rows_h = local_m.to(tl.int64) * stride_hm
    tl.store(H_ptr + rows_h[:, None] + offs_n[None, :], h.to(H_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


class _LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    n_splits: int
    tiles_per_split: int
    num_warps: int
    num_stages: int
    aligned: bool  # every row stride and feature dim divisible by 16 (Triton specializes on it)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _sm_count(device: torch.device) -> Optional[int]:
    """The device's SM count, or None where kernels run under the interpreter."""
    if _interpreting() or device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _divisible_by_16(*ints: int) -> bool:
    """Whether Triton's runtime will mark every one of these integers divisible by 16."""
    return all(int(i) % 16 == 0 for i in ints)


def _launch_config(n_rows: int, n_cols: int, d_max: int, dtype: torch.dtype,
                   sm_count: Optional[int], aligned: bool = False) -> _LaunchConfig:
    """Small deterministic block-size heuristic (no autotune; never under the interpreter).

    ``sm_count`` is the GPU's number of SMs (132 on an H100/H200), or None for the Triton
    interpreter; ``aligned`` says whether every row stride and feature dimension is divisible by
    16 (:func:`_divisible_by_16`), which lets Triton vectorize the loads. Under the interpreter
    every program step costs milliseconds regardless of the block size, so blocks are as large
    as the problem; on a GPU they are sized by the static report (``python -m
    benchmarks.kernel_report`` compiles them for sm_90a and reads registers, spills and wgmma
    shapes), and the forward's class axis is split across programs until the grid covers about
    two waves of the SMs. Taking the SM count as an argument lets the report reproduce a GPU's
    launches on a machine without one.
    """
    if sm_count is None:
        block_m = min(64, max(16, _next_pow2(n_rows)))
        block_n = min(256, max(16, _next_pow2(n_cols)))
        block_k = min(256, max(16, _next_pow2(d_max)))
        n_tiles = triton.cdiv(n_cols, block_n)
        return _LaunchConfig(block_m, block_n, block_k, 1, n_tiles, 4, 1, aligned)
    # Measured with the static report (sm_90a, Triton 3.7.1), 8 warps throughout:
    # - fp16/bf16, strides and dims divisible by 16: 64 x 128 x 64 tiles issue wgmma m64n64k16
    #   without spills (forward 173-178 registers, backward 141-171); 128 x 128 (m64n128k16)
    #   reaches 238-255 registers, and 4 warps spill.
    # - fp16/bf16 otherwise (masked, partly element-wise loads): 64 x 128 x 32 issues the same
    #   m64n64k16 without spills (forward 255 registers, backward 240); with BLOCK_K = 64 it
    #   spills (D = 200: 104-136 spill instructions in the forward, 36 in the backward), and
    #   64 x 64 x 64 (255 registers) only reaches m64n32k16.
    # - fp32 (ieee, no tensor cores): 64 x 64 x 16; BLOCK_K = 32 spilled in the backward.
    if dtype in (torch.float32, torch.float64):
        block_m, block_n, block_k = 64, 64, 16
    else:
        block_m, block_n, block_k = 64, 128, 64 if aligned else 32
    num_warps = 8
    n_tiles = triton.cdiv(n_cols, block_n)
    n_row_blocks = triton.cdiv(n_rows, block_m)
    n_splits = max(1, min(n_tiles, triton.cdiv(2 * sm_count, n_row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split
    return _LaunchConfig(block_m, block_n, block_k, n_splits, tiles_per_split, num_warps, 2,
                         aligned)


def _kernel_dtypes(dtype: torch.dtype):
    """(dot operand dtype, accumulator dtype, dot input precision) for an input dtype."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, tl.float32, "ieee"
    if dtype == torch.float16:
        return tl.float16, tl.float32, "tf32"  # precision only applies to fp32 operands
    # bf16: exact fp32 conversion under the interpreter, whose bf16 arithmetic is broken.
    return (tl.float32 if _interpreting() else tl.bfloat16), tl.float32, "tf32"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inv_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """(n,) accumulator-dtype 1 / max(||x_i||, eps), or ones when not normalizing."""
    acc = _acc_dtype(x.dtype)
    if not normalize:
        return torch.ones(x.shape[0], dtype=acc, device=x.device)
    out = torch.empty(x.shape[0], dtype=acc, device=x.device)
    block_m = 32
    block_d = min(256, max(16, _next_pow2(x.shape[1])))
    grid = (triton.cdiv(x.shape[0], block_m),)
    _kd_loss_inv_norm_kernel[grid](
        x, out, x.shape[0], x.shape[1], x.stride(0),
        EPS=_NORM_EPS, ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return out


def _student_vectors(class_vectors: torch.Tensor,
                     student_class_vectors: Optional[torch.Tensor]) -> torch.Tensor:
    return class_vectors if student_class_vectors is None else student_class_vectors


def _kd_loss_rows_forward(student_features, teacher_features, class_vectors,
                          student_class_vectors, student_scale, teacher_scale,
                          forward_weight, reverse_weight, normalize):
    """Launch the forward sweep and the combine; returns (row_loss, row_stats, col_inv, row_inv)."""
    shared = student_class_vectors is None
    cs = _student_vectors(class_vectors, student_class_vectors)
    n_rows, d_student = student_features.shape
    n_cols, d_teacher = class_vectors.shape
    dtype = student_features.dtype
    acc = _acc_dtype(dtype)
    dot_dtype, acc_tl, precision = _kernel_dtypes(dtype)
    aligned = _divisible_by_16(d_student, d_teacher, student_features.stride(0),
                               teacher_features.stride(0), class_vectors.stride(0), cs.stride(0))
    cfg = _launch_config(n_rows, n_cols, max(d_student, d_teacher), dtype,
                         _sm_count(student_features.device), aligned)

    row_inv = torch.stack([_inv_norms(student_features, normalize),
                           _inv_norms(teacher_features, normalize)])
    inv_ct = _inv_norms(class_vectors, normalize)
    col_inv = torch.stack([inv_ct, inv_ct if shared else _inv_norms(cs, normalize)])

    partial = torch.empty((cfg.n_splits, 6, n_rows), dtype=acc, device=student_features.device)
    grid = (triton.cdiv(n_rows, cfg.block_m), cfg.n_splits)
    _kd_loss_fwd_kernel[grid](
        student_features, teacher_features, class_vectors, cs, row_inv, col_inv, partial,
        n_rows, n_cols, d_student, d_teacher,
        student_features.stride(0), teacher_features.stride(0), class_vectors.stride(0),
        cs.stride(0), cfg.tiles_per_split, student_scale, teacher_scale,
        SHARED=shared, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_tl, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    row_loss = torch.empty(n_rows, dtype=acc, device=student_features.device)
    row_stats = torch.empty((5, n_rows), dtype=acc, device=student_features.device)
    block = 128
    _kd_loss_combine_kernel[(triton.cdiv(n_rows, block),)](
        partial, row_loss, row_stats, n_rows, cfg.n_splits, forward_weight, reverse_weight,
        ACC_DTYPE=acc_tl, BLOCK_M=block,
    )
    return row_loss, row_stats, row_inv, col_inv


def _project_out(x: torch.Tensor, acc_grad: torch.Tensor, inv: torch.Tensor,
                 scale: float, normalize: bool) -> torch.Tensor:
    """scale * r_i * (A_i - <x^_i, A_i> x^_i): the chain rule through x -> x / ||x||."""
    if normalize:
        x_hat = x.to(acc_grad.dtype) * inv[:, None]
        acc_grad = acc_grad - (x_hat * acc_grad).sum(dim=1, keepdim=True) * x_hat
    return ((scale * inv)[:, None] * acc_grad).to(x.dtype)


def _grad_chunk(n_rows: int, n_cols: int, dtype: torch.dtype, block_m: int,
                memory_budget: int) -> tuple[int, int]:
    """(rows per chunk, padded row length) of the backward's G-tile buffer.

    The buffer is (rows, row length) in ``dtype``, its rows padded to 16 bytes so that the
    products read aligned rows; it holds as many whole row blocks as ``memory_budget`` bytes
    allow, at least one (``block_m`` rows: the budget 0) and at most the batch.
    """
    item = torch.empty((), dtype=dtype).element_size()
    row_len = -(-n_cols * item // 16) * 16 // item
    fit = memory_budget // (row_len * item)
    rows = max(block_m, fit // block_m * block_m)
    return min(rows, n_rows), row_len


class _IeeeProducts:
    """On CUDA, fp32 products without TF32 and half products without reduced-precision
    reductions for the duration of the backward's matrix products (restored afterwards)."""

    def __init__(self, device: torch.device):
        self.active = device.type == "cuda"

    def __enter__(self):
        if self.active:
            matmul = torch.backends.cuda.matmul
            try:
                self.saved = (matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
                              matmul.allow_bf16_reduced_precision_reduction)
                matmul.allow_tf32 = False
            except RuntimeError:
                # Newer torch refuses the legacy TF32 flag once the caller set precision with
                # torch.backends.cuda.matmul.fp32_precision: then the caller's choice stands.
                self.active = False
                return self
            matmul.allow_fp16_reduced_precision_reduction = False
            matmul.allow_bf16_reduced_precision_reduction = False
        return self

    def __exit__(self, *exc):
        if self.active:
            matmul = torch.backends.cuda.matmul
            (matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
             matmul.allow_bf16_reduced_precision_reduction) = self.saved
        return False


def _kd_loss_rows_backward(grad_rows, student_features, teacher_features, class_vectors,
                           student_class_vectors, row_stats, row_inv, col_inv, student_scale,
                           teacher_scale, forward_weight, reverse_weight, normalize,
                           need_class_grad, memory_budget):
    """Chunk by chunk of rows: the kernel writes H = G r(Cs) (no atomics), then
    U = g * (H @ Cs) and W += H^T @ (g r(S) S) are plain matrix products (cuBLAS on a GPU)."""
    shared = student_class_vectors is None
    cs = _student_vectors(class_vectors, student_class_vectors)
    n_rows, d_student = student_features.shape
    n_cols, d_teacher = class_vectors.shape
    dtype, device = student_features.dtype, student_features.device
    acc = _acc_dtype(dtype)
    dot_dtype, acc_tl, precision = _kernel_dtypes(dtype)
    aligned = _divisible_by_16(d_student, d_teacher, student_features.stride(0),
                               teacher_features.stride(0), class_vectors.stride(0), cs.stride(0))
    cfg = _launch_config(n_rows, n_cols, max(d_student, d_teacher), dtype, _sm_count(device),
                         aligned)
    compute_w = bool(need_class_grad) and not shared

    grad = grad_rows.to(acc)
    chunk, row_len = _grad_chunk(n_rows, n_cols, dtype, cfg.block_m, memory_budget)
    h_buffer = torch.empty((chunk, row_len), dtype=dtype, device=device)
    u = torch.empty((n_rows, d_student), dtype=acc, device=device)
    if compute_w:
        w = torch.zeros((n_cols, d_student), dtype=acc, device=device)
        # W's row factors g_i r(S_i), divided by max|g| so that small weights cannot underflow
        # fp16 in the product's operand; max|g| is multiplied back at the end.
        grad_max = grad.abs().amax().clamp_min(torch.finfo(acc).tiny)
        row_factor = grad / grad_max * row_inv[0]
    with _IeeeProducts(device):
        for begin in range(0, n_rows, chunk):
            rows = min(chunk, n_rows - begin)
            grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(n_cols, cfg.block_n))
            _kd_loss_bwd_kernel[grid](
                student_features, teacher_features, class_vectors, cs, row_inv, col_inv,
                row_stats, h_buffer,
                begin, rows, n_rows, n_cols, d_student, d_teacher,
                student_features.stride(0), teacher_features.stride(0),
                class_vectors.stride(0), cs.stride(0), h_buffer.stride(0),
                student_scale, teacher_scale, forward_weight, reverse_weight,
                SHARED=shared, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_tl, PRECISION=precision,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            h = h_buffer[:rows, :n_cols]
            end = begin + rows
            u[begin:end] = torch.mm(h, cs).to(acc) * grad[begin:end, None]
            if compute_w:
                x = (student_features[begin:end].to(acc) * row_factor[begin:end, None]).to(dtype)
                w += torch.mm(h.t(), x).to(acc)
    grad_student = _project_out(student_features, u, row_inv[0], student_scale, normalize)
    if compute_w:
        # H carries r(Cs_j): W_j = (H^T X)_j / r(Cs_j).
        w = w * (grad_max / col_inv[1])[:, None]
        grad_class = _project_out(cs, w, col_inv[1], student_scale, normalize)
    else:
        grad_class = student_features.new_empty((0,))
    return grad_student, grad_class


# --------------------------------------------------------------------------------------------
# torch.library registration and autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("clipdistill::kd_loss_rows", mutates_args=())
def _kd_loss_rows_op(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    class_vectors: torch.Tensor,
    student_class_vectors: Optional[torch.Tensor],
    student_scale: float,
    teacher_scale: float,
    forward_weight: float,
    reverse_weight: float,
    normalize: bool,
    backward_memory_budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row losses l_i (B,), row stats (5, B) = (m_t, log l_t, m_s, log l_s, E_{p_s}[z_s - z_t]),
    row_inv (2, B),
    col_inv (2, C). ``backward_memory_budget`` is only kept for the backward."""
    return _kd_loss_rows_forward(student_features, teacher_features, class_vectors,
                                 student_class_vectors, student_scale, teacher_scale,
                                 forward_weight, reverse_weight, normalize)


@_kd_loss_rows_op.register_fake
def _(student_features, teacher_features, class_vectors, student_class_vectors, student_scale,
      teacher_scale, forward_weight, reverse_weight, normalize, backward_memory_budget):
    acc = _acc_dtype(student_features.dtype)
    n_rows, n_cols = student_features.shape[0], class_vectors.shape[0]
    new = student_features.new_empty
    return (new((n_rows,), dtype=acc), new((5, n_rows), dtype=acc), new((2, n_rows), dtype=acc),
            new((2, n_cols), dtype=acc))


@torch.library.custom_op("clipdistill::kd_loss_rows_backward", mutates_args=())
def _kd_loss_rows_backward_op(
    grad_rows: torch.Tensor,
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    class_vectors: torch.Tensor,
    student_class_vectors: Optional[torch.Tensor],
    row_stats: torch.Tensor,
    row_inv: torch.Tensor,
    col_inv: torch.Tensor,
    student_scale: float,
    teacher_scale: float,
    forward_weight: float,
    reverse_weight: float,
    normalize: bool,
    need_class_grad: bool,
    backward_memory_budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss/d student_features, d loss/d student_class_vectors or an empty tensor)."""
    return _kd_loss_rows_backward(grad_rows, student_features, teacher_features, class_vectors,
                                  student_class_vectors, row_stats, row_inv, col_inv,
                                  student_scale, teacher_scale, forward_weight, reverse_weight,
                                  normalize, need_class_grad, backward_memory_budget)


@_kd_loss_rows_backward_op.register_fake
def _(grad_rows, student_features, teacher_features, class_vectors, student_class_vectors,
      row_stats, row_inv, col_inv, student_scale, teacher_scale, forward_weight, reverse_weight,
      normalize, need_class_grad, backward_memory_budget):
    grad_class = (torch.empty_like(student_class_vectors)
                  if need_class_grad and student_class_vectors is not None
                  else student_features.new_empty((0,)))
    return torch.empty_like(student_features), grad_class


def _setup_context(ctx, inputs, output):
    (student_features, teacher_features, class_vectors, student_class_vectors, student_scale,
     teacher_scale, forward_weight, reverse_weight, normalize, backward_memory_budget) = inputs
    _, row_stats, row_inv, col_inv = output
    ctx.save_for_backward(student_features, teacher_features, class_vectors,
                          student_class_vectors, row_stats, row_inv, col_inv)
    ctx.scalars = (student_scale, teacher_scale, forward_weight, reverse_weight, normalize)
    ctx.backward_memory_budget = backward_memory_budget
    ctx.mark_non_differentiable(row_stats, row_inv, col_inv)


def _backward(ctx, grad_rows, _grad_stats, _grad_row_inv, _grad_col_inv):
    (student_features, teacher_features, class_vectors, student_class_vectors, row_stats,
     row_inv, col_inv) = ctx.saved_tensors
    need_class_grad = student_class_vectors is not None and ctx.needs_input_grad[3]
    grad_student, grad_class = _kd_loss_rows_backward_op(
        grad_rows, student_features, teacher_features, class_vectors, student_class_vectors,
        row_stats, row_inv, col_inv, *ctx.scalars, need_class_grad, ctx.backward_memory_budget)
    return (grad_student, None, None, grad_class if need_class_grad else None,
            None, None, None, None, None, None)


torch.library.register_autograd("clipdistill::kd_loss_rows", _backward,
                                setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Validation, backend choice, reduction
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_scalar(name: str, value, *, positive: bool) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_matrix(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _check_budget(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("backward_memory_budget must be a non-negative int (bytes), "
                         f"got {value!r}")
    return value


def _validate(student_features, teacher_features, class_vectors, student_class_vectors,
              logit_scale, teacher_logit_scale, temperature, forward_weight, reverse_weight,
              reduction, row_weights, backend):
    """Raise ValueError naming the argument; returns the scalars as floats."""
    _check_matrix("student_features", student_features)
    _check_matrix("teacher_features", teacher_features)
    _check_matrix("class_vectors", class_vectors)
    n_rows, d_student = student_features.shape
    n_cols, d_teacher = class_vectors.shape
    if n_rows == 0:
        raise ValueError("student_features is an empty batch (0 rows); need at least one row")
    if teacher_features.shape[0] != n_rows:
        raise ValueError(f"teacher_features has {teacher_features.shape[0]} rows, "
                         f"student_features has {n_rows}: they must match")
    if n_cols == 0:
        raise ValueError("class_vectors has no rows: need at least one class")
    if d_student == 0 or d_teacher == 0:
        raise ValueError("student_features and class_vectors need a non-zero feature dimension")
    if teacher_features.shape[1] != d_teacher:
        raise ValueError(f"teacher_features has dimension {teacher_features.shape[1]}, "
                         f"class_vectors has {d_teacher}: they must match")
    if student_class_vectors is None:
        if d_student != d_teacher:
            raise ValueError(
                f"student_features has dimension {d_student} but class_vectors has {d_teacher}; "
                "pass student_class_vectors (C, Ds) or project the student into the teacher's space")
    else:
        _check_matrix("student_class_vectors", student_class_vectors)
        if tuple(student_class_vectors.shape) != (n_cols, d_student):
            raise ValueError(f"student_class_vectors must have shape ({n_cols}, {d_student}) "
                             f"(C, Ds), got {tuple(student_class_vectors.shape)}")
    named = [("teacher_features", teacher_features), ("class_vectors", class_vectors),
             ("student_class_vectors", student_class_vectors), ("row_weights", row_weights)]
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.device != student_features.device:
            raise ValueError(f"{name} is on {tensor.device} but student_features is on "
                             f"{student_features.device}: all inputs must share one device")
    scale = _check_scalar("logit_scale", logit_scale, positive=True)
    teacher_scale = (scale if teacher_logit_scale is None else
                     _check_scalar("teacher_logit_scale", teacher_logit_scale, positive=True))
    temperature = _check_scalar("temperature", temperature, positive=True)
    forward_weight = _check_scalar("forward_weight", forward_weight, positive=False)
    reverse_weight = _check_scalar("reverse_weight", reverse_weight, positive=False)
    if forward_weight == 0 and reverse_weight == 0:
        raise ValueError("forward_weight and reverse_weight are both zero: the loss would be "
                         "identically zero; give at least one a positive weight")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if row_weights is not None:
        if not isinstance(row_weights, torch.Tensor):
            raise ValueError(f"row_weights must be a tensor, got {type(row_weights).__name__}")
        if tuple(row_weights.shape) != (n_rows,):
            raise ValueError(f"row_weights must have shape ({n_rows},), "
                             f"got {tuple(row_weights.shape)}")
        if not row_weights.dtype.is_floating_point:
            raise ValueError(f"row_weights must be floating point, got {row_weights.dtype}")
        # Value checks read the data: on a GPU that is a host synchronization every step, which a
        # training loop must not pay, and a compiled graph cannot branch on it. So they run for
        # CPU tensors only; callers on a GPU check their weights where they build them (the
        # engine derives them from the loader's CPU mask). An all-zero weight vector on a GPU
        # gives a NaN loss, which the engine's periodic non-finite check reports.
        if row_weights.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(row_weights).all()):
                raise ValueError("row_weights must be finite")
            if bool((row_weights < 0).any()):
                raise ValueError("row_weights must be non-negative")
            if not bool((row_weights > 0).any()):
                raise ValueError("row_weights are all zero: at least one row must count")
    return scale, teacher_scale, temperature, forward_weight, reverse_weight


_logged_choices: set = set()


def resolve_backend(backend: str, device: Union[torch.device, str]) -> str:
    """The backend ``kd_loss`` runs for ``backend`` on tensors on ``device``.

    "auto" is "triton" on CUDA tensors and "torch" otherwise; "triton" on CPU tensors needs the
    Triton interpreter (TRITON_INTERPRET=1 set before this module was imported). Each new
    (requested, chosen, device type) triple is logged once at INFO on this module's logger.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        chosen = "triton" if device.type == "cuda" and triton is not None else "torch"
    else:
        chosen = backend
    if chosen == "triton":
        if triton is None:
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"backend='triton' got tensors on {device.type}: Triton runs on CUDA tensors, or "
                "on CPU tensors only under TRITON_INTERPRET=1 (set before import); "
                "use backend='torch' or 'auto'")
    key = (backend, chosen, device.type)
    if not torch.compiler.is_compiling() and key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("kd_loss: backend=%r on %s tensors runs %r", backend, device.type, chosen)
    return chosen


def _reduce(row_loss: torch.Tensor, row_weights: Optional[torch.Tensor], reduction: str,
            n_classes: int, temperature: float, temperature_squared: bool) -> torch.Tensor:
    if row_weights is not None:
        weights = row_weights.to(row_loss.dtype)
        weighted = weights * row_loss
        total_weight = weights.sum()
    else:
        weighted = row_loss
        total_weight = row_loss.new_tensor(float(row_loss.shape[0]))
    if reduction == "none":
        out = weighted
    elif reduction == "sum":
        out = weighted.sum()
    elif reduction == "batchmean":
        out = weighted.sum() / total_weight
    else:  # "mean": a per-element mean over B x C, PromptKD's
        out = weighted.sum() / (total_weight * n_classes)
    if temperature_squared:
        out = out * (temperature * temperature)
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def kl_rows_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    forward_weight: float = 0.5,
    reverse_weight: float = 0.5,
) -> torch.Tensor:
    """Per-row forward_weight·KL(p_t‖p_s) + reverse_weight·KL(p_s‖p_t) of explicit logits, plain PyTorch.

    student_logits, teacher_logits: (B, C), already scaled and divided by the temperature; the
    result (B,) is in their dtype (promote before calling). The teacher side is detached. A term
    with weight 0 is not computed. clipdistill's one eager KL: :func:`kd_loss_reference` forms its
    logits and calls it, and so do the engine's paths that need explicit logits (CoCoOp,
    PromptSRC) and its agreement/KL tally.
    """
    log_p_t = F.log_softmax(teacher_logits.detach(), dim=-1)
    log_p_s = F.log_softmax(student_logits, dim=-1)
    rows = torch.zeros(log_p_s.shape[:-1], dtype=log_p_s.dtype, device=log_p_s.device)
    if forward_weight:
        rows = rows + forward_weight * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if reverse_weight:
        rows = rows + reverse_weight * (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    return rows


def kd_loss_reference(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    class_vectors: torch.Tensor,
    *,
    student_class_vectors: Optional[torch.Tensor] = None,
    logit_scale: float = 100.0,
    teacher_logit_scale: Optional[float] = None,
    temperature: float = 1.0,
    forward_weight: float = 0.5,
    reverse_weight: float = 0.5,
    reduction: str = "batchmean",
    temperature_squared: bool = False,
    row_weights: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Plain PyTorch: both B x C logit matrices materialized, fp32 (float64 for float64 input).

    Same semantics as :func:`kd_loss`, without validation; the teacher inputs are detached.
    """
    compute = (torch.float64 if torch.float64 in (student_features.dtype, teacher_features.dtype)
               else torch.float32)
    student = student_features.to(compute)
    teacher = teacher_features.detach().to(compute)
    teacher_vectors = class_vectors.detach().to(compute)
    student_vectors = (teacher_vectors if student_class_vectors is None
                       else student_class_vectors.to(compute))
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
        teacher_vectors = F.normalize(teacher_vectors, dim=-1)
        student_vectors = (teacher_vectors if student_class_vectors is None
                           else F.normalize(student_vectors, dim=-1))
    teacher_scale = logit_scale if teacher_logit_scale is None else teacher_logit_scale
    row_loss = kl_rows_reference(logit_scale / temperature * student @ student_vectors.T,
                                 teacher_scale / temperature * teacher @ teacher_vectors.T,
                                 forward_weight=forward_weight, reverse_weight=reverse_weight)
    return _reduce(row_loss, row_weights, reduction, class_vectors.shape[0], temperature,
                   temperature_squared)


def _as_kernel_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def kd_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    class_vectors: torch.Tensor,
    *,
    student_class_vectors: Optional[torch.Tensor] = None,
    logit_scale: float = 100.0,
    teacher_logit_scale: Optional[float] = None,
    temperature: float = 1.0,
    forward_weight: float = 0.5,
    reverse_weight: float = 0.5,
    reduction: str = "batchmean",
    temperature_squared: bool = False,
    row_weights: Optional[torch.Tensor] = None,
    normalize: bool = True,
    backend: str = "auto",
    backward_memory_budget: int = DEFAULT_BACKWARD_MEMORY_BUDGET,
) -> torch.Tensor:
    """Distillation loss between teacher and student class distributions over shared classes.

    Args:
        student_features: (B, Ds) student image features; receives a gradient.
        teacher_features: (B, Dt) teacher image features; detached.
        class_vectors: (C, Dt) teacher class vectors; detached. Also the student's when
            ``student_class_vectors`` is None (then Ds must equal Dt).
        student_class_vectors: (C, Ds) the student's own class vectors; receives a gradient when
            it requires one.
        logit_scale: student logit scale (a Python float; no gradient flows to it).
        teacher_logit_scale: teacher logit scale; defaults to ``logit_scale``.
        temperature: divides both logit matrices.
        forward_weight, reverse_weight: weights of KL(p_t || p_s) and KL(p_s || p_t) per row.
        reduction: "batchmean" (sum_i w_i l_i / sum_i w_i; a plain mean over rows without
            weights), "mean" (that divided by C), "sum" (sum_i w_i l_i) or "none" ((B,) w_i l_i).
        temperature_squared: multiply the result by temperature**2.
        row_weights: (B,) non-negative weights (e.g. 0 for padded rows), not all zero. Their
            values are checked eagerly only, not inside a compiled graph.
        normalize: L2-normalize features and class vectors rowwise before the products.
        backend: "triton", "torch" (the materializing reference) or "auto" (triton on CUDA
            tensors, torch otherwise). See :func:`resolve_backend`.
        backward_memory_budget: bytes the Triton backward may use for its G-tile buffer
            (rows x C in the input dtype, one chunk of rows at a time); at least one row
            block (64 rows on a GPU) is used even at 0. Default 64 MiB.

    Inputs of another dtype than ``student_features`` are converted to its dtype for the
    kernel. Returns an fp32 loss (float64 for float64 inputs): a scalar, or (B,) for "none".
    """
    scale, teacher_scale, temperature, forward_weight, reverse_weight = _validate(
        student_features, teacher_features, class_vectors, student_class_vectors, logit_scale,
        teacher_logit_scale, temperature, forward_weight, reverse_weight, reduction, row_weights,
        backend)
    backward_memory_budget = _check_budget(backward_memory_budget)
    if resolve_backend(backend, student_features.device) == "torch":
        return kd_loss_reference(
            student_features, teacher_features, class_vectors,
            student_class_vectors=student_class_vectors, logit_scale=scale,
            teacher_logit_scale=teacher_scale, temperature=temperature,
            forward_weight=forward_weight, reverse_weight=reverse_weight, reduction=reduction,
            temperature_squared=temperature_squared, row_weights=row_weights,
            normalize=normalize)
    dtype = student_features.dtype
    row_loss = _kd_loss_rows_op(
        _as_kernel_input(student_features, dtype),
        _as_kernel_input(teacher_features.detach(), dtype),
        _as_kernel_input(class_vectors.detach(), dtype),
        None if student_class_vectors is None else _as_kernel_input(student_class_vectors, dtype),
        scale / temperature, teacher_scale / temperature, forward_weight, reverse_weight,
        bool(normalize), backward_memory_budget,
    )[0]
    return _reduce(row_loss, row_weights, reduction, class_vectors.shape[0], temperature,
                   temperature_squared)


class KDLoss(nn.Module):
    """:func:`kd_loss` as a module: the options are fixed at construction.

    ``forward(student_features, teacher_features, class_vectors, student_class_vectors=None,
    row_weights=None)``; ``backend_for(device)`` says which backend runs on a device.
    """

    def __init__(self, *, logit_scale: float = 100.0, teacher_logit_scale: Optional[float] = None,
                 temperature: float = 1.0, forward_weight: float = 0.5,
                 reverse_weight: float = 0.5, reduction: str = "batchmean",
                 temperature_squared: bool = False, normalize: bool = True,
                 backend: str = "auto",
                 backward_memory_budget: int = DEFAULT_BACKWARD_MEMORY_BUDGET) -> None:
        super().__init__()
        # Validate the options once, at construction, with a throwaway 1x1 problem.
        probe = torch.ones(1, 1)
        _validate(probe, probe, probe, None, logit_scale, teacher_logit_scale, temperature,
                  forward_weight, reverse_weight, reduction, None, backend)
        self.backward_memory_budget = _check_budget(backward_memory_budget)
        self.logit_scale = logit_scale
        self.teacher_logit_scale = teacher_logit_scale
        self.temperature = temperature
        self.forward_weight = forward_weight
        self.reverse_weight = reverse_weight
        self.reduction = reduction
        self.temperature_squared = temperature_squared
        self.normalize = normalize
        self.backend = backend

    def backend_for(self, device: Union[torch.device, str]) -> str:
        return resolve_backend(self.backend, device)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor,
                class_vectors: torch.Tensor,
                student_class_vectors: Optional[torch.Tensor] = None,
                row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_loss(
            student_features, teacher_features, class_vectors,
            student_class_vectors=student_class_vectors, logit_scale=self.logit_scale,
            teacher_logit_scale=self.teacher_logit_scale, temperature=self.temperature,
            forward_weight=self.forward_weight, reverse_weight=self.reverse_weight,
            reduction=self.reduction, temperature_squared=self.temperature_squared,
            row_weights=row_weights, normalize=self.normalize, backend=self.backend,
            backward_memory_budget=self.backward_memory_budget)

    def extra_repr(self) -> str:
        teacher = "" if self.teacher_logit_scale is None else \
            f", teacher_logit_scale={self.teacher_logit_scale}"
        return (f"logit_scale={self.logit_scale}{teacher}, temperature={self.temperature}, "
                f"forward_weight={self.forward_weight}, reverse_weight={self.reverse_weight}, "
                f"reduction={self.reduction!r}, temperature_squared={self.temperature_squared}, "
                f"normalize={self.normalize}, backend={self.backend!r}")
