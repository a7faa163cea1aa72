r"""Text-to-image generators guided by the teacher: a VQGAN decoder, or pixels / Fourier features.

Every generator is a parameterization ``render(params) -> images (B, 3, H, W) in [0, 1]`` plus a
way to draw initial ``params`` from per-image seeds; :meth:`ImageGenerator.generate` runs the one
objective they share (VQGAN-CLIP's):

    loss(x, t) = mean over cutouts v of  d(normalize(teacher_image(aug_v(x))), t),
    d(a, b)    = 2 * arcsin(||a - b|| / 2)^2        (the squared great-circle distance)

with t the teacher's normalized text feature of the image's (diversified) prompt. ``aug_v`` is one
of ``n_cutouts`` views per image and step (:class:`Cutouts`): a square crop at a random scale
(a fraction in [``cut_min``, 1] of the shorter side) and position, drawn for each image from its
own seed (VQGAN-CLIP shares one box by the batch; here an image does not depend on its
batch-mates), with VQGAN-CLIP's MakeCutouts augmentations (flip, sharpness, affine,
perspective, hue/saturation jitter, per-view noise; :class:`CutoutAugment`), resampled once to
the teacher's input size; then CLIP's mean/std normalization. The teacher stays frozen and in
eval mode; gradients flow through it to the images only. Per-image losses are summed, so an
image's gradient does not depend on what else is in its batch (Adam would undo a batch mean
anyway). Adam, ``steps`` steps.

Generators:

``VQGANGenerator`` (``"vqgan"``, the paper's, and the default: :data:`DEFAULT_GENERATOR`)
    The decoder is diffusers' ``VQModel`` (a maintained implementation of the VQGAN
    architecture). The optimized parameters are the continuous latents z (B, c, h, w), initialized
    as random codebook entries; each step quantizes z to the nearest codebook entries with a
    straight-through gradient (diffusers' ``VectorQuantizer`` does exactly this) and decodes;
    the output in [-1, 1] is mapped to [0, 1]. Weights come from a local diffusers-format
    folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a ``.safetensors`` file
    beside a ``.json`` config: never from the network. ``clipdistill convert-vqgan`` makes such a
    folder from a taming-transformers checkpoint (:mod:`.convert_vqgan`). :func:`tiny_vqgan` builds a random-init
    decoder from a small config for tests. diffusers is an optional dependency
    (``pip install clipdistill[datafree]``); it imports torchvision, so the CPU-only torchvision
    measure (:func:`~clipdistill.engine.models.import_open_clip`) is applied before it.

``FourierGenerator`` (``"fourier"``) and ``PixelGenerator`` (``"pixel"``)
    No weights at all. Fourier: the image is ``sigmoid(irfft2(spectrum * scale))`` with a
    learnable complex spectrum (B, 3, H, W/2+1) initialized N(0, 0.01^2) and a fixed
    1/f^decay scale that makes low frequencies cheap (Lucid's feature-visualization
    parameterization; *choice:* without its color-decorrelation matrix, which is fitted to
    ImageNet statistics that a data-free method should not assume). Pixel: ``sigmoid(logits)``
    with logits N(0, 0.1^2); the simplest baseline, more prone to adversarial high-frequency
    patterns than the Fourier one.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from clipdistill.engine.io import image_spec
from clipdistill.engine.models.clip import import_open_clip

GENERATORS = ("vqgan", "fourier", "pixel")
# The generator of the library (SynthesisPlan) and of `clipdistill synthesize`: the paper's. It needs
# decoder weights (--vqgan; `clipdistill convert-vqgan` makes them from a taming-transformers
# checkpoint); "fourier" is the choice that needs none.
DEFAULT_GENERATOR = "vqgan"
VQGAN_WEIGHTS_NEEDED = (
    "the vqgan generator needs decoder weights: --vqgan DIR, a diffusers VQModel folder (make one from a "
    "taming-transformers checkpoint with `clipdistill convert-vqgan CKPT --out-dir DIR`; 'tiny': a random-init "
    "test decoder), or --generator fourier, which needs no weights"
)
CUTOUT_SEED_TAG = 0xC07  # a tag of its own in each image's seed sequence (see synthesize.IMAGE_SEED_TAG)

# A small VQModel for tests: two resolution levels (latent 1/2 of the image side), 64 codes.
TINY_VQGAN_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=8,
    num_vq_embeddings=64,
    vq_embed_dim=8,
    norm_num_groups=8,
    sample_size=32,
)


# ----------------------------------------------------------------------------- teacher side


def teacher_input_spec(teacher) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The teacher's square input side and its normalization mean/std, each (1, 3, 1, 1)."""
    side, mean, std = image_spec(teacher.model)
    return side, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def teacher_image_features(teacher, images: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """images (B, 3, S, S) in [0, 1] at the teacher's side -> (B, D) normalized float32 features.

    With ``grad=True`` the gradient flows to ``images`` (the teacher's weights stay frozen);
    :meth:`Teacher.encode_image` runs under no_grad, so the wrapped model is called directly.
    """
    _, mean, std = teacher_input_spec(teacher)
    x = (images - mean.to(images)) / std.to(images)
    if not grad:
        return teacher.encode_image(x)
    features = teacher.model.encode_image(x.to(teacher.input_dtype)).float()
    return F.normalize(features, dim=-1)


def resize_to(images: torch.Tensor, side: int) -> torch.Tensor:
    """Resize (B, 3, H, W) to (B, 3, side, side) (bicubic, antialiased when shrinking)."""
    if images.shape[-2:] == (side, side):
        return images
    shrinking = min(images.shape[-2:]) > side
    return F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False,
                         antialias=shrinking).clamp(0, 1)


