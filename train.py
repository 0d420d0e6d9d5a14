"""Train CCNet on Cityscapes or ADE20K (one process, or several through torchrun / DistributedDataParallel).

    python train.py --data-dir cityscapes --random-mirror --random-scale                    # one GPU (or CPU)
    torchrun --nproc_per_node=4 train.py --data-dir cityscapes --random-mirror --random-scale  # 4 GPUs
    torchrun --nproc_per_node=4 train.py --dataset ade20k --random-mirror --random-scale       # ADE20K

The defaults are the dataset's (``dataset/cityscapes.py``, ``dataset/ade20k.py``); for Cityscapes the paper's run:
batch 8 (global, split over the processes), 769x769 crops, SGD lr 1e-2, momentum 0.9, weight decay 1e-4, poly 0.9,
60000 iterations, R=2; for ADE20K mmsegmentation's CCNet recipe (batch 16, 512x512 crops, weight decay 5e-4,
80000 iterations). Snapshots ``CS_scenes_<iter>.pth`` go to
``--snapshot-dir`` every ``--save-pred-every`` iterations and at the end; ``--resume`` continues one exactly
(same batches, same random draws). Rank 0 alone logs (progress bar, TensorBoard, CSV) and writes; it holds a lock on
``--snapshot-dir`` for the whole run, and writes a snapshot only when every weight, buffer and optimizer tensor is
finite.
"""
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dataset.registry import DATASET_NAMES, DEFAULT_DATASET, get_dataset, per_dataset
from dataset.sampler import ResumableDistributedSampler
from dataset.segmentation import DataError, worker_init_fn
from dataset.spec import fill_unset
from engine.train_step import (AMP_DTYPES, compile_forward_loss, fused_sgd_available, load_optimizer_state, make_sgd,
                               optimizer_step, use_channels_last)
from libs.norm import NORM_KINDS, resolve_norm_kind
from networks import BACKBONES, HEADS, build_model
from utils.checkpoint import (CheckpointError, FolderLock, FolderLockedError, load_checkpoint, load_model_weights,
                              non_finite_tensors, remove_temporary_files, save_checkpoint)
from utils.cli import (ArgumentParser, add_max_pixels_argument, parse_auto_bool, parse_bool, parse_fraction,
                       parse_non_negative_float, parse_non_negative_int, parse_path, parse_positive_float,
                       parse_positive_int, parse_size, run_main)
from utils.distributed import (DistInfo, add_collective_timeout_argument, add_gpu_argument, all_reduce_sum,
                               apply_gpu_choice, is_main_process, process_group)
from utils.logger import TrainingLogger
from utils.loss import CriterionDSN
from utils.rng import gather_rng_states, saved_rng_state, seed_all, set_rng_state
from utils.schedule import poly_lr, set_lr

SNAPSHOT_PATTERN = "CS_scenes_{}.pth"
SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX = SNAPSHOT_PATTERN.split("{}")
# Flags whose change makes a resumed run differ from the uninterrupted one (warned about on --resume).
RUN_DEFINING_FLAGS = ("dataset", "data_list", "input_size", "batch_size", "learning_rate", "momentum", "weight_decay",
                      "power", "num_steps", "recurrence", "ohem", "ohem_thres", "ohem_keep", "random_mirror",
                      "random_scale", "random_seed", "num_classes", "backbone", "model", "amp")


class TrainingError(RuntimeError):
    """A condition that stops training with a one-line message (bad flag, non-finite loss)."""


