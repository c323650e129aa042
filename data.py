"""
Every dataset of the project, the embedded synthetic scenes, and augmentation.

All datasets return the same sample, a dict of tensors (see contract.md):

    image     float (3, H, W) in [0, 1]
    semantic  long  (H, W)    class ids, -1 = ignore
    depth     float (1, H, W) metres along the optical axis (CityScapes: inverse depth), 0 = invalid
    normal    float (3, H, W) unit surface normals in the camera frame, all-zero vector = invalid
    edge      float (1, H, W) in {0, 1}

whatever convention the files on disk use for "unknown" (NYUD's raw 0 becomes -1, and so on). Each dataset
has a `name`, a `tasks` dict (every target it provides: task name -> output channels) and a `primary_tasks`
dict (the tasks the papers train on).

The file reads top to bottom:

1. Errors and download notes: what a user sees when a dataset is missing or malformed.
2. SyntheticScenes: indoor-like rooms rendered by vectorised ray casting in torch. It ships as code, so a fresh
   machine can train and test with no download, and it can render a whole batch directly on a GPU.
3. The real datasets: NYUv2 and CityScapes (MTAN's preprocessed .npy releases), NYUD (MTI-Net's NYUD_MT).
4. build_dataset: one entry point by name, used by train.py and eval.py.
5. augment_batch: MTAN's random scale-crop and flip, on batched tensors, so it can run on the GPU.
6. Pictures: colour maps for labels, depth and normals, and `python data.py`, which renders a montage of
   synthetic samples to docs/synthetic_montage.png.
"""
import argparse
import colorsys
import contextlib
import hashlib
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------------------------------------
# 1. Errors and download notes
# -----------------------------------------------------------------------------------------------------------


class DatasetError(ValueError):
    """A dataset folder is missing, laid out differently, or holds a file that cannot be read.

    The message names the offending path, the layout that was expected and where to download the data, so
    no bare numpy or PIL traceback reaches the user."""


# Where each dataset comes from (../shared/spec/downloads.md) and how its folder must look.
DOWNLOADS = {
    "nyuv2": {
        "title": "NYUv2 (MTAN's preprocessed release, 288x384, 13 classes)",
        "url": "https://www.dropbox.com/sh/86nssgwm6hm3vkb/AACrnUQ4GxpdrBbLjb6n-mWNa?dl=0",
        "layout": (
            "ROOT/train/image/0.npy ... (288, 384, 3) float in [0, 1]\n"
            "ROOT/train/label/0.npy ... (288, 384) class ids 0..12, -1 = ignore\n"
            "ROOT/train/depth/0.npy ... (288, 384, 1) metres, 0 = invalid\n"
            "ROOT/train/normal/0.npy ... (288, 384, 3) unit normals, 0 = invalid\n"
            "ROOT/val/...  the same four folders (files numbered 0, 1, 2, ... with no zero padding)"
        ),
    },
    "cityscapes": {
        "title": "CityScapes (MTAN's preprocessed release, 128x256 or 256x512)",
        "url": (
            "https://www.dropbox.com/sh/gaw6vh6qusoyms6/AADwWi0Tp3E3M4B2xzeGlsEna?dl=0 (128x256), "
            "https://www.dropbox.com/sh/vj349qgg57nthi9/AACdZmIuK-Qb_gP6w1HrA43ta?dl=0 (256x512)"
        ),
        "layout": (
            "ROOT/train/image/0.npy ... (H, W, 3) float in [0, 1]\n"
            "ROOT/train/depth/0.npy ... (H, W, 1) inverse depth, 0 = invalid\n"
            "ROOT/train/label_2/0.npy, label_7/0.npy, label_19/0.npy ... (H, W) class ids, -1 = void\n"
            "ROOT/val/...  the same folders (files numbered 0, 1, 2, ... with no zero padding)"
        ),
    },
    "nyud": {
        "title": "NYUD_MT (MTI-Net's NYUD release, 480x640, 40 classes)",
        "url": "NYUD_MT.tgz from Google Drive, file id 14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw "
        "(download it by hand: the official automatic downloader is broken)",
        "layout": (
            "ROOT/gt_sets/train.txt, ROOT/gt_sets/val.txt   one image id per line\n"
            "ROOT/images/<id>.jpg         RGB\n"
            "ROOT/segmentation/<id>.png   uint8, 0 = unlabeled, 1..40 = the NYU-40 classes\n"
            "ROOT/depth/<id>.npy          (H, W) metres, 0 = invalid\n"
            "ROOT/normals/<id>.npy        (H, W, 3) unit normals, 0 = invalid\n"
            "ROOT/edge/<id>.npy           (H, W) binary edge map\n"
            "(ROOT is the NYUD_MT folder itself or the folder that holds it)"
        ),
    },
}


def dataset_error(name, problem, path):
    """A DatasetError that names the path, the expected layout and the download location of dataset `name`."""
    info = DOWNLOADS[name]
    return DatasetError(
        f"{info['title']}: {problem}: {path}\n"
        f"Expected layout:\n{info['layout']}\n"
        f"Download: {info['url']}\n"
        "See the 'Datasets' section of README.md."
    )


# -----------------------------------------------------------------------------------------------------------
# 2. SyntheticScenes: procedural indoor rooms
# -----------------------------------------------------------------------------------------------------------
#
# A scene is a box-shaped room (floor, four walls, ceiling, maybe a picture on the back wall) holding 1 to 5
# primitives (spheres, boxes, cylinders) that stand on the floor. A pinhole camera near the front wall looks
# in with a little random yaw, pitch and roll; a directional light plus ambient light shades every surface
# with Lambert's law, and primitives cast shadows. Every pixel shoots one ray, and the nearest hit gives all
# the targets at once, so they agree with each other exactly:
#
#   semantic  the class of the surface that was hit
#   depth     the hit's z coordinate in the camera frame (metres along the optical axis)
#   normal    the true unit normal of that surface, in the camera frame (x right, y down, z forward),
#             oriented towards the camera
#   edge      1 where the object under a pixel differs from the one under its right or lower neighbour.
#             Objects are: the floor, the walls (all four together), the ceiling, the picture, each primitive.
#             Every primitive is convex and the room is seen from inside, so every depth discontinuity lies
#             on such a boundary: the rule marks all semantic and all depth discontinuities (and, besides,
#             the outline of a primitive in front of another of the same class).
#
# Kinect-like holes: a few blobs (each a cluster of overlapping ellipses in the image) where depth and normal
# are 0 and semantic is -1, as where a real depth sensor returns nothing. The image and the edges are kept.
#
# Determinism. Sample i of a split comes from a seed hashed from (seed, split, i). The scene's few numbers are
# drawn on the CPU with a torch.Generator; the renderer then uses only +, -, *, /, sqrt, floor, comparisons and
# min/max, which IEEE 754 rounds exactly the same way on every machine, vector width and thread count (no
# exp/sin/pow per pixel, no matmul or sum whose summation order could change). So a sample is bit-identical
# on every run and machine, and a batch rendered at once equals the samples rendered one by one. On a GPU the
# same code runs; the results then match the CPU's only to rounding.

CLASS_NAMES = ("floor", "wall", "ceiling", "picture", "sphere", "box", "cylinder")
FLOOR, WALL, CEILING, PICTURE, SPHERE, BOX, CYLINDER = range(len(CLASS_NAMES))

FOCAL = 0.8  # focal length in units of the image width: fx = fy = 0.8 W, a 64 x 50 degree view like a Kinect
EPS = 1e-4  # metres: a hit closer than this along a ray is the surface the ray starts from, not a new one

# Object ids in a rendered scene. The room is a box seen from inside; its six faces come first, in the order
# the slab method finds them (axis x low/high, y low/high, z low/high). Then the picture, then the primitives.
LEFT_WALL, RIGHT_WALL, FLOOR_FACE, CEILING_FACE, FRONT_WALL, BACK_WALL, PICTURE_ID = range(7)
FIRST_PRIMITIVE = 7
ROOM_CLASSES = (WALL, WALL, FLOOR, CEILING, WALL, WALL, PICTURE)  # class of object ids 0..6
ROOM_NORMALS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1), (0, 0, -1))  # inwards

