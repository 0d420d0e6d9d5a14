"""Where the scripts write: checked before any work, so that an output never replaces an input.

:func:`check_output_folder` (``evaluate.py --save-pred``, ``predict.py --output``) and :func:`check_output_file`
(``visualize_attention.py --output``, ``export_onnx.py --output``) raise ``ValueError`` with one line naming the flag
and the path at fault when

* the folder is an existing file (or lies under one), or the file is an existing folder;
* a file to be written is an input: the same path, or the same file through a symbolic link or another spelling
  (paths are compared after ``os.path.realpath``, so a link in the output folder that points at an input counts:
  writing through it would replace the input);
* (folders only) a folder to be written into holds an input: predictions never go among the images or labels they
  come from (``--save-pred leftImg8bit/val/<city>`` would otherwise replace ``<stem>.png`` images).

Everything here is a few ``stat`` calls per file: cheap next to reading one image.
"""
import os
from typing import Iterable


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _existing_ancestor(path: str) -> str:
    """``path`` itself if it exists, else its nearest existing parent folder (or file)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _check_written_paths(flag: str, value: str, written: Iterable[str], inputs: Iterable[str],
                         spare_input_folders: bool) -> None:
    """Raise ``ValueError`` if a path of ``written`` is one of ``inputs`` (realpaths compared), or, with
    ``spare_input_folders``, if it lies in a folder that holds one of ``inputs``."""
    input_by_real_path = {}
    inputs_by_folder = {}
    for path in inputs:
        input_by_real_path.setdefault(_real(path), path)
        for folder in (_real(os.path.dirname(os.path.abspath(path))), os.path.dirname(_real(path))):
            inputs_by_folder.setdefault(folder, path)
    for path in written:
        real = _real(path)
        if real in input_by_real_path:
            raise ValueError(f"{flag} {value}: writing {path} would replace the input {input_by_real_path[real]}; "
                             "choose another output")
        folder = os.path.dirname(real)
        if spare_input_folders and folder in inputs_by_folder:
            raise ValueError(f"{flag} {value}: {os.path.dirname(os.path.abspath(path))} holds the input "
                             f"{inputs_by_folder[folder]}; write the outputs to a folder without inputs")


def check_output_folder(flag: str, folder: str, written: Iterable[str], inputs: Iterable[str]) -> None:
    """Before any work: refuse (``ValueError``, one line naming ``flag`` and the path) the output ``folder`` of a
    run that reads the files ``inputs`` and will write the files ``written`` (in ``folder`` and its subfolders):
    ``folder`` is a file, a file to write is an input (links resolved), or a folder to write into holds an input."""
    blocking = _existing_ancestor(folder)
    if not os.path.isdir(blocking):
        where = "" if blocking == os.path.abspath(folder) else f" (under the file {blocking})"
        raise ValueError(f"{flag} {folder} is a file{where}, not a folder: name a folder for the outputs")
    _check_written_paths(flag, folder, written, inputs, spare_input_folders=True)


def check_output_file(flag: str, path: str, inputs: Iterable[str]) -> None:
    """Before any work: refuse (``ValueError``, one line naming ``flag`` and the path) the output file ``path`` of a
    run that reads the files ``inputs``: ``path`` is a folder, lies under a file, or is one of ``inputs`` (links
    resolved)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: name the file to write")
    blocking = _existing_ancestor(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(blocking):
        raise ValueError(f"{flag} {path} lies under the file {blocking}: name a file in a folder")
    _check_written_paths(flag, path, [path], inputs, spare_input_folders=False)
