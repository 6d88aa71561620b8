"""Model zoo: CIFAR ResNets, wide ResNets, a ViT and an MLP-Mixer, all at 32x32 input.

    from models import create_model, MODEL_NAMES
    model = create_model("resnet32x4", num_classes=100)
    logits = model(x)                         # x: (B, 3, 32, 32)

The uniform decomposition that the three methods use
----------------------------------------------------
Every model is  model(x) == head(stage_n(... stage_2(stage_1(x))))  exactly, with n = 3:

    stages = model.stages()    # list of n modules; the stem (first conv / patch embedding) is in stage 1
    head = model.head()        # everything after the last stage: [final norm/activation], pooling, classifier

Both are *views* built on each call from the model's existing submodules: they hold no new parameters
and add no state_dict names, so checkpoints keep the benchmark zoo's keys. Their parameters are the
model's own (training stage k through `stages[k-1].parameters()` trains the model), and `.train()` /
`.eval()` on a view sets the mode of exactly those submodules.

Stage outputs are the features. Their form is given by two class attributes:
- `feature_kind`: "map" for CNNs, (B, C, H, W); "tokens" for ViT/Mixer, (B, N, D) with N = 8x8 patches
  and no class token. `to_map` and `to_tokens` convert between the two without loss.
- `stage_output_activation`: "relu" where stage outputs are post-activation (CIFAR ResNets), None where
  they are pre-activation (WRN: the head starts with BN + ReLU; token models: the head starts with LayerNorm).
"""
import math

import torch
import torch.nn.functional as F

from .resnet import RESNETS, CifarResNet
from .token_models import mlp_mixer, vit
from .wrn import WRNS, WideResNet

MODEL_NAMES = list(RESNETS) + list(WRNS) + ["vit", "mlp_mixer"]
TOKEN_MODELS = ("vit", "mlp_mixer")


def create_model(name, num_classes=100):
    """A freshly initialised model; `model.arch` holds its name."""
    if name in RESNETS:
        model = CifarResNet(*RESNETS[name], num_classes)
    elif name in WRNS:
        model = WideResNet(*WRNS[name], num_classes)
    elif name == "vit":
        model = vit(num_classes)
    elif name == "mlp_mixer":
        model = mlp_mixer(num_classes)
    else:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    model.arch = name
    return model


def model_family(name):
    """'token' for ViT/MLP-Mixer (AdamW recipe), 'cnn' otherwise (SGD recipe)."""
    return "token" if name in TOKEN_MODELS else "cnn"


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


def to_map(x):
    """(B, N, C) tokens of a square grid -> (B, C, sqrt(N), sqrt(N)); maps pass through unchanged."""
    if x.dim() == 4:
        return x
    B, N, C = x.shape
    side = math.isqrt(N)
    assert side * side == N, f"{N} tokens do not form a square grid"
    return x.transpose(1, 2).reshape(B, C, side, side)


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