# A material is 14 numbers: colour (3), second colour (3), pattern (0 plain, 1 stripes, 2 checker),
# period in metres, and two directions (3 + 3) along which the stripes / checks repeat ("solid" textures:
# they are functions of the 3D hit point, so they need no surface coordinates and no sin or atan).
MATERIAL_SIZE = 14
# Columns of a primitive's row (its material follows): sphere centre, radius; box centre, half sizes,
# cos and sin of its yaw; cylinder centre, radius, half height. All primitives stand on the floor.
PRIMITIVE_SIZES = {"spheres": 4, "boxes": 8, "cylinders": 5}


def camera_intrinsics(height, width):
    """Pinhole intrinsics (fx, fy, cx, cy) in pixels; pixel (u, v) has its centre at (u + 0.5, v + 0.5)."""
    f = FOCAL * width
    return f, f, width / 2, height / 2


def _rotate(v, axis, angle):
    """Rodrigues' rotation of the 3-vector `v` about the unit `axis` by `angle` (plain Python floats)."""
    c, s = math.cos(angle), math.sin(angle)
    cross = (axis[1] * v[2] - axis[2] * v[1], axis[2] * v[0] - axis[0] * v[2], axis[0] * v[1] - axis[1] * v[0])
    along = (1 - c) * sum(a * b for a, b in zip(axis, v))
    return tuple(v[i] * c + cross[i] * s + axis[i] * along for i in range(3))


class _Dice:
    """The random numbers of one scene: a seeded CPU torch.Generator, handing out plain Python floats."""

    def __init__(self, seed):
        self.rng = torch.Generator().manual_seed(seed)

    def uniform(self, lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=self.rng, dtype=torch.float64).item()

    def integer(self, lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (), generator=self.rng))

    def direction(self):  # a uniformly random unit vector: a normalised Gaussian
        v = torch.randn(3, generator=self.rng, dtype=torch.float64).tolist()
        n = math.sqrt(sum(x * x for x in v)) + 1e-12
        return [x / n for x in v]

    def colour(self, hues, saturations, values):  # uniform in an HSV box, returned as RGB in [0, 1]
        return list(colorsys.hsv_to_rgb(self.uniform(*hues) % 1.0, self.uniform(*saturations), self.uniform(*values)))


def _material(first, second, pattern, period, a, b):
    return list(first) + list(second) + [pattern, period] + list(a) + list(b)


def _sample_camera(dice, half_width):
    """Position and axes (right, down, forward in the world) of a camera standing near the front wall and
    looking in, with a little random yaw, pitch (down) and roll."""
    position = [dice.uniform(-0.3, 0.3) * half_width, dice.uniform(1.2, 1.7), dice.uniform(0.2, 0.6)]
    yaw, pitch, roll = (math.radians(dice.uniform(-10, 10)), math.radians(dice.uniform(8, 22)),
                        math.radians(dice.uniform(-3, 3)))
    axes = []
    for v in ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)):
        v = _rotate(v, (0.0, 0.0, 1.0), roll)
        v = _rotate(v, (1.0, 0.0, 0.0), pitch)  # positive pitch tilts the view down
        axes += _rotate(v, (0.0, 1.0, 0.0), yaw)
    return position + axes


def _sample_room_materials(dice):
    """Floor (planks or tiles along the room's axes), walls (paint, or vertical stripes that show on the back
    and the side walls alike), ceiling (plain), picture (a bright pattern at any angle)."""
    floor = dice.colour((0.03, 0.12), (0.2, 0.6), (0.45, 0.8))
    floor = _material(floor, [c * dice.uniform(0.6, 0.85) for c in floor], dice.integer(0, 2),
                      dice.uniform(0.2, 0.6), (1, 0, 0), (0, 0, 1))
    wall = dice.colour((0, 1), (0.05, 0.3), (0.7, 0.95))
    diagonal = (math.sqrt(0.5), 0, math.sqrt(0.5))
    wall = _material(wall, [c * dice.uniform(0.75, 0.9) for c in wall], dice.integer(0, 1),
                     dice.uniform(0.1, 0.3), diagonal, diagonal)
    ceiling = dice.colour((0, 1), (0.0, 0.05), (0.85, 0.95))
    ceiling = _material(ceiling, ceiling, 0, 1.0, (1, 0, 0), (0, 0, 1))
    first, second = dice.colour((0, 1), (0.6, 1.0), (0.6, 1.0)), dice.colour((0, 1), (0.6, 1.0), (0.3, 0.9))
    pattern, period, angle = dice.integer(1, 2), dice.uniform(0.05, 0.2), dice.uniform(0, math.pi)
    picture = _material(first, second, pattern, period, (math.cos(angle), math.sin(angle), 0),
                        (-math.sin(angle), math.cos(angle), 0))
    return [floor, wall, ceiling, picture]


def _sample_picture(dice, half_width, height):
    """An optional picture on the back wall (6 times in 10): present flag, x range, y range."""
    if dice.uniform(0, 1) >= 0.6:
        return [0.0, 0.0, 0.0, 0.0, 0.0]
    w, h = dice.uniform(0.5, 1.6), dice.uniform(0.4, 1.0)
    x = dice.uniform(-half_width + w / 2 + 0.1, half_width - w / 2 - 0.1)
    y = dice.uniform(0.9, min(1.5, height - h - 0.1))
    return [1.0, x - w / 2, x + w / 2, y, y + h]


def _sample_primitives(dice, half_width, depth, camera_z):
    """1 to 5 primitives standing on the floor, at least a metre in front of the camera, inside the room.
    Each tries a few spots so that footprints rarely overlap (a crowded spot is kept after 20 tries).
    Returns rows per kind: geometry (PRIMITIVE_SIZES) followed by a material."""
    rows = {"spheres": [], "boxes": [], "cylinders": []}
    footprints = []  # (x, z, radius)
    for _ in range(dice.integer(1, 5)):
        kind = ("spheres", "boxes", "cylinders")[dice.integer(0, 2)]
        if kind == "spheres":
            radius = dice.uniform(0.2, 0.6)
            size, reach, half_height = [radius], radius, radius
        elif kind == "boxes":
            half = [dice.uniform(0.2, 0.6), dice.uniform(0.2, 0.7), dice.uniform(0.2, 0.6)]
            turn = dice.uniform(0, math.pi / 2)
            size, reach, half_height = half + [math.cos(turn), math.sin(turn)], math.hypot(half[0], half[2]), half[1]
        else:
            radius, half_height = dice.uniform(0.15, 0.45), dice.uniform(0.2, 0.8)
            size, reach = [radius, half_height], radius
        for _ in range(20):
            x = dice.uniform(-half_width + reach + 0.05, half_width - reach - 0.05)
            z = dice.uniform(camera_z + 1.0 + reach, depth - reach - 0.05)
            if all(math.hypot(x - fx, z - fz) > reach + fr for fx, fz, fr in footprints):
                break
        footprints.append((x, z, reach))
        first = dice.colour((0, 1), (0.45, 0.9), (0.55, 1.0))
        second = [c * dice.uniform(0.3, 0.7) for c in first]
        pattern, period = dice.integer(0, 2), dice.uniform(0.06, 0.2)
        rows[kind].append([x, half_height, z] + size
                          + _material(first, second, pattern, period, dice.direction(), dice.direction()))
    return rows


def _sample_holes(dice):
    """Sensor holes: 0 to 3 blobs, each 2 or 3 overlapping ellipses. Centres are fractions of the image
    width and height, radii fractions of the width; then the cosine and sine of the ellipse's tilt."""
    holes = []
    for _ in range(dice.integer(0, 3)):
        cx, cy = dice.uniform(0.05, 0.95), dice.uniform(0.05, 0.95)
        for _ in range(dice.integer(2, 3)):
            tilt = dice.uniform(0, math.pi)
            holes.append([cx + dice.uniform(-0.03, 0.03), cy + dice.uniform(-0.04, 0.04), dice.uniform(0.015, 0.045),
                          dice.uniform(0.015, 0.045), math.cos(tilt), math.sin(tilt)])
    return holes


