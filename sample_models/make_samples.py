"""Regenerate the sample models: small real PyTorch networks exported to ONNX with BN kept.

    pip install torch==2.13.0 onnx onnxscript onnxconverter-common
    python sample_models/make_samples.py                        # every sample in SAMPLES
    python sample_models/make_samples.py resnet_tiny yolo_tiny  # those rows only

SAMPLES is the table: one row per network, with its own seed, so a row regenerates the same
files alone or among the others, and a new row changes no other sample's bytes (torch runs on
one thread, so its reductions add in one order).

onnxscript is the dynamo exporter's; onnxconverter-common makes the `*_fp16io` samples: float32
exports converted the way GPU deployments are (`convert_float_to_float16(keep_io_types=True)`:
float16 weights and arithmetic inside, float32 inputs and outputs); their `.npz` is the float32
network's.

Only this script needs torch; the tests read the .onnx and .npz files it writes.

Each network's BatchNorm layers get perturbed affine parameters (γ, β) and running statistics
calibrated on data (a model with mean 0, var 1, γ 1, β 0 would prove nothing about a fold). Both
PyTorch exporters fold BN by default; the TorchScript exporter with `do_constant_folding=False`
keeps it, and the script counts the BatchNormalization nodes it exported to make sure.

For every model, `<name>.npz` holds reference inputs (`in.<input name>`) and the PyTorch
eval-mode outputs (`out.<output name>`), computed in float32. For the float16 model the outputs
are the float32 network's: the reference a float16 deployment is judged against.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def conv_bn(cin, cout, k, stride=1, groups=1, dim=2, act=nn.ReLU, bias=False, dilation=1):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    padding = dilation * (k // 2)
    layers = [conv(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=bias), norm(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two Conv-BN, a projection shortcut (Conv-BN) when the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=None))
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetTiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.stages = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, 3×3 depthwise, 1×1 linear projection; ReLU6."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.ReLU6),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, 1, act=None),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetTiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.ReLU6),
            InvertedResidual(16, 16, 1, 4),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            conv_bn(24, 64, 1, act=nn.ReLU6),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class AudioConv1d(nn.Module):
    """A 1D conv net over log-mel frames: strided and dilated Conv1d-BN-ReLU, conv biases on."""

    def __init__(self, mels=40, classes=12):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(mels, 64, 5, dim=1, bias=True),
            conv_bn(64, 64, 3, 2, dim=1, bias=True),
            conv_bn(64, 96, 3, dim=1, dilation=2),
            conv_bn(96, 96, 3, dim=1, groups=4, dilation=4),
        )
        self.head = nn.Conv1d(96, classes, 1)

    def forward(self, x):
        return self.head(self.features(x)).mean(dim=2)


class VideoConv3d(nn.Module):
    """A small 3D ResNet-style net over clips: Conv3d-BN-ReLU with a residual add."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, dim=3)
        self.block = nn.Sequential(conv_bn(16, 16, 3, dim=3), conv_bn(16, 16, 3, dim=3, act=None))
        self.down = conv_bn(16, 32, 3, 2, dim=3)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.down(x).mean(dim=(2, 3, 4)))


class SharedConvOutput(nn.Module):
    """One conv's output feeds its BN and a gate branch: that BN cannot be folded; the rest can."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.tail = conv_bn(16, 8, 1)

    def forward(self, x):
        a = self.conv(self.stem(x))
        return self.tail(torch.relu(self.bn(a)) * torch.sigmoid(a))


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduced):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet block: 1×1 expand, depthwise k×k, squeeze-excite, 1×1 project; SiLU."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.SiLU),
            conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcite(hidden, max(1, cin // 4)),
            conv_bn(hidden, cout, 1, act=None),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class EfficientNetTiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=nn.SiLU),
            MBConv(16, 16, 3, 1, 1),
            MBConv(16, 24, 5, 2, 4),
            MBConv(24, 24, 3, 1, 4),
            conv_bn(24, 64, 1, act=nn.SiLU),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class InceptionBlock(nn.Module):
    """Inception-style: parallel 1×1, 1×1→3×3, 1×1→5×5 and pool→1×1 branches, concatenated."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = conv_bn(cin, 16, 1)
        self.b3 = nn.Sequential(conv_bn(cin, 12, 1), conv_bn(12, 16, 3))
        self.b5 = nn.Sequential(conv_bn(cin, 8, 1), conv_bn(8, 12, 5))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 8, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1)


class InceptionTiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 24, 3, 2)
        self.blocks = nn.Sequential(InceptionBlock(24), InceptionBlock(52))
        self.head = nn.Linear(52, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class RepVGGBlock(nn.Module):
    """RepVGG in its training form: BN(3×3 conv) + BN(1×1 conv) + BN(x), then ReLU. The BN on
    the identity branch has no conv in front of it, so no fold applies to it."""

    def __init__(self, channels, stride=1):
        super().__init__()
        self.dense = conv_bn(channels, channels, 3, stride, act=None)
        self.pointwise = conv_bn(channels, channels, 1, stride, act=None)
        self.identity = nn.BatchNorm2d(channels) if stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class RepVGGTiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(RepVGGBlock(16), RepVGGBlock(16), RepVGGBlock(16, stride=2), RepVGGBlock(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


# ---- the models' own re-parameterization (what their authors ship for deployment) --------------
class YoloTiny(nn.Module):
    """A YOLOv8-style detector: Conv-BN-SiLU with C2f blocks (split, bottlenecks, concat), an
    upsampled neck, two heads whose class scores go through a sigmoid. Strides 8 and 16, so H and
    W must be multiples of 16."""

    class C2f(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.a = conv_bn(c, c, 1, act=nn.SiLU)
            self.b = nn.Sequential(conv_bn(c // 2, c // 2, 3, act=nn.SiLU), conv_bn(c // 2, c // 2, 3, act=nn.SiLU))
            self.o = conv_bn(c + c // 2, c, 1, act=nn.SiLU)

        def forward(self, x):
            y1, y2 = self.a(x).chunk(2, 1)
            return self.o(torch.cat([y1, y2, self.b(y2)], 1))

    def __init__(self, classes: int = 20):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2, act=nn.SiLU), conv_bn(8, 16, 3, 2, act=nn.SiLU), self.C2f(16))
        self.p4 = nn.Sequential(conv_bn(16, 32, 3, 2, act=nn.SiLU), self.C2f(32))
        self.p5 = nn.Sequential(conv_bn(32, 64, 3, 2, act=nn.SiLU), self.C2f(64))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = self.C2f(96)
        self.head4 = nn.Sequential(conv_bn(96, 32, 3, act=nn.SiLU), nn.Conv2d(32, 4 + classes, 1))
        self.head5 = nn.Sequential(conv_bn(64, 32, 3, act=nn.SiLU), nn.Conv2d(32, 4 + classes, 1))

    def forward(self, x):
        p3 = self.stem(x)
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        n4 = self.neck(torch.cat([self.up(p5), p4], 1))
        out = torch.cat([self.head4(n4).flatten(2), self.head5(p5).flatten(2)], 2)
        return torch.cat([out[:, :4], out[:, 4:].sigmoid()], 1)


def fused(conv_bn_branch: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of conv → BN at inference."""
    conv, bn = conv_bn_branch[0], conv_bn_branch[1]
    return bn_fused(conv.weight, conv.bias, bn)


def bn_fused(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias + (b - bn.running_mean) * bn.weight / std


def identity_kernel(channels: int, groups: int, k: int) -> torch.Tensor:
    """x itself as a k×k conv kernel of `groups` groups: 1 at the centre of each own channel."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, k, k)
    for c in range(channels):
        kernel[c, c % per_group, k // 2, k // 2] = 1
    return kernel


def padded(kernel: torch.Tensor, k: int) -> torch.Tensor:
    pad = (k - kernel.shape[-1]) // 2
    return nn.functional.pad(kernel, [pad] * 4)


def deploy_conv(kernel: torch.Tensor, bias: torch.Tensor, stride: int, groups: int) -> nn.Conv2d:
    k = kernel.shape[-1]
    conv = nn.Conv2d(kernel.shape[1] * groups, kernel.shape[0], k, stride, k // 2, groups=groups)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


class RepVGGGroupedBlock(RepVGGBlock):
    """RepVGG with grouped 3×3 and 1×1 convs (RepVGG-B1g2 style), and RepVGG's own merge."""

    def __init__(self, channels, stride=1, groups=2):
        nn.Module.__init__(self)
        self.stride, self.groups = stride, groups
        self.dense = conv_bn(channels, channels, 3, stride, groups=groups, act=None)
        self.pointwise = conv_bn(channels, channels, 1, stride, groups=groups, act=None)
        self.identity = nn.BatchNorm2d(channels) if stride == 1 else None

    def reparameterize(self) -> nn.Module:
        kernel, bias = fused(self.dense)
        k1, b1 = fused(self.pointwise)
        kernel, bias = kernel + padded(k1, 3), bias + b1
        if self.identity is not None:
            ki, bi = bn_fused(identity_kernel(kernel.shape[0], self.groups, 3), None, self.identity)
            kernel, bias = kernel + ki, bias + bi
        return nn.Sequential(deploy_conv(kernel, bias, self.stride, self.groups), nn.ReLU())


class RepVGGGrouped(RepVGGTiny):
    def __init__(self, classes=10):
        nn.Module.__init__(self)
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(*(RepVGGGroupedBlock(16, s) for s in (1, 2, 1)))
        self.head = nn.Linear(16, classes)


class MobileOneBlock(nn.Module):
    """MobileOne's training form: `branches` parallel conv→BN, a 1×1 conv→BN "scale" branch
    (k > 1 only) and a BN on x (stride 1 and cin == cout only), summed, then ReLU."""

    def __init__(self, cin, cout, k, stride, groups, branches):
        super().__init__()
        self.k, self.stride, self.groups = k, stride, groups
        self.convs = nn.ModuleList(conv_bn(cin, cout, k, stride, groups=groups, act=None) for _ in range(branches))
        self.scale = conv_bn(cin, cout, 1, stride, groups=groups, act=None) if k > 1 else None
        self.identity = nn.BatchNorm2d(cout) if stride == 1 and cin == cout else None

    def forward(self, x):
        y = sum(branch(x) for branch in self.convs)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)

    def reparameterize(self) -> nn.Module:
        parts = [fused(branch) for branch in self.convs]
        if self.scale is not None:
            k1, b1 = fused(self.scale)
            parts.append((padded(k1, self.k), b1))
        if self.identity is not None:
            parts.append(bn_fused(identity_kernel(parts[0][0].shape[0], self.groups, self.k), None, self.identity))
        kernel, bias = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return nn.Sequential(deploy_conv(kernel, bias, self.stride, self.groups), nn.ReLU())


class MobileOneTiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.blocks = nn.Sequential(
            MobileOneBlock(3, 16, 3, 2, 1, 2),  # stem: no identity (3 → 16 channels)
            MobileOneBlock(16, 16, 3, 1, 16, 3),  # depthwise
            MobileOneBlock(16, 32, 1, 1, 1, 3),  # pointwise, 16 → 32: no identity
            MobileOneBlock(32, 32, 3, 2, 32, 3),  # depthwise, stride 2: no identity
            MobileOneBlock(32, 32, 1, 1, 1, 3),  # pointwise with identity
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(dim=(2, 3)))

    def reparameterize(self) -> nn.Module:
        deployed = copy.deepcopy(self)
        deployed.blocks = nn.Sequential(*(block.reparameterize() for block in self.blocks))
        return deployed


class RepMixer(nn.Module):
    """FastViT's token mixer: x + γ·(mixer(x) − norm(x)), where mixer = BN(DWConv(x)) + BN(x)
    and norm = BN(x), γ a per-channel layer scale."""

    def __init__(self, dim, k=3):
        super().__init__()
        self.k = k
        self.mixer = conv_bn(dim, dim, k, groups=dim, act=None)
        self.mixer_skip = nn.BatchNorm2d(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.layer_scale = nn.Parameter(0.1 + 0.05 * torch.randn(dim, 1, 1))

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) + self.mixer_skip(x) - self.norm(x))

    def reparameterize(self) -> nn.Module:
        """FastViT's merge: w = I + γ·(w_mixer − w_norm), b = γ·(b_mixer − b_norm)."""
        dim = self.layer_scale.shape[0]
        identity = identity_kernel(dim, dim, self.k)
        wm, bm = fused(self.mixer)
        ws, bs = bn_fused(identity, None, self.mixer_skip)
        wn, bn = bn_fused(identity, None, self.norm)
        gamma = self.layer_scale.reshape(-1)
        kernel = identity + gamma.reshape(-1, 1, 1, 1) * (wm + ws - wn)
        return deploy_conv(kernel, gamma * (bm + bs - bn), 1, dim)


class RepMixerTiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.mix1 = RepMixer(16)
        self.ffn = nn.Sequential(conv_bn(16, 32, 1), nn.Conv2d(32, 16, 1))
        self.mix2 = RepMixer(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.mix1(self.stem(x))
        x = self.mix2(x + self.ffn(x))
        return self.head(x.mean(dim=(2, 3)))

    def reparameterize(self) -> nn.Module:
        deployed = copy.deepcopy(self)
        deployed.mix1, deployed.mix2 = self.mix1.reparameterize(), self.mix2.reparameterize()
        return deployed


class Decoder(nn.Module):
    """A decoder: ConvTranspose-BN-ReLU upsampling, one of them grouped, then a 1×1 conv."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.Sequential(nn.ConvTranspose2d(32, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(16, 16, 3, 2, 1, output_padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, z):
        return self.out(self.up2(self.up1(z)))


class MLPHead(nn.Module):
    """Linear → BatchNorm1d → ReLU, twice, then a classifier: Gemm → BN in ONNX."""

    def __init__(self, features=64, hidden=48, classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d (detection backbones): fixed buffers, exported as Mul/Add
    of constants computed by rsqrt, Mul and Sub."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (
            ("weight", torch.ones(channels)),
            ("bias", torch.zeros(channels)),
            ("running_mean", torch.zeros(channels)),
            ("running_var", torch.ones(channels)),
        ):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class FrozenBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for cout, stride in ((16, 2), (32, 2), (32, 1)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), FrozenBatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class PreActNet(nn.Module):
    """BatchNorm on the raw input, then an unpadded conv (folds forward), then pre-activation
    blocks BN → ReLU → Conv, where no fold is exact."""

    def __init__(self, classes=10):
        super().__init__()
        self.input_norm = nn.BatchNorm2d(3)
        self.stem = nn.Conv2d(3, 16, 3, 2)  # no padding
        self.block = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(self.input_norm(x))
        return self.head((x + self.block(x)).mean(dim=(2, 3)))


class TokenMLP(nn.Module):
    """Linear layers on tokens [B, T, C] with BatchNorm1d over the features, applied the two
    usual ways: through transpose(1, 2), and through reshape(-1, C)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(16, 24), nn.BatchNorm1d(24)
        self.fc2, self.bn2 = nn.Linear(24, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        x = nn.functional.gelu(self.bn1(self.fc1(x).transpose(1, 2)).transpose(1, 2))
        y = self.fc2(x)
        return self.bn2(y.reshape(-1, 8)).reshape(y.shape)


class LinearBN(nn.Module):
    """LeViT's Linear_BN: a bias-less Linear, then BatchNorm1d over the flattened tokens."""

    def __init__(self, cin, cout):
        super().__init__()
        self.c, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTTiny(nn.Module):
    """LeViT's attention and MLP blocks on tokens: every Linear is a Linear_BN."""

    def __init__(self, dim=16, heads=2, classes=10):
        super().__init__()
        self.heads, self.key = heads, dim // heads
        self.embed = nn.Sequential(conv_bn(3, dim, 3, 2), nn.Hardswish())
        self.qkv, self.proj = LinearBN(dim, 3 * dim), LinearBN(dim, dim)
        self.mlp = nn.Sequential(LinearBN(dim, 2 * dim), nn.Hardswish(), LinearBN(2 * dim, dim))
        self.head = LinearBN(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # [B, T, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.key).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * self.key**-0.5).softmax(dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.mlp(x)
        return self.head(x.mean(dim=1, keepdim=True)).squeeze(1)


class RepViTBlock(nn.Module):
    """RepViT's token mixer: BN(DWConv3x3(x) + DWConv1x1(x) + x), the BN after the sum."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)


class RepViTTiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.mixers = nn.Sequential(RepViTBlock(16), nn.GELU(), RepViTBlock(16))
        self.ffn = nn.Sequential(conv_bn(16, 32, 1, act=nn.GELU), conv_bn(32, 16, 1, act=None))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.mixers(self.stem(x))
        x = x + self.ffn(x)
        return self.head(x.mean(dim=(2, 3)))


class FastViTMobileOne(nn.Module):
    """FastViT's MobileOneBlock with a 1×1 kernel: no scale branch, so `scale_out = 0` and
    `out = scale_out + identity(x) + conv(x)`, exported with a constant 0 in the sum."""

    def __init__(self, dim):
        super().__init__()
        self.conv = conv_bn(dim, dim, 1, act=None)
        self.identity = nn.BatchNorm2d(dim)

    def forward(self, x):
        scale_out = 0
        identity_out = self.identity(x)
        return nn.functional.gelu(scale_out + identity_out + self.conv(x))


class FastViTTiny(nn.Module):
    """FastViT's stem/patch-embedding MobileOne blocks with 1×1 kernels, and a ConvFFN whose
    output goes through a per-channel layer scale before the next BN: Conv → Mul(γ) → BN."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(FastViTMobileOne(16), FastViTMobileOne(16))
        self.fc = nn.Conv2d(16, 16, 1, bias=False)
        self.layer_scale = nn.Parameter(0.5 + 0.2 * torch.randn(16, 1, 1))
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.relu(self.bn(self.layer_scale * self.fc(x)))
        return self.head(x.mean(dim=(2, 3)))


class QATBlock(nn.Module):
    """A residual block as eager-mode QAT writes it: Conv-BN-ReLU and Conv-BN (fused by
    fuse_modules_qat), the skip added through FloatFunctional so that the sum is quantized."""

    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(
            channels), nn.ReLU()  # fmt: skip
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.add, self.relu2 = torch.ao.nn.quantized.FloatFunctional(), nn.ReLU()

    def forward(self, x):
        return self.relu2(self.add.add(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))), x))


def qat_qconfig():
    """Per-channel int8 weights, uint8 activations, as plain FakeQuantize (the default fused
    observer has no ONNX export), in the ranges ONNX allows."""
    import torch.ao.quantization as tq

    return tq.QConfig(
        activation=tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                             dtype=torch.quint8),
        weight=tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                                         quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )  # fmt: skip


class QATNet(nn.Module):
    """A network in quantization-aware training whose eval() freezes the observers and the BN
    statistics, as QAT does before export."""

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            import torch.ao.quantization as tq

            self.apply(tq.disable_observer)
            self.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        return self


class QATResNetTiny(QATNet):
    """A residual network in PyTorch eager quantization-aware training, exported before convert:
    ConvBn(ReLU)2d modules with per-channel int8 fake-quantized weights, uint8 activations. The
    TorchScript export keeps each BN after its conv, behind a Div by the BN's scale factor, and
    quantizes each weight at run time: QuantizeLinear(W·factor) → DequantizeLinear. eval()
    freezes the observers and BN statistics, as QAT does before export."""

    def __init__(self, classes=10):
        super().__init__()
        import torch.ao.quantization as tq

        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.blocks = nn.Sequential(QATBlock(16), QATBlock(16))
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(16, classes)
        fused = [["conv", "bn", "relu"]]
        for i in range(2):
            fused += [
                [f"blocks.{i}.conv1", f"blocks.{i}.bn1", f"blocks.{i}.relu1"],
                [f"blocks.{i}.conv2", f"blocks.{i}.bn2"],
            ]
        self.train()
        tq.fuse_modules_qat(self, fused, inplace=True)
        self.qconfig = qat_qconfig()
        tq.prepare_qat(self, inplace=True)

    def forward(self, x):
        x = self.blocks(self.relu(self.bn(self.conv(self.quant(x)))))
        return self.dequant(self.head(torch.flatten(self.pool(x), 1)))


class FXQATResNetTiny(QATNet):
    """The residual network of QATResNetTiny (one more block, a strided one with a 1×1 shortcut),
    prepared by torch.ao's FX graph mode (prepare_qat_fx) instead of eager mode: FX fuses each
    Conv-BN(-ReLU) itself and quantizes the residual sums. Plain per-channel FakeQuantize weights
    and uint8 activations; eval() freezes the observers and the BN statistics, as QAT does before
    export."""

    def __init__(self, classes=10):
        super().__init__()
        import torch.ao.quantization as tq
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        float_net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), FXBlock(16), FXBlock(32, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes),
        )  # fmt: skip
        float_net.train()
        mapping = tq.QConfigMapping().set_global(qat_qconfig())
        self.net = prepare_qat_fx(float_net, mapping, (torch.randn(1, 3, 32, 32),))

    def forward(self, x):
        return self.net(x)


class FXBlock(nn.Module):
    """A residual block for FX graph mode: a plain `+` (FX quantizes it), a strided one with a
    Conv-BN shortcut."""

    def __init__(self, channels, stride=1):
        super().__init__()
        into = channels if stride == 1 else channels // 2
        self.conv1, self.bn1 = nn.Conv2d(into, channels, 3, stride, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity() if stride == 1 else nn.Sequential(
            nn.Conv2d(into, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))  # fmt: skip

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


class QATObserverTiny(QATNet):
    """Eager-mode QAT without fusing Conv and BN: each conv's output gets its own observer, so
    the export writes Conv → QuantizeLinear → DequantizeLinear → BatchNormalization, and the
    quantizers' scales and zero points as Casts of Constants. Not exact to fold (the observer
    rounds the conv's output): bnfold folds it only with --requantize."""

    def __init__(self, classes=10):
        super().__init__()
        import torch.ao.quantization as tq

        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(16, classes)
        self.qconfig = qat_qconfig()
        self.train()
        tq.prepare_qat(self, inplace=True)

    def forward(self, x):
        x = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(self.quant(x))))))
        return self.dequant(self.head(torch.flatten(self.pool(x), 1)))


