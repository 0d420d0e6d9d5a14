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
with ``strict=True``); a shape mismatch is always an error, naming the number of classes when a classifier's is; a
checkpoint holding a NaN or an infinity is refused (:func:`non_finite_tensors`).

:func:`load_checkpoint`, the one reader of checkpoint files (every tool, ``--resume`` and ``--restore-from``), checks
the WHOLE file, not only the weights (:func:`check_checkpoint_tensors`): every floating tensor (weights, buffers,
optimizer state, gradient scaler) finite, no BatchNorm ``running_var`` below zero, no sparse tensor. Our snapshots
carry a checksum of all their tensors (:data:`CHECKSUM_KEY`, written by :func:`save_checkpoint`), which it verifies:
flipped bytes in a weight are refused. The original releases, ImageNet weights and snapshots written before
checksums existed have none: they load, and the load summary says that their bytes could not be verified.

A training run's folder: :class:`FolderLock` (one run at a time) and :func:`remove_temporary_files` (what an
interrupted :func:`save_checkpoint` left).
"""
import errno
import fcntl
import fnmatch
import hashlib
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from utils.cli import path_problem

DDP_PREFIX = "module."
OPTIONAL_SUFFIX = "num_batches_tracked"  # absent from old checkpoints; batch counters, not weights

PathLike = Union[str, os.PathLike]


# save_checkpoint writes ``.<name>.<8 hex digits>.tmp`` next to ``<name>`` first; only names of exactly that form
# are temporary files of ours (a user's ``.notes.tmp`` is not).
TEMPORARY_SUFFIX = ".tmp"
TEMPORARY_NAME = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{8}" + re.escape(TEMPORARY_SUFFIX))


CHECKSUM_KEY = "tensor_checksum"  # in our snapshots: "blake2b:<hex>" of every tensor (tensor_checksum)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, written or does not fit the model; the message names the file."""


class FolderLockedError(RuntimeError):
    """Another process holds the :class:`FolderLock` of a folder; the message names the lock file and its holder."""


def non_finite_tensors(state: Mapping, prefix: str = "") -> List[str]:
    """The names of the floating-point tensors of ``state`` that hold a NaN or an infinity.

    ``state``: a state dict (name -> tensor), or any nesting of dicts and lists of tensors and plain values (an
    optimizer's ``state_dict()``, a whole snapshot); names are dotted paths (``bn1.running_var``,
    ``optimizer.state.3.momentum_buffer``). Other values (integers, strings, integer tensors) are skipped.
    """
    items = state.items() if isinstance(state, Mapping) else enumerate(state)
    found = []
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                if not bool(torch.isfinite(value).all()):
                    found.append(name)
        elif isinstance(value, (Mapping, list, tuple)):
            found += non_finite_tensors(value, prefix=f"{name}.")
    return found


def _tensors(value, prefix: str = ""):
    """``(dotted name, tensor)`` of every tensor in a nesting of dicts, lists and tuples, in a fixed order (dict keys
    sorted by their text)."""
    if isinstance(value, torch.Tensor):
        yield prefix.rstrip("."), value
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _tensors(value[key], f"{prefix}{key}.")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}{index}.")