def sample_scene(seed):
    """Draw one random scene from an integer seed: a dict of small float32 tensors, in metres.

    World frame: y up, the floor is y = 0, the room spans x in [-half_width, half_width] and z in [0, depth]
    (z = depth is the back wall the camera faces). Nothing here depends on the image size, so a scene can be
    rendered at any resolution."""
    dice = _Dice(seed)
    half_width, height, depth = dice.uniform(1.8, 3.0), dice.uniform(2.5, 3.2), dice.uniform(4.0, 7.0)
    camera = _sample_camera(dice, half_width)
    # a directional light from above (the vector points towards the light), its strength, the ambient level
    elevation, azimuth = math.radians(dice.uniform(35, 70)), dice.uniform(0, 2 * math.pi)
    light = [math.cos(elevation) * math.sin(azimuth), math.sin(elevation), math.cos(elevation) * math.cos(azimuth),
             dice.uniform(0.55, 0.8), dice.uniform(0.25, 0.45)]
    materials = _sample_room_materials(dice)
    picture = _sample_picture(dice, half_width, height)
    primitives = _sample_primitives(dice, half_width, depth, camera[2])
    holes = _sample_holes(dice)

    def table(rows, width):
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), width)

    return {
        "room": torch.tensor([half_width, height, depth], dtype=torch.float32),
        "camera": torch.tensor(camera, dtype=torch.float32),  # position, right, down, forward
        "light": torch.tensor(light, dtype=torch.float32),
        "picture": torch.tensor(picture, dtype=torch.float32),
        "materials": table(materials, MATERIAL_SIZE),  # floor, wall, ceiling, picture
        **{kind: table(primitives[kind], PRIMITIVE_SIZES[kind] + MATERIAL_SIZE) for kind in PRIMITIVE_SIZES},
        "holes": table(holes, 6),
    }


# --- Ray casting. A vector is a tensor whose FIRST axis holds x, y, z, so `x, y, z = v` unpacks it and every
# component is a contiguous tensor (fast elementwise ops). Rays: direction (3, B, N) with N = H * W pixels,
# origin (3, B, 1) when a sample's rays share it (camera rays) or (3, B, N) (shadow rays). Primitive tables
# are column-first as well, (k, B, P) for k numbers per primitive, padded to the largest P of the batch, with
# a (B, P) mask of the real rows. The intersection functions return (B, N, P) distances, inf for a miss.


def dot(a, b):
    """Dot product of two vectors (first axis), written out: a sum() could change its order with the shape."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _keep(t, hit, mask):
    """Distances of real hits in front of the ray's start; inf elsewhere. mask: (B, P) real primitives."""
    return t.masked_fill(~(hit & (t > EPS) & mask[:, None, :]), math.inf)


def _nonzero(x):
    """x with exact zeros replaced by a tiny number, so that 1 / x is huge rather than inf (0 * inf = nan)."""
    return torch.where(x == 0, torch.full_like(x, 1e-12), x)


def _slab(origin, direction, lo, hi):
    """Ray against the axis-aligned box [lo, hi] (the slab method).

    Along each axis the ray is between the two planes lo and hi for t in [min(t1, t2), max(t1, t2)]; it is
    inside the box where the three intervals overlap: from t_near (the last entry) to t_far (the first exit).
    Returns t_near, t_far and the three per-axis exits (the smallest tells which face the ray leaves by)."""
    entries, exits = [], []
    for o, d, low, high in zip(origin, direction, lo, hi):  # one axis at a time
        inverse = 1 / _nonzero(d)
        t1, t2 = (low - o) * inverse, (high - o) * inverse
        entries.append(torch.minimum(t1, t2))
        exits.append(torch.maximum(t1, t2))
    t_near = torch.maximum(torch.maximum(entries[0], entries[1]), entries[2])
    t_far = torch.minimum(torch.minimum(exits[0], exits[1]), exits[2])
    return t_near, t_far, exits


def _argmin3(a, b, c):
    """Index (0, 1, 2) of the smallest of three tensors, the first on ties (argmin over a stacked axis of
    size 3, written out because a reduction across a leading axis is slow on the CPU)."""
    first = (a <= b) & (a <= c)
    return torch.where(first, 0, torch.where(b <= c, 1, 2))


def _to_box_frame(v, cos, sin):
    """World vector -> a box's own frame (turned by its yaw about the vertical), as 3 components."""
    x, y, z = v
    return cos * x + sin * z, y, cos * z - sin * x


def _from_box_frame(v, cos, sin):
    x, y, z = v
    return cos * x - sin * z, y, sin * x + cos * z


def sphere_hits(origin, direction, spheres, mask):
    """Ray-sphere: the nearer root of |o + t d - c|^2 = r^2. spheres: (4+, B, P) centre, radius."""
    o, d = origin[..., None], direction[..., None]  # (3, B, N or 1, 1)
    centre, radius = spheres[0:3, :, None], spheres[3, :, None]  # (3, B, 1, P), (B, 1, P)
    oc = o - centre
    a, half_b, c = dot(d, d), dot(d, oc), dot(oc, oc) - radius * radius
    disc = half_b * half_b - a * c  # (B, N, P); negative: the ray misses
    t = (-half_b - disc.clamp_min(0).sqrt()) / a
    return _keep(t, disc >= 0, mask)


def box_hits(origin, direction, boxes, mask):
    """Ray-box by the slab method in the box's own frame. boxes: (8+, B, P) centre, half sizes, cos, sin."""
    columns = boxes[:, :, None]  # (8+, B, 1, P)
    centre, half, cos, sin = columns[0:3], columns[3:6], columns[6], columns[7]
    o = _to_box_frame(origin[..., None] - centre, cos, sin)  # components (B, N or 1, P)
    d = _to_box_frame(direction[..., None], cos, sin)  # components (B, N, P) (y: (B, N, 1))
    t_near, t_far, _ = _slab(o, d, -half, half)
    return _keep(t_near, t_near <= t_far, mask)


def cylinder_hits(origin, direction, cylinders, mask):
    """Ray against an upright capped cylinder: the curved side (a circle in the xz-plane, limited in height)
    or the cap that faces the ray (the top one for a ray going down). cylinders: (5+, B, P) centre, radius,
    half height."""
    columns = cylinders[:, :, None]  # (5+, B, 1, P)
    qx, qy, qz = origin[..., None] - columns[0:3]  # ray start relative to the centre, (B, N or 1, P) each
    dx, dy, dz = direction[..., None]  # (B, N or 1, 1) each
    radius, half = columns[3], columns[4]
    a = (dx * dx + dz * dz).clamp_min(1e-12)
    half_b = dx * qx + dz * qz
    disc = half_b * half_b - a * (qx * qx + qz * qz - radius * radius)
    t_side = (-half_b - disc.clamp_min(0).sqrt()) / a
    side = _keep(t_side, (disc >= 0) & ((qy + t_side * dy).abs() <= half), mask)
    cap_y = torch.where(dy < 0, half, -half)
    t_cap = (cap_y - qy) / _nonzero(dy)
    x, z = qx + t_cap * dx, qz + t_cap * dz
    cap = _keep(t_cap, x * x + z * z <= radius * radius, mask)
    return torch.minimum(side, cap)


def primitive_hits(origin, direction, scene):
    """Distances to every primitive of the batch, spheres then boxes then cylinders: (B, N, P_total)."""
    return torch.cat([
        sphere_hits(origin, direction, scene["spheres"], scene["spheres_mask"]),
        box_hits(origin, direction, scene["boxes"], scene["boxes_mask"]),
        cylinder_hits(origin, direction, scene["cylinders"], scene["cylinders_mask"]),
    ], dim=-1)


def _per_pixel(table, obj):
    """table (k, B, O) of per-object numbers, obj (B, N) object ids -> (k, B, N): each pixel's numbers."""
    k, B, O = table.shape
    flat = (obj + O * torch.arange(B, device=obj.device)[:, None]).reshape(-1)
    return table.reshape(k, B * O).index_select(1, flat).reshape(k, B, -1)


