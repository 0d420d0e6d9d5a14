"""Train CCNet on Cityscapes or ADE20K (one process, or several through torchrun / DistributedDataParallel).

    python train.py --data-dir cityscapes --random-mirror --random-scale                    # one GPU (or CPU)
    torchrun --nproc_per_node=4 train.py --data-dir cityscapes --random-mirror --random-scale  # 4 GPUs
    torchrun --nproc_per_node=4 train.py --dataset ade20k --random-mirror --random-scale       # ADE20K

The defaults are the dataset's (``dataset/cityscapes.py``, ``dataset/ade20k.py``); for Cityscapes the paper's run:
batch 8 (global, split over the processes), 769x769 crops, SGD lr 1e-2, momentum 0.9, weight decay 1e-4, poly 0.9,
60000 iterations, R=2; for ADE20K mmsegmentation's CCNet recipe (batch 16, 512x512 crops, weight decay 5e-4,
80000 iterations). Snapshots ``CS_scenes_<iter>.pth`` go to
``--snapshot-dir`` every ``--save-pred-every`` iterations and at the end; ``--resume`` continues one exactly
(same batches, same random draws). ``--val-every N`` scores the model on ``--val-list`` every N iterations and at
the end (as evaluate.py does: the dataset's sliding tiles or whole image), logs the scores and keeps the best
snapshot as ``CS_scenes_best.pth``. Rank 0 alone logs (progress bar, TensorBoard, CSV) and writes; it holds locks on
``--snapshot-dir`` and ``--log-dir`` for the whole run, and writes a snapshot only when every weight, buffer and
optimizer tensor is finite (the run's life cycle: ``engine/training_run.py``).
"""
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from dataset.registry import DATASET_NAMES, DEFAULT_DATASET, get_dataset, per_dataset
from dataset.spec import fill_unset
from engine.train_step import (AMP_DTYPES, channels_last_input, compile_forward_loss, fused_sgd_available, make_sgd,
                               optimizer_step, use_channels_last)
from engine.training_data import TrainingBatches
from engine.training_run import (FAILURES, TrainingError, best_snapshot_path, log_on_main, mean_loss_terms,
                                 on_main_process, resume_or_start, run_folders_claimed, save_snapshot, snapshot_path,
                                 snapshot_state, void_batch_processes)
from engine.validation import VALIDATION_SCORES, Validation
from libs.norm import NORM_KINDS, resolve_norm_kind
from networks import BACKBONES, HEADS, build_model
from utils.checkpoint import load_model_weights
from utils.cli import (ArgumentParser, add_max_pixels_argument, parse_auto_bool, parse_bool, parse_fraction,
                       parse_non_negative_float, parse_non_negative_int, parse_numbers, parse_path,
                       parse_positive_float, parse_positive_int, parse_size, run_main)
from utils.distributed import (DistInfo, add_collective_timeout_argument, add_gpu_argument, apply_gpu_choice,
                               is_main_process, process_group)