def randomize_frozen(model: nn.Module, generator: torch.Generator) -> None:
    """FrozenBatchNorm2d has no running statistics to calibrate: give it trained-looking ones."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.shape[0]
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.2 + torch.rand(c, generator=generator))


def perturb_and_calibrate(model: nn.Module, make_batch, generator: torch.Generator) -> None:
    """Give BN layers non-trivial γ, β, then calibrate running mean and var on data."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
                m.momentum = None  # cumulative average over the calibration batches
                m.reset_running_stats()
        model.train()
        for _ in range(8):
            model(make_batch())
    model.eval()


def images(x: torch.Tensor) -> torch.Tensor:
    """What the image networks see: N(0.3, 1.5²) pixels."""
    return x * 1.5 + 0.3


def log_spectrum(x: torch.Tensor) -> torch.Tensor:
    return x.abs().log1p()


def unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def grouped_blocks_deployed(net: nn.Module) -> nn.Module:
    deployed = copy.deepcopy(net)
    deployed.blocks = nn.Sequential(*(block.reparameterize() for block in net.blocks))
    return deployed


@dataclass(frozen=True)
class Sample:
    """One network and the files made from it: `<name>.onnx` and `.npz` (TorchScript exporter),
    and, when asked for, `<name>_dynamo` (dynamo exporter, opset 18), `<name>_fp16` (the network
    in half precision, judged against the float32 one) and `<name>_fp16io` (the export converted
    to float16 inside with float32 inputs and outputs)."""

    name: str
    seed: int
    network: Callable[[], nn.Module]
    shape: tuple[int, ...]  # one input row, batch excluded
    opset: int = 17
    rows: int = 2  # in the exported example
    calibration_rows: int = 8  # per calibration batch
    data: Callable[[torch.Tensor], torch.Tensor] = images  # N(0, 1) draws → the network's inputs
    dynamic_batch: bool = True
    dynamic_spatial: bool = False  # batch, H and W symbolic
    dynamo: bool = False
    float16: bool = False
    float16_io: bool = False
    deployed: Callable[[nn.Module], nn.Module] | None = None  # the network's own re-parameterization
    frozen: bool = False  # FrozenBatchNorm2d: statistics drawn, not calibrated