def _primitive_normals(point, obj, scene, normal):
    """Write the outward unit normals of the primitives hit at `point` (3, B, N) into `normal` (3, B, N).

    For each kind, every pixel looks up "its" row (with a clamped index: pixels of other objects discard the
    result) and applies that kind's formula. Sphere: (p - c) / r. Box: the face whose normalised coordinate
    |p_i| / h_i is largest. Cylinder: a cap if |y| / h > (distance from the axis) / r, else the horizontal
    radius direction."""
    start = FIRST_PRIMITIVE
    for kind in ("spheres", "boxes", "cylinders"):
        table = scene[kind]  # (k, B, P)
        count = table.shape[2]
        if count == 0:
            continue
        mine = (obj >= start) & (obj < start + count)  # (B, N)
        row = _per_pixel(table[: PRIMITIVE_SIZES[kind]], (obj - start).clamp(0, count - 1))  # (k, B, N)
        q = point - row[0:3]  # (3, B, N) hit point relative to the centre
        if kind == "spheres":
            n = q / row[3]
        elif kind == "boxes":
            cos, sin = row[6], row[7]
            local = torch.stack(_to_box_frame(q, cos, sin))
            ratio = local.abs() / row[3:6]
            face = _argmin3(-ratio[0], -ratio[1], -ratio[2])  # (B, N) axis of the face that was hit
            axis = torch.stack([face == 0, face == 1, face == 2])
            n = torch.stack(_from_box_frame(axis * torch.sign(local), cos, sin))
        else:
            zero = torch.zeros_like(q[0])
            radial = (q[0] * q[0] + q[2] * q[2]).sqrt()
            on_cap = q[1].abs() / row[4] > radial / row[3]
            n = torch.where(on_cap, torch.stack([zero, torch.sign(q[1]), zero]),
                            torch.stack([q[0], zero, q[2]]) / row[3])
        normal = torch.where(mine, n, normal)
        start += count
    return normal


def _pad_columns(tables, device):
    """Per-sample (P_i, k) row tables -> one column-first (k, B, P) table padded with harmless rows (ones),
    plus the (B, P) mask of real rows."""
    count = max(t.shape[0] for t in tables)
    padded = torch.ones(len(tables), count, tables[0].shape[1])
    mask = torch.zeros(len(tables), count, dtype=torch.bool)
    for b, t in enumerate(tables):
        padded[b, : t.shape[0]] = t
        mask[b, : t.shape[0]] = True
    return padded.permute(2, 0, 1).contiguous().to(device), mask.to(device)


def _stack_scenes(scenes, device):
    """A list of scenes from `sample_scene` -> one dict of column-first batched tensors on `device`."""
    batch = {key: torch.stack([s[key] for s in scenes], dim=-1).to(device)  # (k, B)
             for key in ("room", "camera", "light", "picture")}
    batch["materials"] = torch.stack([s["materials"] for s in scenes]).permute(2, 0, 1).contiguous().to(device)
    for key in ("spheres", "boxes", "cylinders", "holes"):
        batch[key], batch[key + "_mask"] = _pad_columns([s[key] for s in scenes], device)
    return batch


def _object_tables(scene):
    """Per-sample tables indexed by object id: class (B, O) and material (14, B, O)."""
    B, device = scene["room"].shape[1], scene["room"].device
    classes = [torch.tensor(ROOM_CLASSES, device=device).expand(B, -1)]
    materials = [scene["materials"][:, :, [1, 1, 0, 2, 1, 1, 3]]]  # ids 0..6: wall wall floor ceiling wall wall picture
    for kind, label in (("spheres", SPHERE), ("boxes", BOX), ("cylinders", CYLINDER)):
        table = scene[kind]
        classes.append(torch.full((B, table.shape[2]), label, device=device))
        materials.append(table[PRIMITIVE_SIZES[kind]:])
    return torch.cat(classes, dim=1), torch.cat(materials, dim=2)


def _albedo(point, material):
    """Surface colour from the solid texture: (3, B, N). material: (14, B, N), each pixel's material."""
    first, second = material[0:3], material[3:6]
    pattern, period = material[6], material[7]
    u = torch.floor(dot(point, material[8:11]) / period)
    v = torch.floor(dot(point, material[11:14]) / period)
    parity = torch.remainder(u + torch.where(pattern == 2, v, torch.zeros_like(v)), 2)
    return torch.where((pattern > 0) & (parity == 1), second, first)


def _hole_mask(holes, mask, height, width):
    """(B, N) True inside any hole ellipse. Coordinates are in units of the image width, so blobs keep their
    shape whatever the aspect ratio. holes: (6, B, K) centre x, y, radii, cos and sin of the tilt."""
    device = holes.device
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                          torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    x = ((u + 0.5) / width).reshape(1, -1, 1)  # (1, N, 1)
    y = ((v + 0.5) / width).reshape(1, -1, 1)
    cx, cy, ra, rb, cos, sin = holes[:, :, None]  # (B, 1, K) each
    dx, dy = x - cx, y - cy * (height / width)  # (B, N, K)
    e1, e2 = (dx * cos + dy * sin) / ra, (dy * cos - dx * sin) / rb
    return ((e1 * e1 + e2 * e2 < 1) & mask[:, None, :]).any(-1)


