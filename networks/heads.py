"""Segmentation heads: the RCCA head, its video variant, the same head with a non-local block or no attention, and
the DSN head.

Module names and ``nn.Sequential`` indices follow the original code, so its checkpoints load: ``conva.0`` (conv),
``conva.1`` (norm), ``cca``, ``convb.0/1``, ``bottleneck.0`` (conv), ``.1`` (norm), ``.2`` (dropout), ``.3``
(classifier).
"""
import torch
from torch import nn

from cc_attention import CrissCrossAttention, CrissCrossAttention3D
from libs.norm import NormFactory


def conv_norm(in_channels: int, out_channels: int, norm: NormFactory) -> nn.Sequential:
    """conv3x3 (no bias) + norm with LeakyReLU(0.01), as ``Sequential`` indices 0 and 1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), norm(out_channels, activation="leaky_relu")
    )


class ContextHead(nn.Module):
    """``conva -> context -> convb -> concat(input) -> bottleneck``; here ``context`` is the identity.

    This is the "no attention" baseline; subclasses put an attention block in ``context``.

    Args:
        in_channels: channels of the backbone output (2048 for ResNet-101).
        inter_channels: channels of ``conva`` / ``convb`` (512 in the original: ``in_channels // 4``).
        num_classes: output channels of the classifier ``bottleneck.3``.
    Shapes: ``(N, in_channels, h, w) -> (N, num_classes, h, w)``.
    """

    def __init__(self, in_channels: int, inter_channels: int, num_classes: int, norm: NormFactory):
        super().__init__()
        self.conva = conv_norm(in_channels, inter_channels, norm)
        self.convb = conv_norm(inter_channels, inter_channels, norm)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + inter_channels, inter_channels, 3, padding=1, bias=False),
            norm(inter_channels, activation="leaky_relu"),
            nn.Dropout2d(0.1),
            nn.Conv2d(inter_channels, num_classes, 1),
        )

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, inter_channels, h, w) -> (N, inter_channels, h, w)``."""
        return x

    def labelled_frames(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the head's input that the logits are for: all of ``x`` here (the video head: the centre
        frame of each clip)."""
        return x

    def forward_with_context(self, x: torch.Tensor):
        """``(logits (N, num_classes, h, w), context (N, inter_channels, h, w))``: the logits and the context block's
        output (after RCCA's R loops), which the category consistent loss reads."""
        context = self.context(self.conva(x))
        out = self.convb(context)
        return self.bottleneck(torch.cat([self.labelled_frames(x), out], dim=1)), context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_context(x)[0]


class RCCAHead(ContextHead):
    """Recurrent criss-cross attention head: ONE ``CrissCrossAttention`` applied ``recurrence`` times.

    ``recurrence`` is a plain attribute: it may be changed after construction (R=0 skips the attention).
    """

    def __init__(self, in_channels: int, inter_channels: int, num_classes: int, norm: NormFactory, recurrence: int = 2):
        if recurrence < 0:
            raise ValueError(f"recurrence must be >= 0, got {recurrence}")
        super().__init__(in_channels, inter_channels, num_classes, norm)
        self.cca = CrissCrossAttention(inter_channels)
        self.recurrence = recurrence

    def context(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.cca(x)
        return x


class VideoRCCAHead(RCCAHead):
    """The RCCA head over clips: ``conva`` on every frame, ONE ``CrissCrossAttention3D`` applied ``recurrence``
    times over the clip's feature maps (every position gathers context from its row, column and time line), then
    ``convb`` and ``bottleneck`` on the centre (labelled) frame of each clip.

    The parameter names are the RCCA head's; only ``cca``'s 1x1 convolutions are ``nn.Conv3d`` (1x1x1): a 2-D
    head's weights load into it (``networks.CheckpointKeys.depth_added``).

    Shapes: ``(N * T, in_channels, h, w)``, the T frames of each of N clips in order -> ``(N, num_classes, h, w)``,
    the centre frame's logits (``forward_with_context``: and its context ``(N, inter_channels, h, w)``).
    """

    def __init__(self, in_channels: int, inter_channels: int, num_classes: int, norm: NormFactory,
                 recurrence: int = 2, clip_length: int = 3):
        super().__init__(in_channels, inter_channels, num_classes, norm, recurrence)
        self.cca = CrissCrossAttention3D(inter_channels)
        self.clip_length = clip_length

    def labelled_frames(self, x: torch.Tensor) -> torch.Tensor:
        """``(N * T, C, h, w) -> (N, C, h, w)``: the centre frame of each clip."""
        return x.unflatten(0, (-1, self.clip_length))[:, self.clip_length // 2]

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """``(N * T, C, h, w)`` -> the centre frames' context ``(N, C, h, w)`` after R 3-D attention loops."""
        clip = x.unflatten(0, (-1, self.clip_length)).transpose(1, 2)  # (N, C, T, h, w); NDHWC if x is NHWC
        for _ in range(self.recurrence):
            clip = self.cca(clip)
        return clip[:, :, self.clip_length // 2]


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018), every pixel attending to every pixel.

    ``x + W(softmax(theta(x)^T phi(x)) g(x))`` with 1x1 convolutions ``theta, phi, g: C -> C/2`` and
    ``W: C/2 -> C``; ``W`` starts at zero, so the block starts as the identity (like CCA's ``gamma``).
    Memory is O((hw)^2): a 97x97 map needs an 8.9e7-entry attention matrix.

    Shapes: ``(N, C, h, w) -> (N, C, h, w)``.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        inner = in_channels // 2
        self.theta = nn.Conv2d(in_channels, inner, 1)
        self.phi = nn.Conv2d(in_channels, inner, 1)
        self.g = nn.Conv2d(in_channels, inner, 1)
        self.out = nn.Conv2d(inner, in_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        query = self.theta(x).flatten(2).transpose(1, 2)  # (N, hw, C/2)
        key = self.phi(x).flatten(2)  # (N, C/2, hw)
        value = self.g(x).flatten(2).transpose(1, 2)  # (N, hw, C/2)
        attention = torch.softmax(torch.bmm(query, key), dim=-1)  # (N, hw, hw)
        context = torch.bmm(attention, value).transpose(1, 2).reshape(n, -1, h, w)
        return x + self.out(context)


class NonLocalHead(ContextHead):
    """The RCCA head with one non-local block in place of the criss-cross attention (the paper's comparison)."""

    def __init__(self, in_channels: int, inter_channels: int, num_classes: int, norm: NormFactory):
        super().__init__(in_channels, inter_channels, num_classes, norm)
        self.non_local = NonLocalBlock(inter_channels)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return self.non_local(x)


class DSNHead(nn.Sequential):
    """Auxiliary (deep supervision) head on layer3: conv3x3 (bias) + norm, Dropout2d(0.1), conv1x1 classifier.

    Shapes: ``(N, in_channels, h, w) -> (N, num_classes, h, w)``.
    """

    def __init__(self, in_channels: int, inter_channels: int, num_classes: int, norm: NormFactory):
        super().__init__(
            nn.Conv2d(in_channels, inter_channels, 3, padding=1),
            norm(inter_channels, activation="leaky_relu"),
            nn.Dropout2d(0.1),
            nn.Conv2d(inter_channels, num_classes, 1),
        )
