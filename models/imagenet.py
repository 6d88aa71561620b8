"""The papers' ImageNet architectures at 224 px, in four stages by resolution (56, 28, 14, 7 at 224 px; the
stem is in stage 1), with their source's state_dict keys, so that its weights and checkpoints load strictly.

Naming [choice]: <source>_<the source's own name>, so that no name collides with the CIFAR zoo's
(`ResNet50`, `MobileNetV2`) and the prefix says whose keys and outputs a model reproduces:
- tv_resnet18, tv_resnet34, tv_resnet50, tv_mobilenet_v2, tv_convnext_tiny, tv_swin_t, tv_vit_b_16:
  torchvision's own models (torchvision.models.get_model), their class swapped for a subclass that only adds
  `stages()` and `head()`: the same modules, keys and forward.
- timm_deit_tiny_patch16_224, timm_deit_small_patch16_224 (= timm's vit_small_patch16_224),
  timm_mixer_b16_224: timm 1.0's VisionTransformer and MlpMixer for these configurations, written here.
- mdistiller_mobilenetv1: the KD benchmarks' ImageNet MobileNetV1 (mdistiller
  `models/imagenet/mobilenetv1.py`), the student of their ResNet50 -> MobileNetV1 pair.
The timm and mdistiller definitions are checked against their reference outputs
(tests/test_imagenet_models.py).

How the stage outputs are read [choice where marked]:
- CNNs (ResNets, MobileNets, ConvNeXt): maps (B, C, H, W). stage_output_activation "relu" for the ResNets and
  MobileNetV1 (blocks end with a ReLU), None for MobileNetV2 (linear bottlenecks) and ConvNeXt.
- Swin-T: torchvision keeps NHWC maps (B, H, W, C); its stages here output them as tokens (B, H*W, C),
  row-major like a patch embedding [choice: Swin is a transformer; tokens make Block-KD's connectors into it
  Linear + LayerNorm, as into the other transformers], and turn them back into NHWC for the next stage.
- ViT-B/16 and DeiT: 197 tokens (B, 1 + 14*14, D), the class token first, passed from stage to stage as they
  are. The methods read the 196 patch tokens as the 14x14 grid and leave the class token out
  (models.grid_shape, to_map) [choice: it has no place on the grid]; where a method builds an input for a
  teacher stage (Block-KD's connectors) it supplies a learned class token.
- MLP-Mixer B/16: 196 tokens (B, 14*14, D).
- Stage boundaries of the 12-block transformers and mixers [choice]: blocks 1-3, 4-6, 7-9, 10-12 (they keep
  one resolution; four equal groups, like the CIFAR ViT's three).

The ViTs, DeiTs and the Mixer take 224 x 224 inputs only (their position embedding or token-mixing MLP is
sized for 14 x 14 patches); the CNNs and Swin-T take other sizes (64 px in the tests).
"""
import math

import torch
import torch.nn as nn


# ------------------------------------------------------------------------------------ torchvision's models

def torchvision_classes():
    """torchvision's model classes, subclassed with the stage decomposition (imported on first use)."""
    import torchvision.models as tvm

    class StagedResNet(tvm.ResNet):
        feature_kind, stage_output_activation = "map", "relu"

        def stages(self):
            stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1)
            return [stem, self.layer2, self.layer3, self.layer4]

        def head(self):
            return nn.Sequential(self.avgpool, nn.Flatten(1), self.fc)

    class StagedMobileNetV2(tvm.MobileNetV2):
        feature_kind, stage_output_activation = "map", None

        def stages(self):  # 24x56x56, 32x28x28, 96x14x14, 320x7x7 at 224
            return [self.features[0:4], self.features[4:7], self.features[7:14], self.features[14:18]]

        def head(self):  # the 1x1 conv to 1280, then as torchvision's forward
            return nn.Sequential(self.features[18], nn.AdaptiveAvgPool2d(1), nn.Flatten(1), self.classifier)

    class StagedConvNeXt(tvm.ConvNeXt):
        feature_kind, stage_output_activation = "map", None

        def stages(self):  # 96x56x56, 192x28x28, 384x14x14, 768x7x7 at 224
            return [self.features[0:2], self.features[2:4], self.features[4:6], self.features[6:8]]

        def head(self):
            return nn.Sequential(self.avgpool, self.classifier)

    class StagedSwin(tvm.SwinTransformer):
        feature_kind, stage_output_activation = "tokens", None

        def stages(self):  # 3136x96, 784x192, 196x384, 49x768 tokens at 224
            first = nn.Sequential(*self.features[0:2], NHWCToTokens())
            return [first] + [nn.Sequential(TokensToNHWC(), *self.features[k:k + 2], NHWCToTokens())
                              for k in (2, 4, 6)]

        def head(self):  # torchvision's Linear is registered as `head`: reached through _modules
            linear = self._modules["head"]
            return nn.Sequential(TokensToNHWC(), self.norm, self.permute, self.avgpool, self.flatten, linear)

        def forward(self, x):  # torchvision's forward, whose self.head(x) now names the method above
            x = self.avgpool(self.permute(self.norm(self.features(x))))
            return self._modules["head"](self.flatten(x))

    class StagedViT(tvm.VisionTransformer):
        feature_kind, stage_output_activation = "tokens", None

        def stages(self):  # 197x768 tokens (class token first) after blocks 3, 6, 9, 12
            layers = self.encoder.layers
            return [nn.Sequential(TorchvisionViTEmbedding(self), *layers[0:3]), layers[3:6], layers[6:9],
                    layers[9:12]]

        def head(self):
            return nn.Sequential(self.encoder.ln, ClassToken(), self.heads)

    return {"tv_resnet18": ("resnet18", StagedResNet), "tv_resnet34": ("resnet34", StagedResNet),
            "tv_resnet50": ("resnet50", StagedResNet), "tv_mobilenet_v2": ("mobilenet_v2", StagedMobileNetV2),
            "tv_convnext_tiny": ("convnext_tiny", StagedConvNeXt), "tv_swin_t": ("swin_t", StagedSwin),
            "tv_vit_b_16": ("vit_b_16", StagedViT)}