@contextlib.contextmanager
def _one_cpu_thread(device):
    """Run the CPU renderer on one thread. Its tensors are small (a few 10^4 to 10^5 numbers), so splitting
    each of its ~1000 elementwise ops across threads costs more than it saves, and on a busy machine, where a
    thread waits for a core, up to 50 times more. For parallel rendering use DataLoader workers."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def render_scenes(scenes, resolution, device="cpu"):
    """Ray-cast scenes (dicts from `sample_scene`) at resolution (H, W) on `device`.

    Returns the batched sample dict: image (B, 3, H, W), semantic (B, H, W), depth (B, 1, H, W),
    normal (B, 3, H, W), edge (B, 1, H, W)."""
    with _one_cpu_thread(device):
        return _render(scenes, resolution, device)


def _render(scenes, resolution, device):
    H, W = resolution
    s = _stack_scenes(scenes, device)
    B, N = len(scenes), H * W
    camera = s["camera"][:, :, None]  # (12, B, 1)
    origin, right, down, forward = camera[0:3], camera[3:6], camera[6:9], camera[9:12]  # (3, B, 1) each

    # Camera rays with z = 1 in the camera frame: then the distance t along a ray IS the depth z.
    fx, fy, cx, cy = camera_intrinsics(H, W)
    v, u = torch.meshgrid(torch.arange(H, device=device, dtype=torch.float32),
                          torch.arange(W, device=device, dtype=torch.float32), indexing="ij")
    ray_x = ((u + 0.5 - cx) / fx).reshape(1, N)  # (1, N)
    ray_y = ((v + 0.5 - cy) / fy).reshape(1, N)
    direction = right * ray_x + down * ray_y + forward  # (3, B, N) world direction of each pixel's ray

    # 1. The nearest surface. Seen from inside, the room is left through the face with the smallest exit
    # distance; face id = 2 * axis + (1 if the ray runs towards the high side of that axis).
    half_width, height, depth_back = s["room"][:, :, None]  # (B, 1) each
    zero = torch.zeros_like(half_width)
    _, t_room, exits = _slab(origin, direction, (-half_width, zero, zero), (half_width, height, depth_back))
    axis = _argmin3(*exits)  # (B, N)
    towards_high = direction.gather(0, axis[None])[0] > 0
    face = 2 * axis + towards_high.long()
    t_prim, prim = primitive_hits(origin, direction, s).min(-1)  # (B, N) nearest primitive and its index
    obj = torch.where(t_prim < t_room, FIRST_PRIMITIVE + prim, face)  # (B, N) object id of each pixel
    depth = torch.minimum(t_prim, t_room)  # (B, N)
    point = origin + depth * direction  # (3, B, N) world hit points

    # The picture is a patch of the back wall with its own class and material.
    present, x0, x1, y0, y1 = s["picture"][:, :, None]  # (B, 1) each
    on_picture = ((obj == BACK_WALL) & (present > 0) & (point[0] >= x0) & (point[0] <= x1)
                  & (point[1] >= y0) & (point[1] <= y1))
    obj = torch.where(on_picture, torch.full_like(obj, PICTURE_ID), obj)

    # 2. Normals in the world: a table lookup for the room's planes, formulas for the primitives.
    room_normals = torch.tensor(ROOM_NORMALS, dtype=torch.float32, device=device).T  # (3, 7)
    normal = room_normals[:, obj.clamp_max(PICTURE_ID)]  # (3, B, N)
    normal = _primitive_normals(point, obj, s, normal)

    # 3. Colour: solid texture times Lambert shading; a shadow ray towards the light tests the primitives.
    classes, materials = _object_tables(s)
    albedo = _albedo(point, _per_pixel(materials, obj))  # (3, B, N)
    to_light, strength, ambient = s["light"][0:3, :, None], s["light"][3, :, None], s["light"][4, :, None]
    shadow_start = point + 1e-3 * normal  # lifted off the surface so that the ray does not hit it
    lit = torch.isinf(primitive_hits(shadow_start, to_light, s)).all(-1)  # (B, N)
    shading = ambient + dot(normal, to_light).clamp_min(0) * strength * lit  # (B, N) linear light
    image = (albedo * shading.sqrt()).clamp(0, 1)  # sqrt: a display gamma of 2, and exact in IEEE

    # 4. Normals into the camera frame (x right, y down, z forward), facing the camera, exactly unit length.
    n = torch.stack([dot(normal, right), dot(normal, down), dot(normal, forward)])  # (3, B, N)
    towards_camera = ray_x * n[0] + ray_y * n[1] + n[2] < 0
    n = torch.where(towards_camera, n, -n)
    n = n / dot(n, n).sqrt()

    # 5. Edges where the object changes (the four walls count as one object: their corners are creases).
    walls = (obj == LEFT_WALL) | (obj == RIGHT_WALL) | (obj == FRONT_WALL) | (obj == BACK_WALL)
    ids = torch.where(walls, torch.full_like(obj, BACK_WALL), obj).reshape(B, H, W)
    edge = torch.zeros(B, H, W, dtype=torch.bool, device=device)
    edge[:, :, :-1] |= ids[:, :, :-1] != ids[:, :, 1:]
    edge[:, :-1, :] |= ids[:, :-1, :] != ids[:, 1:, :]

    # 6. Sensor holes: invalid for depth, normal and semantic alike.
    hole = _hole_mask(s["holes"], s["holes_mask"], H, W)  # (B, N)
    semantic = torch.where(hole, -1, classes.gather(1, obj))
    depth = depth.masked_fill(hole, 0)
    n = n.masked_fill(hole, 0)

    def channels_first(x):  # (C, B, N) -> (B, C, H, W)
        return x.permute(1, 0, 2).reshape(B, -1, H, W).contiguous()

    return {
        "image": channels_first(image),
        "semantic": semantic.reshape(B, H, W).long(),
        "depth": depth.reshape(B, 1, H, W),
        "normal": channels_first(n),
        "edge": edge[:, None].float(),
    }


def parse_resolution(resolution, flag="resolution"):
    """(H, W) from a pair or an "HxW" string; both must be positive multiples of 32 (the networks halve the
    resolution five times)."""
    if isinstance(resolution, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", resolution)
        if match is None:
            raise ValueError(f"{flag} must look like HxW (e.g. 96x128), got {resolution!r}")
        resolution = (int(match.group(1)), int(match.group(2)))
    try:
        height, width = (int(r) for r in resolution)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be (height, width) or 'HxW', got {resolution!r}") from None
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ValueError(f"{flag} must be positive multiples of 32 (e.g. 96x128 or 288x384), "
                         f"got {height}x{width}")
    return height, width


class SyntheticScenes(torch.utils.data.Dataset):
    """The embedded dataset: procedurally rendered indoor rooms with the NYUv2 tasks plus edges.

    SyntheticScenes(split, num_samples, resolution, seed, cache). Splits "train" (1000 samples by default)
    and "val" (200; "test" is the same split) never share a scene. `render_batch(indices, device)` renders
    a whole batch at once, on a GPU if you like; `__getitem__` uses the same code on the CPU. A sample at
    96x128 takes a few milliseconds; cache=True keeps every sample once rendered (about 0.25 MB each at
    96x128), which makes later epochs free. Each DataLoader worker keeps its own cache."""

    name = "synthetic"
    CLASS_NAMES = CLASS_NAMES
    DEFAULT_SIZES = {"train": 1000, "val": 200}

    def __init__(self, split="train", num_samples=None, resolution=(96, 128), seed=0, cache=False):
        split = "val" if split == "test" else split
        if split not in self.DEFAULT_SIZES:
            raise ValueError(f"split must be 'train' or 'val' (or 'test' = 'val'), got {split!r}")
        if num_samples is not None and int(num_samples) <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.split, self.seed = split, int(seed)
        self.num_samples = int(num_samples) if num_samples is not None else self.DEFAULT_SIZES[split]
        self.resolution = parse_resolution(resolution)
        K = len(CLASS_NAMES)
        self.tasks = {"semantic": K, "depth": 1, "normal": 3, "edge": 1}
        self.primary_tasks = {"semantic": K, "depth": 1, "normal": 3}
        self.cache = {} if cache else None

    def __len__(self):
        return self.num_samples

    def scene_seed(self, index):
        """A 63-bit seed for sample `index`, hashed from (seed, split, index): stable and split-specific."""
        digest = hashlib.sha256(f"synthetic-scenes/{self.seed}/{self.split}/{index}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def scene(self, index):
        """The scene description of sample `index` (see `sample_scene`)."""
        return sample_scene(self.scene_seed(index))

    def _check_index(self, index):
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} {self.split} samples")
        return index

    def render_batch(self, indices, device="cpu"):
        """Render samples `indices` at once on `device`: a dict of (B, ...) tensors (see `render_scenes`)."""
        scenes = [self.scene(self._check_index(i)) for i in indices]
        return render_scenes(scenes, self.resolution, device)

    def __getitem__(self, index):
        index = self._check_index(index)
        if self.cache is not None and index in self.cache:
            return dict(self.cache[index])
        sample = {key: value[0] for key, value in self.render_batch([index]).items()}
        if self.cache is not None:
            self.cache[index] = sample
        return dict(sample)


# -----------------------------------------------------------------------------------------------------------
# 3. The real datasets
# -----------------------------------------------------------------------------------------------------------
#
# Files are checked when a dataset is built (folders present, every sample's files present) and read lazily.
# .npy files are memory-mapped: the OS page cache then keeps the whole of NYUv2 in RAM after the first epoch
# and a sample costs one copy into a float32 tensor. cache=True also keeps the converted tensors (NYUv2 at
# 288x384: about 4 MB per sample, 3 GB for the train split).


def _resolve_split(name, split):
    split = "val" if split == "test" else split
    if split not in ("train", "val"):
        raise DatasetError(f"{DOWNLOADS[name]['title']}: split must be 'train' or 'val' "
                           f"(or 'test' = 'val'), got {split!r}")
    return split


def _check_root(name, root):
    if root is None or str(root) == "":
        raise dataset_error(name, "no dataset folder given (pass --data-root PATH)", "<none>")
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise dataset_error(name, "dataset folder not found", root)
    return root


def _check_folder(name, path, what="folder missing (wrong layout?)"):
    if not os.path.isdir(path):
        raise dataset_error(name, what, path)
    return path


def _numbered_npy_files(name, split_dir, folders):
    """Number of samples in an MTAN-style split: files 0.npy .. (n-1).npy in each of `folders`."""
    for folder in folders:
        _check_folder(name, os.path.join(split_dir, folder))
    first = os.path.join(split_dir, folders[0])
    numbers = {int(f[:-4]) for f in os.listdir(first) if re.fullmatch(r"\d+\.npy", f)}
    if not numbers:
        raise dataset_error(name, "no samples (no <i>.npy files) in this split", first)
    count = len(numbers)
    for folder in folders:
        present = set(os.listdir(os.path.join(split_dir, folder)))
        for i in range(count):
            if f"{i}.npy" not in present:
                raise dataset_error(name, "missing file (files must be numbered 0..N-1)",
                                    os.path.join(split_dir, folder, f"{i}.npy"))
    return count


def _read_npy(name, path):
    """Memory-map one .npy file; any failure becomes a DatasetError naming the file."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise dataset_error(name, "missing file", path) from None
    except Exception as error:  # numpy raises ValueError, OSError, EOFError, ... for a damaged file
        raise dataset_error(name, f"cannot read this .npy file ({type(error).__name__}: {error})", path) from None