def cutout_seed(image_seed: int) -> int:
    """The seed of an image's cutouts, a stream apart from the one of its initial parameters."""
    return int(np.random.SeedSequence([int(image_seed), CUTOUT_SEED_TAG]).generate_state(1)[0] & 0x7FFFFFFF)


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) x (N, D) normalized -> (N,) squared great-circle distance 2*arcsin(||a-b||/2)^2."""
    return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


@dataclass(frozen=True)
class CutoutAugment:
    """The random augmentations of each cutout: a probability and a range for each.

    The defaults are VQGAN-CLIP's MakeCutouts (Crowson's notebook, as published with kornia):
    horizontal flip p=0.5, sharpness 0.3 p=0.4, affine (rotation up to 30 degrees, translation
    up to 0.1 of the side, border padding) p=0.8, perspective (distortion 0.2) p=0.4, color
    jitter (hue and saturation 0.01) p=0.7, then per-cutout Gaussian noise with a standard
    deviation drawn from U(0, 0.1). Written here without kornia (see :class:`Cutouts` for the
    exact maps and where they differ from kornia's).
    """

    flip_p: float = 0.5
    sharpness_p: float = 0.4
    sharpness: float = 0.3  # the blend factor toward the input is drawn from U(0, sharpness)
    affine_p: float = 0.8
    degrees: float = 30.0
    translate: float = 0.1  # fraction of the cutout's side
    perspective_p: float = 0.4
    distortion: float = 0.2  # corners move inwards by up to this fraction of the half side
    jitter_p: float = 0.7
    hue: float = 0.01  # fraction of a full turn of the hue circle
    saturation: float = 0.01
    noise: float = 0.1  # the noise's standard deviation is drawn from U(0, noise)


# Named sets for the command line and the synthesis plan. "crops": per-image crops at varied
# scales and flips only (for ablations, and a teacher that should see the image undistorted).
CUTOUT_AUGMENTS: dict[str, CutoutAugment] = {
    "vqgan-clip": CutoutAugment(),
    "crops": CutoutAugment(sharpness_p=0.0, affine_p=0.0, perspective_p=0.0, jitter_p=0.0, noise=0.0),
}
DEFAULT_AUGMENT = "vqgan-clip"

# The columns of the uniform draws of one cutout (one row per cutout).
_U_SIZE, _U_CX, _U_CY, _U_FLIP, _U_AFFINE, _U_ANGLE, _U_TX, _U_TY, _U_PERSP = range(9)
_U_CORNERS = slice(9, 17)
_U_SHARP, _U_SHARP_AMOUNT, _U_JITTER, _U_HUE, _U_SAT, _U_NOISE = range(17, 23)
_N_UNIFORMS = 23

# RGB -> YIQ (NTSC); a hue shift is a rotation of the (I, Q) plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_LUMA = _RGB_TO_YIQ[0]
_SMOOTH_KERNEL = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # PIL's SMOOTH


def _homography_from_corners(corners: torch.Tensor) -> torch.Tensor:
    """(N, 4, 2) targets of the corners (-1,-1), (1,-1), (1,1), (-1,1) -> (N, 3, 3) homographies."""
    source = corners.new_tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    n = corners.shape[0]
    x, y = source[:, 0].expand(n, 4), source[:, 1].expand(n, 4)
    u, v = corners[..., 0], corners[..., 1]
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)  # (N, 8, 8)
    h = torch.linalg.solve(system, torch.cat([u, v], dim=1))  # (N, 8)
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=1).view(n, 3, 3)


class Cutouts:
    """Several augmented crops of every image per step, each image's drawn from its own generator.

    For each image and each of ``n_cutouts`` views: a square crop whose side is a fraction
    ``cut_min + (1 - cut_min) * u ** cut_pow`` (u ~ U(0, 1)) of the image's shorter side at a
    uniform position, then (each with its probability in ``augment``) a horizontal flip, an
    affine map (rotation, translation), a perspective map (each corner moved inwards by
    U(0, distortion) of the half side, per coordinate), all composed into one homography per view
    and sampled once (bilinear, border padding) at the teacher's side; then kornia's sharpness
    blend ``s + f (x - s)`` with ``f ~ U(0, sharpness)`` (as ``RandomSharpness(0.3)`` samples it),
    where ``s`` is ``x`` smoothed by PIL's SMOOTH kernel and clamped to [0, 1], its one-pixel
    border kept from ``x`` (with ``f`` below 1 this softens the view), a color matrix (a hue rotation in YIQ and a
    saturation blend with the luma), and Gaussian noise with a per-view standard deviation. Not
    clamped afterwards (as VQGAN-CLIP: the noise may leave [0, 1]).

    *Choices* where VQGAN-CLIP's kornia pipeline differs: one resampling of the whole chain
    (kornia resamples at each geometric step), the crop sampled bilinearly from the full image
    (VQGAN-CLIP resamples with a Lanczos filter; with crops at least ``cut_min`` of an image the
    size of the teacher's input this upsamples, so nothing aliases), and VQGAN-CLIP's crops
    shared by the batch are drawn here per image, so that an image does not depend on its
    batch-mates.
    """

    def __init__(self, side: int, n_cutouts: int = 16, cut_min: float = 0.5, cut_pow: float = 1.0,
                 augment: Union[str, CutoutAugment] = DEFAULT_AUGMENT):
        if n_cutouts < 1 or not 0 < cut_min <= 1 or cut_pow <= 0:
            raise ValueError(f"need n_cutouts >= 1, 0 < cut_min <= 1 and cut_pow > 0, got {n_cutouts}, "
                             f"{cut_min}, {cut_pow}")
        if isinstance(augment, str):
            if augment not in CUTOUT_AUGMENTS:
                raise ValueError(f"unknown cutout augmentation {augment!r}; choose one of {sorted(CUTOUT_AUGMENTS)}")
            augment = CUTOUT_AUGMENTS[augment]
        self.side, self.n_cutouts, self.cut_min, self.cut_pow = int(side), n_cutouts, cut_min, cut_pow
        self.augment = augment

    def draw(self, generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
        """The uniforms of every view, (B, n_cutouts, 23): row b from ``generators[b]``."""
        return torch.stack([torch.rand(self.n_cutouts, _N_UNIFORMS, generator=g, device=device) for g in generators])

    def transforms(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, 23) uniforms -> (N, 3, 3) homographies from output to input normalized coordinates."""
        a = self.augment
        short = min(height, width)
        frac = self.cut_min + (1 - self.cut_min) * u[:, _U_SIZE].pow(self.cut_pow)
        ex, ey = frac * short / width, frac * short / height  # half extents in [-1, 1] coordinates
        cx, cy = (2 * u[:, _U_CX] - 1) * (1 - ex), (2 * u[:, _U_CY] - 1) * (1 - ey)
        flip = torch.where(u[:, _U_FLIP] < a.flip_p, -1.0, 1.0)
        affine = (u[:, _U_AFFINE] < a.affine_p).to(u.dtype)
        angle = affine * (2 * u[:, _U_ANGLE] - 1) * a.degrees * torch.pi / 180
        tx, ty = (affine * (2 * u[:, c] - 1) * 2 * a.translate for c in (_U_TX, _U_TY))
        cos, sin = angle.cos(), angle.sin()
        sx, sy = ex * flip, ey
        zero, one = torch.zeros_like(cos), torch.ones_like(cos)
        # crop(flip(rotate(p) + t)) as one affine map, then the perspective before it.
        outer = torch.stack([
            torch.stack([sx * cos, -sx * sin, sx * tx + cx], dim=-1),
            torch.stack([sy * sin, sy * cos, sy * ty + cy], dim=-1),
            torch.stack([zero, zero, one], dim=-1),
        ], dim=1)
        corners = u.new_tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
        perspective = (u[:, _U_PERSP] < a.perspective_p).to(u.dtype)
        inward = (perspective * a.distortion)[:, None, None] * u[:, _U_CORNERS].view(-1, 4, 2)
        homography = _homography_from_corners(corners - corners.sign() * inward)
        identity = torch.eye(3, dtype=u.dtype, device=u.device).expand_as(homography)
        return outer @ torch.where(perspective.view(-1, 1, 1) > 0, homography, identity)

    def color_matrices(self, u: torch.Tensor) -> torch.Tensor:
        """(N, 23) uniforms -> (N, 3, 3) RGB matrices (hue rotation, then saturation)."""
        a = self.augment
        jitter = (u[:, _U_JITTER] < a.jitter_p).double()
        phi = jitter * (2 * u[:, _U_HUE].double() - 1) * a.hue * 2 * torch.pi
        rotation = torch.zeros(u.shape[0], 3, 3, dtype=torch.float64, device=u.device)
        rotation[:, 0, 0] = 1
        rotation[:, 1, 1], rotation[:, 1, 2] = phi.cos(), -phi.sin()
        rotation[:, 2, 1], rotation[:, 2, 2] = phi.sin(), phi.cos()
        hue = _YIQ_TO_RGB.to(u.device) @ rotation @ _RGB_TO_YIQ.to(u.device)
        factor = 1 + jitter * (2 * u[:, _U_SAT].double() - 1) * a.saturation
        eye = torch.eye(3, dtype=torch.float64, device=u.device)
        gray = torch.ones(3, 1, dtype=torch.float64, device=u.device) @ _LUMA.to(u.device)[None]
        saturation = factor[:, None, None] * eye + (1 - factor)[:, None, None] * gray
        return (saturation @ hue).to(u.dtype)

    def __call__(self, images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """images (B, 3, H, W), one generator per image on ``images.device`` ->
        (n_cutouts * B, 3, side, side), cut-major (row ``k * B + b`` is view k of image b)."""
        batch, channels, height, width = images.shape
        if len(generators) != batch:
            raise ValueError(f"need one generator per image: {batch} images, {len(generators)} generators")
        n, side, device = self.n_cutouts, self.side, images.device
        u = self.draw(generators, device).view(batch * n, _N_UNIFORMS)  # image-major
        coords = (torch.arange(side, device=device, dtype=torch.float32) * 2 + 1) / side - 1
        gy, gx = torch.meshgrid(coords, coords, indexing="ij")
        base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(-1, 3)  # (S*S, 3)
        mapped = torch.einsum("nij,pj->npi", self.transforms(u, height, width), base)
        grid = (mapped[..., :2] / mapped[..., 2:]).reshape(batch, n * side, side, 2)
        views = F.grid_sample(images.float(), grid.to(torch.float32), mode="bilinear", padding_mode="border",
                              align_corners=False)  # (B, 3, n*S, S)
        views = views.view(batch, channels, n, side, side).transpose(1, 2).reshape(batch * n, channels, side, side)
        a = self.augment
        if a.sharpness_p > 0 and a.sharpness > 0:
            chosen = torch.nonzero(u[:, _U_SHARP] < a.sharpness_p).squeeze(1)  # only the views drawn for it
            if chosen.numel():
                factor = (u[chosen, _U_SHARP_AMOUNT] * a.sharpness).view(-1, 1, 1, 1)
                part = views.index_select(0, chosen)
                kernel = _SMOOTH_KERNEL.to(device).repeat(channels, 1, 1, 1)
                smooth = part.clone()  # the one-pixel border stays the input's
                smooth[..., 1:-1, 1:-1] = F.conv2d(part, kernel, groups=channels).clamp(0, 1)
                views = views.index_copy(0, chosen, smooth + factor * (part - smooth))
        if a.jitter_p > 0 and (a.hue > 0 or a.saturation > 0):
            views = torch.einsum("nij,njhw->nihw", self.color_matrices(u), views)
        if a.noise > 0:
            sigma = (u[:, _U_NOISE] * a.noise).view(batch, n, 1, 1, 1)
            noise = torch.stack([torch.randn(n, channels, side, side, generator=g, device=device) for g in generators])
            views = views + (sigma * noise).view_as(views)
        # image-major -> cut-major, the order the loss reads.
        return views.view(batch, n, channels, side, side).transpose(0, 1).reshape(n * batch, channels, side, side)


# ----------------------------------------------------------------------------- the interface


class ImageGenerator(nn.Module):
    """One interface for every generator: ``init_params`` from seeds, ``render`` to [0, 1] images."""

    name = "generator"
    default_lr = 0.05

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = int(image_size)

    def init_params(self, seeds: Sequence[int]) -> torch.Tensor:
        """Initial parameters for one image per seed, (B, ...)."""
        raise NotImplementedError

    def render(self, params: torch.Tensor) -> torch.Tensor:
        """params (B, ...) -> images (B, 3, image_size, image_size) in [0, 1]."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def generate(
        self,
        teacher,
        text_features: torch.Tensor,
        seeds: Sequence[int],
        *,
        steps: int = 100,
        lr: Optional[float] = None,
        n_cutouts: int = 16,
        augment: Union[str, CutoutAugment] = DEFAULT_AUGMENT,
        cut_min: float = 0.5,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimize one image per row of ``text_features`` (B, D) towards it.

        Args:
            teacher: a frozen :class:`~clipdistill.engine.models.Teacher`.
            text_features: (B, D) the teacher's normalized text features of the prompts.
            seeds: B per-image seeds; each fixes its image's initial parameters and its cutouts,
                so that an image does not depend on the other images of its batch (up to
                floating-point differences of batched kernels).
            steps, lr: Adam steps and learning rate (default: the generator's own).
            n_cutouts, augment, cut_min: the views of each image per step (:class:`Cutouts`).

        Returns:
            images (B, 3, image_size, image_size) in [0, 1] on the CPU, and the teacher's cosine
            similarity of each full image to its prompt at the end, (B,).
        """
        if text_features.dim() != 2 or text_features.shape[0] != len(seeds):
            raise ValueError(f"text_features must be (B={len(seeds)}, D), got {tuple(text_features.shape)}")
        side, _, _ = teacher_input_spec(teacher)
        device = self.device
        targets = F.normalize(text_features.detach().float().to(device), dim=-1)
        params = nn.Parameter(self.init_params(seeds).to(device))
        optimizer = torch.optim.Adam([params], lr=lr or self.default_lr)
        cutouts = Cutouts(side, n_cutouts=n_cutouts, cut_min=cut_min, augment=augment)
        generators = [torch.Generator(device).manual_seed(cutout_seed(s)) for s in seeds]
        batch = targets.shape[0]
        for _ in range(steps):
            images = self.render(params)
            views = cutouts(images, generators)
            features = teacher_image_features(teacher, views, grad=True)
            distance = spherical_distance(features, targets.repeat(cutouts.n_cutouts, 1))
            loss = distance.view(cutouts.n_cutouts, batch).mean(dim=0).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            images = self.render(params).float()
            similarity = (teacher_image_features(teacher, resize_to(images, side)) * targets).sum(-1)
        return images.cpu(), similarity.cpu()


class PixelGenerator(ImageGenerator):
    """Images as sigmoid(logits): no weights, no prior."""

    name = "pixel"
    default_lr = 0.05

    def init_params(self, seeds: Sequence[int]) -> torch.Tensor:
        return torch.stack([
            0.1 * torch.randn(3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ])

    def render(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)


class FourierGenerator(ImageGenerator):
    """Images as sigmoid(irfft2(spectrum * 1/f^decay)): no weights, a smoothness prior."""

    name = "fourier"
    default_lr = 0.05

    def __init__(self, image_size: int, decay: float = 1.0):
        super().__init__(image_size)
        fy = torch.fft.fftfreq(self.image_size)[:, None]
        fx = torch.fft.rfftfreq(self.image_size)[None, :]
        freqs = (fy.square() + fx.square()).sqrt()
        scale = 1.0 / freqs.clamp_min(1.0 / self.image_size).pow(decay)
        # Normalize so the rendered image's standard deviation does not depend on the size.
        scale = scale / scale.square().mean().sqrt()
        self.register_buffer("scale", scale, persistent=False)  # (H, W/2+1)

    def init_params(self, seeds: Sequence[int]) -> torch.Tensor:
        shape = (3, self.image_size, self.image_size // 2 + 1, 2)
        return torch.stack([0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def render(self, params: torch.Tensor) -> torch.Tensor:
        spectrum = torch.view_as_complex(params.float().contiguous()) * self.scale
        pixels = torch.fft.irfft2(spectrum, s=(self.image_size, self.image_size), norm="ortho")
        return torch.sigmoid(pixels * 4.0)


# ----------------------------------------------------------------------------- VQGAN


def _import_diffusers():
    """diffusers' VQModel, after the CPU-only torchvision measure (diffusers imports torchvision)."""
    import_open_clip()
    try:
        from diffusers import VQModel
    except ImportError as error:
        raise ImportError(
            "the VQGAN generator needs diffusers (its VQModel is the decoder): "
            "pip install 'clipdistill[datafree]' (or pip install diffusers); "
            "the fourier and pixel generators need nothing extra"
        ) from error
    return VQModel


def diffusers_available() -> bool:
    try:
        return importlib.util.find_spec("diffusers") is not None
    except (ImportError, ValueError):  # a broken install, or a test that hid the module
        return False


def random_vqgan(config: dict, seed: int = 0):
    """A random-init VQModel from diffusers constructor arguments (tests, benchmarks: it draws nothing useful)."""
    VQModel = _import_diffusers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQModel(**config)


def tiny_vqgan(seed: int = 0):
    """A random-init VQModel from :data:`TINY_VQGAN_CONFIG` (for tests)."""
    return random_vqgan(TINY_VQGAN_CONFIG, seed)


def load_vqgan(path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """A VQModel from local files only.

    ``path`` is a diffusers-format folder (``config.json`` and the weights), or a ``.safetensors``
    file with its config in ``<same stem>.json`` or ``config.json`` beside it.
    """
    VQModel = _import_diffusers()
    path = Path(path)
    if path.is_dir():
        model = VQModel.from_pretrained(str(path), local_files_only=True)
    elif path.is_file() and path.suffix == ".safetensors":
        config_path = next((p for p in (path.with_suffix(".json"), path.parent / "config.json") if p.is_file()), None)
        if config_path is None:
            raise FileNotFoundError(
                f"no VQModel config for {path}: put it in {path.with_suffix('.json')} or "
                f"{path.parent / 'config.json'} (diffusers' VQModel config format)"
            )

        config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
        model = VQModel(**config)
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        decoder_missing = [k for k in missing if not k.startswith(("encoder.", "quant_conv."))]
        if decoder_missing or unexpected:
            raise RuntimeError(
                f"{path} does not fit the VQModel config {config_path}: missing {decoder_missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    else:
        raise FileNotFoundError(
            f"VQGAN weights {str(path)!r} not found: pass a diffusers-format folder or a .safetensors "
            f"file with its JSON config (weights are never downloaded)"
        )
    return model.to(device).eval()


class VQGANGenerator(ImageGenerator):
    """A frozen VQModel decoder; the latents are optimized (straight-through quantization)."""

    name = "vqgan"
    default_lr = 0.1

    def __init__(self, vqmodel: nn.Module, image_size: int):
        super().__init__(image_size)
        self.vqmodel = vqmodel.eval()
        for p in self.vqmodel.parameters():
            p.requires_grad_(False)
        levels = len(vqmodel.config.block_out_channels)
        self.factor = 2 ** (levels - 1)
        if image_size % self.factor:
            raise ValueError(f"image_size {image_size} must be a multiple of the decoder's factor {self.factor}")
        self.latent_side = image_size // self.factor

    def train(self, mode: bool = True) -> "VQGANGenerator":
        super().train(mode)
        self.vqmodel.eval()
        return self

    def init_params(self, seeds: Sequence[int]) -> torch.Tensor:
        codebook = self.vqmodel.quantize.embedding.weight.detach().float().cpu()  # (K, c)
        latents = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            codes = torch.randint(0, codebook.shape[0], (self.latent_side, self.latent_side), generator=g)
            latents.append(codebook[codes].permute(2, 0, 1))
        return torch.stack(latents)

    def render(self, params: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vqmodel.parameters()).dtype
        decoded = self.vqmodel.decode(params.to(dtype)).sample.float()
        return decoded.add(1).div(2).clamp(0, 1)


def build_generator(
    name: str,
    image_size: int,
    *,
    vqgan: Union[str, Path, nn.Module, None] = None,
    device: Union[str, torch.device] = "cpu",
) -> ImageGenerator:
    """A generator by name; ``vqgan`` is a VQModel, a local weights path, or ``"tiny"`` (tests)."""
    if name == "fourier":
        return FourierGenerator(image_size).to(device)
    if name == "pixel":
        return PixelGenerator(image_size).to(device)
    if name == "vqgan":
        if vqgan is None:
            raise ValueError(VQGAN_WEIGHTS_NEEDED)
        if isinstance(vqgan, nn.Module):
            model = vqgan
        elif str(vqgan) == "tiny":
            model = tiny_vqgan()
        else:
            model = load_vqgan(vqgan)
        return VQGANGenerator(model.to(device), image_size)
    raise ValueError(f"unknown generator {name!r}; choose one of {GENERATORS}")