# The errors that stop a run with one line on stderr and exit code 1.
FAILURES = (CheckpointError, DataError, FileNotFoundError, TrainingError, ValueError)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data (a flag left out takes the dataset's default)")
    data.add_argument("--dataset", choices=DATASET_NAMES, default=DEFAULT_DATASET,
                      help="the dataset: its label format, classes and defaults (dataset/registry.py)")
    data.add_argument("--data-dir", default=None,
                      help="the dataset's folder (Cityscapes: holds leftImg8bit/ and gtFine/; ADE20K: images/ and "
                           "annotations/); list paths are relative to it; default: "
                           + per_dataset(lambda spec: spec.data_dir))
    data.add_argument("--data-list", default=None,
                      help="list file of '<image>\\t<label>' lines to train on; default: "
                           "dataset/list/<dataset>/train.lst")
    data.add_argument("--input-size", type=parse_size, default=None, metavar="H,W",
                      help="training crop size; smaller images are padded (image 0, label ignored); default: "
                           + per_dataset(lambda spec: spec.training.input_size))
    add_max_pixels_argument(data)
    data.add_argument("--random-mirror", action="store_true", help="flip images horizontally with p = 0.5")
    data.add_argument("--random-scale", action="store_true",
                      help="rescale images by a random factor in {0.7, 0.8, ..., 2.1} before cropping")
    data.add_argument("--num-workers", type=parse_non_negative_int, default=8, help="data-loading processes per training process")
    data.add_argument("--num-classes", type=parse_positive_int, default=None,
                      help="number of classes the network predicts; default: "
                           + per_dataset(lambda spec: spec.num_classes))
    data.add_argument("--ignore-label", type=int, default=255,
                      help="label value of the void pixels (unevaluated classes, padding), excluded from the loss; "
                           "any integer outside 0..num-classes-1")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=HEADS, default="ccnet",
                       help="context head: RCCA (ccnet), one non-local block, or none (baseline)")
    model.add_argument("--backbone", choices=tuple(BACKBONES), default="resnet101",
                       help="backbone; 'tiny' is a small variant for CPU tests and the demo")
    model.add_argument("--recurrence", type=parse_non_negative_int, default=2, help="R, the number of criss-cross attention loops")
    model.add_argument("--norm", choices=NORM_KINDS, default="auto",
                       help="normalization: auto = InPlaceABN if the inplace_abn package imports, else BatchNorm; "
                            "synchronized across GPU processes (on the CPU there is no synchronized kind: auto "
                            "then gives per-process BatchNorm)")
    model.add_argument("--restore-from", default="./dataset/resnet101-imagenet.pth",
                       help="ImageNet weights for the backbone (the README's Weights say where to get them; a "
                            "missing file is an error); '' trains from scratch")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--batch-size", type=parse_positive_int, default=None,
                       help="GLOBAL batch size, split evenly over the processes (8 = 2 per GPU on 4 GPUs); default: "
                            + per_dataset(lambda spec: spec.training.batch_size))
    optim.add_argument("--learning-rate", type=parse_positive_float, default=None,
                       help="base learning rate of the poly schedule; default: "
                            + per_dataset(lambda spec: spec.training.learning_rate))
    optim.add_argument("--momentum", type=parse_non_negative_float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=parse_non_negative_float, default=None,
                       help="SGD weight decay (on every parameter); default: "
                            + per_dataset(lambda spec: spec.training.weight_decay))
    optim.add_argument("--power", type=parse_non_negative_float, default=0.9,
                       help="poly schedule: lr = base * (1 - it/max) ** power")
    optim.add_argument("--num-steps", type=parse_positive_int, default=None,
                       help="number of training iterations; default: "
                            + per_dataset(lambda spec: spec.training.num_steps))
    optim.add_argument("--ohem", type=parse_bool, default=False, metavar="0|1",
                       help="online hard example mining on the main head")
    optim.add_argument("--ohem-thres", type=parse_fraction, default=0.7,
                       help="OHEM: keep pixels whose ground-truth probability is at most this (or the k-th smallest)")
    optim.add_argument("--ohem-keep", type=parse_non_negative_int, default=100000, help="OHEM: k, the minimum number of pixels kept")
    optim.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                       help="mixed precision: bf16 autocast (the fast recipe on GPUs with bfloat16 tensor cores; "
                            "fp32, the default, is the faithful one), or fp16 autocast with gradient scaling")
    optim.add_argument("--random-seed", type=parse_non_negative_int, default=1234,
                       help="seed of the initialization, the data order and the augmentations")

    speed = parser.add_argument_group("speed (the same training, computed faster; see docs/training.md)")
    speed.add_argument("--channels-last", type=parse_auto_bool, default=None, metavar="auto|1|0",
                       help="model and input batches in the channels_last (NHWC) memory format; auto: on for CUDA "
                            "(except with InPlaceABN), off on the CPU")
    speed.add_argument("--compile", type=parse_bool, default=False, metavar="0|1",
                       help="torch.compile the forward pass and the loss (the first iteration then compiles: a "
                            "minute or more for ResNet-101; its time is logged)")

    run = parser.add_argument_group("run")
    add_gpu_argument(run)
    add_collective_timeout_argument(run)
    run.add_argument("--snapshot-dir", type=parse_path, default="snapshots/",
                     help="where CS_scenes_<iter>.pth snapshots are written; locked while the run lasts. A run "
                          "without --resume refuses a folder that holds another run's snapshots or train_log.csv")
    run.add_argument("--overwrite-snapshots", action="store_true",
                     help="start afresh in a --snapshot-dir that holds another run's snapshots: they and that "
                          "run's logs (train_log.csv, TensorBoard events) are DELETED first")
    run.add_argument("--save-pred-every", type=parse_positive_int, default=10000, help="write a snapshot every this many iterations")
    run.add_argument("--resume", default=None, metavar="SNAPSHOT",
                     help="continue exactly from one of our snapshots (weights, optimizer, iteration, RNG states)")
    run.add_argument("--log-dir", type=parse_path, default=None,
                     help="TensorBoard events and train_log.csv (default: <snapshot-dir>/logs)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    fill_unset(args, get_dataset(args.dataset).training_args())
    parser.check_pixels(f"--input-size {args.input_size[0]},{args.input_size[1]}", args.input_size, args.max_pixels)
    if 0 <= args.ignore_label < args.num_classes:
        parser.error(f"--ignore-label {args.ignore_label} is a class id (0..{args.num_classes - 1}): pick a value "
                     "outside, e.g. 255 or -1")
    if args.log_dir is None:
        args.log_dir = os.path.join(args.snapshot_dir, "logs")
    return args


# ------------------------------------------------------------------------------------------------- the data
def _make_loader(args, rank: int, world_size: int, device: torch.device):
    dataset = get_dataset(args.dataset).dataset(
        args.data_dir, args.data_list, crop_size=tuple(args.input_size), scale=args.random_scale,
        mirror=args.random_mirror, ignore_label=args.ignore_label, training=True, seed=args.random_seed)
    per_process = args.batch_size // world_size
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=args.random_seed)
    iterations_per_epoch = len(sampler) // per_process
    if iterations_per_epoch == 0:
        raise TrainingError(f"--data-list {args.data_list} has {len(dataset)} samples: too few for a global batch "
                            f"of {args.batch_size} over {world_size} processes")
    loader = DataLoader(dataset, batch_size=per_process, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True, worker_init_fn=worker_init_fn,
                        generator=torch.Generator().manual_seed(args.random_seed))
    return dataset, sampler, loader, iterations_per_epoch