def tensor_checksum(state: Mapping) -> str:
    """``"blake2b:<hex>"`` of every tensor of ``state`` (its name, dtype, shape and bytes; the entry
    :data:`CHECKSUM_KEY` itself left out): what :func:`save_checkpoint` stores and :func:`load_checkpoint`
    verifies. About 1 s per GB on one CPU core."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in _tensors({key: value for key, value in state.items() if key != CHECKSUM_KEY}):
        tensor = tensor.detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.layout == torch.strided and tensor.numel():
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"blake2b:{digest.hexdigest()}"


def check_checkpoint_tensors(checkpoint: Mapping, name: str) -> None:
    """Raise :class:`CheckpointError` (one line naming ``name`` and the first tensors at fault) when a tensor of
    ``checkpoint`` (any nesting: the model, the optimizer's state, the scaler's) is sparse, holds a NaN or an
    infinity, or is a BatchNorm ``running_var`` with a negative value."""
    sparse = [key for key, tensor in _tensors(checkpoint) if tensor.layout != torch.strided]
    if sparse:
        raise CheckpointError(f"checkpoint {name}: {len(sparse)} sparse tensor(s) ({_examples(sparse, 3)}): a "
                              "snapshot holds dense tensors only")
    non_finite = non_finite_tensors(checkpoint)
    if non_finite:
        raise CheckpointError(f"checkpoint {name}: {len(non_finite)} tensor(s) hold NaN or infinite values "
                              f"({_examples(non_finite, 3)}): the weights of a diverged run, unusable")
    negative = [key for key, tensor in _tensors(checkpoint) if key.endswith("running_var")
                and tensor.is_floating_point() and bool((tensor < 0).any())]
    if negative:
        raise CheckpointError(f"checkpoint {name}: {len(negative)} BatchNorm variance(s) below zero "
                              f"({_examples(negative, 3)}): damaged or edited, unusable")


def verify_checksum(checkpoint: Mapping, name: str) -> bool:
    """Whether ``checkpoint`` carries a :data:`CHECKSUM_KEY` (False: a released checkpoint or an older snapshot);
    raises :class:`CheckpointError` when its tensors do not match it."""
    stored = checkpoint.get(CHECKSUM_KEY)
    if stored is None:
        return False
    if stored != tensor_checksum(checkpoint):
        raise CheckpointError(f"checkpoint {name}: its tensors do not match the checksum written with them: the file "
                              "was damaged or altered after it was saved")
    return True


def save_checkpoint(state: dict, path: PathLike) -> None:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same folder, then ``os.replace``;
    with :data:`CHECKSUM_KEY` added (:func:`tensor_checksum`), which :func:`load_checkpoint` verifies.

    A crash mid-write leaves the previous file (if any) intact. Parent folders are created.

    Raises:
        CheckpointError: the file system refused the write (a full disk: ``<path>: not written: no space left on
        device``; a quota, a file-size limit); the temporary file is removed, ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _create_temporary(path)
    state = {**state, CHECKSUM_KEY: tensor_checksum(state)}
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        cause = os_error_in(error)
        if cause is None:
            raise
        reason = os.strerror(cause.errno).lower() if cause.errno else str(cause)
        raise CheckpointError(f"checkpoint {path}: not written: {reason}") from error


def _create_temporary(path: Path):
    """(descriptor, path) of a new file ``.<name>.<8 random hex digits>.tmp`` next to ``path``, opened for writing
    with mode 0600 (see :data:`TEMPORARY_NAME`)."""
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), str(temporary)
        except FileExistsError:
            continue


def os_error_in(error: BaseException) -> Optional[OSError]:
    """The ``OSError`` that ``error`` is or was raised from (torch's zip writer turns a failed ``write`` into a
    ``RuntimeError`` whose context is the ``OSError``), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def remove_temporary_files(folder: PathLike, targets: str = "*") -> List[str]:
    """Delete the temporary files that :func:`save_checkpoint` leaves in ``folder`` when its process is killed
    mid-write: exactly the names ``.<name>.<8 hex digits>.tmp`` whose ``<name>`` matches the glob ``targets``
    (other files ending in ``.tmp`` stay); returns their paths. Call it while holding the folder's
    :class:`FolderLock` (another run's file being written would go too)."""
    removed = []
    for temporary in sorted(Path(folder).glob(f".*{TEMPORARY_SUFFIX}")):
        match = TEMPORARY_NAME.fullmatch(temporary.name)
        if match and fnmatch.fnmatchcase(match["target"], targets) and temporary.is_file():
            temporary.unlink()
            removed.append(str(temporary))
    return removed


class FolderLock:
    """An exclusive lock on ``folder`` (created if absent), held from construction to :meth:`release`: ``flock``
    on the open file ``<folder>/.lock``, which holds the holder's process id.

    The kernel releases the lock when its process ends, however it ends (SIGKILL, a crash, a power cut): a dead
    run never blocks the next one, and there is no stale lock to remove. The lock file stays (removing a locked
    file would let a second process lock a new one while the first still writes).

    Raises:
        FolderLockedError: another process holds the lock (the message names the lock file and its process).
    """

    FILE_NAME = ".lock"

    def __init__(self, folder: PathLike):
        self.path = Path(folder) / self.FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise FolderLockedError(f"{self.path} is held by process {holder}") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor: Optional[int] = descriptor

    def release(self) -> None:
        """Unlock (idempotent)."""
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file (``mkstemp`` makes it 0600): 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_checkpoint(path: PathLike, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)``, then the whole checkpoint checked (:func:`check_checkpoint_tensors`)
    and its checksum verified if it has one (:func:`verify_checksum`). A missing, unreadable, damaged or poisoned
    file raises a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: {path_problem(str(path))}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as error:  # no permission, an I/O error: the file is not at fault
        raise CheckpointError(f"checkpoint {path}: cannot be read ({error.strerror or error})") from error
    except Exception as error:  # the chained exception keeps torch's detailed message
        raise CheckpointError(
            f"checkpoint {path}: torch.load(weights_only=True) failed ({type(error).__name__}): corrupt, "
            "truncated, or holding objects other than tensors and plain Python types"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(checkpoint).__name__}")
    check_checkpoint_tensors(checkpoint, str(path))
    verify_checksum(checkpoint, str(path))
    return checkpoint


