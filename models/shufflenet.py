"""The benchmark zoo's CIFAR ShuffleNets, ShuffleV1 (groups 3) and ShuffleV2 (1x), with its state_dict names.

As in RepDistiller / mdistiller, both start with a 1x1 conv to 24 channels + BN + ReLU at 32x32 (no
stride, no max pooling) and have three stages that each halve the grid: 16x16, 8x8, 4x4.
- ShuffleV1: stages of 4, 8, 4 bottlenecks to 240, 480, 960 channels. A bottleneck is grouped 1x1 conv +
  BN + ReLU, channel shuffle, 3x3 depthwise conv (stride 2 in a stage's first block) + BN + ReLU, grouped
  1x1 conv + BN; then ReLU of (that + the input), or, when striding, ReLU of the concatenation [that,
  3x3 average pooling of the input]. The first bottleneck after the stem has an ungrouped first conv.
  Head: 4x4 average pooling and a linear classifier.
- ShuffleV2: stages of a down-sampling block and 3, 7, 3 basic blocks, 116, 232, 464 channels. A basic
  block keeps the first half of the channels and passes the second half through 1x1 conv + BN + ReLU,
  3x3 depthwise conv + BN, 1x1 conv + BN + ReLU; the down-sampling block concatenates two strided
  branches that both end in ReLU. Each block ends with a channel shuffle of 2 groups. Head: 1x1 conv to
  1024 + BN + ReLU, 4x4 average pooling and a linear classifier.
Every block output of both is a ReLU output or (V2's kept half) a shuffled copy of one: stage outputs are
post-activation, non-negative.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def channel_shuffle(x, groups):
    """(N, g * c, H, W) -> channels reordered from group-major to member-major: [g0c0, g1c0, ..., g0c1, ...]."""
    n, channels, h, w = x.shape
    return x.reshape(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


class ShuffleV1Block(nn.Module):
    def __init__(self, in_channels, out_channels, stride, groups):
        super().__init__()
        mid = out_channels // 4
        self.first_groups = 1 if in_channels == 24 else groups  # the zoo's test for "right after the stem"
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = torch.cat([out, self.pool(x)], 1) if self.stride == 2 else out + x
        return F.relu(out)


class ShuffleNetV1(nn.Module):
    feature_kind = "map"
    stage_output_activation = "relu"  # every block ends with a ReLU

    def __init__(self, num_classes=100, widths=(240, 480, 960), depths=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        channels = 24
        for i, (width, depth) in enumerate(zip(widths, depths), start=1):
            # A stage's first block concatenates its pooled input, so its conv branch adds the rest.
            blocks = [ShuffleV1Block(channels, width - channels, 2, groups)]
            blocks += [ShuffleV1Block(width, width, 1, groups) for _ in range(depth - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            channels = width
        self.avgpool = nn.AvgPool2d(4)
        self.linear = nn.Linear(channels, num_classes)

    def stages(self):
        """Stem + layer1 (16x16) | layer2 (8x8) | layer3 (4x4). Views over existing submodules."""
        return [nn.Sequential(self.conv1, self.bn1, self.relu, self.layer1), self.layer2, self.layer3]

    def head(self):
        return nn.Sequential(self.avgpool, nn.Flatten(1), self.linear)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


class ShuffleV2Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.half = channels // 2
        self.conv1 = nn.Conv2d(self.half, self.half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.half)
        self.conv2 = nn.Conv2d(self.half, self.half, 3, 1, 1, groups=self.half, bias=False)
        self.bn2 = nn.BatchNorm2d(self.half)
        self.conv3 = nn.Conv2d(self.half, self.half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.half)

    def forward(self, x):
        kept, x = x[:, :self.half], x[:, self.half:]
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        # left branch: 3x3 depthwise stride 2 + BN, 1x1 + BN + ReLU
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: 1x1 + BN + ReLU, 3x3 depthwise stride 2 + BN, 1x1 + BN + ReLU
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    feature_kind = "map"
    stage_output_activation = "relu"  # every channel is a ReLU output or a shuffled copy of one

    def __init__(self, num_classes=100, widths=(116, 232, 464), depths=(3, 7, 3), last_channels=1024):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        channels = 24
        for i, (width, depth) in enumerate(zip(widths, depths), start=1):
            blocks = [ShuffleV2DownBlock(channels, width)] + [ShuffleV2Block(width) for _ in range(depth)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            channels = width
        self.conv2 = nn.Conv2d(channels, last_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.avgpool = nn.AvgPool2d(4)
        self.linear = nn.Linear(last_channels, num_classes)

    def stages(self):
        """Stem + layer1 (16x16) | layer2 (8x8) | layer3 (4x4). Views over existing submodules."""
        return [nn.Sequential(self.conv1, self.bn1, self.relu, self.layer1), self.layer2, self.layer3]

    def head(self):
        return nn.Sequential(self.conv2, self.bn2, self.relu, self.avgpool, nn.Flatten(1), self.linear)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))
