"""DSNet: the hierarchical iFormer-style backbone of DetailSemNet (ECCV 2024).

Four stages of channels-last token mixers. Each mixer splits its channels into
a high-frequency branch (convolutions and max-pooling on what average pooling
removes) and a low-frequency branch (multi-head self-attention on the pooled
map), then fuses both with a depthwise convolution.

Module and parameter names follow the authors' checkpoints exactly, so their
state dicts load with ``strict=True``; see ``DSNet`` for the stage table.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

__all__ = ["DEPTHS", "EMBED_DIMS", "STRIDES", "DSNet", "token_shape", "Block", "Mixer", "HighMixer", "LowMixer",
           "StemEmbed", "DownsampleEmbed"]


EMBED_DIMS = (96, 192, 320, 384)  # channels of stages 1-4
DEPTHS = (3, 3, 9, 3)  # blocks of stages 1-4
STRIDES = (4, 8, 16, 32)  # input pixels a token of stages 1-4 covers, per side


def token_shape(image_size: int, block: int) -> tuple[int, int]:
    """``(tokens, channels)`` of an ``image_size``-pixel square image's features at the input of ``block``
    (``DSNet.forward_until``; 18: the last block's output)."""
    first_blocks = [sum(DEPTHS[:stage]) for stage in range(len(DEPTHS))]
    stage = max(index for index, first in enumerate(first_blocks) if first <= min(block, sum(DEPTHS) - 1))
    return (image_size // STRIDES[stage]) ** 2, EMBED_DIMS[stage]


class StemEmbed(nn.Module):
    """Stage-1 patch embedding: two stride-2 convolutions, ``[B, C, H, W] -> [B, H/4, W/4, D]``."""

    def __init__(self, in_chans: int = 1, embed_dim: int = 96) -> None:
        super().__init__()
        self.proj1 = nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(embed_dim // 2)
        self.act = nn.GELU()
        self.proj2 = nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.proj1(x)))
        x = self.norm2(self.proj2(x))
        return x.permute(0, 2, 3, 1)


class DownsampleEmbed(nn.Module):
    """Patch embedding between stages: ``[B, H, W, C_in] -> [B, H/2, W/2, C_out]``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj(x.permute(0, 3, 1, 2)))
        return x.permute(0, 2, 3, 1)


class HighMixer(nn.Module):
    """High-frequency branch, ``[B, 2c, H, W] -> [B, 4c, H, W]``.

    Half the channels go through a pointwise and a depthwise convolution, the
    other half through max-pooling and a pointwise convolution.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self.conv1 = nn.Conv2d(half, 2 * half, kernel_size=1, bias=False)
        self.proj1 = nn.Conv2d(2 * half, 2 * half, kernel_size=3, padding=1, groups=2 * half, bias=False)
        self.act1 = nn.GELU()
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.proj2 = nn.Conv2d(half, 2 * half, kernel_size=1)
        self.act2 = nn.GELU()
        self.half = half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_part, pool_part = x[:, : self.half], x[:, self.half :]
        conv_part = self.act1(self.proj1(self.conv1(conv_part)))
        pool_part = self.act2(self.proj2(self.max_pool(pool_part)))
        return torch.cat([conv_part, pool_part], dim=1)


class LowMixer(nn.Module):
    """Low-frequency branch: self-attention over positions, ``[B, C, h, w] -> [B, C, h*p, w*p]``.

    The input is already average-pooled by ``pool_size`` (see ``Mixer``); the
    output is nearest-upsampled back by the same factor.
    """

    def __init__(self, dim: int, num_heads: int, pool_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, C], row-major positions
        qkv = self.qkv(tokens).reshape(batch, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        attended = F.scaled_dot_product_attention(q, k, v)
        x = attended.transpose(2, 3).reshape(batch, channels, height, width)
        if self.pool_size > 1:
            x = F.interpolate(x, scale_factor=self.pool_size, mode="nearest")
        return x


class Mixer(nn.Module):
    """Detail-semantic token mixer, ``[B, H, W, C] -> [B, H, W, C]``.

    ``attention_heads * head_dim`` channels go to the low-frequency attention
    branch, the rest to the high-frequency convolution branch.
    """

    def __init__(self, dim: int, num_heads: int, attention_heads: int, pool_size: int) -> None:
        super().__init__()
        head_dim = dim // num_heads
        low_dim = attention_heads * head_dim
        high_dim = dim - low_dim
        self.pool_size = pool_size
        if pool_size > 1:
            self.pool = nn.AvgPool2d(pool_size, stride=pool_size)
        self.reduce_h = nn.Conv2d(dim, high_dim, kernel_size=1)
        self.reduce_l = nn.Conv2d(dim, low_dim, kernel_size=1)
        self.high_mixer = HighMixer(high_dim)
        self.low_mixer = LowMixer(low_dim, num_heads=attention_heads, pool_size=pool_size)
        fused_dim = 2 * high_dim + low_dim
        self.conv_fuse = nn.Conv2d(fused_dim, fused_dim, kernel_size=3, padding=1, groups=fused_dim, bias=False)
        self.proj = nn.Conv2d(fused_dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        if self.pool_size > 1:
            low = self.pool(x)
            high = x - F.interpolate(low, scale_factor=self.pool_size, mode="nearest")
        else:
            high = low = x
        high = self.high_mixer(self.reduce_h(high))
        low = self.low_mixer(self.reduce_l(low))
        x = torch.cat([high, low], dim=1)
        x = x + self.conv_fuse(x)
        x = self.proj(x)
        return x.permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block on channels-last maps, ``[B, H, W, C] -> [B, H, W, C]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention_heads: int,
        pool_size: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Mixer(dim, num_heads=num_heads, attention_heads=attention_heads, pool_size=pool_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.use_layer_scale = layer_scale_init_value is not None
        if self.use_layer_scale:
            # Names and shapes are the checkpoints' (not timm's LayerScale `gamma`).
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
            self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_layer_scale:
            x = x + self.drop_path(self.layer_scale_1 * self.attn(self.norm1(x)))
            return x + self.drop_path(self.layer_scale_2 * self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DSNet(nn.Module):
    """DSNet backbone; ``forward_features``: ``[B, in_chans, H, W] -> [B, H/32 * W/32, 384]``.

    ======  ==========  ======  ======  =====  =========================  ====  ===========
    stage   embed       grid    dim     heads  attention heads per block  pool  layer scale
    ======  ==========  ======  ======  =====  =========================  ====  ===========
    1       H/4, W/4    56x56   96      3      1,1,1                      2     no
    2       H/8, W/8    28x28   192     6      3,3,3                      2     no
    3       H/16, W/16  14x14   320     10     7 x4, 9 x5                 1     yes
    4       H/32, W/32  7x7     384     12     11,11,11                   1     yes
    ======  ==========  ======  ======  =====  =========================  ====  ===========

    Grids are for 224x224 input; positional embeddings are stored at those
    sizes and resized bilinearly for any other input that is a multiple of 32.
    ``H``, ``W`` must be multiples of 32.
    """

    def __init__(
        self,
        in_chans: int = 1,
        embed_dims: Sequence[int] = EMBED_DIMS,
        depths: Sequence[int] = DEPTHS,
        num_heads: Sequence[int] = (3, 6, 10, 12),
        attention_heads: Sequence[int] = (1,) * 3 + (3,) * 3 + (7,) * 4 + (9,) * 5 + (11,) * 3,
        pool_sizes: Sequence[int] = (2, 2, 1, 1),
        layer_scale_init_values: Sequence[float | None] = (None, None, 1e-6, 1e-6),
        pos_embed_grids: Sequence[int] = (56, 28, 14, 7),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(attention_heads) != sum(depths):
            raise ValueError(f"attention_heads has {len(attention_heads)} entries, depths sum to {sum(depths)}")
        self.num_features = self.embed_dim = embed_dims[-1]
        self.num_blocks = sum(depths)
        self.patch_embed = StemEmbed(in_chans, embed_dims[0])
        self.patch_embed2 = DownsampleEmbed(embed_dims[0], embed_dims[1])
        self.patch_embed3 = DownsampleEmbed(embed_dims[1], embed_dims[2])
        self.patch_embed4 = DownsampleEmbed(embed_dims[2], embed_dims[3])
        for stage, (grid, dim) in enumerate(zip(pos_embed_grids, embed_dims), start=1):
            self.register_parameter(f"pos_embed{stage}", nn.Parameter(torch.zeros(1, grid, grid, dim)))

        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        first_block = 0
        for stage, depth in enumerate(depths, start=1):
            index = range(first_block, first_block + depth)
            blocks = nn.Sequential(*[
                Block(
                    embed_dims[stage - 1],
                    num_heads=num_heads[stage - 1],
                    attention_heads=attention_heads[i],
                    pool_size=pool_sizes[stage - 1],
                    mlp_ratio=mlp_ratio,
                    drop_path=drop_path_rates[i],
                    layer_scale_init_value=layer_scale_init_values[stage - 1],
                )
                for i in index
            ])
            self.add_module(f"blocks{stage}", blocks)
            first_block += depth
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head = nn.Identity()
        self.apply(self._init_weights)
        for stage in range(1, 5):
            trunc_normal_(getattr(self, f"pos_embed{stage}"), std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @staticmethod
    def _add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """Add ``pos_embed [1, n, n, C]`` to ``x [B, h, w, C]``, resizing it when ``(h, w) != (n, n)``."""
        if pos_embed.shape[1:3] != x.shape[1:3]:
            pos_embed = F.interpolate(
                pos_embed.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bilinear", align_corners=False
            ).permute(0, 2, 3, 1)
        return x + pos_embed

    def _stages(self) -> list[tuple[nn.Module, nn.Parameter, nn.Sequential]]:
        """Each stage's patch embedding, position embedding and blocks, stage 1 to 4."""
        return [(self.patch_embed if stage == 1 else getattr(self, f"patch_embed{stage}"),
                 getattr(self, f"pos_embed{stage}"), getattr(self, f"blocks{stage}")) for stage in range(1, 5)]

    def forward_until(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """The input of block ``block`` (0-17, counted over all stages; 18: the last block's output).

        ``[B, in_chans, H, W] -> [B, h, w, C]``: for the first block of a stage, after that stage's patch and
        position embeddings (stage 4's first block, 15: ``[B, H/32, W/32, 384]``).
        """
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of 32; resize the input")
        index = 0
        for embed, pos_embed, blocks in self._stages():
            x = self._add_pos_embed(embed(x), pos_embed)
            for layer in blocks:
                if index == block:
                    return x
                x = layer(x)
                index += 1
        return x

    def state_dict_until(self, block: int) -> dict[str, torch.Tensor]:
        """The state-dict entries ``forward_until(x, block)`` reads: the embeddings of the stages it enters and
        the blocks before ``block``."""
        names, index = [], 0
        for stage, (_, _, blocks) in enumerate(self._stages(), start=1):
            if index > block:
                break
            names += [f"{'patch_embed' if stage == 1 else f'patch_embed{stage}'}.", f"pos_embed{stage}"]
            names += [f"blocks{stage}.{position}." for position in range(len(blocks)) if index + position < block]
            index += len(blocks)
        return {key: value for key, value in self.state_dict().items() if key.startswith(tuple(names))}

    def forward_from(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Stage-4 tokens before the final norm from the input of block ``block`` (``forward_until``'s output):
        ``[B, h, w, C] -> [B, H/32 * W/32, 384]``."""
        index = 0
        for embed, pos_embed, blocks in self._stages():
            if index > block:  # a later stage: its embeddings take the previous stage's output
                x = self._add_pos_embed(embed(x), pos_embed)
            for layer in blocks:
                if index >= block:
                    x = layer(x)
                index += 1
        return x.flatten(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-4 tokens before the final norm: ``[B, in_chans, H, W] -> [B, H/32 * W/32, 384]``."""
        return self.forward_from(self.forward_until(x, 0), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding ``[B, 384]``: final norm of the stage-4 tokens, averaged."""
        return self.head(self.norm(self.forward_features(x)).mean(dim=1))