@dataclass
class LoadReport:
    """What :func:`load_model_weights` did. ``skipped``: ``fc.*`` of ImageNet weights, training-only keys the model
    lacks; ``not_loaded``: the model keys intentionally left alone (the heads, for backbone-only weights; training-only
    modules the checkpoint lacks)."""

    source: str
    backbone_only: bool
    checksum: bool = False  # the checkpoint carried a tensor checksum (verified when its file was read)
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
            text += f"; {len(self.not_loaded)} keys keep their initialization ({_examples(self.not_loaded, 2)})"
        if self.missing:
            text += f"; MISSING {len(self.missing)} ({_examples(self.missing)})"
        if self.unexpected:
            text += f"; UNEXPECTED {len(self.unexpected)} ({_examples(self.unexpected)})"
        text += ("; tensor checksum verified" if self.checksum else
                 "; no tensor checksum (a released checkpoint, or a snapshot older than checksums): its bytes are "
                 "not verified")
        return text


def _examples(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (", ..." if len(keys) > limit else "")


def _state_dict_of(checkpoint: dict, source: str) -> Dict[str, torch.Tensor]:
    """The tensors of a snapshot (``checkpoint["model"]``) or of a raw state dict, without ``module.``."""
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint
    state = {key: value for key, value in state.items() if key != CHECKSUM_KEY}
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
            keys are the heads', the classifiers' and the ImageNet classifier's, and which 1x1 weights gain a depth
            axis (an image snapshot loaded into the video network).
        source: a file path, or a checkpoint dict already loaded.
        backbone_only: load only the backbone and skip the ImageNet classifier; ``None`` decides from the keys (no
            head key: ImageNet weights).
        strict: raise :class:`CheckpointError` on missing or unexpected keys (otherwise only report them).
        name: what messages call the checkpoint (default: the path, or ``<in-memory checkpoint>`` for a dict).
    Returns:
        a :class:`LoadReport` (``report.summary()`` is one line for the log).
    Raises:
        CheckpointError: unreadable file, shape mismatch (e.g. another ``num_classes``), a NaN or an infinity in
        a weight or buffer, or, with ``strict``, missing / unexpected keys.
    """
    model = getattr(model, "module", model)
    model_keys = model.checkpoint_keys
    if isinstance(source, dict):
        name, checkpoint = name or "<in-memory checkpoint>", source
    else:
        name, checkpoint = name or str(source), load_checkpoint(source)
    state = _state_dict_of(checkpoint, name)
    check_checkpoint_tensors(state, name)
    if backbone_only is None:
        backbone_only = not any(key.startswith(model_keys.head_prefixes) for key in state)
    report = LoadReport(source=name, backbone_only=backbone_only, checksum=CHECKSUM_KEY in checkpoint)

    targets = model.state_dict()
    if backbone_only:
        report.skipped = [key for key in state if key.startswith(model_keys.imagenet_classifier)]
        report.not_loaded = [key for key in targets if key.startswith(model_keys.head_prefixes)]
        state = {key: value for key, value in state.items() if not key.startswith(model_keys.imagenet_classifier)}
        targets = {key: value for key, value in targets.items() if not key.startswith(model_keys.head_prefixes)}

    # modules only a training loss uses (the CCL projection): fresh when the checkpoint lacks them, dropped when the
    # model lacks them
    training_only = model_keys.training_only
    report.skipped += [key for key in state if key.startswith(training_only) and key not in targets]
    report.not_loaded += [key for key in targets if key.startswith(training_only) and key not in state]
    report.missing = [key for key in targets if key not in state and not key.endswith(OPTIONAL_SUFFIX)
                      and key not in report.not_loaded]
    report.unexpected = [key for key in state if key not in targets and key not in report.skipped]
    # an image network's 1x1 weights for the modules that are 1x1x1 here (the video head's attention)
    state = {key: value.unsqueeze(2) if key.startswith(model_keys.depth_added) and key in targets
             and value.dim() + 1 == targets[key].dim() else value for key, value in state.items()}
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
