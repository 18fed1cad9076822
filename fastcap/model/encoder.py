"""Image encoders: image -> a grid of visual tokens of width d_model.

`vit` is a small ViT built from FastCap's own blocks (so every projection is a
plain Linear that quantization can see); the CNNs come from torchvision,
built with weights=None unless `pretrained` asks for torchvision's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastcap.model.transformer import EncoderBlock

CNN_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")
ARCHS = ("vit",) + CNN_ARCHS


@dataclass
class EncoderConfig:
    arch: str = "vit"
    image_size: int = 64
    patch_size: int = 8
    width: int = 256
    depth: int = 4
    heads: int = 4
    pretrained: bool = False
    freeze: bool = False


class ViTEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, dropout: float) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}")
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, n, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.width, cfg.heads, dropout=dropout) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.width)
        self.out_dim = cfg.width

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # already-encoded features [B, S, C] from data.cache_features
            return x
        x = self.patch(x).flatten(2).transpose(1, 2)
        if x.shape[1] != self.pos.shape[1]:
            raise ValueError(f"image gives {x.shape[1]} patches, the encoder was built for {self.pos.shape[1]}: "
                             "images must have the model's encoder.image_size")
        x = x + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)


class CNNEncoder(nn.Module):
    """A torchvision backbone without its classifier; its last feature map becomes tokens."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        import torchvision.models as tvm

        weights = "DEFAULT" if cfg.pretrained else None
        try:
            net = getattr(tvm, cfg.arch)(weights=weights)
        except Exception as e:  # torchvision raises URLError/RuntimeError when it cannot download
            hub = torch.hub.get_dir()
            raise RuntimeError(
                f"model.encoder.pretrained=true needs torchvision's {cfg.arch} weights, which could not be "
                f"loaded ({type(e).__name__}: {str(e)[:120]}). Put the weight file torchvision names for "
                f"{cfg.arch} in {hub}/checkpoints/ (it is downloaded there on a machine with internet), "
                "or set model.encoder.pretrained=false") from None
        if cfg.arch.startswith("resnet"):
            self.body = nn.Sequential(*list(net.children())[:-2])
            self.out_dim = net.fc.in_features
        else:
            self.body = net.features
            self.out_dim = net.classifier[0].in_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # already-encoded features [B, S, C] from data.cache_features
            return x
        return self.body(x).flatten(2).transpose(1, 2)


def build_encoder(cfg: EncoderConfig, dropout: float = 0.0) -> nn.Module:
    if cfg.arch == "vit":
        if cfg.pretrained:
            raise ValueError("model.encoder.pretrained=true is only available for torchvision backbones "
                             f"{CNN_ARCHS}; the built-in vit is trained from scratch")
        return ViTEncoder(cfg, dropout)
    if cfg.arch in CNN_ARCHS:
        return CNNEncoder(cfg)
    raise ValueError(f"unknown model.encoder.arch '{cfg.arch}'; choose one of {ARCHS}")