def _batches(dataset, sampler, loader, start_iteration: int, iterations_per_epoch: int):
    """Endless batches, starting where iteration ``start_iteration`` of an uninterrupted run would."""
    epoch, batch_in_epoch = divmod(start_iteration, iterations_per_epoch)
    while True:
        sampler.set_epoch(epoch, start=batch_in_epoch * loader.batch_size)
        dataset.set_epoch(epoch)
        yield from loader
        epoch, batch_in_epoch = epoch + 1, 0


# ------------------------------------------------------------------------------------------------ the model
def _norm_kind(requested: str, world_size: int, device: torch.device) -> str:
    """The concrete norm. Neither SyncBatchNorm nor InPlaceABNSync runs on the CPU: there, several processes
    use per-process BatchNorm statistics (DDP copies rank 0's running statistics to all ranks at each forward)."""
    kind = resolve_norm_kind(requested)
    if device.type == "cpu" and world_size > 1 and kind in ("syncbn", "inplace_abn_sync"):
        if requested != "auto":
            raise TrainingError(f"--norm {requested} needs GPUs: synchronized normalization does not run on the CPU")
        kind = "bn"
    return kind


def _build(args, norm: str, device: torch.device, channels_last: bool, log):
    torch.manual_seed(args.random_seed)  # the same initial weights on every rank
    model = build_model(args.model, args.backbone, args.num_classes, args.recurrence, norm)
    if args.resume is None and args.restore_from:
        log(load_model_weights(model, args.restore_from).summary())
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_sgd(model.parameters(), args.learning_rate, args.momentum, args.weight_decay,
                         fused=fused_sgd_available(device))
    return model, optimizer


