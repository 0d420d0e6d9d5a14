"""Published weights: THE table of them, and the one way a ``--restore-from`` (or ``torch.hub``'s ``weights=``) names
a file, a URL or a table entry.

:func:`resolve_weights` turns a name from :data:`WEIGHTS` or an ``http(s)://`` / ``file://`` URL into a local file
in torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, downloaded once), checking its SHA-256 where one is known: the
table's, or the hash prefix in the file name (torch.hub's ``<name>-<sha256 prefix>.pth`` convention). A mismatch is
one line and leaves nothing in the cache. Anything else is returned as it is: a path.
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import urlparse

from torch import hub

from utils.checkpoint import CheckpointError

_DRIVE = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")  # torch.hub's convention: resnet-5f387d32.pth


@dataclass(frozen=True)
class PublishedWeights:
    """One published file: where it is and what it holds (``recurrence`` / ``num_classes`` None for backbone
    weights); ``val_miou`` the Cityscapes val mIoU (%) its authors report; ``sha256`` None where unknown."""

    url: str
    file_name: str
    description: str
    recurrence: Optional[int] = None
    num_classes: Optional[int] = None
    val_miou: Optional[float] = None
    sha256: Optional[str] = None


# The original repository's releases. Their SHA-256 sums were never published and could not be computed here (no
# access to the files from the development machine): downloads of them are not checked.
WEIGHTS: Dict[str, PublishedWeights] = {
    "resnet101-imagenet": PublishedWeights(
        "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/resnet101-imagenet.pth", "resnet101-imagenet.pth",
        "ImageNet weights of the MIT deep-stem ResNet-101 (backbone only; train.py's initialization)"),
    "ccnet-r101-cityscapes-r1": PublishedWeights(
        _DRIVE.format("13j06I4e50T41j_2HQl4sksrLZihax94L"), "ccnet-r101-cityscapes-r1.pth",
        "the original's released CCNet-R101 Cityscapes snapshot (CS_scenes_60000.pth), R=1",
        recurrence=1, num_classes=19, val_miou=77.91),
    "ccnet-r101-cityscapes-r2": PublishedWeights(
        _DRIVE.format("1IxXm8qxKmfDPVRtT8uuDNEvSQsNVTfLC"), "ccnet-r101-cityscapes-r2.pth",
        "the original's released CCNet-R101 Cityscapes snapshot (CS_scenes_60000.pth), R=2",
        recurrence=2, num_classes=19, val_miou=79.74),
    "ccnet-r101-cityscapes-r2-ohem": PublishedWeights(
        _DRIVE.format("1eiX1Xf1o16DvQc3lkFRi4-Dk7IBVspUQ"), "ccnet-r101-cityscapes-r2-ohem.pth",
        "the original's released CCNet-R101 Cityscapes snapshot (CS_scenes_60000.pth), R=2 trained with OHEM",
        recurrence=2, num_classes=19, val_miou=80.00),
}


def published_model_flags(spec) -> Dict[str, int]:
    """The model flags a name of :data:`WEIGHTS` states: ``{"recurrence": R, "num_classes": K}`` for a released
    snapshot (a raw state dict, which does not say them itself); ``{}`` for backbone weights, paths, URLs and None."""
    entry = WEIGHTS.get(spec) if isinstance(spec, str) else None
    if entry is None or entry.recurrence is None:
        return {}
    return {"recurrence": entry.recurrence, "num_classes": entry.num_classes}


def released_snapshot_names() -> str:
    """The names of :data:`WEIGHTS` that are whole snapshots (not backbone weights), for help texts."""
    return ", ".join(name for name, entry in WEIGHTS.items() if entry.recurrence is not None)


def is_url(spec: str) -> bool:
    return urlparse(spec).scheme in ("http", "https", "file")


def resolve_weights(spec: str, flag: str = "--restore-from") -> str:
    """A local path for ``spec``: a name of :data:`WEIGHTS` or a URL, downloaded into torch.hub's cache (once) and
    checked; anything else (a path, ``''``) unchanged. Errors name ``flag``: :class:`CheckpointError`."""
    if not spec or os.path.exists(spec):
        return spec
    if spec in WEIGHTS:
        entry = WEIGHTS[spec]
        return _download(entry.url, entry.file_name, entry.sha256, f"{flag} {spec}")
    if is_url(spec):
        file_name = os.path.basename(urlparse(spec).path)
        if not file_name:
            raise CheckpointError(f"{flag} {spec}: the URL names no file")
        match = _HASH_IN_NAME.search(file_name)
        return _download(spec, file_name, match.group(1) if match else None, f"{flag} {spec}")
    return spec


def _download(url: str, file_name: str, sha256: Optional[str], what: str) -> str:
    cache = Path(hub.get_dir()) / "checkpoints"
    path = cache / file_name
    if path.is_file():
        return str(path)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        hub.download_url_to_file(url, str(path), hash_prefix=sha256, progress=False)
    except RuntimeError as error:  # torch.hub's hash check (the temporary file is already removed)
        raise CheckpointError(f"{what}: the download does not match its SHA-256 ({error}); nothing was kept") from None
    except OSError as error:  # no network, 404, a full disk
        raise CheckpointError(f"{what}: cannot download {url} into {cache} ({error})") from None
    with open(path, "rb") as downloaded:
        if downloaded.read(1) == b"<":  # a web page (a sign-in or a quota notice), not a torch file
            path.unlink()
            raise CheckpointError(f"{what}: {url} answered with a web page, not a checkpoint: download it in a "
                                  "browser and pass the file's path")
    return str(path)
