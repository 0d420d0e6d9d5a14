"""Where the scripts write: checked before any work, so that an output never replaces an input, and written so that
a failed write leaves nothing behind.

:func:`check_output_folder` (``evaluate.py --save-pred``, ``predict.py --output``) and :func:`check_output_file`
(``visualize_attention.py --output``, ``export_onnx.py --output``) raise ``ValueError`` with one line naming the flag
and the path at fault when

* the folder is an existing file (or lies under one), or the file is an existing folder; the path is a symbolic
  link to nothing (writing through it would create a file elsewhere);
* a file to be written is an input -- the images and labels read, and the ``--restore-from`` checkpoint: the same
  path, the same file through a symbolic link or another spelling (paths compared after ``os.path.realpath``), or
  the same file under another name (a hard link: ``(st_dev, st_ino)`` compared);
* a file to be written already exists, is not empty and is not of the kind the tool writes there (its first bytes: a
  PNG, a JPEG, JSON, ONNX): a tool replaces its own earlier outputs, never another file -- and never a checkpoint;
* (files only) the name does not end with the tool's suffix (``export_onnx.py --output x.pth``);
* (folders only) a folder to be written into holds an image or label read (``--save-pred leftImg8bit/val/<city>``
  would otherwise replace ``<stem>.png`` images); a checkpoint's folder may receive outputs;

and with :class:`OutputError` when the output's folder cannot be written (a read-only file system, no permission).

:func:`atomic_output` is how every output file is written: a temporary file beside it, renamed over it when
complete; any ``OSError`` (a full disk, a read-only folder) or an encoder that reports failure becomes an
:class:`OutputError` naming the file, and the temporary file is removed (the previous file, if any, is untouched).
:func:`lock_output_folder` keeps a second run out of an output folder while one writes there.

Everything here is a few ``stat`` calls (and an 8-byte read for each existing output) per file: cheap next to
reading one image.
"""
import glob
import os
import re
import tempfile
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

from utils.checkpoint import FolderLock, FolderLockedError, os_error_in
from utils.cli import RunFailure

# The first bytes of each kind of file the tools write, by suffix (ONNX: a protobuf whose first field is the IR
# version, tag 0x08).
OUTPUT_SIGNATURES: Dict[str, Tuple[bytes, ...]] = {
    ".png": (b"\x89PNG\r\n\x1a\n",), ".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",),
    ".json": (b"{",), ".onnx": (b"\x08",),
}
# The first bytes of a PyTorch checkpoint: a zip archive (torch.save since 1.6) or a pickle (older files).
CHECKPOINT_SIGNATURES = (b"PK\x03\x04", b"\x80")
PARTIAL_MARKER = ".partial"  # atomic_output's temporary files: .<name>.<random>.partial<suffix>
_PARTIAL_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.partial(\.[A-Za-z0-9]+)?$")  # mkstemp's 8 random characters


