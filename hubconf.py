"""torch.hub entry points:

    model = torch.hub.load("<owner>/<repo>", "ccnet", weights="ccnet-r101-cityscapes-r2").eval()
    model = torch.hub.load("path/to/checkout", "ccnet", source="local", backbone="tiny", num_classes=6)

``model(images)`` takes ``(N, 3, H, W)`` BGR images preprocessed like the datasets' (``dataset.transforms``: mean
subtracted, no scaling) and returns ``[logits (N, num_classes, h, w)]`` in eval mode (output stride 8; upsample to
the image size). See docs/model.md.
"""
from networks import build_model as _build_model
from utils.checkpoint import load_model_weights as _load_model_weights
from utils.weights import published_model_flags as _published_model_flags
from utils.weights import resolve_weights as _resolve_weights

dependencies = ["torch", "numpy"]


def ccnet(backbone: str = "resnet101", num_classes: int = None, recurrence: int = None, weights: str = None,
          norm: str = "auto", model: str = "ccnet"):
    """CCNet (dilated ResNet + recurrent criss-cross attention head + DSN head), in train mode as built.

    Args:
        backbone: ``"resnet101"``, ``"resnet50"`` or ``"tiny"``.
        num_classes: classifier outputs; default: the named weights' (19 for the Cityscapes releases), else 19.
        recurrence: R, the criss-cross attention loops; default: the named weights' R, else 2.
        weights: None (random initialization), a file path, an ``http(s)://`` or ``file://`` URL (cached by torch.hub;
            a ``<name>-<sha256 prefix>.pth`` file name is checked), or a name of ``utils.weights.WEIGHTS``:
            ``resnet101-imagenet`` (backbone only), ``ccnet-r101-cityscapes-r1``, ``-r2``, ``-r2-ohem``.
        norm: ``"auto"``, ``"bn"``, ``"inplace_abn"``, ... (``networks.build_model``); the weights load into any.
        model: ``"ccnet"``, ``"nonlocal"`` or ``"baseline"`` (the paper's comparisons).
    """
    published = _published_model_flags(weights)
    if num_classes is None:
        num_classes = published.get("num_classes", 19)
    if recurrence is None:
        recurrence = published.get("recurrence", 2)
    network = _build_model(model, backbone, num_classes, recurrence, norm)
    if weights:
        _load_model_weights(network, _resolve_weights(weights, flag="weights="))
    return network
