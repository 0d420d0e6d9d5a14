"""The paper's attention figure: where a chosen point gathers its context from, after R=1 and R=2 loops.

    python visualize_attention.py --restore-from snapshots/CS_scenes_60000.pth IMAGE --point 400,1000
    python visualize_attention.py --restore-from demo_run/cityscapes/snapshots/CS_scenes_300.pth --backbone tiny \\
        demo_data/cityscapes/leftImg8bit/val/demoville/demoville_000001_000000_leftImg8bit.png --point 90,128 --point 30,60

One loop of criss-cross attention lets the pixel ``p`` aggregate the pixels ``u`` on its row and column with
weights ``A1[p, u]`` (a softmax: they sum to 1). The second loop, with the same module, aggregates the first
loop's outputs along the cross of ``p`` again, so the weight of ``u`` after two loops is
``sum_z A2[p, z] * A1[z, u]``: two criss-cross hops, which reach every pixel of the image. This script runs the
network once on the whole image, captures the input of every loop of ``model.head.cca`` (a forward pre-hook),
recomputes each loop's attention ``A_r = softmax(ca_weight(q, k))`` with the reference functions of
``cc_attention``, and composes the hops with the transpose of ``ca_map`` (its vector-Jacobian product).

Output (default: ``attention/<stem>_attention.png`` in the current folder -- never the image's own folder, so
that a later ``predict.py`` on that folder does not segment the figure): one row per ``--point``: the image with
the point and the prediction, then the map after each loop (R = 1, 2, ...), each divided by its maximum and shown on a
square-root colour scale (so that the small two-hop weights far from the point stay visible).
"""
import os
import sys
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from cc_attention.reference import ca_map_reference, ca_weight_reference
from dataset.predictions import overlay
from dataset.registry import get_dataset
from dataset.segmentation import DataError, read_image_file
from dataset.transforms import image_to_tensor
from engine.inference_model import (add_model_arguments, add_speed_arguments, build_and_load, inference_model,
                                    load_snapshot, refuse_video_model, resolve_restore_from)
from utils.checkpoint import CheckpointError
from utils.cli import ArgumentParser, add_max_pixels_argument, parse_path, parse_point, parse_positive_float, run_main
from utils.distributed import apply_gpu_choice
from utils.inference import check_scales
from utils.logits import upsample_logits
from utils.outputs import atomic_output, check_encoded, check_output_file, check_output_folder

FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_OUTPUT_FOLDER = "attention"  # in the current folder
# --max-pixels: each loop's attention holds (h + w - 1) * h * w weights at 1/8 of the image's size, so the image
# is held to 16 M pixels (4096 x 4096: 1 GiB of attention per loop), less than a plain forward pass
MAX_PIXELS = 2 ** 24


def capture_attention(model, images: torch.Tensor, runner=None) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Run ``model`` (or ``runner``, e.g. an ``engine.inference_model.InferenceModel`` of it) on ``(1, 3, H, W)`` images;
    returns the attention of every criss-cross loop, each ``(1, h+w-1, h, w)`` (softmax over dim 1, recomputed in
    float32), and the main logits ``(1, K, h, w)``."""
    cca = model.head.cca
    inputs = []
    hook = cca.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().float()))
    try:
        with torch.no_grad():
            logits = (runner or model)(images)[0]
            attentions = [torch.softmax(ca_weight_reference(cca.query_conv(x), cca.key_conv(x)), dim=1) for x in inputs]
    finally:
        hook.remove()
    return attentions, logits


def spread_back(attention: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The transpose of one criss-cross aggregation: ``out[u] = sum_p weights[p] * attention[p -> u]``.

    ``attention`` ``(1, h+w-1, h, w)``, ``weights`` ``(1, 1, h, w)`` -> ``(1, 1, h, w)``.
    """
    with torch.enable_grad():
        values = torch.zeros_like(weights, requires_grad=True)
        aggregated = ca_map_reference(attention, values)
        (gradient,) = torch.autograd.grad(aggregated, values, grad_outputs=weights)
    return gradient


def context_maps(attentions: Sequence[torch.Tensor], point: Tuple[int, int]) -> List[torch.Tensor]:
    """For the feature-map pixel ``point = (y, x)``: after ``r`` loops (r = 1 .. R), the weight with which every
    pixel ``u`` reaches ``point`` through the attention, ``(A_r ... A_1)[point, u]``. Returns R maps ``(h, w)``,
    each summing to 1."""
    height, width = attentions[0].shape[-2:]
    maps = []
    for loops in range(1, len(attentions) + 1):
        weights = attentions[0].new_zeros(1, 1, height, width)
        weights[0, 0, point[0], point[1]] = 1.0
        for attention in reversed(attentions[:loops]):
            weights = spread_back(attention, weights)
        maps.append(weights[0, 0])
    return maps


def feature_point(point: Tuple[int, int], image_size: Tuple[int, int], feature_size: Tuple[int, int]):
    """Image pixel ``(y, x)`` -> nearest feature-map pixel under the corner-aligned mapping of the upsampling."""
    return tuple(int(round(p * (f - 1) / max(s - 1, 1))) for p, s, f in zip(point, image_size, feature_size))