SAMPLES = (
    Sample("resnet_tiny", 1, ResNetTiny, (3, 32, 32), dynamo=True, float16=True, float16_io=True),
    Sample("mobilenet_tiny", 2, MobileNetTiny, (3, 32, 32), opset=13, float16_io=True),
    Sample("audio_conv1d", 3, AudioConv1d, (40, 100), opset=11, rows=1, data=log_spectrum, dynamic_batch=False),
    Sample("video_conv3d", 4, VideoConv3d, (3, 8, 16, 16), opset=15, rows=1, calibration_rows=4, data=unchanged,
           dynamic_batch=False),
    Sample("shared_conv_output", 5, SharedConvOutput, (3, 32, 32), rows=1, dynamic_batch=False),
    Sample("efficientnet_tiny", 6, EfficientNetTiny, (3, 32, 32), float16_io=True),
    Sample("inception_tiny", 7, InceptionTiny, (3, 32, 32), opset=13, float16_io=True),
    Sample("repvgg_tiny", 8, RepVGGTiny, (3, 32, 32)),
    Sample("decoder_convtranspose", 9, Decoder, (32, 4, 4), data=unchanged, dynamo=True, float16_io=True),
    Sample("mlp_batchnorm1d", 10, MLPHead, (64,), rows=4, calibration_rows=32, data=unchanged, dynamo=True),
    Sample("frozen_bn_backbone", 11, FrozenBackbone, (3, 32, 32), rows=1, dynamic_batch=False, dynamo=True,
           frozen=True),
    Sample("preact_input_bn", 12, PreActNet, (3, 32, 32), dynamo=True, float16_io=True),
    Sample("token_mlp_batchnorm1d", 13, TokenMLP, (10, 16), data=unchanged, dynamic_batch=False),
    Sample("repvgg_grouped", 14, RepVGGGrouped, (3, 32, 32), deployed=grouped_blocks_deployed),
    Sample("mobileone_tiny", 15, MobileOneTiny, (3, 32, 32), deployed=lambda net: net.reparameterize()),
    Sample("repmixer_tiny", 16, RepMixerTiny, (3, 32, 32), deployed=lambda net: net.reparameterize()),
    Sample("levit_tiny", 17, LeViTTiny, (3, 32, 32), dynamic_batch=False, dynamo=True),
    Sample("repvit_tiny", 18, RepViTTiny, (3, 32, 32), dynamic_batch=False, dynamo=True),
    Sample("fastvit_tiny", 19, FastViTTiny, (3, 32, 32), dynamic_batch=False, dynamo=True),
    Sample("yolo_tiny", 20, YoloTiny, (3, 64, 64), rows=1, calibration_rows=4, dynamic_spatial=True, dynamo=True),
    Sample("qat_resnet_tiny", 21, QATResNetTiny, (3, 32, 32)),
    Sample("fx_qat_resnet_tiny", 22, FXQATResNetTiny, (3, 32, 32)),
    Sample("qat_observer_tiny", 23, QATObserverTiny, (3, 32, 32)),
)  # fmt: skip