def _normalized(value):
    """Lists and tuples compare as lists (an ``input_size`` tuple may come back from a snapshot as a list)."""
    return [_normalized(item) for item in value] if isinstance(value, (list, tuple)) else value


def _check_resumed_args(saved: dict, args, log) -> None:
    changed = [f"--{name.replace('_', '-')} {saved[name]!r} -> {getattr(args, name)!r}"
               for name in RUN_DEFINING_FLAGS
               if name in saved and _normalized(saved[name]) != _normalized(getattr(args, name))]
    if changed:
        log("warning: the resumed run differs from the snapshot's: " + "; ".join(changed))


def _load_scaler_state(scaler, state: dict, log) -> None:
    """The fp16 gradient scale, when both the snapshot's and this run's scalers are enabled (a disabled scaler
    saves ``{}``); otherwise, i.e. ``--amp`` changed from or to fp16, one warning and a fresh scale."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled() or state:
        log("warning: --amp changed to or from fp16 since the snapshot: the gradient scaler starts afresh")


def _snapshot_state(model, optimizer, scaler, iteration: int, args, rng_states: list) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
            "rng": {"world_size": len(rng_states), "ranks": rng_states}, "scaler": scaler.state_dict(),
            "args": dict(vars(args))}


# ------------------------------------------------------------------------------------ the snapshot folder
def _log_on_main(text: str) -> None:
    """One line on stderr, from rank 0 only."""
    if is_main_process():
        print(text, file=sys.stderr, flush=True)


def _on_main_process(action, device: torch.device):
    """``action()`` on rank 0 only; returns its result there (None on the other ranks). If it raised one of
    :data:`FAILURES`, every process raises (rank 0 that error, the others one that points to it), so that no
    process waits forever for rank 0 at the next collective operation."""
    result, error = None, None
    if is_main_process():
        try:
            result = action()
        except FAILURES as caught:
            error = caught
    if all_reduce_sum(torch.tensor([float(error is not None)], device=device)).item():
        raise error or TrainingError("stopped by the main process (rank 0): see its error line")
    return result


def _snapshot_iteration(path: Path) -> int:
    """``CS_scenes_<iter>.pth`` -> iter (-1 if the name holds no number)."""
    number = path.name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)]
    return int(number) if number.isdigit() else -1


def _earlier_run_files(args) -> tuple:
    """(snapshots sorted by iteration, the CSV log or None) that an earlier run left in this run's folders."""
    snapshots = sorted(Path(args.snapshot_dir).glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}"), key=_snapshot_iteration)
    csv_log = Path(args.log_dir) / TrainingLogger.CSV_NAME
    return snapshots, (csv_log if csv_log.is_file() and csv_log.stat().st_size else None)