def _read_picture(name, path):
    """Read an image file with PIL into a numpy array, keeping its mode (RGB for photos, L or P for labels)."""
    try:
        with Image.open(path) as picture:
            if picture.mode not in ("L", "P", "RGB", "I", "I;16"):
                picture = picture.convert("RGB")
            return np.asarray(picture)
    except FileNotFoundError:
        raise dataset_error(name, "missing file", path) from None
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, ... for a damaged file
        raise dataset_error(name, f"cannot read this image ({type(error).__name__}: {error})", path) from None


def _channels_last(name, array, path, channels):
    """(H, W, C) array with C == channels (an (H, W) array is accepted when channels == 1)."""
    if array.ndim == 2 and channels == 1:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] != channels:
        raise dataset_error(name, f"array of shape {tuple(array.shape)}, expected (H, W, {channels})", path)
    return array


def _image_tensor(name, array, path):
    """(H, W, 3) in [0, 1] (or uint8 in [0, 255]) -> float (3, H, W) in [0, 1]."""
    array = _channels_last(name, array, path, 3)
    if array.dtype == np.uint8:
        return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 255)
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), dtype=np.float32, order="C"))  # a copy


def _float_tensor(name, array, path, channels):
    """(H, W, C) or (H, W) -> float (C, H, W); NaN or inf (unknown) becomes 0, the contract's "invalid"."""
    array = _channels_last(name, array, path, channels)
    tensor = torch.from_numpy(np.array(array.transpose(2, 0, 1), dtype=np.float32, order="C"))  # a copy
    return tensor.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _label_tensor(name, array, path, num_classes, shift=0):
    """(H, W) class ids -> long (H, W); ids outside 0..num_classes-1 after `shift` become -1 (ignore)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise dataset_error(name, f"label of shape {tuple(array.shape)}, expected (H, W)", path)
    labels = torch.from_numpy(np.array(array))  # a copy out of the memory map
    if labels.is_floating_point():  # MTAN's files store ids as floats
        labels = labels.nan_to_num_(nan=-1.0).round_()
    labels = labels.long() + shift
    return labels.masked_fill_((labels < 0) | (labels >= num_classes), -1)


def _check_sizes(name, sample, paths):
    """Every map of a sample must have the image's height and width."""
    size = tuple(sample["image"].shape[-2:])
    for key, value in sample.items():
        if tuple(value.shape[-2:]) != size:
            raise dataset_error(name, f"size mismatch: {key} is {tuple(value.shape[-2:])} but the image "
                                f"{paths['image']} is {size}", paths[key])


class _CachedDataset(torch.utils.data.Dataset):
    """Shared by the real datasets: a length, an optional in-memory cache, and `load(index)` to override."""

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} out of range for {self.length} samples")
        if self.cache is not None and index in self.cache:
            return dict(self.cache[index])
        sample = self.load(index)
        if self.cache is not None:
            self.cache[index] = sample
        return dict(sample)

    def _limit(self, count, num_samples):
        """Use only the first `num_samples` samples (train.py's --subset)."""
        if num_samples is not None and int(num_samples) <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        return count if num_samples is None else min(count, int(num_samples))


class NYUv2(_CachedDataset):
    """MTAN's preprocessed NYUv2: {train,val}/{image,label,depth,normal}/<i>.npy, 288x384, 795 / 654 samples.

    13 classes (-1 = ignore), depth in metres (0 = invalid), unit normals (zero = invalid), images in [0, 1]
    used as stored (no mean/std normalisation, as in MTAN). `val` is also the test split."""

    name = "nyuv2"
    # The 13-class grouping of Couprie et al. (2013), in the usual alphabetical order of label ids 0..12.
    CLASS_NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
                   "table", "tv", "wall", "window")
    tasks = {"semantic": 13, "depth": 1, "normal": 3}
    primary_tasks = {"semantic": 13, "depth": 1, "normal": 3}
    FOLDERS = ("image", "label", "depth", "normal")

    def __init__(self, root, split="train", num_samples=None, cache=False):
        root = _check_root(self.name, root)
        self.split = _resolve_split(self.name, split)
        self.folder = _check_folder(self.name, os.path.join(root, self.split), f"no '{self.split}' folder")
        self.length = self._limit(_numbered_npy_files(self.name, self.folder, self.FOLDERS), num_samples)
        self.cache = {} if cache else None

    def load(self, index):
        paths = {folder: os.path.join(self.folder, folder, f"{index}.npy") for folder in self.FOLDERS}
        arrays = {folder: _read_npy(self.name, path) for folder, path in paths.items()}
        sample = {
            "image": _image_tensor(self.name, arrays["image"], paths["image"]),
            "semantic": _label_tensor(self.name, arrays["label"], paths["label"], 13),
            "depth": _float_tensor(self.name, arrays["depth"], paths["depth"], 1),
            "normal": _float_tensor(self.name, arrays["normal"], paths["normal"], 3),
        }
        _check_sizes(self.name, sample, {"image": paths["image"], "semantic": paths["label"],
                                         "depth": paths["depth"], "normal": paths["normal"]})
        return sample


class CityScapes(_CachedDataset):
    """MTAN's preprocessed CityScapes: {train,val}/{image,depth,label_2,label_7,label_19}/<i>.npy.

    num_classes 2, 7 or 19 picks the label folder (-1 = void). "depth" holds the release's inverse depth
    (disparity), 0 = invalid (sky included), as MTAN trains on it. Images in [0, 1], used as stored."""

    name = "cityscapes"
    CLASS_NAMES = {
        2: ("background", "foreground"),
        7: ("flat", "construction", "object", "nature", "sky", "human", "vehicle"),
        19: ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
             "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
             "bicycle"),
    }

    def __init__(self, root, split="train", num_classes=7, num_samples=None, cache=False):
        if num_classes not in (2, 7, 19):
            raise ValueError(f"CityScapes num_classes (--num-classes) must be 2, 7 or 19, got {num_classes!r}")
        root = _check_root(self.name, root)
        self.split = _resolve_split(self.name, split)
        self.num_classes = num_classes
        self.tasks = {"semantic": num_classes, "depth": 1}
        self.primary_tasks = dict(self.tasks)
        self.folders = ("image", "depth", f"label_{num_classes}")
        self.folder = _check_folder(self.name, os.path.join(root, self.split), f"no '{self.split}' folder")
        self.length = self._limit(_numbered_npy_files(self.name, self.folder, self.folders), num_samples)
        self.cache = {} if cache else None

    def load(self, index):
        image_path, depth_path, label_path = (os.path.join(self.folder, f, f"{index}.npy") for f in self.folders)
        sample = {
            "image": _image_tensor(self.name, _read_npy(self.name, image_path), image_path),
            "semantic": _label_tensor(self.name, _read_npy(self.name, label_path), label_path, self.num_classes),
            "depth": _float_tensor(self.name, _read_npy(self.name, depth_path), depth_path, 1),
        }
        _check_sizes(self.name, sample, {"image": image_path, "semantic": label_path, "depth": depth_path})
        return sample