from utils.logger import TrainingLogger
from utils.loss import CategoryConsistentLoss, CriterionDSN
from utils.rng import gather_rng_states
from utils.schedule import poly_lr, set_lr
from utils.weights import resolve_weights


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
    data.add_argument("--clip-length", type=parse_positive_int, default=1, metavar="T",
                      help="video: train on clips of T (odd) frames around each labelled frame with the 3-D "
                           "criss-cross attention head (a video dataset: camvid); 1: the image CCNet")
    data.add_argument("--frame-stride", type=parse_positive_int, default=1, metavar="S",
                      help="video: the clip's frames are S frames apart")
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
                       help="normalization: auto = BatchNorm (SyncBatchNorm across GPU processes; on the CPU "
                            "per-process BatchNorm); InPlaceABN on request (--norm inplace_abn, inplace_abn_sync)")
    model.add_argument("--restore-from", default="./dataset/resnet101-imagenet.pth",
                       help="the initial weights: a file, an http(s):// or file:// URL, or a name of the weights "
                            "table (resnet101-imagenet: the ImageNet backbone; a released snapshot's name); URLs and "
                            "names are downloaded once into torch.hub's cache (the README's Weights); a missing file "
                            "is an error; '' trains from scratch")

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

    ccl = parser.add_argument_group("category consistent loss (the TPAMI version's; docs/training.md)")
    ccl.add_argument("--ccl", type=parse_bool, default=False, metavar="0|1",
                     help="add the category consistent loss of a 1x1 projection of the context head's output "
                          "(0: the ICCV recipe)")
    ccl.add_argument("--ccl-dim", type=parse_positive_int, default=16, help="CCL: the embedding's channels")
    ccl.add_argument("--ccl-margins", type=parse_numbers(2), default=(0.5, 1.5), metavar="DELTA_V,DELTA_D",
                     help="CCL: the variance and distance margins, 0 <= delta_v < delta_d")
    ccl.add_argument("--ccl-weights", type=parse_numbers(3), default=(1.0, 1.0, 0.001), metavar="ALPHA,BETA,GAMMA",
                     help="CCL: the weights of the variance, distance and regularization terms")

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
    run.add_argument("--val-every", type=parse_non_negative_int, default=0, metavar="N",
                     help="score the model on --val-list every N iterations and at the end (as evaluate.py does: "
                          "the dataset's sliding tiles or whole image), log val mIoU, pixel and mean accuracy, and "
                          "keep the best snapshot as CS_scenes_best.pth; 0: no validation")
    run.add_argument("--val-list", default=None,
                     help="--val-every's list file of '<image>\\t<label>' lines (paths relative to --data-dir); "
                          "default: dataset/list/<dataset>/val.lst")
    run.add_argument("--log-dir", type=parse_path, default=None,
                     help="TensorBoard events and train_log.csv (default: <snapshot-dir>/logs); locked with "
                          "--snapshot-dir while the run lasts")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    fill_unset(args, get_dataset(args.dataset).training_args())
    parser.check_pixels(f"--input-size {args.input_size[0]},{args.input_size[1]}", args.input_size, args.max_pixels)
    if 0 <= args.ignore_label < args.num_classes:
        parser.error(f"--ignore-label {args.ignore_label} is a class id (0..{args.num_classes - 1}): pick a value "
                     "outside, e.g. 255 or -1")
    if not args.ccl_margins[0] < args.ccl_margins[1]:
        parser.error(f"--ccl-margins {','.join(map(str, args.ccl_margins))}: delta_v must be below delta_d")
    if args.val_list is not None and not args.val_every:
        parser.error(f"--val-list {args.val_list} without --val-every: pass --val-every N to validate")
    if args.val_every and args.val_list is None:
        args.val_list = get_dataset(args.dataset).list_path("val")
    if args.log_dir is None:
        args.log_dir = os.path.join(args.snapshot_dir, "logs")
    return args


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
    model = build_model(args.model, args.backbone, args.num_classes, args.recurrence, norm,
                        embedding_dim=args.ccl_dim if args.ccl else 0, clip_length=args.clip_length)
    if args.resume is None and args.restore_from:
        log(load_model_weights(model, args.restore_from).summary())
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_sgd(model.parameters(), args.learning_rate, args.momentum, args.weight_decay,
                         fused=fused_sgd_available(device))
    return model, optimizer


# ------------------------------------------------------------------------------------------------- training
def train(args) -> torch.nn.Module:
    """Run the training that ``args`` (from :func:`parse_args`) describes; returns this process's trained model.

    Joins the process group that torchrun describes (if any) and leaves it at the end; holds the run's folders
    meanwhile (``engine.training_run``: locks, refusals, resume, the finite save)."""
    if args.resume is None:  # a URL or a name: the downloaded file (every process; downloads are atomic)
        args.restore_from = resolve_weights(args.restore_from)
    if args.resume is None and args.restore_from and not os.path.isfile(args.restore_from):
        raise TrainingError(f"--restore-from {args.restore_from}: no such file (ImageNet weights: see the README's "
                            "Weights for resnet101-imagenet.pth); pass --restore-from '' to train from scratch")
    with process_group(apply_gpu_choice(args.gpu), args.collective_timeout) as info, \
            run_folders_claimed(args, info.device) as folders:
        return _train(args, info, folders.run_id if folders is not None else None)


