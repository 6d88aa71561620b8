"""CIFAR token models: a ViT and an MLP-Mixer, patch 4 at 32x32 (an 8x8 grid of 64 tokens, no class token).

Both are pre-norm residual stacks whose depth is split into three equal stages, so that they pair with the
three-stage CIFAR CNNs in every method. The stem (patch embedding, position embedding) belongs to stage 1;
the head is the final LayerNorm, the mean over tokens and the classifier. Stage outputs are tokens (B, N, D).
"""
import torch
import torch.nn as nn


def num_patches(patch_size=4, image_size=32):
    """Tokens of the patch embedding: an (image_size / patch_size)^2 grid, 64 for 4x4 patches of 32x32."""
    return (image_size // patch_size) ** 2


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch_size=4, image_size=32, pos_embed=True):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.num_tokens = num_patches(patch_size, image_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim)) if pos_embed else None
        if pos_embed:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        return x if self.pos_embed is None else x + self.pos_embed


class Mlp(nn.Sequential):
    def __init__(self, dim, hidden):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, mlp_hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MixerBlock(nn.Module):
    def __init__(self, dim, num_tokens, token_hidden, channel_hidden):
        super().__init__()
        self.norm1, self.token_mlp = nn.LayerNorm(dim), Mlp(num_tokens, token_hidden)
        self.norm2, self.channel_mlp = nn.LayerNorm(dim), Mlp(dim, channel_hidden)

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class TokenNet(nn.Module):
    """Patch embedding, `depth` residual blocks in `num_stages` equal groups, LayerNorm + mean pool + Linear."""
    feature_kind = "tokens"
    stage_output_activation = None

    def __init__(self, patch_embed, blocks, dim, num_classes, num_stages=3):
        super().__init__()
        assert len(blocks) % num_stages == 0, "depth must split into equal stages"
        self.patch_embed = patch_embed
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        self.num_stages = num_stages
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def stages(self):
        per = len(self.blocks) // self.num_stages
        groups = [self.blocks[i * per:(i + 1) * per] for i in range(self.num_stages)]
        return [nn.Sequential(self.patch_embed, *groups[0])] + groups[1:]

    def head(self):
        return _TokenHead(self.norm, self.fc)

    def forward(self, x):
        x = self.norm(self.blocks(self.patch_embed(x)))
        return self.fc(x.mean(1))


class _TokenHead(nn.Module):
    def __init__(self, norm, fc):
        super().__init__()
        self.norm, self.fc = norm, fc

    def forward(self, x):
        return self.fc(self.norm(x).mean(1))


# The defaults are the sizes chosen as students (see the model table in benchmarks/README.md): ~2.7M and
# ~0.87M parameters.

def vit(num_classes=100, dim=192, depth=9, heads=3, mlp_hidden=384):
    blocks = [TransformerBlock(dim, heads, mlp_hidden) for _ in range(depth)]
    return TokenNet(PatchEmbed(dim), blocks, dim, num_classes)


def mlp_mixer(num_classes=100, dim=128, depth=6, token_hidden=64, channel_hidden=512, patch_size=4):
    # Token mixing fixes the token order, so the Mixer needs no position embedding. (The blocks are built
    # first, as always: the initialisation of a given seed does not change.)
    blocks = [MixerBlock(dim, num_patches(patch_size), token_hidden, channel_hidden) for _ in range(depth)]
    return TokenNet(PatchEmbed(dim, patch_size, pos_embed=False), blocks, dim, num_classes)
