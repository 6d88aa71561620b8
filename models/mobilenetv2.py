"""The benchmark zoo's CIFAR MobileNetV2 ("mobile_half": width 0.5, expansion T = 6), zoo state_dict names.

As in RepDistiller / mdistiller: a 3x3 stride-2 conv stem (32x32 -> 16x16), seven groups of inverted
residual blocks (t, c, n, s) = (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
(6, 160, 3, 2), (6, 320, 1, 1) with every width c halved, a 1x1 conv to 1280 channels (not halved),
2x2 average pooling and a linear classifier. Every block is 1x1 expand + BN + ReLU, 3x3 depthwise + BN +
ReLU, 1x1 project + BN (linear bottleneck; the expand conv is there even for t = 1), plus the input when
stride is 1 and the widths agree. Block outputs are therefore not post-activation.
"""
import math

import torch.nn as nn

SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def conv_bn_relu(in_channels, out_channels, kernel_size, stride=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    feature_kind = "map"
    stage_output_activation = None  # stage outputs end with BN (+ the residual input): not post-ReLU

    def __init__(self, num_classes=100, width=0.5, expansion=6, last_channels=1280):
        super().__init__()
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(3, channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for i, (t, c, n, s) in enumerate(SETTING):
            out_channels = int(c * width)
            group = []
            for j in range(n):
                group.append(InvertedResidual(channels, out_channels, s if j == 0 else 1, t if i > 0 else 1))
                channels = out_channels
            self.blocks.append(nn.Sequential(*group))
        self.conv2 = conv_bn_relu(channels, last_channels, 1)
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)  # the zoo's pooling of the 2x2 map at 32x32 input
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                nn.init.zeros_(m.bias)

    def stages(self):
        """Stem + groups 0-1 (12x16x16) | group 2 (16x8x8) | groups 3-4 (48x4x4): the zoo's features f1-f3.
        Groups 5-6 (2x2) belong to the head. Views over existing submodules."""
        b = self.blocks
        return [nn.Sequential(self.conv1, b[0], b[1]), b[2], nn.Sequential(b[3], b[4])]

    def head(self):
        b = self.blocks
        return nn.Sequential(b[5], b[6], self.conv2, self.avgpool, nn.Flatten(1), self.classifier)

    def forward(self, x):
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(self.avgpool(self.conv2(x)).flatten(1))