def make(sample: Sample) -> None:
    """Build, calibrate and export one row of SAMPLES, from its own seed only."""
    torch.manual_seed(sample.seed)  # the layers' initial weights
    gen = torch.Generator().manual_seed(sample.seed)

    def draw(rows: int) -> torch.Tensor:
        return sample.data(torch.randn(rows, *sample.shape, generator=gen))

    net = sample.network()
    if sample.frozen:
        net.eval()
        randomize_frozen(net, gen)
    else:
        perturb_and_calibrate(net, lambda: draw(sample.calibration_rows), gen)
    example = draw(sample.rows)
    deployed = sample.deployed(net).eval() if sample.deployed else None
    common = {"dynamic_spatial": sample.dynamic_spatial}
    export(net, sample.name, example, sample.opset, sample.dynamic_batch, deployed=deployed, **common)
    if sample.dynamo:  # optimize=False keeps BN
        export(net, f"{sample.name}_dynamo", example, 18, sample.dynamic_batch, dynamo=True, **common)
    if sample.float16:  # many rows: float16 error is statistical
        half_example = draw(32).half()
        export(copy.deepcopy(net).half(), f"{sample.name}_fp16", half_example, sample.opset, True, reference=net)
    if sample.float16_io:
        convert_float16_io(sample.name)


