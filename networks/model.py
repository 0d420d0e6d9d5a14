"""The whole network and its builder: dilated ResNet + context head (RCCA by default) + auxiliary DSN head."""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn

from libs.norm import NormFactory, make_norm

from .heads import ContextHead, DSNHead, NonLocalHead, RCCAHead
from .resnet import BACKBONES, BackboneSpec, DilatedResNet

HEADS = ("ccnet", "nonlocal", "baseline")


@dataclass(frozen=True)
class CheckpointKeys:
    """What the keys of a checkpoint of this network mean, for ``utils.checkpoint`` (the model describes its own
    weights: timm's ``pretrained_cfg`` habit).

    Attributes:
        head_prefixes: the heads' keys; weights without any of them are backbone-only (ImageNet) weights.
        classifiers: the modules whose ``weight`` / ``bias`` have one row per class.
        imagenet_classifier: the prefix of the ImageNet classifier, in backbone weights but not in the network.
        training_only: the prefixes of modules that only a training loss uses (the CCL projection): a checkpoint
            without them loads (they keep their initialization), and a model without them drops them from a
            checkpoint that has them.
    """

    head_prefixes: Tuple[str, ...]
    classifiers: Tuple[str, ...]
    imagenet_classifier: str
    training_only: Tuple[str, ...] = ()


class SegmentationNet(DilatedResNet):
    """Backbone modules at the top level (as in the original, so keys read ``layer4.2.conv3.weight``), plus
    ``head`` on layer4 and ``dsn`` on layer3; with ``embedding_dim > 0`` also ``ccl_projection``, a 1x1 convolution
    of the head's context output (RCCA's, after the R loops) to ``embedding_dim`` channels for the category
    consistent loss (``utils.loss.CategoryConsistentLoss``).

    ``forward(x)``: ``x`` ``(N, 3, H, W)`` preprocessed BGR -> in training mode ``[main, aux]`` logits (with
    ``ccl_projection``: ``[main, aux, embedding (N, embedding_dim, h, w)]``), in eval mode ``[main]`` (the auxiliary
    head and the projection serve only the training loss, so inference does not compute them: torchvision's
    ``aux_classifier`` habit; the main logits do not depend on them). Logits are ``(N, num_classes, h, w)`` at
    output stride 8: ``h = ((H - 1) // 2 + 1) // 2 // 2 + 1`` (stride-2 conv, ceil-mode max-pool, stride-2 conv):
    769 -> 97, 1024 -> 129, 2048 -> 257.
    """

    checkpoint_keys = CheckpointKeys(head_prefixes=("head.", "dsn."), classifiers=("head.bottleneck.3", "dsn.3"),
                                     imagenet_classifier="fc.", training_only=("ccl_projection.",))

    def __init__(self, spec: BackboneSpec, head: nn.Module, num_classes: int, norm: NormFactory, multi_grid=(1, 1, 1),
                 embedding_dim: int = 0):
        super().__init__(spec, norm, multi_grid)
        self.head = head
        self.dsn = DSNHead(spec.layer3_channels, spec.head_width, num_classes, norm)
        self.ccl_projection = nn.Conv2d(spec.head_width, embedding_dim, 1) if embedding_dim else None

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        c3, c4 = self.forward_features(x)
        if not self.training:
            return [self.head(c4)]
        if self.ccl_projection is None:
            return [self.head(c4), self.dsn(c3)]
        logits, context = self.head.forward_with_context(c4)
        return [logits, self.dsn(c3), self.ccl_projection(context)]


def build_model(
    name: str = "ccnet",
    backbone: str = "resnet101",
    num_classes: int = 19,
    recurrence: int = 2,
    norm: str = "auto",
    multi_grid: Sequence[int] = (1, 1, 1),
    embedding_dim: int = 0,
) -> SegmentationNet:
    """THE entry point for train.py, evaluate.py and the tools.

    Args:
        name: ``"ccnet"`` (RCCA head, ``model.head.cca`` / ``model.head.recurrence``), ``"nonlocal"`` (one
            non-local block in its place) or ``"baseline"`` (no attention).
        backbone: ``"resnet101"``, ``"resnet50"`` or ``"tiny"`` (narrow, for CPU tests and the demo).
        num_classes: classifier outputs of both heads.
        recurrence: R, the number of criss-cross attention loops (ccnet only; 2 as in the paper).
        norm: see :func:`libs.norm.make_norm` (``"auto"``, ``"bn"``, ``"syncbn"``, ``"inplace_abn"``,
            ``"inplace_abn_sync"``); the state-dict keys are the same for all.
        multi_grid: dilation multipliers of layer4's blocks (the original: (1, 1, 1)).
        embedding_dim: > 0 adds ``ccl_projection``, the embedding of the category consistent loss (train.py
            ``--ccl 1 --ccl-dim``); 0 (the ICCV network) adds nothing.
    """
    if name not in HEADS:
        raise ValueError(f"model name must be one of {HEADS}, got {name!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {tuple(BACKBONES)}, got {backbone!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if embedding_dim < 0:
        raise ValueError(f"embedding_dim must be >= 0, got {embedding_dim}")
    spec = BACKBONES[backbone]
    norm_layer = make_norm(norm)
    head_args = (spec.layer4_channels, spec.head_width, num_classes, norm_layer)
    if name == "ccnet":
        head = RCCAHead(*head_args, recurrence=recurrence)
    elif name == "nonlocal":
        head = NonLocalHead(*head_args)
    else:
        head = ContextHead(*head_args)
    return SegmentationNet(spec, head, num_classes, norm_layer, multi_grid, embedding_dim)

