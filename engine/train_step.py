"""One training step, shared by train.py and the training-step benchmark: the forward pass under autocast, the
loss in float32, backward (scaled for fp16) and the SGD step; and the switches that make it fast:

* :class:`ForwardLoss`: network + loss as one module, what ``--compile`` hands to ``torch.compile`` (under
  DistributedDataParallel too: dynamo runs DDP's own forward eagerly and compiles the wrapped model's forward, split
  at DDP's gradient buckets, and the loss; see :func:`compile_forward_loss`);
* :func:`make_sgd`: the SGD optimizer, fused (one kernel for the whole update) where torch has it and asked for;
* :func:`use_channels_last`: the ``--channels-last auto`` decision; :func:`load_optimizer_state` keeps the
  optimizer's implementation and the parameters' memory format when a snapshot is resumed.
"""
import inspect
from typing import Iterable, Optional

import torch
from torch import nn

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def forward_loss(network, criterion, images: torch.Tensor, labels: torch.Tensor, amp_dtype, with_terms: bool = False):
    """The forward pass (under autocast when ``amp_dtype`` is set) and the loss (float32).

    images (N, 3, H, W) preprocessed, labels (N, H, W) int64 train ids -> scalar loss, ``criterion(preds, labels)``;
    ``with_terms``: ``(loss, terms)`` from one ``criterion.terms(preds, labels)``: the loss is its ``total``, ``terms``
    the other entries (the loss's parts for the log), detached.
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        preds = network(images)
    if not with_terms:
        return criterion(preds, labels)
    terms = criterion.terms(preds, labels)
    loss = terms.pop("total")
    return loss, {name: value.detach() for name, value in terms.items()}


def optimizer_step(loss: torch.Tensor, optimizer, scaler) -> None:
    """Backward (scaled for fp16) and one SGD step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


class ForwardLoss(nn.Module):
    """``forward(images, labels) -> loss`` (``with_terms``: ``(loss, terms)``): :func:`forward_loss` of ``network``
    and ``criterion`` as one module, so that ``torch.compile`` sees (and fuses) the forward pass and the loss
    together."""

    def __init__(self, network: nn.Module, criterion: nn.Module, amp_dtype: Optional[torch.dtype] = None,
                 with_terms: bool = False):
        super().__init__()
        self.network = network
        self.criterion = criterion
        self.amp_dtype = amp_dtype
        self.with_terms = with_terms

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        return forward_loss(self.network, self.criterion, images, labels, self.amp_dtype, self.with_terms)


def compile_forward_loss(network: nn.Module, criterion: nn.Module, amp_dtype: Optional[torch.dtype],
                         compiled: bool, with_terms: bool = False) -> nn.Module:
    """The :class:`ForwardLoss` of the step (``with_terms``: it also returns the loss's parts), ``torch.compile``'d
    when ``compiled``.

    ``network`` may be the DistributedDataParallel-wrapped model (wrap first, then compile: PyTorch's documented
    order). Compilation happens at the first call (forward) and the first backward: the first step takes that long.
    Anything the compiler cannot capture (e.g. OHEM's data-dependent threshold) runs eagerly between graphs."""
    step = ForwardLoss(network, criterion, amp_dtype, with_terms)
    return torch.compile(step) if compiled else step


def use_channels_last(choice: Optional[bool], device: torch.device, norm: str = "bn") -> bool:
    """``--channels-last``: ``choice`` when given (True/False); ``None`` (auto): on for CUDA (cuDNN's fast
    convolutions for tensor cores take NHWC; the same convolutions, computed in another order), off on the CPU and
    with InPlaceABN (its kernels are not checked with channels_last on a GPU)."""
    if choice is not None:
        return choice
    return device.type == "cuda" and not norm.startswith("inplace_abn")


def channels_last_input(images: torch.Tensor) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in the channels_last memory format; clips ``(N, T, C, H, W)`` too, as the batch of
    ``N * T`` frames the backbone sees (same shape, values and frame order)."""
    if images.dim() == 5:
        return images.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(images.shape)
    return images.contiguous(memory_format=torch.channels_last)


def fused_sgd_available(device: torch.device) -> bool:
    """Whether ``torch.optim.SGD(fused=True)`` is used on ``device``: CUDA only, where this torch has it."""
    return device.type == "cuda" and "fused" in inspect.signature(torch.optim.SGD).parameters


def make_sgd(parameters: Iterable[torch.Tensor], lr: float, momentum: float, weight_decay: float,
             fused: bool = False) -> torch.optim.SGD:
    """SGD with one parameter group; ``fused``: the fused implementation (one kernel launch for every parameter's
    update; the same formula), else torch's default (``foreach`` on GPUs)."""
    options = {"fused": True} if fused else {}
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, **options)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this optimizer's implementation (``fused`` / ``foreach``: a
    snapshot written on a GPU may say ``fused=True``) and giving every state tensor (momentum) its parameter's
    memory format (a snapshot written with another ``--channels-last``)."""
    implementation = {key: optimizer.defaults[key] for key in ("foreach", "fused") if key in optimizer.defaults}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(implementation)
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    optimizer.state[parameter][key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
