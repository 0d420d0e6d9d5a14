"""Segment arbitrary images with a CCNet snapshot: colour predictions and overlays.

    python predict.py --restore-from snapshots/CS_scenes_60000.pth photo.jpg street/ --output predictions
    python predict.py --restore-from demo_run/cityscapes/snapshots/CS_scenes_300.pth --backbone tiny --whole \\
        demo_data/cityscapes/leftImg8bit/val/demoville

Inputs: image files and/or folders (their images, not recursive), of any size, in any format OpenCV reads (PNG,
JPEG, BMP, TIFF, WebP, ...; grey images are read as colour). For each image ``<stem>``, writes to ``--output``:

* ``<stem>.png``: the prediction as a paletted PNG (pixel = train id, shown in the dataset's colours);
* ``<stem>_overlay.jpg``: the colours blended over the image (``--alpha``).

Inference is evaluate.py's (the dataset's mode by default: Cityscapes sliding ``--input-size`` tiles, ADE20K and LIP
the whole image; ``--whole`` / ``--no-whole``, ``--scales``, ``--flip`` (LIP's left/right classes swapped in the
mirrored prediction); ``--channels-last``, ``--amp``); ``--dataset`` and the model flags default to the snapshot's.

Before the model is built: ``--output`` is a folder whose outputs replace no input image nor the snapshot (by path
or as the same file under another name) nor any file that is not an earlier prediction, and that holds no input
(``utils.outputs``); the tiles fit ``--max-pixels`` (each image's scales are checked before its forward pass).
``--output`` is locked while the run writes there; every file is written whole or not at all, and a write that
fails (a full disk) is one line naming the file.
"""
import os
import sys
from typing import List, Optional, Sequence, Tuple

import cv2
import torch

from dataset.predictions import overlay, save_paletted_png
from dataset.registry import get_dataset
from dataset.segmentation import DataError, read_image_file
from dataset.transforms import image_to_tensor
from engine.inference_model import (add_inference_arguments, add_model_arguments, add_speed_arguments, build_and_load,
                                    check_tile_size, inference_model, load_snapshot, refuse_video_model,
                                    resolve_restore_from)
from utils.checkpoint import CheckpointError
from utils.cli import ArgumentParser, parse_fraction, parse_path, path_problem, run_main
from utils.distributed import apply_gpu_choice
from utils.inference import predict_logits
from utils.outputs import atomic_output, check_encoded, check_output_folder, lock_output_folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def find_images(inputs: Sequence[str]) -> List[str]:
    """The image files named in ``inputs``, folders expanded to their images (sorted); a missing path is an error."""
    images = []
    for path in inputs:
        if os.path.isdir(path):
            try:
                names = os.listdir(path)
            except OSError as error:  # a folder of mode 000
                raise FileNotFoundError(f"cannot list the folder {path}: {error.strerror or error}") from None
            found = sorted(os.path.join(path, name) for name in names
                           if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, name)))
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            images += found
        elif os.path.isfile(path):
            images.append(path)
        else:
            problem = path_problem(path)
            raise FileNotFoundError(f"no such image or folder: {path}" if problem == "no such file" else
                                    f"cannot read the input {path}: {problem}")
    stems = {}
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise ValueError(f"two inputs would write the same outputs '{stem}.png': {stems[stem]} and {path}")
        stems[stem] = path
    return images


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--output", type=parse_path, default="predictions",
                        help="folder for the predictions and overlays (default: predictions/ in the current folder; "
                             "a folder that holds an input image is refused)")
    parser.add_argument("--alpha", type=parse_fraction, default=0.5, help="opacity of the colours in the overlays")
    add_model_arguments(parser)
    add_inference_arguments(parser)
    add_speed_arguments(parser)
    return parser.parse_args(argv)


def output_paths(output: str, image: str) -> Tuple[str, str]:
    """The two files written for ``image``: ``<output>/<stem>.png`` and ``<output>/<stem>_overlay.jpg``."""
    stem = os.path.join(output, os.path.splitext(os.path.basename(image))[0])
    return stem + ".png", stem + "_overlay.jpg"


def run(args) -> None:
    """Segment the images ``args`` (from :func:`parse_args`) name; write the predictions and overlays."""
    resolve_restore_from(args)  # a URL or a name: the downloaded file, which the checks below compare against
    images = find_images(args.inputs)
    written = [path for image in images for path in output_paths(args.output, image)]
    # before any work: outputs never replace inputs
    check_output_folder("--output", args.output, written, images, checkpoints=[args.restore_from])
    checkpoint = load_snapshot(args)  # also resolves the dataset and its defaults
    refuse_video_model(args, "predict.py")
    check_tile_size(args)
    device = torch.device("cuda" if apply_gpu_choice(args.gpu) else "cpu")
    model = inference_model(build_and_load(args, device, checkpoint=checkpoint), args, device)
    spec = get_dataset(args.dataset)
    tile_size = None if args.whole else args.input_size
    lock = lock_output_folder("--output", args.output)
    try:
        for path in images:
            image = read_image_file(path)
            logits = predict_logits(model, image_to_tensor(image).to(device), tile_size, args.scales, args.flip,
                                    args.tile_batch, image_name=path, max_pixels=args.max_pixels,
                                    flip_pairs=spec.flip_pairs)
            train_ids = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
            prediction_path, overlay_path = output_paths(args.output, path)
            save_paletted_png(prediction_path, train_ids, spec.palette)
            with atomic_output(overlay_path) as temporary:
                check_encoded(cv2.imwrite(temporary, overlay(image, train_ids, spec.palette, args.alpha)))
            print(f"{path}: {image.shape[0]}x{image.shape[1]} -> {prediction_path}, {overlay_path}")
    finally:
        lock.release()
    print(f"{len(images)} image(s) segmented into {os.path.abspath(args.output)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 1 the run failed (one line on stderr), 2 bad command line."""
    return run_main(argv, parse_args, run, (CheckpointError, DataError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
