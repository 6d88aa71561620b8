"""Model zoo: the CIFAR-100 benchmark's CNNs (ResNets, wide ResNets, VGGs, MobileNetV2, ShuffleNetV1/V2,
ResNet50), a ViT and an MLP-Mixer, all at 32x32 input and in three stages; and the ImageNet architectures
of models/imagenet.py (torchvision's tv_*, the reference layouts timm_* and mdistiller_*), 224x224 by
default and in four stages (that file documents their stages and token handling).

    from models import create_model, MODEL_NAMES
    model = create_model("resnet32x4", num_classes=100)
    logits = model(x)                         # x: (B, 3, 32, 32)

The uniform decomposition that the three methods use
----------------------------------------------------
Every model is  model(x) == head(stage_n(... stage_2(stage_1(x))))  exactly, with n = 3 for the CIFAR
zoo and n = 4 for the ImageNet architectures (`stage_count`):

    stages = model.stages()    # list of n modules; the stem (first conv / patch embedding) is in stage 1
    head = model.head()        # everything after the last stage: [final norm/activation], pooling, classifier

Both are *views* built on each call from the model's existing submodules: they hold no new parameters
and add no state_dict names, so checkpoints keep the benchmark zoo's keys. Their parameters are the
model's own (training stage k through `stages[k-1].parameters()` trains the model), and `.train()` /
`.eval()` on a view sets the mode of exactly those submodules.

Stage outputs are the features. Their form is given by two class attributes:
- `feature_kind`: "map" for CNNs, (B, C, H, W); "tokens" for ViT/Mixer, (B, N, D) with N = 8x8 patches
  and no class token (the ImageNet ViTs add one: `has_class_token`, see models/imagenet.py). `to_map`
  and `to_tokens` convert between the two without loss.
- `stage_output_activation`: "relu" where stage outputs are post-activation (CIFAR ResNets, VGGs,
  ShuffleV1/V2, ResNet50), None where they are not (WRN: pre-activation, the head starts with BN + ReLU;
  MobileNetV2: linear bottlenecks end with BN + the residual input; token models: the head starts with
  LayerNorm).

Stage boundaries of the zoo models with more than three natural blocks [choice]. The benchmark code
returns the features f0 (stem), f1, f2, ... of `is_feat`; the stages end at three of them, chosen so that
every standard pair's student and teacher run their stages on the same grids where the architectures allow:
- VGG: block0 + pool + block1 | pool + block2 | pool + block3 + block4, each block with its ReLU:
  128x16x16, 256x8x8, 512x4x4 (f1, f2, f4; f3 and f4 are both 512x4x4 at 32x32 since the zoo does not
  pool between blocks 3 and 4 there). The 64x32x32 block-0 output is inside stage 1.
- MobileNetV2: stem + groups 0-1 | group 2 | groups 3-4: 12x16x16, 16x8x8, 48x4x4 (f1, f2, f3). Groups
  5-6 (160x2x2, f4), the 1x1 conv to 1280 and the classifier form the head: 664 k of its 813 k
  parameters, which SSKD's head phase re-initialises and trains (f4 as stage 3 would leave a 2x2 grid).
- ShuffleV1 / ShuffleV2: stem + stage 1 | stage 2 | stage 3: 240x16x16, 480x8x8, 960x4x4 /
  116x16x16, 232x8x8, 464x4x4 (f1, f2, f3; no choice: three natural stages).
- ResNet50: stem + layer1 + layer2 | layer3 | layer4: 512x16x16, 1024x8x8, 2048x4x4 (f2, f3, f4). Not
  layer1-3: that would put layer4 (15 M of the 23.7 M parameters) in the head, and give 32/16/8 grids
  against the 16/8/4 of its standard students (vgg8, MobileNetV2).
`FEATURE_POINTS` records which `is_feat` entries the stage outputs are ((1, 2, 3) where not listed).

Recipes: `DEFAULT_LR` holds the benchmark's per-model peak learning rate where it differs from the CNN
recipe's 0.05 (MobileNetV2 and the ShuffleNets train with 0.01), for common.make_recipe; `--lr` overrides it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .imagenet import FIXED_224, IMAGENET_MODELS, TOKEN_IMAGENET_MODELS, TORCHVISION_MODELS, imagenet_model
from .mobilenetv2 import MobileNetV2
from .resnet import RESNETS, CifarResNet
from .resnet50 import BottleneckResNet
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .token_models import mlp_mixer, vit
from .vgg import VGG, VGGS
from .wrn import WRNS, WideResNet

OTHER_CNNS = {"MobileNetV2": MobileNetV2, "ShuffleV1": ShuffleNetV1, "ShuffleV2": ShuffleNetV2,
              "ResNet50": BottleneckResNet}
CIFAR_MODELS = list(RESNETS) + list(WRNS) + list(VGGS) + list(OTHER_CNNS) + ["vit", "mlp_mixer"]
MODEL_NAMES = CIFAR_MODELS + list(IMAGENET_MODELS)  # the ImageNet models: models/imagenet.py
TOKEN_MODELS = ("vit", "mlp_mixer") + TOKEN_IMAGENET_MODELS

# The benchmark's peak lr for these students (the cnn recipe's is 0.05); same schedule otherwise.
DEFAULT_LR = {"MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01}

# Indices into the benchmark code's `is_feat` list [f0 (stem), f1, ...] of the three stage outputs.
FEATURE_POINTS = {**{name: (1, 2, 4) for name in VGGS}, "ResNet50": (2, 3, 4)}

# state_dict key of the classifier's weight, by the zoo's names, then torchvision's and timm's.
CLASSIFIER_WEIGHTS = ("fc.weight", "classifier.weight", "classifier.0.weight", "linear.weight",
                      "classifier.1.weight", "classifier.2.weight", "head.weight", "heads.head.weight")


def create_model(name, num_classes=100):
    """A freshly initialised model; `model.arch` holds its name."""
    if name in RESNETS:
        model = CifarResNet(*RESNETS[name], num_classes)
    elif name in WRNS:
        model = WideResNet(*WRNS[name], num_classes)
    elif name in VGGS:
        model = VGG(VGGS[name], num_classes)
    elif name in OTHER_CNNS:
        model = OTHER_CNNS[name](num_classes=num_classes)
    elif name == "vit":
        model = vit(num_classes)
    elif name == "mlp_mixer":
        model = mlp_mixer(num_classes)
    elif name in IMAGENET_MODELS:
        model = imagenet_model(name, num_classes)
    else:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    model.arch = name
    return model


def default_image_size(name):
    """The input side a model is built for: 32 for the CIFAR zoo and the CIFAR token models, 224 for the
    ImageNet models."""
    return 224 if name in IMAGENET_MODELS else 32


def fixed_image_size(name):
    """The only input side a model takes (its position embedding or token-mixing MLP is sized for one
    patch grid), or None when it takes any: the CIFAR ViT and Mixer are fixed at 32, the ImageNet ViTs,
    DeiTs and Mixer at 224."""
    if name in ("vit", "mlp_mixer"):
        return 32
    return 224 if name in FIXED_224 else None


def stage_count(name):
    """How many stages `name` has (3 for the CIFAR zoo), from a model built on the meta device."""
    with torch.device("meta"):
        return len(create_model(name, 10).stages())


def model_family(name):
    """'token' for ViT/MLP-Mixer (AdamW recipe), 'cnn' otherwise (SGD recipe)."""
    return "token" if name in TOKEN_MODELS else "cnn"


def classifier(model):
    """The final nn.Linear (`fc`, `classifier`, `classifier[0]` or `linear`, by the zoo's names)."""
    return [m for m in model.head().modules() if isinstance(m, nn.Linear)][-1]


def state_dict_classes(state_dict):
    """The number of classes of a zoo state_dict (its classifier's rows), or None if it has no known
    classifier."""
    key = next((k for k in CLASSIFIER_WEIGHTS if k in state_dict and state_dict[k].dim() == 2), None)  # a Linear
    return None if key is None else state_dict[key].shape[0]


def stage_features(model, x):
    """Run the decomposition: returns ([stage_1 output, ..., stage_n output], logits)."""
    features = []
    for stage in model.stages():
        x = stage(x)
        features.append(x)
    return features, model.head()(x)


@torch.no_grad()
def feature_shapes(model, image_size=32):
    """Per-sample shapes of the stage outputs, e.g. [(64, 32, 32), (128, 16, 16), (256, 8, 8)].

    Runs one zero image in eval mode (so BatchNorm statistics are untouched) and restores the mode."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    feats, _ = stage_features(model, torch.zeros(1, 3, image_size, image_size, device=param.device))
    model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats]


def grid_shape(shape):
    """A per-sample feature shape -> (channels, grid side): maps are (C, H, W) with H == W, tokens (N, D) with
    N a square number (their sqrt(N) x sqrt(N) grid), or a square number + 1: a class token first, which is
    not on the grid (see has_class_token)."""
    if len(shape) == 3:
        assert shape[1] == shape[2], f"non-square feature map {tuple(shape)}"
        return shape[0], shape[1]
    side = math.isqrt(shape[0] - has_class_token(shape))
    assert side * side == shape[0] - has_class_token(shape), f"{shape[0]} tokens do not form a square grid"
    return shape[1], side


def has_class_token(shape):
    """Whether tokens (N, D) hold a class token before a square grid of patches (N = s^2 + 1, ViT, DeiT)."""
    if len(shape) != 2:
        return False
    tokens = shape[0]
    return math.isqrt(tokens) ** 2 != tokens and math.isqrt(tokens - 1) ** 2 == tokens - 1


def to_map(x):
    """(B, N, C) tokens of a square grid -> (B, C, sqrt(N), sqrt(N)); maps pass through unchanged."""
    if x.dim() == 4:
        return x
    channels, side = grid_shape(x.shape[1:])
    if has_class_token(x.shape[1:]):
        x = x[:, 1:]  # the class token is not on the grid
    return x.transpose(1, 2).reshape(len(x), channels, side, side)


def to_tokens(x):
    """(B, C, H, W) -> (B, H*W, C), row-major like the patch embedding; tokens pass through unchanged."""
    if x.dim() == 3:
        return x
    return x.flatten(2).transpose(1, 2)


def resize_map(x, size):
    """Resize a (B, C, H, W) map to size x size: average pooling when shrinking, bilinear when growing."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] > size:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
