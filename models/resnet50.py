"""The benchmark zoo's CIFAR ResNet50 (RepDistiller's `resnetv2.ResNet50`) with its state_dict names.

An ImageNet-style bottleneck ResNet adapted to 32x32: a 3x3 stride-1 conv stem to 64 channels + BN + ReLU
and no max pooling, then layer1-4 of 3, 4, 6, 3 post-activation bottlenecks (1x1, 3x3 carrying the
stride, 1x1 to 4x the width, + BN each; ReLU after the sum with the shortcut, a 1x1 conv + BN where the
shape changes) with 256, 512, 1024, 2048 output channels at 32, 16, 8, 4 pixels, global average pooling
and a linear classifier.
"""
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class BottleneckResNet(nn.Module):
    feature_kind = "map"
    stage_output_activation = "relu"  # every bottleneck ends with a ReLU

    def __init__(self, depths=(3, 4, 6, 3), num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        in_planes = 64
        for i, (planes, depth, stride) in enumerate(zip((64, 128, 256, 512), depths, (1, 2, 2, 2)), start=1):
            blocks = []
            for j in range(depth):
                blocks.append(Bottleneck(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self):
        """Stem + layer1 + layer2 (512x16x16) | layer3 (1024x8x8) | layer4 (2048x4x4): the zoo's features
        f2-f4. Views over existing submodules (no new parameters or state_dict names)."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu)
        return [nn.Sequential(stem, self.layer1, self.layer2), self.layer3, self.layer4]

    def head(self):
        return nn.Sequential(self.avgpool, nn.Flatten(1), self.linear)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))