class NYUD(_CachedDataset):
    """MTI-Net's NYUD_MT: jpg images, png labels, npy depth / normals / edges, 795 train / 654 val at 480x640.

    The raw label 0 (unlabeled) becomes -1 and the 40 NYU classes 1..40 become 0..39, as MTI-Net's loader
    does (it writes 255 for "ignore"; the contract's ignore is -1). Depth 0 = invalid; normals zero = invalid;
    edge binarised at 0.5. MTI-Net trains on semantic + depth; normal and edge are its auxiliary tasks."""

    name = "nyud"
    CLASS_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
                   "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
                   "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
                   "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
                   "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")
    tasks = {"semantic": 40, "depth": 1, "normal": 3, "edge": 1}
    primary_tasks = {"semantic": 40, "depth": 1}
    # task -> (folder, file extension)
    FILES = {"image": ("images", ".jpg"), "semantic": ("segmentation", ".png"), "depth": ("depth", ".npy"),
             "normal": ("normals", ".npy"), "edge": ("edge", ".npy")}

    def __init__(self, root, split="train", num_samples=None, cache=False):
        root = _check_root(self.name, root)
        if os.path.isdir(os.path.join(root, "NYUD_MT")):  # the folder that holds NYUD_MT is fine too
            root = os.path.join(root, "NYUD_MT")
        self.root, self.split = root, _resolve_split(self.name, split)
        _check_folder(self.name, os.path.join(root, "gt_sets"))
        list_path = os.path.join(root, "gt_sets", f"{self.split}.txt")
        try:
            with open(list_path) as f:
                ids = [line.strip() for line in f if line.strip()]
        except OSError as error:
            raise dataset_error(self.name, f"cannot read the split list ({error.strerror})", list_path) from None
        if not ids:
            raise dataset_error(self.name, "no samples (empty split list)", list_path)
        for folder, ext in self.FILES.values():
            present = set(os.listdir(_check_folder(self.name, os.path.join(root, folder))))
            for i in ids:
                if i + ext not in present:
                    raise dataset_error(self.name, "missing file", os.path.join(root, folder, i + ext))
        self.ids = ids[: self._limit(len(ids), num_samples)]
        self.length = len(self.ids)
        self.cache = {} if cache else None

    def load(self, index):
        paths = {task: os.path.join(self.root, folder, self.ids[index] + ext)
                 for task, (folder, ext) in self.FILES.items()}
        edge = _float_tensor(self.name, _read_npy(self.name, paths["edge"]), paths["edge"], 1)
        sample = {
            "image": _image_tensor(self.name, _read_picture(self.name, paths["image"]), paths["image"]),
            "semantic": _label_tensor(self.name, _read_picture(self.name, paths["semantic"]), paths["semantic"],
                                      40, shift=-1),
            "depth": _float_tensor(self.name, _read_npy(self.name, paths["depth"]), paths["depth"], 1),
            "normal": _float_tensor(self.name, _read_npy(self.name, paths["normal"]), paths["normal"], 3),
            "edge": (edge > 0.5).float(),
        }
        _check_sizes(self.name, sample, paths)
        return sample


# -----------------------------------------------------------------------------------------------------------
# 4. build_dataset
# -----------------------------------------------------------------------------------------------------------

DATASET_NAMES = ("synthetic", "nyuv2", "cityscapes", "nyud")


def build_dataset(name, root=None, split="train", **options):
    """Build dataset `name` and return (dataset, tasks), tasks being its primary task dict.

    options (None means "not given"): resolution (synthetic only), num_classes (cityscapes only),
    num_samples (use only the first N samples), seed (synthetic only), cache. `root` is ignored for synthetic.
    NYUD's primary tasks are semantic + depth (MTI-Net's NYUD setting); dataset.tasks also lists its
    auxiliary normal and edge targets."""
    options = {key: value for key, value in options.items() if value is not None}
    allowed = {"synthetic": {"resolution", "num_samples", "seed", "cache"},
               "nyuv2": {"num_samples", "cache"},
               "cityscapes": {"num_classes", "num_samples", "cache"},
               "nyud": {"num_samples", "cache"}}
    if name not in allowed:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    for key in options:
        if key not in allowed[name]:
            if key == "resolution":
                raise ValueError(f"--resolution applies to synthetic data only; the {name} files fix their own "
                                 "resolution")
            raise ValueError(f"option {key!r} does not apply to dataset {name!r} "
                             f"(valid: {', '.join(sorted(allowed[name]))})")
    if name == "synthetic":
        dataset = SyntheticScenes(split, **options)
    elif name == "nyuv2":
        dataset = NYUv2(root, split, **options)
    elif name == "cityscapes":
        dataset = CityScapes(root, split, **options)
    else:
        dataset = NYUD(root, split, **options)
    return dataset, dict(dataset.primary_tasks)


# -----------------------------------------------------------------------------------------------------------
# 5. Augmentation
# -----------------------------------------------------------------------------------------------------------
#
# MTAN's NYUv2 augmentation (mtan.md section 6.3; not used in the paper's tables): pick a scale s from
# {1.0, 1.2, 1.5}, crop an int(H/s) x int(W/s) window at a random position, resize it back to H x W (image and
# normals bilinear with align_corners=True; labels, depth and edges nearest, exactly as F.interpolate's
# default "nearest" picks pixels), divide depth by s (zooming in brings things closer), then flip
# horizontally with probability 1/2, negating the normals' x. Normals are not renormalised, as in MTAN.
#
# Here it runs on a whole batch on any device: each output pixel reads source rows/columns that differ per
# sample, so resizing is a gather. A nearest gather can only copy existing values, so ignore labels stay -1 and
# invalid depth stays 0. For normals, the bilinear blend is multiplied by the nearest-resized validity mask:
# an invalid pixel stays exactly zero (MTAN would blend it with its neighbours into a short, "valid" vector).


def _nearest_source(out_size, in_size):
    """Source index of each output index, computed as F.interpolate(mode="nearest") does (in float32)."""
    if out_size == in_size:
        return torch.arange(out_size)
    scale = torch.tensor(float(in_size), dtype=torch.float32) / float(out_size)
    index = torch.floor(torch.arange(out_size, dtype=torch.float32) * scale).long()
    return index.clamp_max(in_size - 1)


def _linear_source(out_size, in_size):
    """The two source indices and the weight of the second, as bilinear with align_corners=True computes."""
    scale = (torch.tensor(float(in_size - 1), dtype=torch.float32) / float(out_size - 1)
             if out_size > 1 else torch.tensor(0.0))
    position = torch.arange(out_size, dtype=torch.float32) * scale
    first = torch.floor(position).long().clamp_max(in_size - 1)
    weight = (position - first.float()).clamp(0, 1)
    return first, (first + 1).clamp_max(in_size - 1), weight