class OutputError(RunFailure):
    """An output file that could not be written (full disk, read-only folder, encoder failure); the message names
    it. The file is left as it was."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _identity(path: str) -> Optional[Tuple[int, int]]:
    """``(st_dev, st_ino)`` of the file ``path`` names (links followed), None if it cannot be stat'ed."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _existing_ancestor(path: str) -> str:
    """``path`` itself if it exists (or is a link), else its nearest existing parent folder (or file)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _dangling_link(path: str) -> Optional[str]:
    """The target of ``path`` if it is a symbolic link to nothing, else None."""
    if os.path.islink(path) and not os.path.exists(path):
        return os.readlink(path)
    return None


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(8)
    except OSError:
        return b""


def _check_replaceable(flag: str, value: str, path: str) -> None:
    """Refuse writing ``path`` if it exists and is not a file of the kind its suffix says (a tool's own output)."""
    if not os.path.lexists(path):
        return
    target = _dangling_link(path)
    if target is not None:
        raise ValueError(f"{flag} {value}: {path} is a symbolic link to the missing {target}: writing would create "
                         "that file; remove the link or choose another output")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {value}: {path} is a folder; choose another output")
    if os.path.getsize(path) == 0:  # nothing to lose (e.g. what a failed write of an older version left)
        return
    head = _head(path)
    if head.startswith(CHECKPOINT_SIGNATURES):
        raise ValueError(f"{flag} {value}: {path} is a checkpoint, never an output of this tool; choose another "
                         "output")
    suffix = os.path.splitext(path)[1].lower()
    if not head.startswith(OUTPUT_SIGNATURES.get(suffix, ())):
        raise ValueError(f"{flag} {value}: {path} exists and is not a {suffix or 'suffix-less'} file this tool "
                         "writes; it is not replaced: move it or choose another output")


def _check_written_paths(flag: str, value: str, written: Iterable[str], inputs: Iterable[str],
                         checkpoints: Iterable[str], spare_input_folders: bool) -> None:
    """Raise ``ValueError`` if a path of ``written`` is one of ``inputs`` or ``checkpoints`` (realpaths and file
    identities compared), is an existing file of another kind than its suffix says, or, with
    ``spare_input_folders``, lies in a folder that holds one of ``inputs``."""
    input_by_real_path = {}
    input_by_identity = {}
    inputs_by_folder = {}
    for path in inputs:
        input_by_real_path.setdefault(_real(path), path)
        input_by_identity.setdefault(_identity(path), path)
        for folder in (_real(os.path.dirname(os.path.abspath(path))), os.path.dirname(_real(path))):
            inputs_by_folder.setdefault(folder, path)
    for path in checkpoints:
        input_by_real_path.setdefault(_real(path), path)
        input_by_identity.setdefault(_identity(path), path)
    input_by_identity.pop(None, None)
    for path in written:
        real = _real(path)
        replaced = input_by_real_path.get(real) or input_by_identity.get(_identity(path))
        if replaced is not None:
            how = "" if real == _real(replaced) else " (the same file under another name: a hard link)"
            raise ValueError(f"{flag} {value}: writing {path} would replace the input {replaced}{how}; "
                             "choose another output")
        folder = os.path.dirname(real)
        if spare_input_folders and folder in inputs_by_folder:
            raise ValueError(f"{flag} {value}: {os.path.dirname(os.path.abspath(path))} holds the input "
                             f"{inputs_by_folder[folder]}; write the outputs to a folder without inputs")
        _check_replaceable(flag, value, path)


def _check_writable(flag: str, value: str, folder: str) -> None:
    """Refuse (``OutputError``) an existing ``folder`` where nothing can be created: a read-only file system (also
    for root), or no permission."""
    if os.access(folder, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    reason = "read-only file system" if read_only else "no permission to write there"
    raise OutputError(f"{flag} {value}: {folder} cannot be written ({reason})")


def _check_not_empty(flag: str, value: str) -> None:
    if not value:
        raise ValueError(f"{flag} is empty: name a path")


def check_output_folder(flag: str, folder: str, written: Iterable[str], inputs: Iterable[str],
                        checkpoints: Sequence[str] = ()) -> None:
    """Before any work: refuse (``ValueError``, one line naming ``flag`` and the path) the output ``folder`` of a
    run that reads the files ``inputs`` and the checkpoint(s) ``checkpoints`` and will write the files ``written``
    (in ``folder`` and its subfolders): see the module docstring. A folder (or the nearest existing one above) that
    cannot be written (read-only, no permission) is an ``OutputError``."""
    _check_not_empty(flag, folder)
    blocking = _existing_ancestor(folder)
    target = _dangling_link(blocking)
    if target is not None:
        raise ValueError(f"{flag} {folder}: {blocking} is a symbolic link to the missing {target}: name an existing "
                         "folder or a new path")
    if not os.path.isdir(blocking):
        where = "" if blocking == os.path.abspath(folder) else f" (under the file {blocking})"
        raise ValueError(f"{flag} {folder} is a file{where}, not a folder: name a folder for the outputs")
    _check_writable(flag, folder, blocking)
    _check_written_paths(flag, folder, written, inputs, checkpoints, spare_input_folders=True)


def check_output_file(flag: str, path: str, inputs: Iterable[str], suffixes: Sequence[str],
                      checkpoints: Sequence[str] = (), writable: bool = True) -> None:
    """Before any work: refuse (``ValueError``, one line naming ``flag`` and the path) the output file ``path`` of a
    run that reads the files ``inputs`` and the checkpoint(s) ``checkpoints``: its name does not end with one of
    ``suffixes`` (e.g. ``(".onnx",)``), it is a folder, lies under a file, is an input (links and hard links
    resolved), or exists and is not of its suffix's kind; with ``writable``, also (``OutputError``) when its folder
    (or the nearest existing one above) cannot be written."""
    _check_not_empty(flag, path)
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: name the file to write")
    if not path.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{flag} {path}: name a {' or '.join(suffixes)} file (this tool writes that kind only)")
    blocking = _existing_ancestor(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(blocking):
        raise ValueError(f"{flag} {path} lies under the file {blocking}: name a file in a folder")
    if writable:
        _check_writable(flag, path, blocking)
    _check_written_paths(flag, path, [path], inputs, checkpoints, spare_input_folders=False)


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file (``mkstemp`` makes it 0600): 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def os_error_reason(error: OSError) -> str:
    """``OSError(ENOSPC)`` -> ``"no space left on device"``: the reason without the path."""
    return os.strerror(error.errno).lower() if error.errno else (error.strerror or str(error))


@contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """``with atomic_output(path) as temporary: <write the file temporary>``: the file is then renamed to ``path``
    (parent folders created). The temporary file keeps ``path``'s suffix (encoders choose the format by it).

    Raises:
        OutputError: an ``OSError`` while writing (``<path>: not written: no space left on device``; also one that
        a library's own error was raised from), or one raised by the body for a failed encoder; the temporary file
        is removed and ``path`` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.",
                                             suffix=PARTIAL_MARKER + os.path.splitext(name)[1])
        os.close(handle)
        yield temporary
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except Exception as error:  # an OSError, or a library's error raised from one (torch's and onnx's writers)
        cause = os_error_in(error)
        if cause is None:
            raise
        raise OutputError(f"{path}: not written: {os_error_reason(cause)}") from error
    finally:
        if temporary is not None and os.path.lexists(temporary):
            try:
                os.unlink(temporary)
            except OSError:
                pass


def check_encoded(written: bool) -> None:
    """``cv2.imwrite``'s result: raise ``OSError`` (turned into :class:`OutputError` by :func:`atomic_output`) when
    it is False (OpenCV reports a failed write, e.g. a full disk, only so)."""
    if not written:
        raise OSError(0, "the image encoder reported a failure (a full disk, or a format it cannot write)")


def lock_output_folder(flag: str, folder: str) -> FolderLock:
    """Hold ``folder``'s :class:`utils.checkpoint.FolderLock` while this run writes there; another run holding it
    is a ``ValueError`` naming the flag (two runs would interleave their outputs). Once it is held, the temporary
    files that a killed run's :func:`atomic_output` left in ``folder`` and its subfolders are removed (only names
    of that form: ``.<name>.<8 random characters>.partial<suffix>``)."""
    try:
        lock = FolderLock(folder)
    except FolderLockedError as error:
        raise ValueError(f"{flag} {folder} is in use by another run ({error}): wait for it to end, or choose "
                         "another folder") from None
    except OSError as error:
        raise OutputError(f"{flag} {folder}: cannot be written ({os_error_reason(error)})") from None
    for path in glob.glob(os.path.join(glob.escape(folder), "**", f".*{PARTIAL_MARKER}*"), recursive=True):
        if _PARTIAL_NAME.match(os.path.basename(path)) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
            except OSError:
                pass
    return lock
