"""Re-driving open_clip's towers with prompt tokens, without forking their code.

open_clip's ``VisionTransformer`` and CLIP text path run embeddings, a stack of residual
blocks, a norm, pooling and a projection. Prompt learners need to change only what enters
the block stack and what happens between blocks, so these functions call open_clip's own
modules (``_embeds``, each block, ``_pool`` / ``text_global_pool``, the projections) and
loop over ``transformer.resblocks`` themselves, exactly as ``Transformer.forward`` does,
calling a per-layer hook between blocks. With no prompts the hook is never called and the
operations are the same as open_clip's, so features match bit for bit.

Where prompts sit:
- Vision: prompt tokens are appended after the patch tokens ([CLS, patches, prompts]).
  The first layer's prompts join before ``ln_pre`` by default (``before_ln_pre=True``), as
  the published VPT, MaPLe, IVLP/PromptSRC and PromptKD code concatenates them, so ln_pre
  normalizes them with the image tokens; ``before_ln_pre=False`` appends them after
  ``ln_pre`` (this engine's placement before the option existed, kept so that runs made then
  reproduce). At each of the first ``depth`` layers the trailing prompt tokens are replaced by
  that layer's prompts ("deep" prompting); later layers carry the previous layer's outputs.
  They are cut off before pooling, so ``avg`` pooling and attentional poolers see only the
  image tokens.
- Text: prompt tokens occupy positions ``1 .. 1+n`` (after the start token), as in CoOp;
  deeper layers replace those positions. Pooling uses the placeholder token ids, so the
  end-of-text position is found as open_clip finds it.

Shapes are batch-first (N, L, width) at every hook, whatever the blocks' own layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipdistill.engine.models.clip import import_open_clip

# A hook gets (layer index, x (N, L, width)) before that layer's block and returns the new x.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


def run_blocks(
    transformer: nn.Module,
    x: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    hook: Optional[LayerHook] = None,
) -> torch.Tensor:
    """Run open_clip's ``transformer.resblocks`` on x (N, L, width) -> (N, L, width).

    Follows ``Transformer.forward``: the same layout changes when the blocks are not
    batch-first, the same gradient checkpointing switch; ``hook`` runs before each block.
    """
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for index, block in enumerate(transformer.resblocks):
        if hook is not None:
            x = hook(index, x if batch_first else x.transpose(0, 1))
            if not batch_first:
                x = x.transpose(0, 1)
        if getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled():
            x = checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
    if not batch_first:
        x = x.transpose(0, 1)
    return x


def _expand_prompts(prompts: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, width) shared or (N, n, width) per sample -> (N, n, width)."""
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0).expand(batch, -1, -1)
    return prompts.to(dtype)


# --------------------------------------------------------------------------- vision


def check_vision_tower(visual: nn.Module) -> None:
    """Refuse towers that cannot be re-driven (timm and ResNet towers have no token stack)."""
    needed = ("transformer", "conv1", "positional_embedding", "class_embedding", "ln_post")
    missing = [name for name in needed if not hasattr(visual, name)]
    if missing or not hasattr(visual.transformer, "resblocks"):
        raise TypeError(
            f"vision prompts need open_clip's VisionTransformer; got {type(visual).__name__} "
            f"(missing {missing or ['transformer.resblocks']}). Use a ViT model config."
        )


def _vision_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[CLS, patches] with positions, before ``ln_pre``: the steps of open_clip's ``_embeds``."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.patch_dropout(x)


