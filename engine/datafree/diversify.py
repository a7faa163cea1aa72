r"""Prompt diversification: pseudo-token style embeddings in "a [style] style of a [class]."

The data-free paper (PAPERS.md) drives image synthesis with prompts whose ``[style]`` slot holds
one or more *pseudo-tokens*: vectors in the teacher's token-embedding space that correspond to no
word. The prompt is tokenized with placeholder words in that slot; the placeholders' token
embeddings are replaced by the style vectors and the sequence is run through the teacher's own
text tower (:class:`~clipdistill.engine.towers.TextTower`), as CoOp splices its learned context.

Shapes: S styles, k pseudo-tokens per style (``n_style_tokens``), W the text tower's width,
C classes, D the joint embedding size, L the context length.

Three diversifiers, each turning ``(count, seed)`` into a :class:`StyleBank` of S = count styles,
style ``j`` drawn from its own seed ``style_seed(seed, j)`` so that any one style can be redrawn:

Mix-Prompt (``"mix"``)
    Each pseudo-token is a random convex combination of the token embeddings of
    ``words_per_style`` words drawn without replacement from :data:`STYLE_WORDS` (a dictionary of
    style words made for this project), with weights from a symmetric Dirichlet(``alpha``).
    *Choice where the paper is silent:* a word that the BPE splits into several tokens is
    represented by the mean of its token embeddings, so every dictionary entry is one vector.

Random-Prompt (``"random"``)
    Each pseudo-token is drawn from N(mu, diag(sigma^2)), with mu and sigma the per-dimension mean
    and standard deviation of the teacher's token-embedding table ("matched to the statistics of
    the table"). *Choice:* a diagonal Gaussian, not a full covariance: the table's covariance is
    W x W and buys little for a vector that is then optimized or used as is.

Contrastive-Prompt (``"contrastive"``)
    Styles are learned one after another, each starting from the Random-Prompt draw with the same
    style seed (so "contrastive vs random on the same seed" compares like with like). With
    f(s, c) the normalized teacher text feature of "a [s] style of a [c].", g(c) the class anchor
    (the normalized feature of "a photo of a [c].") and a memory bank M of the earlier styles'
    features f(s_m, c) (detached), style s_j minimizes over a subset of classes c:

        L_class(s, c) = -log softmax_c'( <f(s, c), g(c')> / tau )[c]          (keep the class)
        L_repel(s, c) = tau * logsumexp_{m in M} ( <f(s, c), f(s_m, c)> / tau )  (leave the bank)
        L(s)          = mean_c [ L_class + repel_weight * L_repel ]

    *Choices where the paper is silent (its exact losses were not retrievable):* the class term is
    a cross-entropy over classes rather than a pull towards g(c): it is satisfied as soon as the
    styled prompt still reads as its class, so it does not collapse every style onto the anchor;
    the repelling term is a soft maximum (tau-scaled logsumexp) of the similarity to the memory
    bank, whose gradient concentrates on the nearest earlier styles; it is zero for the first
    style. After every step each pseudo-token's norm is clipped to the largest row norm of the
    token-embedding table, so that pushing away cannot be won by inflating the vector out of the
    range the text tower was trained on. Adam, ``steps`` steps per style, ``classes_per_step``
    classes drawn per step (all when C is small) so that the cost per step does not grow with C.

The spread of a bank is measured in the teacher's text space by :func:`style_spread`: the mean
pairwise cosine distance between the styled prompts' features, per class, averaged over classes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clipdistill.engine.models.towers import TextTower

Tokenizer = Callable[[Sequence[str]], torch.Tensor]

STYLE_TEMPLATE = "a {style} style of a {name}."
ANCHOR_TEMPLATE = "a photo of a {name}."
# Placeholder word tokenized into the style slot; its embeddings are replaced, and the slot's
# positions come from tokenizing the template's prefix, never from searching for this word (a class
# name such as "x-wing fighter" tokenizes to the same id).
PLACEHOLDER = "X"
DIVERSIFIERS = ("mix", "random", "contrastive")
STYLE_SEED_TAG = 0x57E1E

# A dictionary of visual style words for Mix-Prompt, written for this project: media, techniques,
# art movements, rendering looks and photographic conditions.
STYLE_WORDS: tuple[str, ...] = (
    "photo", "photograph", "snapshot", "painting", "watercolor", "oil", "acrylic", "gouache",
    "sketch", "drawing", "pencil", "charcoal", "ink", "pastel", "crayon", "chalk", "engraving",
    "woodcut", "etching", "lithograph", "mosaic", "fresco", "tapestry", "embroidery", "quilt",
    "origami", "papercraft", "collage", "stencil", "graffiti", "mural", "tattoo", "cartoon",
    "comic", "anime", "manga", "clipart", "icon", "emoji", "sticker", "logo", "pixel", "voxel",
    "render", "3d", "lowpoly", "wireframe", "blueprint", "diagram", "infographic", "sculpture",
    "statue", "clay", "plasticine", "wood", "marble", "bronze", "glass", "ceramic", "porcelain",
    "toy", "plush", "lego", "figurine", "miniature", "silhouette", "shadow", "neon", "hologram",
    "xray", "thermal", "infrared", "sepia", "monochrome", "grayscale", "vintage", "retro",
    "polaroid", "blurry", "grainy", "noisy", "pixelated", "glitch", "psychedelic", "surreal",
    "abstract", "cubist", "impressionist", "expressionist", "baroque", "renaissance", "gothic",
    "minimalist", "popart", "ukiyoe", "art", "deco", "nouveau", "futuristic", "cyberpunk",
    "steampunk", "fantasy", "medieval", "tribal", "folk", "doodle", "scribble", "cross-stitch",
    "knitted", "painted", "sunset", "night", "foggy", "snowy", "rainy", "underwater", "aerial",
    "closeup", "macro", "panorama", "studio", "cinematic", "dramatic", "pastel-colored", "bright",
    "dark",
)


def style_seed(seed: int, style_index: int) -> int:
    """The seed of style ``style_index`` in a run seeded ``seed`` (a 31-bit int, stable across runs)."""
    # A tag word keeps style seeds apart from image seeds drawn from the same run seed (numpy's
    # SeedSequence ignores trailing zero words, so unequal-length keys alone could collide).
    return int(np.random.SeedSequence([int(seed), STYLE_SEED_TAG, int(style_index)]).generate_state(1)[0] & 0x7FFFFFFF)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ----------------------------------------------------------------------------- styled prompts


class StyledPrompts:
    """Token ids of "a X style of a [class]." per class and where the style slot sits.

    ``encode_pairs(styles (N, k, W), class_indices (N,))`` -> (N, D) normalized teacher text
    features of the styled prompts; gradients flow into ``styles`` (the tower stays frozen).
    """

    def __init__(
        self,
        tower: TextTower,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        n_style_tokens: int = 1,
        template: str = STYLE_TEMPLATE,
    ):
        if n_style_tokens < 1:
            raise ValueError(f"n_style_tokens must be >= 1, got {n_style_tokens}")
        if "{style}" not in template or "{name}" not in template:
            raise ValueError(f"template must contain {{style}} and {{name}}, got {template!r}")
        prefix = template.split("{style}")[0]
        if "{name}" in prefix:
            raise ValueError(f"template must put {{style}} before {{name}}, got {template!r}")
        if not class_names:
            raise ValueError("class_names is empty")
        self.tower = tower
        self.template = template
        self.class_names = list(class_names)
        self.n_style_tokens = n_style_tokens
        prefix_tokens = tokenizer([prefix.strip()])[0] if prefix.strip() else None
        n_prefix = 0 if prefix_tokens is None else int(prefix_tokens.argmax().item()) - 1
        self.style_start = 1 + n_prefix  # after the start-of-text token and the prefix words
        placeholder = " ".join([PLACEHOLDER] * n_style_tokens)
        texts = [template.format(style=placeholder, name=name) for name in self.class_names]
        device = tower.token_embedding.weight.device
        self.token_ids = tokenizer(texts).to(device)  # (C, L)
        # The end-of-text token is the largest id (open_clip's own pooling relies on it too); the
        # style slot must end before it or the prompt was truncated into the slot.
        last = int(self.token_ids.argmax(dim=-1).min().item())
        if self.style_start + n_style_tokens >= last:
            raise ValueError(f"the style slot does not fit in the context length {tower.context_length}")

    def text(self, class_index: int, style: str) -> str:
        """The readable prompt, the style shown as a description (e.g. ``<random#17>``)."""
        return self.template.format(style=style, name=self.class_names[class_index])

    def encode_pairs(self, styles: torch.Tensor, class_indices: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """styles (N, k, W), class_indices (N,) -> (N, D) normalized features (float32)."""
        if styles.dim() != 3 or styles.shape[1] != self.n_style_tokens or styles.shape[2] != self.tower.width:
            raise ValueError(
                f"styles must be (N, {self.n_style_tokens}, {self.tower.width}), got {tuple(styles.shape)}"
            )
        class_indices = torch.as_tensor(class_indices, dtype=torch.long, device=self.token_ids.device)
        if class_indices.shape != styles.shape[:1]:
            raise ValueError(f"class_indices must be ({styles.shape[0]},), got {tuple(class_indices.shape)}")
        out = []
        for start in range(0, styles.shape[0], batch_size):
            tokens = self.token_ids[class_indices[start : start + batch_size]]
            embedded = self.tower.embed(tokens)
            style = styles[start : start + batch_size].to(device=embedded.device, dtype=embedded.dtype)
            end = self.style_start + self.n_style_tokens
            embedded = torch.cat([embedded[:, : self.style_start], style, embedded[:, end:]], dim=1)
            out.append(F.normalize(self.tower.encode(embedded, tokens).float(), dim=-1))
        return torch.cat(out)

    def encode_grid(self, styles: torch.Tensor, class_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """styles (S, k, W) x classes (K,) (default: all) -> (S, K, D) normalized features."""
        if class_indices is None:
            class_indices = torch.arange(len(self.class_names))
        class_indices = torch.as_tensor(class_indices, dtype=torch.long)
        n_styles, n_classes = styles.shape[0], class_indices.shape[0]
        pairs_style = styles.repeat_interleave(n_classes, dim=0)
        pairs_class = class_indices.repeat(n_styles)
        return self.encode_pairs(pairs_style, pairs_class).view(n_styles, n_classes, -1)


def style_spread(features: torch.Tensor) -> float:
    """Mean pairwise cosine distance between styles, per class, averaged over classes.

    features: (S, K, D) normalized (as :meth:`StyledPrompts.encode_grid` returns), S >= 2.
    """
    if features.dim() != 3 or features.shape[0] < 2:
        raise ValueError(f"features must be (S>=2, K, D), got {tuple(features.shape)}")
    per_class = features.transpose(0, 1).float()  # (K, S, D)
    sims = per_class @ per_class.transpose(1, 2)  # (K, S, S)
    n = features.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=features.device)
    return float((1.0 - sims[:, off_diagonal]).mean())


# ----------------------------------------------------------------------------- style banks


@dataclass
class StyleBank:
    """S style embeddings and where each came from.

    embeddings: (S, k, W) float32 on the CPU. seeds: the style seed of each. descriptions: short
    readable names (``"watercolor 0.52 + ink 0.30 + neon 0.18"``, ``"random#123"``). losses: for
    Contrastive-Prompt, each style's objective at every optimization step.
    """

    kind: str
    embeddings: torch.Tensor
    seeds: list[int]
    descriptions: list[str]
    losses: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def save(self, path: Union[str, Path], key: dict) -> None:
        """Write the bank and the ``key`` it was made for to one safetensors file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "seeds": self.seeds, "descriptions": self.descriptions,
                "losses": self.losses, "key": key}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({"styles": self.embeddings.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"style_bank": json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, Path], key: Optional[dict] = None) -> "StyleBank":
        """Read a bank; with ``key``, refuse one made for anything else."""
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["style_bank"])
            embeddings = handle.get_tensor("styles")
        if key is not None and meta["key"] != key:
            diff = sorted(k for k in set(key) | set(meta["key"]) if key.get(k) != meta["key"].get(k))
            raise ValueError(f"style bank {path} was made for other settings (differs in {diff})")
        return cls(meta["kind"], embeddings, meta["seeds"], meta["descriptions"], meta["losses"])


class MixPrompt:
    """Random convex combinations of style-word embeddings (see the module docstring)."""

    name = "mix"

    def __init__(
        self,
        tower: TextTower,
        tokenizer: Tokenizer,
        words: Sequence[str] = STYLE_WORDS,
        words_per_style: int = 3,
        alpha: float = 1.0,
        n_style_tokens: int = 1,
    ):
        words = list(dict.fromkeys(w.strip() for w in words if w.strip()))
        if len(words) < 2:
            raise ValueError("Mix-Prompt needs at least two distinct style words")
        if not 1 <= words_per_style <= len(words):
            raise ValueError(f"words_per_style must be in [1, {len(words)}], got {words_per_style}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.words = words
        self.words_per_style = words_per_style
        self.alpha = alpha
        self.n_style_tokens = n_style_tokens
        tokens = tokenizer(words).to(tower.token_embedding.weight.device)
        with torch.no_grad():
            embedded = tower.token_embedding(tokens).float()  # (V, L, W)
        ends = tokens.argmax(dim=-1)  # end-of-text position
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        inside = (positions[None] >= 1) & (positions[None] < ends[:, None])  # the word's own tokens
        weights = inside.float() / inside.float().sum(dim=1, keepdim=True).clamp_min(1)
        self.word_embeddings = torch.einsum("vl,vlw->vw", weights, embedded).cpu()  # (V, W)

    def styles(self, count: int, seed: int) -> StyleBank:
        """``count`` styles, style j drawn from ``style_seed(seed, j)``."""
        embeddings, seeds, descriptions = [], [], []
        for j in range(count):
            s = style_seed(seed, j)
            rng = np.random.default_rng(s)
            tokens, names = [], []
            for _ in range(self.n_style_tokens):
                picked = rng.choice(len(self.words), size=self.words_per_style, replace=False)
                mix = rng.dirichlet([self.alpha] * self.words_per_style)
                tokens.append(torch.from_numpy(mix).float() @ self.word_embeddings[torch.from_numpy(picked)])
                order = np.argsort(-mix)
                names.append(" + ".join(f"{self.words[picked[i]]} {mix[i]:.2f}" for i in order))
            embeddings.append(torch.stack(tokens))
            seeds.append(s)
            descriptions.append(" | ".join(names))
        width = self.word_embeddings.shape[1]
        stacked = torch.stack(embeddings) if embeddings else torch.empty(0, self.n_style_tokens, width)
        return StyleBank(self.name, stacked, seeds, descriptions)


class RandomPrompt:
    """Pseudo-tokens drawn from the token-embedding table's per-dimension Gaussian."""

    name = "random"

    def __init__(self, tower: TextTower, n_style_tokens: int = 1):
        self.n_style_tokens = n_style_tokens
        with torch.no_grad():
            table = tower.token_embedding.weight.float()
            self.mean = table.mean(dim=0).cpu()
            self.std = table.std(dim=0).cpu()

    def draw(self, seed: int) -> torch.Tensor:
        """One style (k, W) from ``seed``."""
        noise = torch.randn(self.n_style_tokens, self.mean.shape[0], generator=_generator(seed))
        return self.mean + self.std * noise

    def styles(self, count: int, seed: int) -> StyleBank:
        seeds = [style_seed(seed, j) for j in range(count)]
        embeddings = torch.stack([self.draw(s) for s in seeds]) if count else torch.empty(0, self.n_style_tokens, self.mean.shape[0])
        return StyleBank(self.name, embeddings, seeds, [f"random#{s}" for s in seeds])


class ContrastivePrompt:
    """Styles learned against a memory bank of earlier styles (objective in the module docstring)."""

    name = "contrastive"

    def __init__(
        self,
        prompts: StyledPrompts,
        tokenizer: Tokenizer,
        *,
        steps: int = 50,
        lr: float = 2e-3,
        temperature: float = 0.07,
        repel_weight: float = 1.0,
        classes_per_step: int = 64,
        anchor_template: str = ANCHOR_TEMPLATE,
    ):
        if steps < 0 or lr <= 0 or temperature <= 0 or repel_weight < 0 or classes_per_step < 1:
            raise ValueError("steps >= 0, lr > 0, temperature > 0, repel_weight >= 0 and classes_per_step >= 1 are required")
        self.prompts = prompts
        self.tower = prompts.tower
        self.n_style_tokens = prompts.n_style_tokens
        self.init = RandomPrompt(self.tower, prompts.n_style_tokens)
        self.steps, self.lr, self.temperature = steps, lr, temperature
        self.repel_weight, self.classes_per_step = repel_weight, classes_per_step
        device = self.tower.token_embedding.weight.device
        with torch.no_grad():
            tokens = tokenizer([anchor_template.format(name=n) for n in prompts.class_names]).to(device)
            self.anchors = F.normalize(self.tower.encode_tokens(tokens).float(), dim=-1)  # (C, D)
            self.max_norm = float(self.tower.token_embedding.weight.float().norm(dim=-1).max())

    def objective(self, style: torch.Tensor, class_indices: torch.Tensor, bank: Optional[torch.Tensor]) -> torch.Tensor:
        """L(s) for one style (k, W) over ``class_indices`` (K,); bank (M, C, D) or None."""
        feats = self.prompts.encode_pairs(style.unsqueeze(0).expand(len(class_indices), -1, -1), class_indices)
        anchors = self.anchors.to(feats.device)
        targets = class_indices.to(feats.device)
        loss = F.cross_entropy(feats @ anchors.t() / self.temperature, targets)
        if bank is not None and bank.shape[0] > 0 and self.repel_weight > 0:
            earlier = bank[:, class_indices].to(feats.device)  # (M, K, D)
            sims = torch.einsum("kd,mkd->km", feats, earlier) / self.temperature
            loss = loss + self.repel_weight * self.temperature * torch.logsumexp(sims, dim=1).mean()
        return loss

    def styles(self, count: int, seed: int, bank: Optional[StyleBank] = None) -> StyleBank:
        """Learn ``count`` styles in order; ``bank`` continues an earlier, shorter run."""
        n_classes = len(self.prompts.class_names)
        all_classes = torch.arange(n_classes)
        embeddings = [] if bank is None else list(bank.embeddings)
        seeds = [] if bank is None else list(bank.seeds)
        losses = [] if bank is None else list(bank.losses)
        memory = []  # (C, D) detached features of each earlier style
        with torch.no_grad():
            for e in embeddings:
                memory.append(self.prompts.encode_grid(e.unsqueeze(0))[0])
        for j in range(len(embeddings), count):
            s = style_seed(seed, j)
            g = _generator(s ^ 0x5EED)
            param = nn.Parameter(self.init.draw(s).to(self.tower.token_embedding.weight.device))
            optimizer = torch.optim.Adam([param], lr=self.lr)
            stacked = torch.stack(memory) if memory else None
            trace = []
            for _ in range(self.steps):
                if n_classes > self.classes_per_step:
                    classes = torch.randperm(n_classes, generator=g)[: self.classes_per_step]
                else:
                    classes = all_classes
                loss = self.objective(param, classes, stacked)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    norms = param.norm(dim=-1, keepdim=True)
                    param.mul_(torch.clamp(self.max_norm / norms.clamp_min(1e-12), max=1.0))
                trace.append(float(loss.detach()))
            with torch.no_grad():
                trace.append(float(self.objective(param, all_classes, stacked)))  # final, all classes
                memory.append(self.prompts.encode_grid(param.detach().unsqueeze(0))[0])
            embeddings.append(param.detach().float().cpu())
            seeds.append(s)
            losses.append(trace)
        stacked_embeddings = torch.stack(embeddings) if embeddings else self.init.styles(0, seed).embeddings
        return StyleBank(self.name, stacked_embeddings, seeds, [f"contrastive#{s}" for s in seeds], losses)


def build_diversifier(
    name: str,
    tower: TextTower,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    *,
    n_style_tokens: int = 1,
    words_per_style: int = 3,
    contrastive_steps: int = 50,
    contrastive_lr: float = 2e-3,
):
    """A diversifier by name (``"mix"``, ``"random"``, ``"contrastive"``) over the teacher's text tower."""
    if name == "mix":
        return MixPrompt(tower, tokenizer, words_per_style=words_per_style, n_style_tokens=n_style_tokens)
    if name == "random":
        return RandomPrompt(tower, n_style_tokens=n_style_tokens)
    if name == "contrastive":
        prompts = StyledPrompts(tower, tokenizer, class_names, n_style_tokens=n_style_tokens)
        return ContrastivePrompt(prompts, tokenizer, steps=contrastive_steps, lr=contrastive_lr)
    raise ValueError(f"unknown diversifier {name!r}; choose one of {DIVERSIFIERS}")
