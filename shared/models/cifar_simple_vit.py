"""Simple ViT for CIFAR, with every LayerNorm site built from a norm/noise spec.

The "simple ViT" of Beyer, Zhai & Kolesnikov ("Better plain ViT baselines for ImageNet-1k", 2022) as
in lucidrains' vit-pytorch ``SimpleViT``, which the paper used: patches -> LayerNorm -> linear ->
LayerNorm, fixed 2-D sin-cos position embedding, ``depth`` pre-norm blocks (multi-head attention
without biases, GELU MLP), a final LayerNorm, mean pooling over tokens and a linear head. No class
token, no dropout. PyTorch's default initialization, as in vit-pytorch.

Defaults (``cifar_simple_vit``): 32x32 input, patch 4 (64 tokens), dim 512, depth 6, 16 heads of 64,
MLP 1024, 10 classes.

Norm sites: the ``norm`` spec is built for every LayerNorm (patch, embedding, two per block, final:
3 + 2 * depth sites) with ``layout="channels_last"``: activations are (N, L, C) tokens, so ``ln`` is a
LayerNorm over C and noise parts act along the last dim (GNI with ``channel_dim=-1``). The paper's GNI
setting is ``[{"type":"norm","subtype":"ln","dkwargs":{"affine":True}},
{"type":"noise","subtype":"ghost_noise_injector_rep","dkwargs":{"batch_size":12,"channel_last":True}}]``,
or in short ``[ln, gnir12]``.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_device_dtype
from timm.models import generate_default_cfgs, register_model

from shared.models.base import NORM_RENAMES, build_model, cifar_cfg
from shared.specs import create_norm_factory

__all__ = ["CifarSimpleViT", "sincos_position_embedding_2d"]


def sincos_position_embedding_2d(grid_height: int, grid_width: int, dim: int, temperature: float = 10000.0,
                                 dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, shape (grid_height * grid_width, dim), row-major tokens.

    A quarter of the channels each holds ``sin(x * w)``, ``cos(x * w)``, ``sin(y * w)``, ``cos(y * w)``
    with frequencies ``w_k = temperature ** (-k / (dim/4 - 1))``, k = 0 .. dim/4 - 1.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid_height, device=device), torch.arange(grid_width, device=device),
                          indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=device) / max(quarter - 1, 1))
    x = x.flatten()[:, None].double() * omega[None, :].double()
    y = y.flatten()[:, None].double() * omega[None, :].double()
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).to(dtype)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention without biases (q, k, v and output projections)."""

    def __init__(self, dim: int, heads: int, dim_head: int, norm_layer: Callable, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.heads, self.dim_head = heads, dim_head
        self.norm = norm_layer(dim, **dd)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False, **dd)
        self.proj = nn.Linear(heads * dim_head, dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # softmax(q k^T / sqrt(dim_head)) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head))


class FeedForward(nn.Module):
    """Pre-norm MLP: norm -> linear -> GELU -> linear."""

    def __init__(self, dim: int, hidden_dim: int, norm_layer: Callable, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = norm_layer(dim, **dd)
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Block(nn.Module):
    """``x + attn(x)`` then ``x + mlp(x)``."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, norm_layer: Callable,
                 device=None, dtype=None):
        super().__init__()
        self.attn = Attention(dim, heads, dim_head, norm_layer, device=device, dtype=dtype)
        self.mlp = FeedForward(dim, mlp_dim, norm_layer, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class CifarSimpleViT(nn.Module):
    """Simple ViT (no class token, sin-cos positions, mean pooling) with spec-built norms.

    Args:
        img_size: input height and width (the position embedding is fixed to this grid).
        patch_size: side of the square patches.
        in_chans: input channels.
        num_classes: classifier outputs; 0 for none.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        dim_head: width of each head (``heads * dim_head`` need not equal ``dim``).
        mlp_dim: hidden width of the MLP.
        norm: norm spec for every LayerNorm site, built channels_last (default ``'ln'``: LayerNorm, eps 1e-5).
        global_pool: 'avg' (mean over tokens) or '' (``forward_head`` returns the tokens).
        drop_rate: dropout before the classifier (0 in the original).
    """
    global_pool = "avg"  # what global_pool=None keeps (timm.create_model drops None arguments likewise)

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 32, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 10, dim: int = 512, depth: int = 6, heads: int = 16, dim_head: int = 64,
                 mlp_dim: int = 1024, norm: Any = "ln", global_pool: str = "avg", drop_rate: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        norm_layer = create_norm_factory(norm, layout="channels_last")
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.grid_size = (height // patch_size, width // patch_size)
        self.num_features = self.head_hidden_size = self.embed_dim = dim
        patch_dim = in_chans * patch_size * patch_size
        self.patch_norm = norm_layer(patch_dim, **dd)
        self.patch_proj = nn.Linear(patch_dim, dim, **dd)
        self.embed_norm = norm_layer(dim, **dd)
        self.register_buffer("pos_embed", sincos_position_embedding_2d(*self.grid_size, dim, device=device,
                                                                       dtype=dtype or torch.float32),
                             persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, dim_head, mlp_dim, norm_layer, **dd) for _ in range(depth)])
        self.norm = norm_layer(dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, global_pool)  # the head (on the device and dtype of the parameters)
        self.feature_info = [dict(num_chs=dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p * p * C) with row-major patches and (p1, p2, c) order inside a patch."""
        batch, channels, height, width = x.shape
        if (height // self.patch_size, width // self.patch_size) != self.grid_size or height % self.patch_size:
            raise ValueError(f"expected input of size {self.grid_size[0] * self.patch_size}x"
                             f"{self.grid_size[1] * self.patch_size}, got {height}x{width}")
        p = self.patch_size
        x = x.reshape(batch, channels, height // p, p, width // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.patch_proj(self.patch_norm(self.patchify(x))))
        return x + self.pos_embed.to(x.dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_|^embed_norm|^pos_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs (timm's feature-extraction API): ``indices`` int = last n blocks, list = those blocks.

        With ``output_fmt='NCHW'`` each is reshaped to (N, dim, H / patch, W / patch); 'NLC' keeps tokens.
        ``norm`` applies the final norm to each.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        depth = len(self.blocks)
        indices = depth if indices is None else indices
        take = [depth - indices + i for i in range(indices)] if isinstance(indices, int) else \
            [i if i >= 0 else depth + i for i in indices]
        if not take or any(not 0 <= i < depth for i in take):
            raise ValueError(f"indices {indices!r} out of range for {depth} blocks")
        last = max(take) if stop_early else depth - 1
        intermediates = []
        x = self.embed(x)
        for index, block in enumerate(self.blocks[:last + 1]):
            x = block(x)
            if index in take:
                feature = self.norm(x) if norm else x
                if output_fmt == "NCHW":
                    feature = feature.transpose(1, 2).reshape(x.shape[0], -1, *self.grid_size)
                intermediates.append(feature)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "cifar_simple_vit": cifar_cfg(pool_size=None, fixed_input_size=True, first_conv="patch_proj",
                                  classifier="head"),
})


@register_model
def cifar_simple_vit(pretrained: bool = False, **kwargs: Any) -> CifarSimpleViT:
    """Simple ViT for 32x32 inputs: patch 4, dim 512, depth 6, 16 heads of 64, MLP 1024."""
    return build_model(CifarSimpleViT, "cifar_simple_vit", pretrained, kwargs, NORM_RENAMES,
                       dict(out_indices=3, feature_cls="getter"))