def _refuse_or_clear_earlier_run(args) -> None:
    """A run without ``--resume`` in folders that hold another run's snapshots or CSV log: refused, or with
    ``--overwrite-snapshots`` those files (and the TensorBoard events) are deleted, so that no folder mixes two runs."""
    snapshots, csv_log = _earlier_run_files(args)
    if not snapshots and csv_log is None:
        return
    if not args.overwrite_snapshots:
        if snapshots:
            raise TrainingError(
                f"--snapshot-dir {args.snapshot_dir} holds another run's snapshots ({len(snapshots)}, the last "
                f"{snapshots[-1]}): pass --resume {snapshots[-1]} to continue that run, or choose another "
                "--snapshot-dir (--overwrite-snapshots deletes them and starts afresh)")
        raise TrainingError(
            f"--log-dir {args.log_dir} holds another run's {csv_log.name}: choose another --snapshot-dir (or "
            "--log-dir), or pass --overwrite-snapshots to delete it and start afresh")
    events = sorted(Path(args.log_dir).glob("events.out.tfevents.*"))
    deleted = [*snapshots, *([csv_log] if csv_log else []), *events]
    for path in deleted:
        path.unlink()
    _log_on_main(f"--overwrite-snapshots: deleted {len(deleted)} files of an earlier run (snapshots "
                 f"{', '.join(path.name for path in snapshots) or 'none'}; its logs)")


def _claim_snapshot_dir(args) -> FolderLock:
    """Lock ``--snapshot-dir`` for this run; then refuse (or clear) another run's files there and remove the
    temporary files of a save that was interrupted. Rank 0 only."""
    try:
        lock = FolderLock(args.snapshot_dir)
    except FolderLockedError as error:
        raise TrainingError(f"--snapshot-dir {args.snapshot_dir} is in use by another training run ({error}): wait "
                            "for it to end, or choose another --snapshot-dir") from None
    except OSError as error:  # not a folder, no permission, a read-only file system
        raise TrainingError(f"--snapshot-dir {args.snapshot_dir}: cannot be written ({error})") from None
    try:
        if args.resume is None:
            _refuse_or_clear_earlier_run(args)
        for path in remove_temporary_files(args.snapshot_dir):
            _log_on_main(f"removed {path}: the temporary file of an interrupted snapshot save")
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def _snapshot_dir_claimed(args, device: torch.device):
    """``with``: ``--snapshot-dir`` locked by rank 0 (see :func:`_claim_snapshot_dir`), every rank told whether
    that worked; released at the end (and by the kernel, if the process dies)."""
    lock = _on_main_process(lambda: _claim_snapshot_dir(args), device)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _save_snapshot(state: dict, path: str, last_snapshot: str | None) -> None:
    """Write ``state`` to ``path`` if all its tensors (weights, buffers, optimizer, scaler) are finite; otherwise, or if
    the file system refuses the write, a :class:`TrainingError` that names the last snapshot written."""
    last = f"Last good snapshot: {last_snapshot or 'none written yet'}"
    non_finite = non_finite_tensors(state)  # every tensor the loaders check: the model, optimizer, scaler
    if non_finite:
        raise TrainingError(f"iteration {state['iteration']}: {len(non_finite)} tensor(s) hold NaN or infinite values "
                            f"(first: {non_finite[0]}); {path} not written, training stopped. {last}")
    try:
        save_checkpoint(state, path)
    except CheckpointError as error:
        raise TrainingError(f"{error}; training stopped at iteration {state['iteration']}. {last}") from error


# ---------------------------------------------------------------------------------------------- the labels
def _label_problems(labels: torch.Tensor, names, args, iteration: int) -> tuple:
    """(whether no pixel of this process's batch is valid, a message for a label id the network cannot predict or
    None). labels (N, H, W) int64 train ids on the CPU, void = ``--ignore-label``."""
    valid = labels != args.ignore_label
    out_of_range = valid & ((labels < 0) | (labels >= args.num_classes))
    message = None
    if out_of_range.any():
        sample = int(out_of_range.flatten(1).any(1).nonzero()[0])
        value = int(labels[sample][out_of_range[sample]][0])
        message = (f"iteration {iteration}: the label of {names[sample]} ({args.data_list}) holds train id {value}, "
                   f"outside 0..{args.num_classes - 1} of --num-classes {args.num_classes} (the void label "
                   f"{args.ignore_label} aside): pass the dataset's number of classes, or fix the label")
    return not bool(valid.any()), message


