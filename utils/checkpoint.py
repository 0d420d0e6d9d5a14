"""Saving and loading weights: atomic snapshots and THE one loader for every kind of checkpoint.

:func:`load_model_weights` accepts

* our snapshots: a dict whose ``"model"`` entry is the state dict (train.py writes ``{"model", "optimizer",
  "iteration", "rng", "scaler", "args"}``);
* the original code's released snapshots (``CS_scenes_60000.pth``): a raw state dict, maybe with the ``module.``
  prefix of ``DataParallel``, maybe without ``num_batches_tracked`` (old InPlaceABNSync);
* ImageNet weights (the MIT ``resnet101-imagenet.pth``): a raw state dict of the backbone plus ``fc.*``.

The model says what its keys mean (``model.checkpoint_keys``: a ``networks.CheckpointKeys``): the ImageNet case is
recognized by the absence of every head key (``head.*``, ``dsn.*`` for CCNet) and loaded into the backbone only
(the ImageNet classifier ``fc.*`` is skipped, the heads keep their initialization) — pass
``backbone_only=True/False`` to force either reading. Missing and unexpected keys are reported (and are an error
with ``strict=True``); a shape mismatch is always an error, naming the number of classes when a classifier's is.
"""
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

DDP_PREFIX = "module."
OPTIONAL_SUFFIX = "num_batches_tracked"  # absent from old checkpoints; batch counters, not weights

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def save_checkpoint(state: dict, path: PathLike) -> None:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same folder, then ``os.replace``.

    A crash mid-write leaves the previous file (if any) intact. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file (``mkstemp`` makes it 0600): 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_checkpoint(path: PathLike, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)``; a missing or unreadable file raises a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # the chained exception keeps torch's detailed message
        raise CheckpointError(
            f"checkpoint {path}: torch.load(weights_only=True) failed ({type(error).__name__}): corrupt, "
            "truncated, or holding objects other than tensors and plain Python types"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(checkpoint).__name__}")
    return checkpoint


@dataclass
class LoadReport:
    """What :func:`load_model_weights` did. ``skipped``: ``fc.*`` of ImageNet weights; ``not_loaded``: the model
    keys intentionally left alone (the heads, for backbone-only weights)."""

    source: str
    backbone_only: bool
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    not_loaded: List[str] = field(default_factory=list)

    def summary(self) -> str:
        kind = "backbone weights" if self.backbone_only else "weights"
        text = f"loaded {len(self.loaded)} {kind} from {self.source}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} ({_examples(self.skipped)})"
        if self.not_loaded:
            text += f"; {len(self.not_loaded)} head keys keep their initialization"
        if self.missing:
            text += f"; MISSING {len(self.missing)} ({_examples(self.missing)})"
        if self.unexpected:
            text += f"; UNEXPECTED {len(self.unexpected)} ({_examples(self.unexpected)})"
        return text


def _examples(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (", ..." if len(keys) > limit else "")


def _state_dict_of(checkpoint: dict, source: str) -> Dict[str, torch.Tensor]:
    """The tensors of a snapshot (``checkpoint["model"]``) or of a raw state dict, without ``module.``."""
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint {source}: neither a snapshot with a 'model' entry nor a state dict "
            f"(non-tensor entries: {_examples(not_tensors)})"
        )
    return {key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key: value for key, value in state.items()}


def _shape_error(source: str, mismatches: List[str], classifier: Optional[str]) -> CheckpointError:
    text = f"checkpoint {source}: shape mismatch for {len(mismatches)} keys ({_examples(mismatches, 3)})"
    if classifier:
        text += f"; {classifier}"
    return CheckpointError(text)


def load_model_weights(
    model: nn.Module,
    source: Union[PathLike, dict],
    backbone_only: Optional[bool] = None,
    strict: bool = True,
    name: Optional[str] = None,
) -> LoadReport:
    """Load a snapshot, an original checkpoint or ImageNet weights into ``model`` (see the module docstring).

    Args:
        model: the network (a ``DistributedDataParallel`` wrapper is unwrapped); its ``checkpoint_keys`` say which
            keys are the heads', the classifiers' and the ImageNet classifier's.
        source: a file path, or a checkpoint dict already loaded.
        backbone_only: load only the backbone and skip the ImageNet classifier; ``None`` decides from the keys (no
            head key: ImageNet weights).
        strict: raise :class:`CheckpointError` on missing or unexpected keys (otherwise only report them).
        name: what messages call the checkpoint (default: the path, or ``<in-memory checkpoint>`` for a dict).
    Returns:
        a :class:`LoadReport` (``report.summary()`` is one line for the log).
    Raises:
        CheckpointError: unreadable file, shape mismatch (e.g. another ``num_classes``), or, with ``strict``,
        missing / unexpected keys.
    """
    model = getattr(model, "module", model)
    model_keys = model.checkpoint_keys
    if isinstance(source, dict):
        name, checkpoint = name or "<in-memory checkpoint>", source
    else:
        name, checkpoint = name or str(source), load_checkpoint(source)
    state = _state_dict_of(checkpoint, name)
    if backbone_only is None:
        backbone_only = not any(key.startswith(model_keys.head_prefixes) for key in state)
    report = LoadReport(source=name, backbone_only=backbone_only)

    targets = model.state_dict()
    if backbone_only:
        report.skipped = [key for key in state if key.startswith(model_keys.imagenet_classifier)]
        report.not_loaded = [key for key in targets if key.startswith(model_keys.head_prefixes)]
        state = {key: value for key, value in state.items() if not key.startswith(model_keys.imagenet_classifier)}
        targets = {key: value for key, value in targets.items() if not key.startswith(model_keys.head_prefixes)}

    report.missing = [key for key in targets if key not in state and not key.endswith(OPTIONAL_SUFFIX)]
    report.unexpected = [key for key in state if key not in targets]
    mismatches = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(targets[key].shape)}"
        for key in state
        if key in targets and state[key].shape != targets[key].shape
    ]
    if mismatches:
        classifier_keys = [f"{module}.{name}" for module in model_keys.classifiers for name in ("weight", "bias")]
        classifier = next((key for key in classifier_keys if key in state and key in targets
                           and state[key].shape != targets[key].shape), None)
        hint = None
        if classifier:
            hint = (f"the checkpoint has num_classes={state[classifier].shape[0]}, "
                    f"the model {targets[classifier].shape[0]}")
        raise _shape_error(name, mismatches, hint)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(
            f"checkpoint {name} does not match the model: {len(report.missing)} missing keys "
            f"({_examples(report.missing)}), {len(report.unexpected)} unexpected keys ({_examples(report.unexpected)})"
        )

    loadable = {key: value for key, value in state.items() if key in targets}
    model.load_state_dict(loadable, strict=False)
    report.loaded = sorted(loadable)
    return report
