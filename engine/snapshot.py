"""A trained snapshot made a ready model, for the tools that run one (evaluate.py, predict.py,
visualize_attention.py, export_onnx.py): their shared flags, the model flags resolved from the snapshot, building
and loading.

The model flags (``--dataset`` among them) default to None on the command line: :func:`resolve_model_args` fills
them in from the snapshot's saved ``args`` (train.py saves them), else from :data:`MODEL_DEFAULTS` (the original's
released snapshots are raw state dicts); the number of classes defaults to the dataset's, and the inference flags
to the dataset's evaluation defaults (``dataset.spec``).
"""
import argparse
import sys
from typing import Optional

import torch

from dataset.registry import DATASET_NAMES, DEFAULT_DATASET, get_dataset, per_dataset
from dataset.spec import fill_unset
from networks import BACKBONES, HEADS, build_model
from utils.checkpoint import load_checkpoint, load_model_weights
from utils.cli import parse_non_negative_int, parse_positive_int, parse_scales, parse_size
from utils.distributed import add_gpu_argument

# The model flags' values when neither the command line nor the snapshot's saved ``args`` give them (None: the
# dataset's number of classes).
MODEL_DEFAULTS = {"dataset": DEFAULT_DATASET, "model": "ccnet", "backbone": "resnet101", "recurrence": 2,
                  "num_classes": None}


def add_model_arguments(parser: argparse.ArgumentParser, gpu: bool = True) -> None:
    """``--restore-from --dataset --model --backbone --recurrence --num-classes`` and ``--gpu`` (if ``gpu``)."""
    parser.add_argument("--restore-from", required=True, help="snapshot: ours (train.py) or an original release")
    from_snapshot = "default: the snapshot's (train.py saves its args), else {}"
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
    if gpu:
        add_gpu_argument(parser)


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--input-size --whole/--no-whole --scales --flip`` (see ``utils.inference.predict_logits``); the first two
    default to the dataset's (filled in by :func:`load_snapshot`)."""
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


def resolve_model_args(args, checkpoint: dict, verbose: bool = True) -> None:
    """Fill in ``args.dataset / model / backbone / recurrence / num_classes`` left None on the command line: from
    the snapshot's saved ``args`` (ours), else :data:`MODEL_DEFAULTS` (original releases: raw state dicts), the
    number of classes else the dataset's. A flag given explicitly wins; if it differs from the snapshot's, one
    warning line is printed (when ``verbose``)."""
    saved = checkpoint.get("args")
    saved = saved if isinstance(saved, dict) else {}
    for name, default in MODEL_DEFAULTS.items():
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


def build_and_load(args, device: torch.device, verbose: bool = True,
                   checkpoint: Optional[dict] = None) -> torch.nn.Module:
    """The model of ``args`` with all the snapshot's weights (backbone-only ImageNet weights are refused), in eval
    mode on ``device``. ``checkpoint``: the one :func:`load_snapshot` returned (read here if None).

    Batch norm: every kind computes the same function in eval mode, so plain BatchNorm2d is used.
    """
    if checkpoint is None:
        checkpoint = load_snapshot(args, verbose)
    model = build_model(args.model, backbone=args.backbone, num_classes=args.num_classes,
                        recurrence=args.recurrence, norm="bn")
    report = load_model_weights(model, checkpoint, backbone_only=False, name=args.restore_from)
    if verbose:
        print(report.summary())
    return model.to(device).eval()