def _train(args, info: DistInfo, run_id) -> torch.nn.Module:
    rank, world_size, device = info.rank, info.world_size, info.device
    if args.batch_size % world_size:
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes")
    amp_dtype = AMP_DTYPES[args.amp]
    if args.amp == "fp16" and device.type != "cuda":
        raise TrainingError("--amp fp16 needs a GPU; use --amp bf16 on the CPU")
    if device.type == "cuda":  # fixed crops: every iteration has the shapes cuDNN's autotuning measured first
        torch.backends.cudnn.benchmark = True
    log = log_on_main

    norm = _norm_kind(args.norm, world_size, device)
    if args.amp == "bf16" and norm.startswith("inplace_abn"):
        raise TrainingError(f"--amp bf16 does not work with norm {norm} (InPlaceABN rejects bfloat16 "
                            "activations): use --norm bn (or syncbn), or --amp fp16 on a GPU")
    channels_last = use_channels_last(args.channels_last, device, norm)
    data = TrainingBatches(args, rank, world_size, device)
    validation = Validation(args, device, channels_last, amp_dtype) if args.val_every else None
    model, optimizer = _build(args, norm, device, channels_last, log)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_iteration = resume_or_start(args, model, optimizer, scaler, rank, world_size, device, log, validation)

    network = model
    if world_size > 1:  # with R = 0 the attention's parameters receive no gradient
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=args.model == "ccnet" and args.recurrence == 0)
    ccl = (CategoryConsistentLoss(*args.ccl_margins, *args.ccl_weights, ignore_index=args.ignore_label)
           if args.ccl else None)
    criterion = CriterionDSN(args.ignore_label, ohem=args.ohem, ohem_thresh=args.ohem_thres,
                             ohem_keep=args.ohem_keep, ccl=ccl)
    forward_and_loss = compile_forward_loss(network, criterion, amp_dtype, args.compile, with_terms=True)
    log(f"training {args.model}/{args.backbone} (norm {norm}) on {world_size} process(es), "
        f"{device.type}, {args.batch_size // world_size} images each; {len(data)} samples, "
        f"{data.iterations_per_epoch} iterations per epoch; iterations {start_iteration + 1}..{args.num_steps}")
    log(f"precision {'fp32' if amp_dtype is None else args.amp}, "
        f"{'channels_last' if channels_last else 'NCHW'}, torch.compile {'on' if args.compile else 'off'}, "
        f"{'fused' if optimizer.defaults.get('fused') else 'foreach/for-loop'} SGD"
        + (f", cudnn.benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}" if device.type == "cuda" else ""))
    if validation is not None:
        log(validation.describe() + (f"; best so far: mIoU {100 * validation.best_miou:.2f} % at iteration "
                                     f"{validation.best_iteration}" if validation.best_miou is not None else ""))
    logger = TrainingLogger(args.log_dir, args.num_steps, start_iteration, enabled=is_main_process(),
                            validation_names=VALIDATION_SCORES if validation is not None else ())
    last_snapshot = args.resume  # a checkpoint refuses to load unless finite: a good one

    def save(path: str, done: int) -> None:
        """Write the snapshot of iteration ``done`` to ``path`` (rank 0; a collective)."""
        rng_states = gather_rng_states(device, world_size)
        state = (snapshot_state(model, optimizer, scaler, done, args, run_id, rng_states,
                                validation.state_dict() if validation is not None else None)
                 if is_main_process() else None)
        on_main_process(lambda: save_snapshot(state, path, last_snapshot), device)
        logger.message(f"saved {path}")

    def validate(done: int) -> dict:
        """Score the model after ``done`` steps, log it, and save it as the best snapshot if it is."""
        started = time.perf_counter()
        scores = validation.run(model, rank, world_size)
        best = validation.improves(scores["miou"])
        logger.message(f"iteration {done}: val mIoU {100 * scores['miou']:.2f} %, pixel accuracy "
                       f"{100 * scores['pixel_acc']:.2f} %, mean accuracy {100 * scores['mean_acc']:.2f} % "
                       f"({time.perf_counter() - started:.1f} s)" + (", the best so far" if best else ""))
        if best:
            validation.record_best(scores["miou"], done)
            save(best_snapshot_path(args.snapshot_dir), done)
        return scores

    skipped = []  # the iterations whose global batch had a process's share without a valid label pixel
    network.train()
    batches = data.iterate(start_iteration)
    try:
        for iteration in range(start_iteration, args.num_steps):
            done = iteration + 1
            images, labels, names = next(batches)
            void_processes = void_batch_processes(labels, names, args, done, world_size, device)
            if void_processes:
                skipped.append(done)
            else:
                first_started = time.perf_counter() if iteration == start_iteration else None
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = channels_last_input(images)
                labels = labels.to(device, non_blocking=True)
                lr = poly_lr(args.learning_rate, iteration, args.num_steps, args.power)
                set_lr(optimizer, lr)
                loss, terms = forward_and_loss(images, labels)
                mean_loss, mean_terms, bad_ranks = mean_loss_terms(loss, terms, world_size)
                if bad_ranks:
                    raise TrainingError(f"non-finite loss at iteration {done} (on {bad_ranks} process(es)); "
                                        f"stopped. Last good snapshot: {last_snapshot or 'none written yet'}")
                optimizer_step(loss, optimizer, scaler)
                if first_started is not None:  # compilation (--compile) and cuDNN's autotuning happen here
                    seconds = time.perf_counter() - first_started
                    logger.message(f"iteration {done} (the first of this run) took {seconds:.1f} s"
                                   + (", torch.compile included" if args.compile else ""))
            scores = validate(done) if validation is not None and validation.due(done, args.num_steps) else None
            if void_processes:
                logger.skip(f"iteration {done} skipped: no valid label pixel in the batch of {void_processes} "
                            f"process(es) (every pixel --ignore-label {args.ignore_label})", done, scores)
            else:
                logger.log(done, loss=mean_loss, lr=lr, terms=mean_terms, validation=scores)
            if done % args.save_pred_every == 0 or done == args.num_steps:
                path = snapshot_path(args.snapshot_dir, done)
                save(path, done)
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
