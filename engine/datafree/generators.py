r"""Text-to-image generators guided by the teacher: a VQGAN decoder, or pixels / Fourier features.

Every generator is a parameterization ``render(params) -> images (B, 3, H, W) in [0, 1]`` plus a
way to draw initial ``params`` from per-image seeds; :meth:`ImageGenerator.generate` runs the one
objective they share (VQGAN-CLIP's):

    loss(x, t) = mean over cutouts v of  d(normalize(teacher_image(aug_v(x))), t),
    d(a, b)    = 2 * arcsin(||a - b|| / 2)^2        (the squared great-circle distance)

with t the teacher's normalized text feature of the image's (diversified) prompt. ``aug_v`` takes a
random square crop (side drawn from [``cut_min``, 1] of the shorter side, the same box for the
whole batch, as VQGAN-CLIP's MakeCutouts), resizes it to the teacher's input size, flips it at
random and adds a little Gaussian noise; then CLIP's mean/std normalization. The teacher stays
frozen and in eval mode; gradients flow through it to the images only. Per-image losses are
summed, so an image's gradient does not depend on what else is in its batch (Adam would undo a
batch mean anyway). Adam, ``steps`` steps.

Generators:

``VQGANGenerator`` (``"vqgan"``, the paper's)
    The decoder is diffusers' ``VQModel`` (a maintained implementation of the VQGAN
    architecture). The optimized parameters are the continuous latents z (B, c, h, w), initialized
    as random codebook entries; each step quantizes z to the nearest codebook entries with a
    straight-through gradient (diffusers' ``VectorQuantizer`` does exactly this) and decodes;
    the output in [-1, 1] is mapped to [0, 1]. Weights come from a local diffusers-format
    folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a ``.safetensors`` file
    beside a ``.json`` config: never from the network. :func:`tiny_vqgan` builds a random-init
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
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from clipdistill.engine.io import image_spec
from clipdistill.engine.models.clip import import_open_clip

GENERATORS = ("vqgan", "fourier", "pixel")

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


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) x (N, D) normalized -> (N,) squared great-circle distance 2*arcsin(||a-b||/2)^2."""
    return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


class Cutouts:
    """Random square crops resized to the teacher's side, flipped and noised (see module doc)."""

    def __init__(self, side: int, n_cutouts: int = 16, cut_min: float = 0.5, noise: float = 0.05):
        if n_cutouts < 1 or not 0 < cut_min <= 1:
            raise ValueError(f"need n_cutouts >= 1 and 0 < cut_min <= 1, got {n_cutouts}, {cut_min}")
        self.side, self.n_cutouts, self.cut_min, self.noise = side, n_cutouts, cut_min, noise

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) -> (n_cutouts * B, 3, side, side), cut-major."""
        _, _, height, width = images.shape
        short = min(height, width)
        views = []
        for _ in range(self.n_cutouts):
            u = torch.rand(4, generator=generator).tolist()
            size = max(1, int(short * (self.cut_min + (1 - self.cut_min) * u[0])))
            top = int((height - size) * u[1])
            left = int((width - size) * u[2])
            view = images[:, :, top : top + size, left : left + size]
            view = F.interpolate(view, size=(self.side, self.side), mode="bilinear", align_corners=False)
            if u[3] < 0.5:
                view = view.flip(-1)
            views.append(view)
        views = torch.cat(views)
        if self.noise > 0:
            noise = torch.randn(views.shape, generator=generator).to(views)
            views = views + self.noise * noise
        return views.clamp(0, 1)


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
        cut_min: float = 0.5,
        noise: float = 0.05,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimize one image per row of ``text_features`` (B, D) towards it.

        Args:
            teacher: a frozen :class:`~clipdistill.engine.models.Teacher`.
            text_features: (B, D) the teacher's normalized text features of the prompts.
            seeds: B per-image seeds; they fix the initial parameters and, through the first seed,
                the cutouts, so that an image is reproducible from its seed and batch.
            steps, lr: Adam steps and learning rate (default: the generator's own).

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
        cutouts = Cutouts(side, n_cutouts=n_cutouts, cut_min=cut_min, noise=noise)
        generator = torch.Generator().manual_seed(int(seeds[0]) if len(seeds) else 0)
        batch = targets.shape[0]
        for _ in range(steps):
            images = self.render(params)
            views = cutouts(images, generator)
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


def tiny_vqgan(seed: int = 0):
    """A random-init VQModel from :data:`TINY_VQGAN_CONFIG` (for tests; it draws nothing useful)."""
    VQModel = _import_diffusers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQModel(**TINY_VQGAN_CONFIG)


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
            raise ValueError(
                "the vqgan generator needs decoder weights: pass a local diffusers VQModel folder or "
                ".safetensors file (--vqgan PATH), or 'tiny' for a random-init test decoder"
            )
        if isinstance(vqgan, nn.Module):
            model = vqgan
        elif str(vqgan) == "tiny":
            model = tiny_vqgan()
        else:
            model = load_vqgan(vqgan)
        return VQGANGenerator(model.to(device), image_size)
    raise ValueError(f"unknown generator {name!r}; choose one of {GENERATORS}")