def _heatmap(image_bgr: np.ndarray, weights: torch.Tensor, label: str) -> np.ndarray:
    height, width = image_bgr.shape[:2]
    normalized = (weights / weights.max().clamp(min=1e-12)).sqrt().cpu().numpy().astype(np.float32)
    resized = cv2.resize(normalized, (width, height), interpolation=cv2.INTER_NEAREST)
    colours = cv2.applyColorMap((255 * resized).astype(np.uint8), cv2.COLORMAP_JET)
    panel = cv2.addWeighted(image_bgr, 0.4, colours, 0.6, 0)
    return _caption(panel, label)


def _caption(panel: np.ndarray, text: str) -> np.ndarray:
    scale = max(0.4, panel.shape[0] / 400)
    cv2.putText(panel, text, (5, int(20 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)
    cv2.putText(panel, text, (5, int(20 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def _mark(panel: np.ndarray, point: Tuple[int, int]) -> np.ndarray:
    radius = max(3, panel.shape[0] // 60)
    cv2.circle(panel, (point[1], point[0]), radius, (255, 255, 255), -1)
    cv2.circle(panel, (point[1], point[0]), radius, (0, 0, 0), max(1, radius // 3))
    return panel


def render(image_bgr: np.ndarray, train_ids: np.ndarray, palette: np.ndarray, point: Tuple[int, int],
           maps: Sequence[torch.Tensor]):
    """One row: the prediction overlay (in the ``palette``'s colours) with the point, then one heatmap per loop
    count."""
    panels = [_caption(_mark(overlay(image_bgr, train_ids, palette), point), f"point (y={point[0]}, x={point[1]})")]
    panels += [_mark(_heatmap(image_bgr, weights, f"R={r}"), point) for r, weights in enumerate(maps, start=1)]
    return np.concatenate(panels, axis=1)


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("image", help="image file (any size and common format)")
    parser.add_argument("--point", type=parse_point, action="append", required=True,
                        help="'y,x' pixel of the image (after --scale); repeat for several rows")
    parser.add_argument("--scale", type=parse_positive_float, default=1.0,
                        help="resize the image first (e.g. 0.5 on a CPU)")
    parser.add_argument("--output", type=parse_path, default=None,
                        help=f"PNG (or JPEG) to write (default: {DEFAULT_OUTPUT_FOLDER}/<stem>_attention.png in "
                             "the current folder; a folder that holds the image is refused)")
    add_max_pixels_argument(parser, default=MAX_PIXELS)
    add_model_arguments(parser)
    add_speed_arguments(parser)
    return parser.parse_args(argv)


def check_model_args(args) -> None:
    """After the model flags are resolved (command line, else the snapshot): only an RCCA head with R >= 1 has
    attention to show. Raises ValueError (one line)."""
    if args.model != "ccnet":
        raise ValueError(f"--model is {args.model}: only the ccnet (RCCA) head has criss-cross attention to show")
    if args.recurrence < 1:
        raise ValueError(f"--recurrence is {args.recurrence}: with R=0 there is no attention to show (use R >= 1)")


def run(args) -> None:
    """Draw the attention figure ``args`` (from :func:`parse_args`) describe."""
    resolve_restore_from(args)  # a URL or a name: the downloaded file, which the output check compares against
    if args.output is None:
        stem = os.path.splitext(os.path.basename(args.image))[0]
        output = os.path.join(DEFAULT_OUTPUT_FOLDER, f"{stem}_attention.png")
        check_output_folder("--output", DEFAULT_OUTPUT_FOLDER, [output], [args.image], checkpoints=[args.restore_from])
    else:
        output = args.output
        check_output_file("--output", output, [args.image], FIGURE_SUFFIXES, checkpoints=[args.restore_from])
    image = read_image_file(args.image)
    check_scales(image.shape[:2], [args.scale], args.image, flag="--scale", max_pixels=args.max_pixels)
    if args.scale != 1.0:
        image = cv2.resize(image, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_LINEAR)
    height, width = image.shape[:2]
    for y, x in args.point:
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"--point {y},{x} lies outside the {height}x{width} image")
    checkpoint = load_snapshot(args)
    refuse_video_model(args, "visualize_attention.py")
    check_model_args(args)
    device = torch.device("cuda" if apply_gpu_choice(args.gpu) else "cpu")
    model = build_and_load(args, device, checkpoint=checkpoint)
    runner = inference_model(model, args, device)
    attentions, logits = capture_attention(model, image_to_tensor(image).to(device), runner)
    train_ids = upsample_logits(logits, (height, width)).argmax(1)[0].to(torch.uint8).cpu().numpy()
    rows = []
    for point in args.point:
        maps = context_maps(attentions, feature_point(point, (height, width), logits.shape[-2:]))
        rows.append(render(image, train_ids, get_dataset(args.dataset).palette, point, maps))
    with atomic_output(output) as temporary:
        check_encoded(cv2.imwrite(temporary, np.concatenate(rows, axis=0)))
    print(f"attention of {len(args.point)} point(s) after R = 1..{len(attentions)} loops: {output}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 1 the run failed (one line on stderr), 2 bad command line."""
    return run_main(argv, parse_args, run, (CheckpointError, DataError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