def export(
    model: nn.Module,
    name: str,
    example: torch.Tensor,
    opset: int,
    dynamic_batch: bool,
    reference: nn.Module | None = None,
    dynamo: bool = False,
    deployed: nn.Module | None = None,
    dynamic_spatial: bool = False,
) -> None:
    """Export `model` with BN kept; `<name>.npz` gets the inputs and eval outputs, and with a
    `deployed` form (the model's own re-parameterization) its outputs and Conv count too. With
    `dynamic_spatial`, the batch, H and W of the input are symbolic."""
    path = HERE / f"{name}.onnx"
    spatial = {0: "batch", 2: "height", 3: "width"}
    if dynamo:  # one file, no external data
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            optimize=False,
            external_data=False,
            input_names=["input"],
            output_names=["output"],
            opset_version=opset,
            dynamic_shapes={"x": spatial} if dynamic_spatial else None,
        )
    else:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": spatial}
            if dynamic_spatial
            else {"input": {0: "batch"}, "output": {0: "batch"}}
            if dynamic_batch
            else None,
        )
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    bn_count = sum(n.op_type == "BatchNormalization" for n in onnx_model.graph.node)
    expected = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert bn_count == expected, f"{name}: exported {bn_count} BatchNormalization nodes, module has {expected}"
    with torch.no_grad():
        ref = (reference or model)(example.float() if reference is not None else example)
    arrays = {"in.input": example.numpy(), "out.output": ref.float().numpy()}
    if deployed is not None:
        with torch.no_grad():
            arrays["reparam.output"] = deployed(example).numpy()
        arrays["reparam.convs"] = np.array(sum(isinstance(m, nn.Conv2d) for m in deployed.modules()))
    np.savez(HERE / f"{name}.npz", **arrays)
    print(f"{name}.onnx: {path.stat().st_size / 1e3:.0f} kB, opset {opset}, {bn_count} BatchNormalization")


def convert_float16_io(name: str) -> None:
    """`<name>_fp16io.onnx` from `<name>.onnx`, with the float32 network's `.npz`."""
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(HERE / f"{name}.onnx")), keep_io_types=True)
    onnx.checker.check_model(model, full_check=True)
    path = HERE / f"{name}_fp16io.onnx"
    onnx.save(model, str(path))
    (HERE / f"{name}_fp16io.npz").write_bytes((HERE / f"{name}.npz").read_bytes())
    print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB, float16 inside, float32 inputs and outputs")


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    rows = {sample.name: sample for sample in SAMPLES}
    unknown = [name for name in names if name not in rows]
    if unknown:
        raise SystemExit(f"no such sample: {', '.join(unknown)} (SAMPLES has {', '.join(rows)})")
    for name in names or rows:
        make(rows[name])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
