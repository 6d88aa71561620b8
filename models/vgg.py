"""CIFAR VGGs with BatchNorm (vgg8, vgg11, vgg13, vgg16, vgg19) with the benchmark zoo's state_dict names.

As in the RepDistiller / mdistiller zoo: five blocks of 3x3 conv (with bias) + BN, with a ReLU between the
convs of a block and one after the block, 2x2 max pooling after blocks 0, 1 and 2 (the zoo pools after
block 3 only at 64x64 input, so at 32x32 blocks 3 and 4 both run at 4x4), then global average pooling and
a single linear classifier (no fully connected layers). Every block's output is taken after its ReLU.
"""
import math

import torch.nn as nn


def make_block(in_channels, widths):
    """[conv, BN, ReLU, conv, BN, ...] without the final ReLU: the zoo's Sequential indices (0, 1, 3, 4, ...)."""
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    feature_kind = "map"
    stage_output_activation = "relu"  # every stage ends with the ReLU after a block

    def __init__(self, config, num_classes=100):
        super().__init__()
        in_channels = 3
        for i, widths in enumerate(config):
            setattr(self, f"block{i}", make_block(in_channels, widths))
            in_channels = widths[-1]
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                nn.init.zeros_(m.bias)

    def stages(self):
        """Block 0 + pool + block 1 (16x16) | pool + block 2 (8x8) | pool + blocks 3 and 4 (4x4), each block
        followed by its ReLU. Views over existing submodules (no new parameters or state_dict names)."""
        relu, pool = self.relu, self.pool
        return [nn.Sequential(self.block0, relu, pool, self.block1, relu),
                nn.Sequential(pool, self.block2, relu),
                nn.Sequential(pool, self.block3, relu, self.block4, relu)]

    def head(self):
        return nn.Sequential(self.avgpool, nn.Flatten(1), self.classifier)

    def forward(self, x):
        x = self.relu(self.block1(self.pool(self.relu(self.block0(x)))))
        x = self.relu(self.block2(self.pool(x)))
        x = self.relu(self.block4(self.relu(self.block3(self.pool(x)))))
        return self.classifier(self.avgpool(x).flatten(1))


VGGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}
