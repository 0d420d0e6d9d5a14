"""CCNet: dilated ResNet backbone, RCCA / non-local / plain context heads, DSN head, and ``build_model``."""
from .heads import ContextHead, DSNHead, NonLocalBlock, NonLocalHead, RCCAHead
from .model import HEADS, CheckpointKeys, SegmentationNet, build_model
from .resnet import BACKBONES, BackboneSpec, Bottleneck, DilatedResNet

__all__ = [
    "BACKBONES",
    "HEADS",
    "BackboneSpec",
    "Bottleneck",
    "CheckpointKeys",
    "ContextHead",
    "DSNHead",
    "DilatedResNet",
    "NonLocalBlock",
    "NonLocalHead",
    "RCCAHead",
    "SegmentationNet",
    "build_model",
]
