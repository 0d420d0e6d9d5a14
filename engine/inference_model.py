"""A trained snapshot made a ready model, for the tools that run one (evaluate.py, predict.py,
visualize_attention.py, export_onnx.py): their shared flags, the model flags resolved from the snapshot, building
and loading, and how the model runs (:class:`InferenceModel`: memory format and autocast, ``--channels-last`` and
``--amp``).

``--restore-from`` is a file, an ``http(s)://`` or ``file://`` URL, or a name of the weights table
(``utils.weights.WEIGHTS``): each tool's run calls :func:`resolve_restore_from` first, which replaces a URL or a
name by the downloaded file in torch.hub's cache, so that every later use (the output checks, the loader, result.json)
sees the file.

The model flags (``--dataset`` among them) default to None on the command line: :func:`resolve_model_args` fills
them in from the snapshot's saved ``args`` (train.py saves them), else from the table entry's R and classes when
``--restore-from`` named one, else from :data:`MODEL_DEFAULTS` (the original's released snapshots are raw state
dicts); the number of classes defaults to the dataset's, and the inference flags to the dataset's evaluation
defaults (``dataset.spec``).
"""
import argparse
import sys
from typing import List, Optional

import torch
from torch import nn

from dataset.registry import DATASET_NAMES, DEFAULT_DATASET, get_dataset, per_dataset
from dataset.spec import fill_unset
from engine.train_step import AMP_DTYPES, channels_last_input, use_channels_last
from networks import BACKBONES, HEADS, build_model
from utils.checkpoint import load_checkpoint, load_model_weights
from utils.cli import (add_max_pixels_argument, check_pixels, parse_auto_bool, parse_non_negative_int, parse_path,
                       parse_positive_int, parse_scales, parse_size)
from utils.distributed import add_gpu_argument
from utils.weights import published_model_flags, released_snapshot_names, resolve_weights

# The model flags' values when neither the command line nor the snapshot's saved ``args`` give them (None: the
# dataset's number of classes).
MODEL_DEFAULTS = {"dataset": DEFAULT_DATASET, "model": "ccnet", "backbone": "resnet101", "recurrence": 2,
                  "num_classes": None, "clip_length": 1, "frame_stride": 1}


def add_model_arguments(parser: argparse.ArgumentParser, gpu: bool = True) -> None:
    """``--restore-from --dataset --model --backbone --recurrence --num-classes --clip-length --frame-stride`` and
    ``--gpu`` (if ``gpu``)."""
    parser.add_argument("--restore-from", type=parse_path, required=True,
                        help="the snapshot: a file (ours, from train.py, or an original release), an http(s):// or "
                             "file:// URL, or a released snapshot's name (" + released_snapshot_names() + "); URLs "
                             "and names are downloaded once into torch.hub's cache")
    parser.set_defaults(published_flags={}, downloaded=False)  # set by resolve_restore_from
    from_snapshot = "default: the snapshot's (train.py saves its args; a released snapshot's name: its own), else {}"
    parser.add_argument("--dataset", default=None, choices=DATASET_NAMES,
                        help="what the model was trained on (its classes, colours and evaluation defaults); "
                             + from_snapshot.format(MODEL_DEFAULTS["dataset"]))
    parser.add_argument("--model", default=None, choices=HEADS,
                        help="context head; " + from_snapshot.format(MODEL_DEFAULTS["model"]))
    parser.add_argument("--backbone", default=None, choices=tuple(BACKBONES),
                        help="backbone; " + from_snapshot.format(MODEL_DEFAULTS["backbone"]))
    parser.add_argument("--recurrence", type=parse_non_negative_int, default=None,
                        help="R, criss-cross attention loops; " + from_snapshot.format(MODEL_DEFAULTS["recurrence"]))
    parser.add_argument("--num-classes", type=parse_positive_int, default=None,
                        help="classes the model predicts; " + from_snapshot.format("the dataset's"))
    parser.add_argument("--clip-length", type=parse_positive_int, default=None, metavar="T",
                        help="video CCNet: clips of T frames around each labelled frame; "
                             + from_snapshot.format(MODEL_DEFAULTS["clip_length"]))
    parser.add_argument("--frame-stride", type=parse_positive_int, default=None, metavar="S",
                        help="video CCNet: the clip's frames S frames apart; "
                             + from_snapshot.format(MODEL_DEFAULTS["frame_stride"]))
    if gpu:
        add_gpu_argument(parser)


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--input-size --whole/--no-whole --scales --flip --tile-batch --max-pixels`` (see
    ``utils.inference.predict_logits``); the first two default to the dataset's (filled in by
    :func:`load_snapshot`)."""
    tiles = per_dataset(lambda spec: spec.evaluation.input_size)
    parser.add_argument("--input-size", type=parse_size, default=None,
                        help=f"sliding-window tile 'H,W'; default: the dataset's, {tiles}")
    parser.add_argument("--whole", action=argparse.BooleanOptionalAction, default=None,
                        help="predict the whole image at once (no tiles), or (--no-whole) in sliding tiles; "
                             "default: the dataset's: "
                             + per_dataset(lambda spec: "whole image" if spec.evaluation.whole else "tiles"))
    parser.add_argument("--scales", type=parse_scales, default=[1.0],
                        help="image scales to average, e.g. 0.75,1.0,1.25")
    parser.add_argument("--flip", action="store_true", help="also average the left-right mirrored prediction")
    parser.add_argument("--tile-batch", type=parse_positive_int, default=1,
                        help="sliding window: tiles per forward pass (the same logits; faster on a GPU, more memory: "
                             "8 takes a 1024x2048 image's 8 tiles at once)")
    add_max_pixels_argument(parser)


def check_tile_size(args, images_per_pass: int = 1) -> None:
    """Sliding-window inference: ``--input-size`` tiles, ``--tile-batch`` of each of ``images_per_pass`` images per
    forward pass, within ``--max-pixels`` (``ValueError`` otherwise, before the model is built)."""
    if not args.whole:
        height, width = args.input_size
        check_pixels(f"--input-size {height},{width}", height, width, args.max_pixels,
                     args.tile_batch * images_per_pass)


def resolve_restore_from(args) -> None:
    """Make ``args.restore_from`` a local file before anything treats it as a path: a URL or a name of
    ``utils.weights.WEIGHTS`` is downloaded (once; SHA-256 checked where known) and replaced by the file in
    torch.hub's cache; a path stays as it is. Sets ``args.published_flags`` (the R and classes a released
    snapshot's name states: :func:`resolve_model_args`' defaults) and ``args.downloaded``. Raises
    ``CheckpointError`` (one line naming ``--restore-from``) when the download fails."""
    given = args.restore_from
    args.published_flags = published_model_flags(given)
    args.restore_from = resolve_weights(given)
    args.downloaded = args.restore_from != given


def resolve_model_args(args, checkpoint: dict, verbose: bool = True) -> None:
    """Fill in ``args.dataset / model / backbone / recurrence / num_classes`` left None on the command line: from
    the snapshot's saved ``args`` (ours), else the released snapshot's name (``args.published_flags``, from
    :func:`resolve_restore_from`), else :data:`MODEL_DEFAULTS` (original releases: raw state dicts), the number of
    classes else the dataset's. A flag given explicitly wins; if it differs from the snapshot's, one warning line is
    printed (when ``verbose``)."""
    saved = checkpoint.get("args")
    saved = saved if isinstance(saved, dict) else {}
    for name, default in {**MODEL_DEFAULTS, **args.published_flags}.items():
        given, stored = getattr(args, name), saved.get(name)
        if given is None:
            setattr(args, name, default if stored is None else stored)
        elif stored is not None and given != stored and verbose:
            print(f"warning: --{name.replace('_', '-')} {given} differs from the snapshot's {stored} "
                  f"({args.restore_from})", file=sys.stderr)
    if args.num_classes is None:
        args.num_classes = get_dataset(args.dataset).num_classes


def load_snapshot(args, verbose: bool = True) -> dict:
    """Read ``args.restore_from`` (once) and resolve the model flags from it, then fill the flags the dataset has
    evaluation defaults for (``--data-dir --data-list --input-size --whole``, those ``args`` has and left None);
    returns the checkpoint."""
    checkpoint = load_checkpoint(args.restore_from)
    resolve_model_args(args, checkpoint, verbose)
    fill_unset(args, get_dataset(args.dataset).evaluation_args())
    return checkpoint


def refuse_video_model(args, tool: str) -> None:
    """A one-line ``ValueError`` when the snapshot is a video CCNet (``--clip-length`` > 1): ``tool`` runs on single
    images, a video model on clips of a video dataset's frames (evaluate.py reads them)."""
    if args.clip_length > 1:
        raise ValueError(f"{tool} runs on single images; {args.restore_from} is a video CCNet (--clip-length "
                         f"{args.clip_length}): evaluate.py --save-pred writes its predictions of a list's clips")


