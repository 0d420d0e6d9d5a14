"""Evaluate a CCNet snapshot on a dataset's list (Cityscapes, ADE20K, LIP): mIoU table, result.json, and optionally
the predictions.

    python evaluate.py --data-dir CS --restore-from snapshots/CS_scenes_60000.pth            # sliding 769 tiles
    python evaluate.py --data-dir CS --restore-from ccnet-r101-cityscapes-r2                 # a released snapshot
    python evaluate.py ... --whole --scales 0.75,1.0,1.25 --flip                              # multi-scale + flip
    torchrun --nproc_per_node 4 evaluate.py ...                                               # distributed
    python evaluate.py ... --data-list dataset/list/cityscapes/test.lst --save-pred outputs   # test server

Inference (see ``utils.inference``): the dataset's mode by default (Cityscapes: sliding window, tiles of
``--input-size``, 1/3 overlap, logits averaged: the original; ADE20K and LIP: the whole image), ``--whole`` for one
pass over the whole image, ``--no-whole`` for tiles; ``--scales`` / ``--flip`` average the logits of every scale and
of the left-right mirrored image (with the dataset's left/right classes swapped in the mirrored one: LIP's arms, legs
and shoes). ``--restore-from`` is a file, a URL or a released snapshot's name (downloaded into torch.hub's cache:
``engine.inference_model.resolve_restore_from``); ``--dataset`` and the model flags default to the snapshot's.

Scores (see ``utils.metrics``): one confusion matrix over all valid pixels (summed over the processes under
torchrun; each process takes a contiguous share of the list, so no image is counted twice or left out), IoU per
class, mean IoU, pixel accuracy, mean (per-class) accuracy. ``result.json`` goes into ``--save-pred`` if given, else
beside the snapshot (a downloaded one: into the current folder, not torch.hub's cache).

``--save-pred DIR`` writes ``DIR/<stem>.png`` (paletted: pixel = train id, in the dataset's colours) and
``DIR/labelIds/<stem>.png`` (single channel, full resolution, the values of the dataset's label files: Cityscapes
label ids, the format of cityscapesScripts' evaluation and of the test server; ADE20K 1..150; LIP 0..19). Lists
without labels (test.lst) are predicted, not scored. ``DIR`` is locked while the run writes there (a second
evaluation into it stops with one line). result.json names the snapshot it scores; when the snapshot's folder is
read-only (and there is no ``--save-pred``), it goes to the current folder instead, and the run says so.

Before the model is built: every listed file exists, is not empty and may be read (``dataset.segmentation.
read_list``), and ``--save-pred`` is a folder whose outputs replace no listed file and that holds none
(``utils.outputs``: neither by path nor as the same file under another name, nor the snapshot), and the tiles fit
``--max-pixels``. Every file is written whole or not at all; a write that fails (a full disk) is one line naming
the file. Labels with values outside the dataset's table or without a valid pixel are counted (the
dataset's ``label_flags``, summed over the processes) and reported at the end, and in result.json.
"""
import errno
import os
import sys
import time
from typing import Optional, Sequence, Tuple

import torch

from dataset.predictions import save_label_png, save_paletted_png
from dataset.registry import get_dataset, per_dataset
from dataset.segmentation import DataError
from engine.evaluation import InferenceMode, evaluate_share
from engine.inference_model import (add_inference_arguments, add_model_arguments, add_speed_arguments,
                                    build_and_load, check_tile_size, inference_model, load_snapshot,
                                    resolve_restore_from)
from utils.checkpoint import CHECKSUM_KEY, CheckpointError
from utils.cli import ArgumentParser, parse_non_negative_int, parse_path, parse_positive_int, run_main
from utils.distributed import (add_collective_timeout_argument, all_reduce_sum, apply_gpu_choice, barrier,
                               is_main_process, process_group)
from utils.metrics import format_scores_table, scores_from_confusion, write_result_json
from utils.outputs import OutputError, check_output_file, check_output_folder, lock_output_folder

RESULT_NAME = "result.json"


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="the dataset's folder; default: "
                                                        + per_dataset(lambda spec: spec.data_dir))
    parser.add_argument("--data-list", default=None,
                        help="list file, '<image>\\t<label>' lines (or '<image>' only: predict without scoring); "
                             "default: dataset/list/<dataset>/val.lst")
    add_model_arguments(parser)
    add_inference_arguments(parser)
    add_speed_arguments(parser)
    parser.add_argument("--batch-size", type=parse_positive_int, default=1,
                        help="images per forward pass (same-size images)")
    parser.add_argument("--num-workers", type=parse_non_negative_int, default=2,
                        help="data loading processes per process")
    parser.add_argument("--save-pred", type=parse_path, default=None, metavar="DIR",
                        help="write the predictions as PNGs to DIR")
    add_collective_timeout_argument(parser)
    return parser.parse_args(argv)


