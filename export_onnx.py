"""Export a CCNet snapshot to ONNX and check the file against PyTorch with onnxruntime.

    python export_onnx.py --restore-from snapshots/CS_scenes_60000.pth --output ccnet.onnx
    python export_onnx.py --restore-from ade_run/CS_scenes_80000.pth --output ccnet_ade.onnx --skip-check

Any backbone, head and R; the model flags (``--dataset --model --backbone --recurrence --num-classes``) default to
the snapshot's, as in evaluate.py. The file (``engine.onnx_export``): opset 18, the weights inside, input ``image``
``(N, 3, H, W)`` float32 (BGR minus the mean, ``dataset.transforms``), output ``logits`` ``(N, K, H, W)`` (the main
head's, upsampled to the input's size: argmax over K gives the train ids); the batch, height and width are dynamic
(the script says so, or which dimension was fixed to ``--input-size``). Its metadata name the dataset, the classes
and the input's preprocessing.

The check (unless ``--skip-check``) runs PyTorch and onnxruntime on random images of two sizes, ``--input-size`` at
batch 1 and a smaller odd size at batch 2, and fails when the logits differ by more than 1 % of their largest
magnitude (float32 rounding differs between the runtimes: a ResNet-101 shows about 0.1 %, as PyTorch's own float32
against float64 does; an export that computes something else is off by far more). Needs ``onnx`` and
``onnxscript`` (and ``onnxruntime`` for the check): requirements-dev.txt.
"""
import json
import os
import sys
from typing import Optional, Sequence

import torch

from dataset.registry import get_dataset, per_dataset
from dataset.transforms import IMG_MEAN_BGR
from engine.onnx_export import (INPUT_NAME, OPSET, OUTPUT_NAME, ExportError, compare_with_onnxruntime,
                                export_onnx)
from engine.inference_model import (add_model_arguments, build_and_load, load_snapshot, refuse_video_model,
                                    resolve_restore_from)
from utils.checkpoint import CheckpointError
from utils.cli import ArgumentParser, add_max_pixels_argument, check_pixels, parse_path, parse_size, run_main
from utils.outputs import atomic_output, check_output_file

RELATIVE_TOLERANCE = 1e-2  # of the largest |logit|: the check's limit for float32 on another runtime


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=parse_path, required=True,
                        help="the .onnx file to write (another kind of file is never replaced)")
    parser.add_argument("--input-size", type=parse_size, default=None, metavar="H,W",
                        help="size of the example input, and of any dimension that cannot stay dynamic; default: "
                             "the dataset's evaluation tile, " + per_dataset(lambda spec: spec.evaluation.input_size))
    add_max_pixels_argument(parser)
    parser.add_argument("--skip-check", action="store_true", help="do not run the file with onnxruntime")
    add_model_arguments(parser, gpu=False)
    return parser.parse_args(argv)


def check_shapes(input_size, dynamic: dict) -> list:
    """The two image batches of the check: ``input_size`` at batch 1, then (for dynamic dimensions) about 3/4 of
    it, odd, at batch 2."""
    height, width = input_size
    smaller = [(size * 3 // 4) | 1 if dynamic[name] else size for size, name in ((height, "height"), (width, "width"))]
    return [(1, 3, height, width), (2 if dynamic["batch"] else 1, 3, *smaller)]


def run(args) -> None:
    """Export the snapshot ``args`` (from :func:`parse_args`) name; check the file unless told not to."""
    resolve_restore_from(args)  # a URL or a name: the downloaded file, which the output check compares against
    check_output_file("--output", args.output, [], (".onnx",), checkpoints=[args.restore_from])
    checkpoint = load_snapshot(args)  # the model flags, the dataset, and the input size's default
    refuse_video_model(args, "export_onnx.py")
    check_pixels(f"--input-size {args.input_size[0]},{args.input_size[1]}", *args.input_size, args.max_pixels)
    model = build_and_load(args, torch.device("cpu"), checkpoint=checkpoint)
    spec = get_dataset(args.dataset)
    classes = spec.class_names if args.num_classes == spec.num_classes else [str(k) for k in range(args.num_classes)]
    metadata = {
        "dataset": args.dataset, "classes": json.dumps(list(classes)),
        "network": f"{args.model}, {args.backbone} backbone, R={args.recurrence}",
        "snapshot": os.path.basename(args.restore_from),
        INPUT_NAME: "(N, 3, H, W) float32: the image in BGR order minus the per-channel mean "
                    f"({', '.join(f'{value:.3f}' for value in IMG_MEAN_BGR)}), not scaled",
        OUTPUT_NAME: "(N, K, H, W) float32: the main head's logits, upsampled to the input size (corners aligned); "
                     "argmax over K gives the class",
    }
    with atomic_output(args.output) as temporary:  # written whole or not at all
        dynamic = export_onnx(model, temporary, args.input_size, metadata)
    fixed = [name for name, is_dynamic in dynamic.items() if not is_dynamic]
    print(f"{args.output}: ONNX opset {OPSET}, {os.path.getsize(args.output) / 2 ** 20:.1f} MiB; "
          + ("batch, height and width dynamic" if not fixed else
             f"fixed to the example input's (2x3x{args.input_size[0]}x{args.input_size[1]}): {', '.join(fixed)}"))
    if args.skip_check:
        return
    for result in compare_with_onnxruntime(model, args.output, check_shapes(args.input_size, dynamic)):
        shape = "x".join(map(str, result.shape))
        print(f"onnxruntime check, input {shape}: max |logit difference| {result.max_difference:.2e} (largest "
              f"|logit| {result.max_logit:.2f}); same class at {100 * result.same_class:.2f} % of the pixels")
        if result.max_difference > RELATIVE_TOLERANCE * max(result.max_logit, 1.0):
            raise ExportError(f"onnxruntime's logits differ from PyTorch's by {result.max_difference:.3g} at input "
                              f"{shape}: more than {RELATIVE_TOLERANCE:g} of the largest logit")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 1 the export or its check failed (one line on stderr), 2 bad command line."""
    return run_main(argv, parse_args, run, (CheckpointError, ExportError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