def _take(x, rows, cols):
    """x (B, C, H, W), rows (B, H'), cols (B, W') -> (B, C, H', W'): x[b, :, rows[b, i], cols[b, j]]."""
    B, C = x.shape[:2]
    x = x.gather(2, rows[:, None, :, None].expand(B, C, rows.shape[1], x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(B, C, x.shape[2], cols.shape[1]))


def scale_crop_flip(batch, scale, top, left, flip):
    """The deterministic half of `augment_batch`: for each sample b, crop the int(H/scale[b]) x
    int(W/scale[b]) window at (top[b], left[b]), resize it to H x W, divide depth by scale[b], and mirror it
    if flip[b]. scale, top, left, flip: sequences of length B. Returns a new dict; other entries pass."""
    B, _, H, W = batch["image"].shape
    device = batch["image"].device
    near_rows, near_cols, rows, cols = [], [], [], []
    for b in range(B):
        h, w = int(H / scale[b]), int(W / scale[b])
        if not (0 <= top[b] <= H - h and 0 <= left[b] <= W - w):
            raise ValueError(f"crop {h}x{w} at ({top[b]}, {left[b]}) does not fit in {H}x{W}")
        flip_cols = (lambda x: x.flip(0)) if flip[b] else (lambda x: x)  # mirror = read columns right to left
        near_rows.append(_nearest_source(H, h) + top[b])
        near_cols.append(flip_cols(_nearest_source(W, w) + left[b]))
        r0, r1, wr = _linear_source(H, h)
        c0, c1, wc = _linear_source(W, w)
        rows.append((r0 + top[b], r1 + top[b], wr))
        cols.append((flip_cols(c0 + left[b]), flip_cols(c1 + left[b]), flip_cols(wc)))
    near_rows, near_cols = torch.stack(near_rows).to(device), torch.stack(near_cols).to(device)  # (B, H), (B, W)
    r0, r1, wr = (torch.stack(t).to(device) for t in zip(*rows))
    c0, c1, wc = (torch.stack(t).to(device) for t in zip(*cols))

    def nearest(x):
        return _take(x, near_rows, near_cols)

    def bilinear(x):  # first along rows, then along columns; weight 0 copies the pixel exactly
        x = x.float()
        wr_, wc_ = wr[:, None, :, None], wc[:, None, None, :]
        x = _take(x, r0, torch.arange(W, device=device).expand(B, W)) * (1 - wr_) + \
            _take(x, r1, torch.arange(W, device=device).expand(B, W)) * wr_
        return _take(x, torch.arange(H, device=device).expand(B, H), c0) * (1 - wc_) + \
            _take(x, torch.arange(H, device=device).expand(B, H), c1) * wc_

    out = dict(batch)
    for key, x in batch.items():
        if not torch.is_tensor(x) or x.dim() not in (3, 4) or tuple(x.shape[-2:]) != (H, W):
            continue  # not a (B, [C,] H, W) map: pass it through
        if key == "image":
            out[key] = bilinear(x)
        elif key == "normal":
            valid = (x != 0).any(1, keepdim=True)
            n = bilinear(x) * nearest(valid).to(x.dtype)
            flipped = torch.tensor(flip, device=device)[:, None, None, None]  # (B, 1, 1, 1)
            out[key] = torch.cat([torch.where(flipped, -n[:, :1], n[:, :1]), n[:, 1:]], dim=1)
        elif key == "depth":
            s = torch.tensor(scale, dtype=x.dtype, device=device)[:, None, None, None]
            out[key] = nearest(x) / s
        elif x.dim() == 3:  # (B, H, W) label maps: semantic, parts
            out[key] = nearest(x[:, None])[:, 0]
        else:  # edge, saliency and any other map
            out[key] = nearest(x)
    return out


def augment_batch(batch, generator=None, scales=(1.0, 1.2, 1.5), flip_prob=0.5):
    """MTAN's random scale-crop and horizontal flip on a dict of batched tensors (any device).

    Each sample draws its own scale, crop position and flip from `generator` (a CPU torch.Generator; None
    uses torch's global generator), so a seeded generator gives the same crops on CPU and GPU."""
    B, _, H, W = batch["image"].shape
    choice = torch.randint(len(scales), (B,), generator=generator).tolist()
    position = torch.rand(B, 2, generator=generator, dtype=torch.float64).tolist()
    flip = (torch.rand(B, generator=generator) < flip_prob).tolist()
    scale = [float(scales[c]) for c in choice]
    top = [int(p[0] * (H - int(H / s) + 1)) for p, s in zip(position, scale)]  # uniform in 0..H-h
    left = [int(p[1] * (W - int(W / s) + 1)) for p, s in zip(position, scale)]
    return scale_crop_flip(batch, scale, top, left, flip)


# -----------------------------------------------------------------------------------------------------------
# 6. Pictures
# -----------------------------------------------------------------------------------------------------------


def _numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


# 20 colours that stay distinguishable side by side (Sasha Trubetskoy's list of distinct colours)
_DISTINCT_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                     (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                     (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                     (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]


def palette(num_classes):
    """num_classes colours as uint8 (K, 3): the 20 distinct colours, then hues spread by the golden ratio."""
    colours = list(_DISTINCT_COLOURS[:num_classes])
    for k in range(len(colours), num_classes):
        r, g, b = colorsys.hsv_to_rgb((0.6180339887 * k) % 1.0, 0.7 if k % 2 else 0.45, 0.95 if k % 3 else 0.7)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return np.array(colours, dtype=np.uint8).reshape(num_classes, 3)


def colorize_semantic(labels, num_classes):
    """Class ids (H, W) (tensor or array) -> uint8 (H, W, 3); ignore (-1, or anything out of range) black."""
    labels = _numpy(labels).astype(np.int64)
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    known = (labels >= 0) & (labels < num_classes)
    out[known] = palette(num_classes)[labels[known]]
    return out


# anchors of a perceptually ordered colour map, from far (dark purple) to near (bright yellow)
_DEPTH_COLOURS = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]],
                          dtype=np.float64)


def colorize_depth(depth, max_depth=None):
    """Depth (1, H, W) or (H, W) -> uint8 (H, W, 3): near bright, far dark; invalid (0) black.

    The scale runs from the smallest valid depth to max_depth (default: the largest valid depth)."""
    depth = _numpy(depth).astype(np.float64)
    depth = depth.reshape(depth.shape[-2:])
    valid = depth > 0
    out = np.zeros(depth.shape + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    lo = depth[valid].min()
    hi = max_depth if max_depth is not None else depth[valid].max()
    x = np.clip((hi - depth[valid]) / max(hi - lo, 1e-12), 0, 1) * (len(_DEPTH_COLOURS) - 1)  # 0 far .. 4 near
    i = np.minimum(np.floor(x).astype(np.int64), len(_DEPTH_COLOURS) - 2)
    t = (x - i)[:, None]
    out[valid] = ((1 - t) * _DEPTH_COLOURS[i] + t * _DEPTH_COLOURS[i + 1]).round().astype(np.uint8)
    return out


def colorize_normal(normal):
    """Normals (3, H, W) in [-1, 1] -> uint8 (H, W, 3) as (n + 1) / 2; invalid (zero vector) black."""
    normal = _numpy(normal).astype(np.float64)
    rgb = np.clip((normal.transpose(1, 2, 0) + 1) / 2, 0, 1)
    rgb[~(normal != 0).any(0)] = 0
    return (rgb * 255).round().astype(np.uint8)


def _grey(mask):
    """A (1, H, W) or (H, W) map in [0, 1] -> uint8 (H, W, 3) grey picture."""
    mask = _numpy(mask).astype(np.float64)
    mask = mask.reshape(mask.shape[-2:])
    return np.repeat((np.clip(mask, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def montage(samples, num_classes, class_names=None):
    """Rows of [image | semantic | depth | normals | edge | invalid mask] (a PIL image), one row per sample,
    under a line of column titles and above a colour legend of the classes (when class_names is given)."""
    titles = ["image", "semantic", "depth (near bright)", "normals", "edge", "invalid"]
    rows = []
    for s in samples:
        image = (np.clip(_numpy(s["image"]).transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
        rows.append(np.concatenate([image, colorize_semantic(s["semantic"], num_classes),
                                    colorize_depth(s["depth"]), colorize_normal(s["normal"]),
                                    _grey(s["edge"]), _grey(_numpy(s["depth"]) == 0)], axis=1))
    H, W = rows[0].shape[0], rows[0].shape[1] // len(titles)
    line = 14  # pixels per line of text
    legend = line if class_names else 0
    canvas = Image.new("RGB", (rows[0].shape[1], line + H * len(rows) + legend), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((c * W + 4, 1), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        canvas.paste(Image.fromarray(row), (0, line + r * H))
    x, y = 4, line + H * len(rows) + 2
    for name, colour in zip(class_names or [], palette(num_classes)):
        draw.rectangle([x, y, x + 9, y + 9], fill=tuple(int(c) for c in colour))
        draw.text((x + 13, y - 1), name, fill=(0, 0, 0))
        x += 13 + int(draw.textlength(name)) + 12
    return canvas


def main(argv=None):
    parser = argparse.ArgumentParser(description="Render synthetic samples with every task into a montage PNG.")
    parser.add_argument("--out", default=os.path.join("docs", "synthetic_montage.png"), help="PNG to write")
    parser.add_argument("--num", type=int, default=4, help="number of samples (rows)")
    parser.add_argument("--resolution", default="192x256", help="HxW, multiples of 32")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dataset = SyntheticScenes(args.split, resolution=args.resolution, seed=args.seed)
    batch = dataset.render_batch(range(args.num))
    samples = [{key: value[b] for key, value in batch.items()} for b in range(args.num)]
    folder = os.path.dirname(args.out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    montage(samples, len(CLASS_NAMES), CLASS_NAMES).save(args.out)
    print(f"wrote {args.out}: {args.num} {args.split} samples at {dataset.resolution[0]}x{dataset.resolution[1]}"
          f" (classes: {', '.join(CLASS_NAMES)})")


if __name__ == "__main__":
    main()
