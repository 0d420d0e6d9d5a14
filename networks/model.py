"""The whole network and its builder: dilated ResNet + context head (RCCA by default) + auxiliary DSN head; the
video network (the same over clips, 3-D criss-cross attention in the head)."""
from dataclasses import dataclass, replace
from typing import List, Sequence, Tuple

import torch
from torch import nn

from libs.norm import NormFactory, make_norm

from .heads import ContextHead, DSNHead, NonLocalHead, RCCAHead, VideoRCCAHead
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
        depth_added: the prefixes of modules whose 1x1 convolutions are 1x1x1 (``nn.Conv3d``) here but 1x1 in an
            image network (the video head's ``head.cca.``): a checkpoint's ``(O, I, 1, 1)`` weight loads into an
            ``(O, I, 1, 1, 1)`` one with the depth axis added.
    """

    head_prefixes: Tuple[str, ...]
    classifiers: Tuple[str, ...]
    imagenet_classifier: str
    training_only: Tuple[str, ...] = ()
    depth_added: Tuple[str, ...] = ()


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


class VideoSegmentationNet(SegmentationNet):
    """CCNet over clips of ``clip_length`` frames (odd), the labelled frame at the centre.

    ``forward(x)``: ``x`` ``(N, T, 3, H, W)`` preprocessed BGR clips -> what :class:`SegmentationNet` returns for
    the centre frames ``(N, 3, H, W)``: the backbone runs on all ``N * T`` frames as one batch, the head
    (:class:`networks.heads.VideoRCCAHead`) gives every position context from its row, column and time line (R
    loops), and the logits, the auxiliary DSN logits and the CCL embedding are the centre frames'. The state-dict
    keys are the image network's; only ``head.cca``'s 1x1 convolutions are 1x1x1, and an image snapshot's weights
    load into them (``checkpoint_keys.depth_added``): a 2-D snapshot initializes every weight of the video network.
    """

    checkpoint_keys = replace(SegmentationNet.checkpoint_keys, depth_added=("head.cca.",))

    def __init__(self, spec: BackboneSpec, head: VideoRCCAHead, num_classes: int, norm: NormFactory,
                 multi_grid=(1, 1, 1), embedding_dim: int = 0):
        super().__init__(spec, head, num_classes, norm, multi_grid, embedding_dim)
        self.clip_length = head.clip_length

    def to(self, *args, **kwargs):
        """``nn.Module.to``; ``memory_format=torch.channels_last`` (what train.py and the inference tools ask for)
        converts the 4-D weights and leaves the 1x1x1 attention weights, the same in every memory format (PyTorch
        refuses channels_last for 5-D tensors). The frames of channels-last clips ``(N, T, 3, H, W)`` are NHWC
        images: ``clips.flatten(0, 1).contiguous(memory_format=torch.channels_last).view_as(clips)``."""
        memory_format = kwargs.pop("memory_format", None)
        module = super().to(*args, **kwargs) if args or kwargs else self
        if memory_format is None:
            return module
        return self._apply(lambda t: t.contiguous(memory_format=memory_format) if t.dim() == 4 else t)

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(N, T, 3, H, W)`` -> (layer3 of the centre frames ``(N, C3, h, w)``, layer4 of every frame
        ``(N * T, C4, h, w)``): what the DSN head and the video head read."""
        if x.dim() != 5 or x.shape[1] != self.clip_length or x.shape[2] != 3:
            raise ValueError(f"the video network expects clips (N, {self.clip_length}, 3, H, W); got "
                             f"{tuple(x.shape)}")
        c3, c4 = super().forward_features(x.flatten(0, 1))
        return self.head.labelled_frames(c3), c4


def build_model(
    name: str = "ccnet",
    backbone: str = "resnet101",
    num_classes: int = 19,
    recurrence: int = 2,
    norm: str = "auto",
    multi_grid: Sequence[int] = (1, 1, 1),
    embedding_dim: int = 0,
    clip_length: int = 1,
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
        clip_length: T, the frames of a clip. 1: the image network (:class:`SegmentationNet`, inputs
            ``(N, 3, H, W)``); an odd T > 1 (ccnet only): :class:`VideoSegmentationNet`, inputs ``(N, T, 3, H, W)``
            with the labelled frame at the centre.
    """
    if name not in HEADS:
        raise ValueError(f"model name must be one of {HEADS}, got {name!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {tuple(BACKBONES)}, got {backbone!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if embedding_dim < 0:
        raise ValueError(f"embedding_dim must be >= 0, got {embedding_dim}")
    if clip_length < 1 or clip_length % 2 == 0:
        raise ValueError(f"clip_length must be odd and >= 1 (the labelled frame at the centre), got {clip_length}")
    if clip_length > 1 and name != "ccnet":
        raise ValueError(f"clip_length {clip_length} needs the ccnet head (3-D criss-cross attention); {name!r} is "
                         "an image network")
    spec = BACKBONES[backbone]
    norm_layer = make_norm(norm)
    head_args = (spec.layer4_channels, spec.head_width, num_classes, norm_layer)
    if clip_length > 1:
        return VideoSegmentationNet(spec, VideoRCCAHead(*head_args, recurrence=recurrence, clip_length=clip_length),
                                    num_classes, norm_layer, multi_grid, embedding_dim)
    if name == "ccnet":
        head = RCCAHead(*head_args, recurrence=recurrence)
    elif name == "nonlocal":
        head = NonLocalHead(*head_args)
    else:
        head = ContextHead(*head_args)
    return SegmentationNet(spec, head, num_classes, norm_layer, multi_grid, embedding_dim)

