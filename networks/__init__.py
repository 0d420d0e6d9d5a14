"""CCNet: dilated ResNet backbone, RCCA / non-local / plain context heads, DSN head, the video network over clips, and
``build_model``."""
from .heads import ContextHead, DSNHead, NonLocalBlock, NonLocalHead, RCCAHead, VideoRCCAHead
from .model import HEADS, CheckpointKeys, SegmentationNet, VideoSegmentationNet, build_model
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
    "VideoRCCAHead",
    "VideoSegmentationNet",
    "build_model",
]