def build_and_load(args, device: torch.device, verbose: bool = True,
                   checkpoint: Optional[dict] = None) -> torch.nn.Module:
    """The model of ``args`` with all the snapshot's weights (backbone-only ImageNet weights are refused, and so is
    a checkpoint with a NaN or an infinity: ``CheckpointError`` naming the file and a tensor), in eval mode on
    ``device``. ``checkpoint``: the one :func:`load_snapshot` returned (read here if None).

    Batch norm: every kind computes the same function in eval mode, so plain BatchNorm2d is used.
    """
    if checkpoint is None:
        checkpoint = load_snapshot(args, verbose)
    model = build_model(args.model, backbone=args.backbone, num_classes=args.num_classes,
                        recurrence=args.recurrence, norm="bn", clip_length=args.clip_length)
    report = load_model_weights(model, checkpoint, backbone_only=False, name=args.restore_from)
    if verbose:
        print(report.summary())
    return model.to(device).eval()


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--channels-last --amp``: the memory format and precision the model runs in (see :class:`InferenceModel`)."""
    parser.add_argument("--channels-last", type=parse_auto_bool, default=None, metavar="auto|1|0",
                        help="run the model in the channels_last (NHWC) memory format; auto: on for CUDA")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                        help="autocast precision of the forward passes (bf16: the fast one on GPUs with bfloat16 "
                             "tensor cores; fp16: GPU only); the logits are averaged in float32")


class InferenceModel(nn.Module):
    """``model`` (in eval mode) run in the channels_last memory format (``channels_last``: the model is converted
    here, each input at the call) and under autocast (``amp_dtype``, None = float32): ``forward(images)`` ->
    ``[main logits]`` in float32, as ``utils.inference`` expects. ``model`` itself is kept as ``self.model``
    (hooks on its modules see the calls)."""

    def __init__(self, model: nn.Module, channels_last: bool = False, amp_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last = channels_last
        self.amp_dtype = amp_dtype

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        if self.channels_last:
            images = channels_last_input(images)
        with torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.model(images)
        return [output.float() for output in outputs]


def inference_model(model: nn.Module, args, device: torch.device) -> InferenceModel:
    """``model`` as ``--channels-last`` (auto: on for CUDA) and ``--amp`` of ``args`` say it runs. Raises ValueError
    for fp16 on the CPU (one line)."""
    if args.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a GPU; use --amp bf16 on the CPU")
    return InferenceModel(model, use_channels_last(args.channels_last, device), AMP_DTYPES[args.amp]).eval()