TORCHVISION_MODELS = ("tv_resnet18", "tv_resnet34", "tv_resnet50", "tv_mobilenet_v2", "tv_convnext_tiny",
                      "tv_swin_t", "tv_vit_b_16")


def torchvision_model(name, num_classes=1000, weights=None):
    """torchvision's model `name` (tv_resnet18, ...), with `stages()` and `head()`; `weights`: one of
    torchvision's weight names for it (IMAGENET1K_V1, ...), loaded through torchvision's weights API (its
    1000-class head is then replaced by a fresh one when num_classes differs)."""
    import torchvision.models as tvm

    source, staged = torchvision_classes()[name]
    if weights is None:
        model = tvm.get_model(source, weights=None, num_classes=num_classes)
    else:
        model = tvm.get_model(source, weights=weights)
    model.__class__ = staged  # adds stages() and head() only: the same modules, keys and forward
    if weights is not None and num_classes != 1000:
        replace_classifier(model, num_classes)
    return model


def replace_classifier(model, num_classes):
    """A freshly initialised classifier of `num_classes` outputs, under the same state_dict name: the last
    Linear of the model's head(), which is not always the last Linear in module order (Swin, DeiT and the
    Mixer register their head before their blocks' MLPs)."""
    from models import classifier

    old = classifier(model)
    parent, name = next((module, child_name) for module in model.modules()
                        for child_name, child in module.named_children() if child is old)
    setattr(parent, name, nn.Linear(old.in_features, num_classes).to(old.weight.device))


class NHWCToTokens(nn.Module):
    def forward(self, x):  # (B, H, W, C) -> (B, H*W, C)
        return x.flatten(1, 2)


class TokensToNHWC(nn.Module):
    def forward(self, x):  # (B, N, C) -> (B, sqrt N, sqrt N, C)
        side = math.isqrt(x.shape[1])
        return x.reshape(len(x), side, side, x.shape[2])


class ClassToken(nn.Module):
    def forward(self, x):
        return x[:, 0]


class TorchvisionViTEmbedding(nn.Module):
    """torchvision's ViT before its encoder layers: patches, the class token, the position embedding and its
    dropout (what VisionTransformer.forward and Encoder.forward do first), as a stage-1 part."""

    def __init__(self, vit):
        super().__init__()
        self.conv_proj, self.dropout = vit.conv_proj, vit.encoder.dropout
        self.class_token, self.pos_embedding = vit.class_token, vit.encoder.pos_embedding  # shared parameters
        self.process_input = vit._process_input

    def forward(self, x):
        x = self.process_input(x)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


# ------------------------------------------------------------------------ timm's DeiT and MLP-Mixer layouts

class Mlp(nn.Module):
    """timm's Mlp: fc1, GELU (erf), fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """timm's Attention: one qkv projection, scaled dot-product attention over heads, an output projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q * (dim // self.heads) ** -0.5) @ k.transpose(-2, -1)
        x = attention.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """timm's ViT block (no layer scale, no drop path): x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, mlp_ratio * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """A 16x16 stride-16 convolution, flattened to tokens (B, N, D) row-major."""

    def __init__(self, dim, patch=16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DeiTEmbedding(nn.Module):
    """Stage 1's first part: patch tokens, the class token in front, the position embedding."""

    def __init__(self, deit):
        super().__init__()
        self.patch_embed, self.cls_token, self.pos_embed = deit.patch_embed, deit.cls_token, deit.pos_embed

    def forward(self, x):
        x = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed


