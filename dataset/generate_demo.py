"""Generate a small dataset of synthetic street scenes in the Cityscapes or the ADE20K format, of synthetic people in
the LIP format, or street videos in the CamVid format, for the demo and the tests.

    python -m dataset.generate_demo OUT_DIR [--dataset cityscapes|ade20k|lip|camvid] [--num-train 24 --num-val 8
                                            --height 128 --width 256 --seed 0]

Cityscapes (the default) writes ``OUT_DIR/leftImg8bit/{train,val}/demoville/*_leftImg8bit.png`` and
``OUT_DIR/gtFine/{train,val}/demoville/*_gtFine_labelIds.png`` (real Cityscapes label ids); ADE20K writes
``OUT_DIR/images/{training,validation}/ADE_{train,val}_<8 digits>.jpg`` and ``OUT_DIR/annotations/.../*.png``
(ADE20K's values: 1..150 for the classes, 0 for void). Both write the list files ``OUT_DIR/{train,val}.lst``
(what ``python -m dataset.make_lists OUT_DIR --dataset ...`` writes too). The two formats draw the same scenes.

Each scene has sky (gradient, clouds), buildings (facades with window grids), vegetation (noisy green tree
crowns), road (dark asphalt, dashed lane marks), cars (coloured bodies, dark windows, wheels) and people (head,
torso, legs), each class with its own colour, texture and shape, so a small network learns them in minutes;
the bottom rows are an "ego vehicle" bonnet (label id 1; void in both formats, ignored in training).

LIP writes ``OUT_DIR/TrainVal_images/{train,val}_images/<stem>.jpg`` and
``OUT_DIR/TrainVal_parsing_annotations/{train,val}_segmentations/<stem>.png`` (LIP's class ids) and the two lists:
one standing figure per image (hair, face, upper clothes, pants, arms, legs, shoes) on a textured background. The
figure is symmetric: its two arms (legs, shoes) have the same shape, colour and texture, and only their side tells
the left one (class 14, 16, 18: the one further left in the image) from the right one (15, 17, 19), so a network
trained with mirrored crops tells them apart only if the mirror swaps their labels (``DatasetSpec.flip_pairs``).

CamVid (``--dataset camvid``) writes video in SegNet's CamVid layout: sequences of such streets in which every car
and person moves sideways at its own speed, their labelled frames in ``OUT_DIR/{train,val}/`` (names in CamVid's two
styles, ``0000DM_000004.png`` and ``Seq01DM_f00004.png``), the annotations in ``OUT_DIR/{train,val}annot/`` (CamVid's
values: 0..10, 11 void) and every frame of each sequence in ``OUT_DIR/frames/<sequence>/``, what the video network's
clips read (``dataset.clips``).

Same seed -> same files.
"""
import os
import sys
from typing import Callable, Dict, NamedTuple, Tuple

import cv2
import numpy as np

from dataset.ade20k import ADE20K, SPLIT_FOLDERS
from dataset.camvid import CAMVID
from dataset.camvid import VOID as CAMVID_VOID
from dataset.lip import IMAGE_FOLDER, LABEL_FOLDER, LIP
from dataset.registry import DEFAULT_DATASET
from utils.cli import EXIT_OK, ArgumentParser, parse_non_negative_int

MIN_SIZE = 32  # pixels, the smallest height and width a scene is drawn at
# Cityscapes label ids (see dataset.labels): what the *_gtFine_labelIds.png files hold.
EGO_VEHICLE, ROAD, BUILDING, VEGETATION, SKY, PERSON, CAR = 1, 7, 11, 21, 23, 24, 26
CITY = "demoville"


def _texture(rng: np.random.Generator, shape: tuple, amplitude: float, blur: int) -> np.ndarray:
    """(H, W) float32 smooth noise in about [-amplitude, amplitude]."""
    noise = rng.standard_normal(shape).astype(np.float32)
    if blur > 1:
        noise = cv2.GaussianBlur(noise, (0, 0), blur)
        noise /= noise.std() + 1e-6
    return amplitude * noise


def _paint(image: np.ndarray, label: np.ndarray, mask: np.ndarray, colour_bgr, label_id: int,
           texture: np.ndarray | None = None) -> None:
    """Fill ``mask`` (H, W bool) with a colour (plus an optional (H, W) brightness texture) and its label id."""
    pixels = np.broadcast_to(np.asarray(colour_bgr, np.float32), image.shape).copy()
    if texture is not None:
        pixels += texture[..., None]
    image[mask] = pixels[mask]
    label[mask] = label_id


