"""One training step, shared by train.py and the training-step benchmark: the forward pass under autocast, the
loss in float32, backward (scaled for fp16) and the SGD step."""
import torch

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def forward_loss(network, criterion, images: torch.Tensor, labels: torch.Tensor, amp_dtype) -> torch.Tensor:
    """The forward pass (under autocast when ``amp_dtype`` is set) and the loss (float32).

    images (N, 3, H, W) preprocessed, labels (N, H, W) int64 train ids -> scalar loss.
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        preds = network(images)
    return criterion(preds, labels)


def optimizer_step(loss: torch.Tensor, optimizer, scaler) -> None:
    """Backward (scaled for fp16) and one SGD step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