def prediction_paths(save_pred: str, name: str) -> Tuple[str, str]:
    """The two PNGs ``--save-pred`` writes for the listed image ``name``: ``<save_pred>/<stem>.png`` (colour) and
    ``<save_pred>/labelIds/<stem>.png`` (the dataset's label values)."""
    stem = os.path.splitext(os.path.basename(name))[0] + ".png"
    return os.path.join(save_pred, stem), os.path.join(save_pred, "labelIds", stem)


def check_save_pred(save_pred: str, entries, restore_from: str) -> None:
    """Before any work: ``--save-pred`` must be a folder (or not exist yet) whose outputs (the predictions of
    ``entries`` and result.json) replace no listed image or label nor the snapshot ``restore_from``, and that holds
    no image or label (``utils.outputs``); no two listed images may share a file name (the second prediction would
    replace the first)."""
    first_by_output = {}
    for entry in entries:
        colour_png = prediction_paths(save_pred, entry.name)[0]
        earlier = first_by_output.setdefault(colour_png, entry)
        if earlier is not entry:
            raise ValueError(f"--save-pred {save_pred}: the listed images {earlier.name} (line {earlier.line}) and "
                             f"{entry.name} (line {entry.line}) would both be written to {colour_png}; give them "
                             "different file names")
    written = [path for entry in entries for path in prediction_paths(save_pred, entry.name)]
    inputs = [path for entry in entries for path in (entry.image_path, entry.label_path) if path is not None]
    check_output_folder("--save-pred", save_pred, written + [os.path.join(save_pred, RESULT_NAME)], inputs,
                        checkpoints=[restore_from])


def beside_snapshot(args) -> str:
    """result.json's path without ``--save-pred``: in the snapshot's folder; for a snapshot downloaded from a URL or
    a name (torch.hub's cache, shared by every download), in the current folder."""
    if args.downloaded:
        return os.path.abspath(RESULT_NAME)
    return os.path.join(os.path.dirname(os.path.abspath(args.restore_from)), RESULT_NAME)


def write_result(args, scores, class_names, extra: dict) -> str:
    """Write result.json (``--save-pred``'s, else beside the snapshot); returns its path. A snapshot folder that
    cannot be written (read-only, no permission) puts it in the current folder instead, with a warning line."""
    if args.save_pred:
        path = os.path.join(args.save_pred, RESULT_NAME)
        write_result_json(path, scores, class_names, extra)
        return path
    path = beside_snapshot(args)
    try:
        write_result_json(path, scores, class_names, extra)
        return path
    except OutputError as error:
        cause = error.__cause__
        if not isinstance(cause, OSError) or cause.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    fallback = os.path.abspath(RESULT_NAME)
    check_output_file(RESULT_NAME, fallback, [], suffixes=(".json",), checkpoints=[args.restore_from])
    print(f"warning: {os.path.dirname(path)} cannot be written (read-only): {RESULT_NAME} goes to the current "
          f"folder instead", file=sys.stderr)
    write_result_json(fallback, scores, class_names, extra)
    return fallback


def evaluate(model, dataset, device, args, rank: int = 0, world_size: int = 1, show_progress: bool = True):
    """Predict this process's share of ``dataset`` (``engine.evaluation.evaluate_share``) as ``args`` say; write
    PNGs if ``args.save_pred``.

    Returns the ``(K, K)`` int64 confusion matrix of this share (on ``device``), or None if the list has no labels.
    """
    spec = get_dataset(args.dataset)
    mode = InferenceMode(None if args.whole else tuple(args.input_size), args.scales, args.flip, args.tile_batch,
                         args.max_pixels, spec.flip_pairs)

    def save_predictions(prediction: torch.Tensor, names) -> None:
        for train_ids, name in zip(prediction.to(torch.uint8).cpu().numpy(), names):
            colour_path, label_path = prediction_paths(args.save_pred, name)
            save_paletted_png(colour_path, train_ids, spec.palette)  # whole or not at all
            save_label_png(label_path, spec.encode_label(train_ids))

    return evaluate_share(model, dataset, device, mode, args.num_classes, rank, world_size, args.batch_size,
                          args.num_workers, save_predictions if args.save_pred else None, show_progress)