def _shape_mask(shape: tuple, draw) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    draw(mask)
    return mask.astype(bool)


def _draw_sky(rng, image, label, horizon):
    h, w = label.shape
    rows = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]
    top, bottom = np.array([180, 110, 60], np.float32), np.array([235, 200, 170], np.float32)  # BGR blue -> pale
    image[:horizon] = top + rows[..., None] * (bottom - top)
    label[:horizon] = SKY
    clouds = _texture(rng, (horizon, w), 1.0, max(2, w // 24)) > 1.0
    image[:horizon][clouds] = 0.5 * image[:horizon][clouds] + 0.5 * 245.0


def _draw_buildings(rng, image, label, horizon):
    h, w = label.shape
    hedge = np.zeros(label.shape, bool)  # a low hedge along the street, seen between the buildings
    hedge[horizon - h // 40:horizon + h // 20 + 1] = True
    _paint(image, label, hedge, (40, 110, 50), VEGETATION, _texture(rng, label.shape, 20.0, 1))
    x = int(rng.integers(-w // 10, w // 20))
    while x < w:
        width = int(rng.integers(w // 8, w // 3))
        top = int(rng.integers(h // 12, horizon - h // 10))
        bottom = horizon + h // 20
        grey = float(rng.uniform(90, 190))
        colour = (grey * rng.uniform(0.85, 1.0), grey * rng.uniform(0.9, 1.0), grey)
        facade = _shape_mask(label.shape, lambda m: cv2.rectangle(m, (x, top), (x + width, bottom), 1, -1))
        # window grid: darker cells every `step` pixels
        step = max(4, h // 16)
        yy, xx = np.mgrid[0:h, 0:w]
        windows = ((yy - top) % step < step // 2) & ((xx - x) % step < step // 2) & ((yy - top) > step // 2)
        texture = np.where(windows, -grey * 0.45, 0.0).astype(np.float32) + _texture(rng, label.shape, 4.0, 1)
        _paint(image, label, facade, colour, BUILDING, texture)
        x += width + int(rng.integers(0, w // 10))


def _draw_trees(rng, image, label, horizon):
    h, w = label.shape
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = int(rng.integers(0, w)), int(horizon - rng.integers(0, h // 6))
        radius = int(rng.integers(h // 10, h // 5))
        trunk = _shape_mask(label.shape, lambda m: cv2.rectangle(
            m, (cx - max(1, radius // 8), cy), (cx + max(1, radius // 8), horizon + h // 20), 1, -1))
        crown = _shape_mask(label.shape, lambda m: cv2.ellipse(
            m, (cx, cy - radius // 2), (radius, int(radius * 1.2)), 0, 0, 360, 1, -1))
        leaves = _texture(rng, label.shape, 25.0, 1.5)
        _paint(image, label, trunk | crown, (40, 120, 60), VEGETATION, leaves)


def _draw_road(rng, image, label, horizon):
    h, w = label.shape
    road_top = horizon + h // 20
    road = np.zeros(label.shape, bool)
    road[road_top:] = True
    _paint(image, label, road, (85, 80, 80), ROAD, _texture(rng, label.shape, 6.0, 1))
    # dashed lane marks converging to the vanishing point (still road)
    marks = np.zeros(label.shape, np.uint8)
    for y in range(road_top + 2, h, max(4, h // 12)):
        half = max(1, int((y - road_top) / (h - road_top) * w / 60))
        cv2.rectangle(marks, (w // 2 - half, y), (w // 2 + half, y + max(2, h // 40)), 1, -1)
    image[marks.astype(bool)] = (220, 220, 220)
    return road_top


def _depth_scale(y: int, road_top: int, h: int) -> float:
    """Objects grow linearly from the horizon (0.25) to the bottom of the image (1.0)."""
    return 0.25 + 0.75 * (y - road_top) / max(1, h - road_top)


def _draw_car(rng, image, label, road_top, foot_y):
    h, w = label.shape
    scale = _depth_scale(foot_y, road_top, h)
    car_w, car_h = int(w * 0.22 * scale) + 4, int(h * 0.16 * scale) + 3
    x0 = int(rng.integers(-car_w // 3, w - 2 * car_w // 3))
    y0 = foot_y - car_h
    wheel_r = max(1, car_h // 4)
    colour = tuple(float(c) for c in rng.choice([(40, 40, 200), (200, 60, 30), (30, 160, 220), (60, 60, 60),
                                                   (230, 230, 230), (40, 140, 40)]))
    body = _shape_mask(label.shape, lambda m: (
        cv2.rectangle(m, (x0, y0 + car_h // 3), (x0 + car_w, foot_y - wheel_r // 2), 1, -1),
        cv2.rectangle(m, (x0 + car_w // 5, y0), (x0 + 4 * car_w // 5, y0 + car_h // 3), 1, -1)))
    _paint(image, label, body, colour, CAR, _texture(rng, label.shape, 3.0, 1))
    window = _shape_mask(label.shape, lambda m: cv2.rectangle(
        m, (x0 + car_w // 4, y0 + 1), (x0 + 3 * car_w // 4, y0 + car_h // 3), 1, -1))
    _paint(image, label, window & body, (70, 50, 40), CAR)
    wheels = _shape_mask(label.shape, lambda m: [cv2.circle(m, (x, foot_y - wheel_r), wheel_r, 1, -1)
                                                 for x in (x0 + car_w // 5, x0 + 4 * car_w // 5)])
    _paint(image, label, wheels, (20, 20, 20), CAR)


def _draw_person(rng, image, label, road_top, foot_y):
    h, w = label.shape
    scale = _depth_scale(foot_y, road_top, h)
    height = int(h * 0.32 * scale) + 6
    cx = int(rng.integers(0, w))
    half_w = max(1, height // 8)
    head_r = max(1, height // 10)
    shirt = tuple(float(c) for c in rng.integers(0, 256, 3))
    legs = _shape_mask(label.shape, lambda m: cv2.rectangle(
        m, (cx - half_w, foot_y - height // 2), (cx + half_w, foot_y), 1, -1))
    torso = _shape_mask(label.shape, lambda m: cv2.rectangle(
        m, (cx - half_w - 1, foot_y - height + 2 * head_r), (cx + half_w + 1, foot_y - height // 2), 1, -1))
    head = _shape_mask(label.shape, lambda m: cv2.circle(m, (cx, foot_y - height + head_r), head_r, 1, -1))
    _paint(image, label, legs, (90, 50, 30), PERSON)
    _paint(image, label, torso, shirt, PERSON, _texture(rng, label.shape, 8.0, 1))
    _paint(image, label, head, (120, 160, 220), PERSON)


def _draw_street(rng: np.random.Generator, height: int, width: int):
    """The still part of a scene: ``(image (H, W, 3) float32, label ids (H, W) uint8, road_top, ego_top)``."""
    image = np.zeros((height, width, 3), np.float32)
    label = np.zeros((height, width), np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.5))
    _draw_sky(rng, image, label, horizon)
    _draw_buildings(rng, image, label, horizon)
    _draw_trees(rng, image, label, horizon)
    road_top = _draw_road(rng, image, label, horizon)
    return image, label, road_top, height - max(2, height // 16)


def _street_objects(rng: np.random.Generator, height: int, road_top: int, ego_top: int):
    """``[(draw function, foot row)]`` of the scene's cars and people, far ones first (near ones occlude them)."""
    objects = [(_draw_car, int(rng.integers(road_top + height // 10, ego_top))) for _ in range(rng.integers(1, 4))]
    objects += [(_draw_person, int(rng.integers(road_top + height // 12, ego_top)))
                for _ in range(rng.integers(1, 4))]
    return sorted(objects, key=lambda item: item[1])


def _finish(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, ego_top: int):
    """The ego vehicle's bonnet over the bottom rows, sensor noise; -> uint8 BGR image, label ids."""
    bonnet = np.zeros(label.shape, bool)
    bonnet[ego_top:] = True
    _paint(image, label, bonnet, (30, 30, 30), EGO_VEHICLE)
    image += _texture(rng, label.shape, 3.0, 1)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic street scene: (H, W, 3) uint8 BGR image and (H, W) uint8 Cityscapes label ids."""
    image, label, road_top, ego_top = _draw_street(rng, height, width)
    for draw, foot_y in _street_objects(rng, height, road_top, ego_top):
        draw(rng, image, label, road_top, foot_y)
    return _finish(rng, image, label, ego_top)


def make_figure(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic person seen from the front: (H, W, 3) uint8 BGR image and (H, W) uint8 LIP class ids.

    The figure is mirror-symmetric about its centre line (near the image's centre); its left limbs (on the image's
    left) and right limbs look the same.
    """
    ids = {name: class_id for class_id, name in enumerate(LIP.class_names)}
    image = np.empty((height, width, 3), np.float32)
    image[:] = rng.uniform(40, 220, 3)
    image += _texture(rng, (height, width), 18.0, max(2, height // 16))[..., None]
    label = np.full((height, width), ids["background"], np.uint8)
    size = height * rng.uniform(0.78, 0.95)  # the figure's height
    top = (height - size) / 2 + rng.uniform(-0.02, 0.02) * height
    centre = width / 2 + rng.uniform(-0.08, 0.08) * width
    half_torso = max(2.0, 0.13 * size)
    arm = max(2.0, 0.07 * size)
    skin = rng.uniform((90, 120, 170), (150, 180, 235))  # BGR, one skin colour for the face and every limb
    rows = {"head": top + 0.2 * size, "shoulder": top + 0.22 * size, "waist": top + 0.55 * size,
            "hips": top + 0.68 * size, "ankle": top + 0.93 * size, "sole": top + size}

    def box(x0, x1, y0, y1) -> np.ndarray:
        return _shape_mask(label.shape, lambda m: cv2.rectangle(m, (round(x0), round(y0)), (round(x1), round(y1)),
                                                                1, -1))

    radius = 0.1 * size
    hair = _shape_mask(label.shape, lambda m: cv2.circle(m, (round(centre), round(top + radius)), round(radius), 1,
                                                         -1))
    face = _shape_mask(label.shape, lambda m: cv2.ellipse(
        m, (round(centre), round(top + 1.15 * radius)), (round(0.8 * radius), round(0.85 * radius)), 0, 0, 360, 1,
        -1))
    _paint(image, label, hair, rng.uniform(10, 70, 3), ids["hair"], _texture(rng, label.shape, 10.0, 1))
    _paint(image, label, face, skin, ids["face"])
    _paint(image, label, box(centre - half_torso, centre + half_torso, rows["shoulder"], rows["waist"]),
           rng.uniform(0, 255, 3), ids["upper-clothes"], _texture(rng, label.shape, 8.0, 1))
    _paint(image, label, box(centre - half_torso, centre + half_torso, rows["waist"], rows["hips"]),
           rng.uniform(0, 255, 3), ids["pants"], _texture(rng, label.shape, 8.0, 1))
    shoe = rng.uniform(10, 60, 3)
    for side, sign in (("left", -1), ("right", 1)):  # the image's left, then its right: mirror images
        inner, outer = centre + sign * (half_torso + 1), centre + sign * (half_torso + 1 + arm)
        _paint(image, label, box(inner, outer, rows["shoulder"], rows["waist"]), skin, ids[f"{side}-arm"])
        inner, outer = centre + sign * 1, centre + sign * half_torso
        _paint(image, label, box(inner, outer, rows["hips"], rows["ankle"]), skin, ids[f"{side}-leg"])
        _paint(image, label, box(inner, outer, rows["ankle"], rows["sole"]), shoe, ids[f"{side}-shoe"])
    image += _texture(rng, label.shape, 3.0, 1)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8), label


class DemoFormat(NamedTuple):
    """How one dataset's format stores a scene."""

    files: Callable[[str, int, int], Tuple[str, str]]  # (split, split index, index) -> image, label (relative)
    label_values: np.ndarray  # (256,) uint8: a drawn label value -> the value the format's label file holds
    draw: Callable = make_scene  # (rng, height, width) -> (H, W, 3) uint8 BGR image, (H, W) uint8 drawn labels


def _cityscapes_files(split: str, split_index: int, index: int) -> Tuple[str, str]:
    stem = f"{CITY}_{split_index:06d}_{index:06d}"
    return f"leftImg8bit/{split}/{CITY}/{stem}_leftImg8bit.png", f"gtFine/{split}/{CITY}/{stem}_gtFine_labelIds.png"


def _ade20k_files(split: str, split_index: int, index: int) -> Tuple[str, str]:
    folder, stem = SPLIT_FOLDERS[split], f"ADE_{split}_{index + 1:08d}"
    return f"images/{folder}/{stem}.jpg", f"annotations/{folder}/{stem}.png"


def _lip_files(split: str, split_index: int, index: int) -> Tuple[str, str]:
    stem = f"{index:06d}_{split_index:06d}"
    return f"{IMAGE_FOLDER}/{split}_images/{stem}.jpg", f"{LABEL_FOLDER}/{split}_segmentations/{stem}.png"


def _ade20k_values() -> np.ndarray:
    """Drawn Cityscapes label ids -> ADE20K annotation values (the class's index + 1; the ego vehicle: 0, void)."""
    values = np.zeros(256, np.uint8)
    for label_id, name in ((ROAD, "road"), (BUILDING, "building"), (VEGETATION, "tree"), (SKY, "sky"),
                           (PERSON, "person"), (CAR, "car")):
        values[label_id] = ADE20K.class_names.index(name) + 1
    return values


FORMATS: Dict[str, DemoFormat] = {
    "cityscapes": DemoFormat(_cityscapes_files, np.arange(256, dtype=np.uint8)),
    "ade20k": DemoFormat(_ade20k_files, _ade20k_values()),
    "lip": DemoFormat(_lip_files, np.arange(256, dtype=np.uint8), make_figure),
}


def generate(out_dir: str, num_train: int = 24, num_val: int = 8, height: int = 128, width: int = 256,
             seed: int = 0, dataset: str = DEFAULT_DATASET) -> dict[str, str]:
    """Write the dataset in the format of ``dataset`` (a key of :data:`FORMATS`, or ``"camvid"``: video,
    :func:`_generate_camvid`); returns ``{"train": list path, "val": list path}``."""
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"height and width must be at least {MIN_SIZE}, got {height}x{width}")
    if dataset == CAMVID.name:
        return _generate_camvid(out_dir, num_train, num_val, height, width, seed)
    demo_format = FORMATS[dataset]
    lists = {}
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        lines = []
        for index in range(count):
            image, label = demo_format.draw(np.random.default_rng((seed, split_index, index)), height, width)
            image_path, label_path = demo_format.files(split, split_index, index)
            for path, pixels in ((image_path, image), (label_path, demo_format.label_values[label])):
                os.makedirs(os.path.dirname(os.path.join(out_dir, path)), exist_ok=True)
                cv2.imwrite(os.path.join(out_dir, path), pixels)
            lines.append(f"{image_path}\t{label_path}\n")
        lists[split] = os.path.join(out_dir, f"{split}.lst")
        with open(lists[split], "w", encoding="utf-8") as handle:
            handle.writelines(lines)
    return lists


# ---- CamVid-format video ---------------------------------------------------------------------------------------

LABELS_PER_SEQUENCE = 4  # labelled frames of a generated sequence
LABEL_EVERY = 5  # frames between two labelled frames of a sequence
MAX_OFFSET = 4  # frames written before the first and after the last labelled frame: clips of T=9 at stride 1, T=5
# at stride 2
MAX_SPEED = 3.0  # pixels per frame of a moving object in a 128-pixel-wide frame (scaled with the width)


def _camvid_values() -> np.ndarray:
    """Drawn Cityscapes label ids -> CamVid annotation values (the class's train id; the ego vehicle and anything
    not drawn: 11, void)."""
    values = np.full(256, CAMVID_VOID, np.uint8)
    for label_id, name in ((ROAD, "road"), (BUILDING, "building"), (VEGETATION, "tree"), (SKY, "sky"),
                           (PERSON, "pedestrian"), (CAR, "car")):
        values[label_id] = CAMVID.class_names.index(name)
    return values


def _shifted(array: np.ndarray, shift: int) -> np.ndarray:
    """``array`` (H, W, ...) moved ``shift`` pixels right (left when negative), zeros where nothing moved in."""
    out = np.zeros_like(array)
    width = array.shape[1]
    if abs(shift) < width:
        if shift >= 0:
            out[:, shift:] = array[:, :width - shift]
        else:
            out[:, :width + shift] = array[:, -shift:]
    return out


def make_video(rng: np.random.Generator, height: int, width: int, num_frames: int):
    """``num_frames`` frames of one street: ``[(image (H, W, 3) uint8 BGR, label ids (H, W) uint8)]``. The street
    stands still; each car and person moves sideways at its own speed (up to :data:`MAX_SPEED` pixels a frame at
    128 pixels wide), so consecutive frames differ where objects are."""
    street, street_label, road_top, ego_top = _draw_street(rng, height, width)
    movers = []
    for draw, foot_y in _street_objects(rng, height, road_top, ego_top):  # each drawn alone on an empty layer
        image, label = np.zeros_like(street), np.zeros_like(street_label)
        draw(rng, image, label, road_top, foot_y)
        speed = rng.uniform(0.3, 1.0) * MAX_SPEED * width / 128 * rng.choice((-1, 1))
        movers.append((image, label, speed))
    frames = []
    for index in range(num_frames):
        image, label = street.copy(), street_label.copy()
        for mover_image, mover_label, speed in movers:  # far ones first: near ones occlude them
            shift = int(round(speed * index))
            moved = _shifted(mover_label, shift) > 0
            image[moved], label[moved] = _shifted(mover_image, shift)[moved], _shifted(mover_label, shift)[moved]
        frames.append(_finish(rng, image, label, ego_top))
    return frames


def _sequence_name(index: int, frame: int) -> Tuple[str, str]:
    """(sequence, frame file name) in CamVid's two styles, alternating: ``0000DM_000004.png`` (six digits) and
    ``Seq01DM_f00004.png`` (``f`` and five digits)."""
    if index % 2 == 0:
        sequence = f"{index:04d}DM"
        return sequence, f"{sequence}_{frame:06d}.png"
    sequence = f"Seq{index:02d}DM"
    return sequence, f"{sequence}_f{frame:05d}.png"


def _generate_camvid(out_dir: str, num_train: int, num_val: int, height: int, width: int,
                     seed: int) -> dict[str, str]:
    """Write CamVid-format video: ``OUT_DIR/{train,val}/<name>.png`` labelled frames, ``{train,val}annot/<name>.png``
    their annotations (0..10, 11 void), ``frames/<sequence>/`` every frame of each sequence, and the lists
    ``OUT_DIR/{train,val}.lst``; returns their paths. A sequence has up to :data:`LABELS_PER_SEQUENCE` labelled
    frames :data:`LABEL_EVERY` apart and :data:`MAX_OFFSET` more frames before the first and after the last."""
    values = _camvid_values()
    lists, sequence_index = {}, 0
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        lines = []
        for first in range(0, count, LABELS_PER_SEQUENCE):
            labelled = [MAX_OFFSET + k * LABEL_EVERY for k in range(min(LABELS_PER_SEQUENCE, count - first))]
            frames = make_video(np.random.default_rng((seed, split_index, sequence_index)), height, width,
                                labelled[-1] + MAX_OFFSET + 1)
            for number, (image, label) in enumerate(frames):
                sequence, name = _sequence_name(sequence_index, number)
                written = [(f"frames/{sequence}/{name}", image)]
                if number in labelled:
                    written += [(f"{split}/{name}", image), (f"{split}annot/{name}", values[label])]
                    lines.append(f"{split}/{name}\t{split}annot/{name}\n")
                for path, pixels in written:
                    os.makedirs(os.path.dirname(os.path.join(out_dir, path)), exist_ok=True)
                    cv2.imwrite(os.path.join(out_dir, path), pixels)
            sequence_index += 1
        lists[split] = os.path.join(out_dir, f"{split}.lst")
        with open(lists[split], "w", encoding="utf-8") as handle:
            handle.writelines(lines)
    return lists


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad command line."""
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--dataset", choices=(*FORMATS, CAMVID.name), default=DEFAULT_DATASET,
                        help="the format to write the scenes in")
    parser.add_argument("--num-train", type=parse_non_negative_int, default=24, help="number of training scenes")
    parser.add_argument("--num-val", type=parse_non_negative_int, default=8, help="number of validation scenes")
    parser.add_argument("--height", type=parse_non_negative_int, default=128,
                        help=f"image height in pixels, >= {MIN_SIZE}")
    parser.add_argument("--width", type=parse_non_negative_int, default=256,
                        help=f"image width in pixels, >= {MIN_SIZE}")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files")
    args = parser.parse_args(argv)
    if args.height < MIN_SIZE or args.width < MIN_SIZE:
        parser.error(f"--height and --width must be >= {MIN_SIZE}, got {args.height}x{args.width}")
    lists = generate(args.out_dir, args.num_train, args.num_val, args.height, args.width, args.seed, args.dataset)
    print(f"wrote {args.num_train} train + {args.num_val} val scenes ({args.dataset} format) to {args.out_dir}: "
          f"{lists['train']}, {lists['val']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