class DeiT(nn.Module):
    """timm's VisionTransformer as DeiT-Tiny/Small: 16x16 patches at 224 px, a class token, learned position
    embeddings, `depth` blocks, LayerNorm, the class token's logits (timm's keys)."""
    feature_kind, stage_output_activation = "tokens", None

    def __init__(self, dim, heads, depth=12, num_classes=1000, image_size=224, patch=16):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.patch_embed = PatchEmbed(dim, patch)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def stages(self):
        blocks = list(self.blocks)
        return [nn.Sequential(DeiTEmbedding(self), *blocks[0:3]), nn.Sequential(*blocks[3:6]),
                nn.Sequential(*blocks[6:9]), nn.Sequential(*blocks[9:12])]

    def head(self):  # the Linear is registered as `head` (timm's key): reached through _modules
        return nn.Sequential(self.norm, ClassToken(), self._modules["head"])

    def forward(self, x):
        for stage in self.stages():
            x = stage(x)
        return self.head()(x)


class MixerBlock(nn.Module):
    """timm's MixerBlock: a token-mixing MLP across the patches, then a channel MLP, each with a residual."""

    def __init__(self, dim, tokens, token_hidden, channel_hidden):
        super().__init__()
        self.norm1, self.mlp_tokens = nn.LayerNorm(dim, eps=1e-6), Mlp(tokens, token_hidden)
        self.norm2, self.mlp_channels = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, channel_hidden)

    def forward(self, x):
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Mixer(nn.Module):
    """timm's MlpMixer as Mixer-B/16: 16x16 patches at 224 px (196 tokens), 12 blocks of 768 dims, token MLP
    384, channel MLP 3072, LayerNorm, mean over the tokens, a linear head (timm's keys)."""
    feature_kind, stage_output_activation = "tokens", None

    def __init__(self, num_classes=1000, dim=768, depth=12, token_hidden=384, channel_hidden=3072,
                 image_size=224, patch=16):
        super().__init__()
        self.stem = PatchEmbed(dim, patch)
        tokens = (image_size // patch) ** 2
        self.blocks = nn.Sequential(*(MixerBlock(dim, tokens, token_hidden, channel_hidden)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def stages(self):
        blocks = list(self.blocks)
        return [nn.Sequential(self.stem, *blocks[0:3]), nn.Sequential(*blocks[3:6]),
                nn.Sequential(*blocks[6:9]), nn.Sequential(*blocks[9:12])]

    def head(self):  # the Linear is registered as `head` (timm's key): reached through _modules
        return nn.Sequential(self.norm, TokenMean(), self._modules["head"])

    def forward(self, x):
        for stage in self.stages():
            x = stage(x)
        return self.head()(x)


class TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


# --------------------------------------------------------------------------- the KD benchmarks' MobileNetV1

def conv_bn(inp, out, stride):
    return nn.Sequential(nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out),
                         nn.ReLU(inplace=True))


def conv_dw(inp, out, stride):
    return nn.Sequential(nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                         nn.ReLU(inplace=True), nn.Conv2d(inp, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out),
                         nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """mdistiller's ImageNet MobileNetV1 (keys model.<i>.<j>, fc): a 3x3 stem and 13 depthwise-separable
    blocks; stages end at its four post-ReLU features (128x56x56, 256x28x28, 512x14x14, 1024x7x7 at 224).
    [choice] Global average pooling where mdistiller has AvgPool2d(7): the same at 224 px, and any size
    works."""
    feature_kind, stage_output_activation = "map", "relu"

    def __init__(self, num_classes=1000):
        super().__init__()
        self.model = nn.Sequential(
            conv_bn(3, 32, 2), conv_dw(32, 64, 1), conv_dw(64, 128, 2), conv_dw(128, 128, 1),
            conv_dw(128, 256, 2), conv_dw(256, 256, 1), conv_dw(256, 512, 2),
            *(conv_dw(512, 512, 1) for _ in range(5)), conv_dw(512, 1024, 2), conv_dw(1024, 1024, 1),
            nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(1024, num_classes)

    def stages(self):
        return [self.model[0:4], self.model[4:6], self.model[6:12], self.model[12:14]]

    def head(self):
        return nn.Sequential(self.model[14], nn.Flatten(1), self.fc)

    def forward(self, x):
        for stage in self.stages():
            x = stage(x)
        return self.head()(x)


REFERENCE_MODELS = {
    "timm_deit_tiny_patch16_224": lambda n: DeiT(192, 3, num_classes=n),
    "timm_deit_small_patch16_224": lambda n: DeiT(384, 6, num_classes=n),
    "timm_mixer_b16_224": lambda n: Mixer(num_classes=n),
    "mdistiller_mobilenetv1": lambda n: MobileNetV1(num_classes=n),
}
IMAGENET_MODELS = TORCHVISION_MODELS + tuple(REFERENCE_MODELS)
TOKEN_IMAGENET_MODELS = ("tv_swin_t", "tv_vit_b_16", "timm_deit_tiny_patch16_224",
                         "timm_deit_small_patch16_224", "timm_mixer_b16_224")
FIXED_224 = ("tv_vit_b_16", "timm_deit_tiny_patch16_224", "timm_deit_small_patch16_224", "timm_mixer_b16_224")


def imagenet_model(name, num_classes=1000):
    if name in REFERENCE_MODELS:
        return REFERENCE_MODELS[name](num_classes)
    return torchvision_model(name, num_classes)