# ------------------------------------------------------------------------------------------------- training
def train(args) -> torch.nn.Module:
    """Run the training that ``args`` (from :func:`parse_args`) describes; returns this process's trained model.

    Joins the process group that torchrun describes (if any) and leaves it at the end; holds the lock on
    ``--snapshot-dir`` meanwhile."""
    if args.resume is None and args.restore_from and not os.path.isfile(args.restore_from):
        raise TrainingError(f"--restore-from {args.restore_from}: no such file (ImageNet weights: see the README's "
                            "Weights for resnet101-imagenet.pth); pass --restore-from '' to train from scratch")
    with process_group(apply_gpu_choice(args.gpu), args.collective_timeout) as info, \
            _snapshot_dir_claimed(args, info.device):
        return _train(args, info)


def _train(args, info: DistInfo) -> torch.nn.Module:
    rank, world_size, device = info.rank, info.world_size, info.device
    main_process = is_main_process()
    if args.batch_size % world_size:
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes")
    amp_dtype = AMP_DTYPES[args.amp]
    if args.amp == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs a GPU; use --amp bf16 on the CPU")
    if device.type == "cuda":  # fixed crops: every iteration has the shapes cuDNN's autotuning measured first
        torch.backends.cudnn.benchmark = True
    log = _log_on_main

    norm = _norm_kind(args.norm, world_size, device)
    if args.amp == "bf16" and norm.startswith("inplace_abn"):
        raise TrainingError(f"--amp bf16 does not work with norm {norm} (InPlaceABN rejects bfloat16 "
                            "activations): use --norm bn (or syncbn), or --amp fp16 on a GPU")
    channels_last = use_channels_last(args.channels_last, device, norm)
    dataset, sampler, loader, iterations_per_epoch = _make_loader(args, rank, world_size, device)
    model, optimizer = _build(args, norm, device, channels_last, log)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_iteration = 0
    if args.resume is not None:
        checkpoint = load_checkpoint(args.resume)
        if "optimizer" not in checkpoint:
            raise TrainingError(f"--resume {args.resume}: holds no optimizer state (a bare state dict, not a snapshot "
                                f"of train.py): to start from its weights, pass --restore-from {args.resume} instead")
        missing = [key for key in ("model", "iteration", "rng") if key not in checkpoint]
        if missing:
            raise TrainingError(f"--resume {args.resume}: not a snapshot of train.py (no {', '.join(missing)})")
        load_model_weights(model, checkpoint, name=args.resume)
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        _load_scaler_state(scaler, checkpoint.get("scaler") or {}, log)
        start_iteration = int(checkpoint["iteration"])
        _check_resumed_args(checkpoint.get("args", {}), args, log)
        rng = checkpoint["rng"]
        rng_state = saved_rng_state(rng, rank, world_size, f"--resume {args.resume}")
        if rng_state is not None:
            set_rng_state(rng_state, device, f"--resume {args.resume}")
        else:
            log(f"warning: the snapshot was written by {rng['world_size']} processes, this run has {world_size}: "
                "the data order and the random draws differ from an uninterrupted run")
            torch.manual_seed(args.random_seed + start_iteration + rank)
        log(f"resumed from {args.resume} at iteration {start_iteration}")
    else:
        seed_all(args.random_seed + rank)  # dropout draws differ between ranks
    if start_iteration >= args.num_steps:
        raise TrainingError(f"--resume {args.resume} is at iteration {start_iteration}, --num-steps is "
                            f"{args.num_steps}: nothing to do")

    network = model
    if world_size > 1:  # with R = 0 the attention's parameters receive no gradient
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=args.model == "ccnet" and args.recurrence == 0)
    criterion = CriterionDSN(args.ignore_label, ohem=args.ohem, ohem_thresh=args.ohem_thres,
                             ohem_keep=args.ohem_keep)
    forward_and_loss = compile_forward_loss(network, criterion, amp_dtype, args.compile)
    log(f"training {args.model}/{args.backbone} (norm {norm}) on {world_size} process(es), "
        f"{device.type}, {args.batch_size // world_size} images each; {len(dataset)} samples, "
        f"{iterations_per_epoch} iterations per epoch; iterations {start_iteration + 1}..{args.num_steps}")
    log(f"precision {'fp32' if amp_dtype is None else args.amp}, "
        f"{'channels_last' if channels_last else 'NCHW'}, torch.compile {'on' if args.compile else 'off'}, "
        f"{'fused' if optimizer.defaults.get('fused') else 'foreach/for-loop'} SGD"
        + (f", cudnn.benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}" if device.type == "cuda" else ""))
    logger = TrainingLogger(args.log_dir, args.num_steps, start_iteration, enabled=main_process)
    last_snapshot = args.resume  # a checkpoint refuses to load unless finite: a good one
    skipped = []  # the iterations whose global batch had a process's share without a valid label pixel
    network.train()
    batches = _batches(dataset, sampler, loader, start_iteration, iterations_per_epoch)
    try:
        for iteration in range(start_iteration, args.num_steps):
            done = iteration + 1
            images, labels, names = next(batches)
            all_void, bad_label = _label_problems(labels, names, args, done)
            # every process takes the same decision (a process that skipped a step alone would wait forever); a
            # single process keeps the flags on the CPU: no copy to the GPU, no wait for its queued work
            problems = all_reduce_sum(torch.tensor([float(all_void), float(bad_label is not None)],
                                                   device=device if world_size > 1 else "cpu"))
            void_processes, bad_label_processes = (int(count) for count in problems.tolist())
            if bad_label_processes:
                raise TrainingError(bad_label or f"iteration {done}: another process's batch holds a train id "
                                                 f"outside --num-classes {args.num_classes}: see its error line")
            if void_processes:
                skipped.append(done)
                logger.skip(f"iteration {done} skipped: no valid label pixel in the batch of {void_processes} "
                            f"process(es) (every pixel --ignore-label {args.ignore_label})")
            else:
                first_started = time.perf_counter() if iteration == start_iteration else None
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                lr = poly_lr(args.learning_rate, iteration, args.num_steps, args.power)
                set_lr(optimizer, lr)
                loss = forward_and_loss(images, labels)
                # one all-reduce: the mean loss for the log, and whether any rank's loss is not finite
                stats = all_reduce_sum(torch.stack([loss.detach().float(),
                                                    (~torch.isfinite(loss.detach())).float()]))
                mean_loss, bad_ranks = stats[0].item() / world_size, int(stats[1].item())
                if bad_ranks:
                    raise TrainingError(f"non-finite loss at iteration {done} (on {bad_ranks} process(es)); "
                                        f"stopped. Last good snapshot: {last_snapshot or 'none written yet'}")
                optimizer_step(loss, optimizer, scaler)
                if first_started is not None:  # compilation (--compile) and cuDNN's autotuning happen here
                    seconds = time.perf_counter() - first_started
                    logger.message(f"iteration {done} (the first of this run) took {seconds:.1f} s"
                                   + (", torch.compile included" if args.compile else ""))
                logger.log(done, loss=mean_loss, lr=lr)
            if done % args.save_pred_every == 0 or done == args.num_steps:
                rng_states = gather_rng_states(device, world_size)
                path = os.path.join(args.snapshot_dir, SNAPSHOT_PATTERN.format(done))
                state = _snapshot_state(model, optimizer, scaler, done, args, rng_states) if main_process else None
                _on_main_process(lambda: _save_snapshot(state, path, last_snapshot), device)
                logger.message(f"saved {path}")
                last_snapshot = path
    finally:
        batches.close()  # shuts the data-loading workers down now, also when training stopped with an error
        if skipped:
            logger.message(f"{len(skipped)} iteration(s) skipped, their batch without a valid label pixel: "
                           f"{', '.join(map(str, skipped[:10]))}{', ...' if len(skipped) > 10 else ''}")
        logger.close()
    return model


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 training failed (one line on stderr), 2 bad command line."""
    return run_main(argv, parse_args, train, FAILURES)


if __name__ == "__main__":
    sys.exit(main())