def _vision_embeds(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if hasattr(visual, "_embeds"):
        return visual._embeds(images)
    # open_clip before ``_embeds`` existed: the same steps its forward took.
    return visual.ln_pre(_vision_tokens(visual, images))


def _vision_pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(visual, "_pool"):
        pooled, _ = visual._pool(x)
    else:
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("attentional pooling needs open_clip >= 3.0 for prompt learners")
        x = visual.ln_post(x)
        pooled, _ = visual._global_pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def encode_image(
    visual: nn.Module,
    images: torch.Tensor,
    layer_prompts: Sequence[torch.Tensor] = (),
    before_ln_pre: bool = True,
) -> torch.Tensor:
    """Image features through open_clip's vision tower with deep vision prompts.

    Args:
        visual: open_clip ``VisionTransformer``.
        images: (B, 3, H, W).
        layer_prompts: one tensor per prompted layer, starting at layer 0, each (n, width)
            or (B, n, width), all with the same n. Empty, or n == 0: open_clip's own path.
        before_ln_pre: layer 0's prompts join the tokens before ``ln_pre`` (the published
            placement) or after it (see the module docstring).

    Returns:
        (B, output_dim) unnormalized features, as ``visual(images)``.
    """
    n_prompts = layer_prompts[0].shape[-2] if len(layer_prompts) else 0
    if n_prompts == 0:
        x = run_blocks(visual.transformer, _vision_embeds(visual, images))
    else:
        if len(layer_prompts) > len(visual.transformer.resblocks):
            raise ValueError(
                f"{len(layer_prompts)} prompted layers for a tower of {len(visual.transformer.resblocks)}"
            )
        if before_ln_pre:
            tokens = _vision_tokens(visual, images)
            n_tokens = tokens.shape[1]
            first = _expand_prompts(layer_prompts[0], tokens.shape[0], tokens.dtype)
            x = visual.ln_pre(torch.cat([tokens, first], dim=1))
        else:
            x = _vision_embeds(visual, images)
            n_tokens = x.shape[1]

        def insert(index: int, h: torch.Tensor) -> torch.Tensor:
            if index >= len(layer_prompts) or (index == 0 and before_ln_pre):
                return h
            prompts = _expand_prompts(layer_prompts[index], h.shape[0], h.dtype)
            return torch.cat([h[:, :n_tokens], prompts], dim=1)

        x = run_blocks(visual.transformer, x, hook=insert)
        x = x[:, :n_tokens]
    return _vision_pool(visual, x)


# --------------------------------------------------------------------------- text


@dataclass
class TextTower:
    """The pieces of open_clip's text path, wherever the model keeps them.

    ``CLIP`` keeps them on the model itself, ``CustomTextCLIP`` in ``model.text``.
    Built with :meth:`of`.
    """

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    attn_mask: Optional[torch.Tensor]
    ln_final: nn.Module
    text_projection: Optional[nn.Module | torch.Tensor]
    pool_type: str
    eos_id: Optional[int]

    @classmethod
    def of(cls, model: nn.Module) -> "TextTower":
        owner = getattr(model, "text", model)
        if not hasattr(owner, "token_embedding") or not hasattr(owner, "transformer"):
            raise TypeError(
                f"text prompts need open_clip's own text transformer; {type(owner).__name__} "
                f"(e.g. a Hugging Face text tower) is not supported"
            )
        if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
            raise TypeError("text towers with a class token or padding mask (CoCa-style) are not supported")
        if owner is model:
            pool_type, eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
        else:
            pool_type, eos_id = owner.pool_type, getattr(owner, "eos_id", None)
        return cls(
            token_embedding=owner.token_embedding,
            positional_embedding=owner.positional_embedding,
            transformer=owner.transformer,
            attn_mask=owner.attn_mask,
            ln_final=owner.ln_final,
            text_projection=owner.text_projection,
            pool_type=pool_type,
            eos_id=eos_id,
        )

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def cast_dtype(self) -> torch.dtype:
        return self.transformer.get_cast_dtype()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L) -> token embeddings (N, L, width) in the tower's compute dtype."""
        return self.token_embedding(tokens).to(self.cast_dtype)

    def encode(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        layer_prompts: Sequence[Optional[torch.Tensor]] = (),
        prompt_start: int = 1,
    ) -> torch.Tensor:
        """Text features from token embeddings, with optional deep prompts.

        Args:
            embeddings: (N, L, width) token embeddings, learned context already in place.
            tokens: (N, L) token ids used only to find the pooled (end-of-text) position.
            layer_prompts: for layers 1.. (index 0 is ignored: the first layer's prompts are
                part of ``embeddings``), each (n, width) or (N, n, width) or None; they
                replace positions ``prompt_start .. prompt_start+n`` before that layer.
            prompt_start: first prompt position (1: after the start token).

        Returns:
            (N, output_dim) unnormalized features, as open_clip's ``encode_text``.
        """
        text_global_pool = import_open_clip().transformer.text_global_pool
        dtype = self.cast_dtype
        seq_len = embeddings.shape[1]
        x = embeddings.to(dtype) + self.positional_embedding[:seq_len].to(dtype)
        attn_mask = self.attn_mask
        if attn_mask is not None and attn_mask.shape[-1] != seq_len:
            attn_mask = attn_mask[:seq_len, :seq_len]
        hook = None
        if any(p is not None and p.shape[-2] > 0 for p in list(layer_prompts)[1:]):

            def hook(index: int, h: torch.Tensor) -> torch.Tensor:
                if index == 0 or index >= len(layer_prompts) or layer_prompts[index] is None:
                    return h
                prompts = _expand_prompts(layer_prompts[index], h.shape[0], h.dtype)
                end = prompt_start + prompts.shape[1]
                return torch.cat([h[:, :prompt_start], prompts, h[:, end:]], dim=1)

        x = run_blocks(self.transformer, x, attn_mask=attn_mask, hook=hook)
        x = self.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
        return x

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L) -> (N, output_dim); equals open_clip's ``encode_text``."""
        return self.encode(self.embed(tokens), tokens)