def run(args) -> None:
    """Evaluate as ``args`` (from :func:`parse_args`) say: print the scores, write result.json and predictions.

    Joins the process group that torchrun describes (if any) and leaves it at the end."""
    resolve_restore_from(args)  # a URL or a name: the downloaded file (every process; downloads are atomic)
    with process_group(apply_gpu_choice(args.gpu), args.collective_timeout) as info:
        checkpoint = load_snapshot(args, verbose=is_main_process())  # also the dataset and its defaults
        check_tile_size(args, args.batch_size)
        spec = get_dataset(args.dataset)
        dataset = spec.dataset(args.data_dir, args.data_list, clip_length=args.clip_length,
                               frame_stride=args.frame_stride, training=False)
        labelled = dataset.entries[0].label_path is not None
        if not labelled and not args.save_pred:
            raise DataError(f"{args.data_list} has no labels to score against: pass --save-pred DIR to write "
                            "predictions")
        if args.save_pred:
            check_save_pred(args.save_pred, dataset.entries, args.restore_from)
        elif labelled:  # result.json beside the snapshot replaces only an earlier result.json
            check_output_file(RESULT_NAME, beside_snapshot(args), [], suffixes=(".json",),
                              checkpoints=[args.restore_from], writable=False)  # read-only: the current folder
        lock = _lock_save_pred(args, info.device)
        try:
            _evaluate_and_report(args, checkpoint, spec, dataset, info)
        finally:
            if lock is not None:
                lock.release()


def _lock_save_pred(args, device: torch.device):
    """Rank 0 locks ``--save-pred`` (``utils.outputs.lock_output_folder``) and every process learns whether that
    worked (else the others would wait for rank 0 at the next collective operation); returns the lock or None."""
    lock, error = None, None
    if args.save_pred and is_main_process():
        try:
            lock = lock_output_folder("--save-pred", args.save_pred)
        except (OutputError, ValueError) as caught:
            error = caught
    if all_reduce_sum(torch.tensor([float(error is not None)], device=device)).item():
        raise error or DataError("--save-pred: stopped by the main process (rank 0): see its error line")
    return lock


def _evaluate_and_report(args, checkpoint: dict, spec, dataset, info) -> None:
    """Build the model, evaluate ``dataset`` (each process its share); rank 0 prints the scores and writes
    result.json."""
    model = inference_model(build_and_load(args, info.device, verbose=is_main_process(), checkpoint=checkpoint),
                            args, info.device)
    start = time.time()
    conf = evaluate(model, dataset, info.device, args, info.rank, info.world_size, is_main_process())
    if conf is not None:
        all_reduce_sum(conf)
    label_flags = all_reduce_sum(dataset.label_flags.to(info.device, torch.int64))  # each process: its share
    barrier()
    if not is_main_process():
        return
    mode = "whole image" if args.whole else f"sliding {args.input_size[0]}x{args.input_size[1]} tiles"
    print(f"{len(dataset)} images from {args.data_list} in {time.time() - start:.1f} s on {info.world_size} "
          f"process(es): {mode}, scales {args.scales}, flip {args.flip}")
    if args.save_pred:
        print(f"predictions: {os.path.abspath(args.save_pred)} (colour) and "
              f"{os.path.abspath(os.path.join(args.save_pred, 'labelIds'))} (label ids)")
    label_problems = dataset.label_problems(label_flags.cpu())
    for line in dataset.describe_label_problems(label_problems):
        print(f"warning: {line}", file=sys.stderr)
    if conf is None:
        return
    scores = scores_from_confusion(conf)
    class_names = (spec.class_names if args.num_classes == spec.num_classes
                   else [str(k) for k in range(args.num_classes)])
    print(format_scores_table(scores, class_names))
    result_path = write_result(args, scores, class_names, extra={
        "snapshot": os.path.abspath(args.restore_from), "snapshot_checksum": checkpoint.get(CHECKSUM_KEY),
        "data_list": args.data_list,
        "num_images": len(dataset), "whole": args.whole, "input_size": list(args.input_size),
        "scales": args.scales, "flip": args.flip, "recurrence": args.recurrence, "dataset": args.dataset,
        "amp": args.amp,
        "label_problems": {name: len(entries) for name, entries in label_problems.items()},
    })
    print(f"result: {result_path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 1 the evaluation failed (one line on stderr), 2 bad command line."""
    return run_main(argv, parse_args, run, (CheckpointError, DataError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
