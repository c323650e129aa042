"""
The datasets of MTAN and MTI-Net, an embedded synthetic dataset, and augmentation.

Every dense dataset returns the same sample, a dict of tensors:

    image     float (3, H, W) in [0, 1]
    semantic  long  (H, W)    class ids, -1 = ignore
    depth     float (1, H, W) metres along the optical axis (CityScapes: inverse depth), 0 = invalid
    normal    float (3, H, W) unit surface normals in the camera frame, all-zero vector = invalid
    edge      float (1, H, W) in {0, 1}
    parts     long  (H, W)    human-part ids, 0 = background, -1 = ignore (PASCAL)
    saliency  float (1, H, W) in {0, 1} (PASCAL)

whatever convention the files on disk use for "unknown" (NYUD's raw 0 becomes -1, and so on). Each dataset
has a `name`, `class_names`, a `tasks` dict (every target it provides: task name -> output channels) and a
`primary_tasks` dict (the tasks the papers train on). The Visual Decathlon is a classification benchmark: its
samples are {"image", "label"}.

THE DATASET MODULE is sections 1-5, up to the line "Appendices" (about line 825):

1. build_dataset: every dense dataset by name (train.py and eval.py call it).
2. The file datasets of the two papers: NYUv2 and CityScapes (MTAN's preprocessed .npy releases) and NYUD
   (MTI-Net's NYUD_MT), each a table of files; read_image, the one image reader; the conversion of the arrays
   read into the sample above, and check_sample, the few rules every sample obeys.
3. Augmentation: MTAN's random scale-crop and flip on batched tensors (so it can run on the GPU), and the edge
   targets derived from semantic labels.
4. SyntheticScenes: indoor-like rooms rendered by ray casting in torch, the dataset of `python train.py`. It
   ships as code, so a fresh machine can train and test with no download.
5. PASCAL-Context (MTI-Net's PASCAL_MT, five tasks).

THE APPENDICES that follow are infrastructure: the machinery that makes the repository self-contained (no
scipy, no skimage, no download needed to run the tests). A reader of the papers can skip them.

A. Errors and download notes: what a user sees when a dataset is missing or malformed, and where to get it.
B. The PASCAL transforms (augmentation, resizing) and label builders (Pascal-Part parts, Context edges).
C. The Visual Decathlon loader (MTAN's many-to-many experiment) and build_decathlon.
D. The ray caster behind SyntheticScenes (sample_scene ... render_scenes).
E. A MATLAB v5 .mat reader, scoped to what PASCAL_MT's files hold.
F. Guo-Hall thinning (PASCAL's edge labels).
G. The synthetic Decathlon: four small classification domains rendered with appendix D.
H. Pictures: colour maps for labels, depth and normals (eval.py uses them), the montage, and `python data.py`,
   which renders synthetic samples to docs/synthetic_montage.png.
"""
import argparse
import colorsys
import contextlib
import hashlib
import inspect
import math
import os
import re
import struct
import warnings
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

# ------------------------------------------------------------------------------------------------------------
# 1. build_dataset: every dense dataset by name
# ------------------------------------------------------------------------------------------------------------
#
# DATASETS (after section 5, once the classes exist) maps each name to its class. A class carries everything
# build_dataset needs: its `name`, and the options it accepts, which are the arguments of its constructor
# after (root, split), or after (split) for a dataset without files. A new dataset is one more class in that
# list, with `name`, `tasks`, `primary_tasks` and `class_names`. The Visual Decathlon, whose samples are
# labelled images, has its own entry point: build_decathlon (appendix C).


def build_dataset(name, root=None, split="train", **options):
    """Build dataset `name` and return (dataset, tasks), tasks being its primary task dict.

    options: those its class's constructor takes, None meaning "not given" (num_samples: use only the first N
    samples; the classes describe the others). `root` is the dataset folder (None: data/<name> under the
    working directory); synthetic ignores it. NYUD's primary tasks are semantic + depth (MTI-Net's NYUD
    setting); dataset.tasks also lists its auxiliary normal and edge targets."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    cls = DATASETS[name]
    accepted = [key for key in inspect.signature(cls).parameters if key not in ("root", "split")]
    options = {key: value for key, value in options.items() if value is not None}
    for key in options:
        if key not in accepted:
            hint = "; --resolution is for synthetic data only" if key == "resolution" else ""
            raise ValueError(f"option {key!r} does not apply to dataset {name!r} (valid: "
                             f"{', '.join(accepted)}){hint}")
    reads_files = "root" in inspect.signature(cls).parameters
    dataset = cls(root, split, **options) if reads_files else cls(split, **options)
    return dataset, dict(dataset.primary_tasks)


# ------------------------------------------------------------------------------------------------------------
# 2. The file datasets of the two papers: NYUv2, CityScapes (MTAN) and NYUD (MTI-Net)
# ------------------------------------------------------------------------------------------------------------
#
# A dataset of files is a table, FILES = {task: (folder, extension, reader)}: the file of sample <id> for a task
# is ROOT/<folder>/<id><extension>, and reader(path) reads it. Files are found when a dataset is built (a
# missing one is named then) and read lazily. .npy files are memory-mapped: the OS page cache then keeps the
# whole of NYUv2 in RAM after the first epoch and a sample costs one copy into a float32 tensor. cache=True
# also keeps the converted tensors (NYUv2 at 288x384: about 4 MB per sample, 3 GB for the train split). Every
# failure is a DatasetError that names the file, the expected layout and the download (appendix A).

LABEL_TASKS = ("semantic", "parts")  # maps of class ids, (H, W) long; the other maps are float (C, H, W)
IMAGE_TOLERANCE = 1e-3  # resampled or compressed copies may overshoot [0, 1] by a rounding error
MAX_DEPTH = 100.0  # metres: no indoor scene (NYUv2, NYUD) comes near; a larger value is millimetres or so


class _CachedDataset(torch.utils.data.Dataset):
    """Shared by the dense datasets: `length` samples, an optional in-memory cache (`cache`: a dict, or None)
    and `load(index)`, which each dataset defines to read (or render) sample `index`; every sample loaded
    passes check_sample. A dataset of files names its samples `ids` and keeps their files in `paths`
    ({id: {task: path}}, from _find_files)."""

    same_size = True  # every sample of a split has one size; PASCAL (decoded at each image's size): False
    label_offset = 0  # the stored class id is id + label_offset (NYUD stores 1..40 for 0..39)
    max_depth = MAX_DEPTH  # the bound on depth; None: no bound (CityScapes' inverse depth)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        index = range(self.length)[index]  # 0 .. length - 1, negative from the end; IndexError otherwise
        if self.cache is not None and index in self.cache:
            return dict(self.cache[index])
        sample = self.load(index)
        self.check_sample(index, sample)
        if self.cache is not None:
            self.cache[index] = sample
        return dict(sample)

    def check_sample(self, index, sample):
        """The rules every sample obeys: a value the network must not see is a DatasetError naming the file and
        what was expected (not a quiet wrong result, nor a traceback of the batch collation). Every map has the
        image's height and width and its task's channels; every sample of a split the size of the first one
        read (sample 0, read before training), unless the dataset resizes them; the image lies in [0, 1]
        (NaN fails), class ids in -1..K-1, depth at most max_depth. A value is printed with the digits that
        show its excess (100.0001, not 100). Cheap: a few passes in numpy (see _to_tensor)."""
        files = self.sample_files(index) if hasattr(self, "paths") else {}

        def fail(key, problem):
            raise dataset_error(self.name, problem, files.get(key, f"sample {index} ({key})"))

        H, W = (tuple(sample["image"].shape) + (0, 0))[1:3]  # (3, H, W); a malformed image fails below
        for key, x in sample.items():
            labels, channels = key in LABEL_TASKS, 3 if key == "image" else self.tasks[key]
            if tuple(x.shape) != ((H, W) if labels else (channels, H, W)):
                stored = tuple(x.shape[1:] + x.shape[:1]) if x.dim() == 3 else tuple(x.shape)  # channels last
                mismatch = "size mismatch: " if tuple(x.shape[-2:]) != (H, W) else ""
                fail(key, f"{mismatch}{key} of shape {stored}, expected (H, W{'' if labels else f', {channels}'})"
                     f" where (H, W) = ({H}, {W}) is the size of the image {files.get('image', '')}")
        first = self.__dict__.setdefault("first_size", (H, W))
        if (H, W) != first and self.same_size:
            fail("image", f"sample {index} is {H}x{W}, but the first samples of the {self.split} split are "
                 f"{first[0]}x{first[1]}: crop or resize it")
        low, high = float(sample["image"].numpy().min()), float(sample["image"].numpy().max())
        if not (low >= -IMAGE_TOLERANCE and high <= 1 + IMAGE_TOLERANCE):  # also true for NaN
            fail("image", f"image values in [{np.float32(low)!s}, {np.float32(high)!s}], expected floats in [0, 1] "
                 f"(within {IMAGE_TOLERANCE:g}; saved as 0..255? divide by 255)")
        for key in [key for key in sample if key in LABEL_TASKS]:
            ids, K, offset = sample[key].numpy(), self.tasks[key], self.label_offset
            if ids.min() < -1 or ids.max() >= K:
                wrong = int(ids[(ids < -1) | (ids >= K)][0]) + offset  # as stored in the file
                fail(key, f"label value {wrong} outside the expected range {offset}..{K - 1 + offset} "
                     f"(ignore: {offset - 1} or 255)")
        if "depth" in sample and self.max_depth is not None:
            high = float(sample["depth"].numpy().max())
            if high > self.max_depth:
                fail("depth", f"depth up to {np.float32(high)!s}, expected metres (at most {self.max_depth:g}; "
                     "millimetres? divide by 1000)")

    def _use(self, ids, num_samples, cache):
        """Use the first `num_samples` of the samples `ids` (all of them when None; train.py's --subset)."""
        self.ids = ids if num_samples is None else ids[: int(num_samples)]
        self.length, self.cache = len(self.ids), {} if cache else None

    def sample_files(self, index):
        return self.paths[self.ids[index]]

    def load(self, index):
        """Sample `index` of a dataset of files: every file of FILES read and converted (_to_tensor)."""
        paths = self.sample_files(index)
        return {task: _to_tensor(task, _read(self.name, paths[task], read), paths[task], self.label_offset)
                for task, (_, _, read) in self.FILES.items()}


class _MTANRelease(_CachedDataset):
    """MTAN's preprocessed releases (NYUv2, CityScapes): ROOT/{train,val}/<folder>/<i>.npy, one folder per
    target (`folders`: task -> folder), files numbered 0, 1, 2, ... Images in [0, 1] are used as stored (no
    mean/std normalisation, as in MTAN)."""

    def __init__(self, root, split="train", num_samples=None, cache=False):
        self.split = _resolve_split(split)
        folder = _check_folder(self.name, _check_folder(self.name, root), self.split,
                               problem=f"no '{self.split}' folder")
        images = _check_folder(self.name, folder, self.folders["image"])
        numbers = {int(f[:-4]) for f in os.listdir(images) if re.fullmatch(r"\d+\.npy", f)}
        if not numbers:
            raise dataset_error(self.name, "no samples (no <i>.npy files) in this split", images)
        ids = [str(i) for i in range(len(numbers))]
        self.FILES = {task: (name, ".npy", _read_npy) for task, name in self.folders.items()}
        self.paths = _find_files(self.name, folder, ids, self.FILES, "missing file (files must be numbered 0..N-1)")
        self._use(ids, num_samples, cache)


class NYUv2(_MTANRelease):
    """MTAN's preprocessed NYUv2: {train,val}/{image,label,depth,normal}/<i>.npy, 288x384, 795 / 654 samples.

    13 classes (-1 = ignore), depth in metres (0 = invalid), unit normals (zero = invalid), images in [0, 1].
    `val` is also the test split."""

    name = "nyuv2"
    # The 13-class grouping of Couprie et al. (2013), in its usual alphabetical order (the files name none).
    class_names = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
                   "table", "tv", "wall", "window")
    tasks = {"semantic": 13, "depth": 1, "normal": 3}
    primary_tasks = {"semantic": 13, "depth": 1, "normal": 3}
    folders = {"image": "image", "semantic": "label", "depth": "depth", "normal": "normal"}


class CityScapes(_MTANRelease):
    """MTAN's preprocessed CityScapes: {train,val}/{image,depth,label_2,label_7,label_19}/<i>.npy.

    num_classes 2, 7 or 19 picks the label folder (-1 = void). "depth" holds the release's inverse depth
    (disparity), 0 = invalid (sky included), as MTAN trains on it: no bound in metres. Images in [0, 1]."""

    name = "cityscapes"
    max_depth = None
    # Paper Table 1's groupings and the standard train ids, in that order (the files carry no names).
    CLASS_NAMES_BY_COUNT = {  # num_classes -> class_names
        2: ("background", "foreground"),
        7: ("flat", "construction", "object", "nature", "sky", "human", "vehicle"),
        19: ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
             "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
             "bicycle"),
    }

    def __init__(self, root, split="train", num_classes=7, num_samples=None, cache=False):
        if num_classes not in (2, 7, 19):
            raise ValueError(f"CityScapes num_classes (--num-classes) is 2, 7 or 19, got {num_classes!r}")
        self.num_classes, self.class_names = num_classes, self.CLASS_NAMES_BY_COUNT[num_classes]
        self.tasks = {"semantic": num_classes, "depth": 1}
        self.primary_tasks = dict(self.tasks)
        self.folders = {"image": "image", "semantic": f"label_{num_classes}", "depth": "depth"}
        super().__init__(root, split, num_samples, cache)


class NYUD(_CachedDataset):
    """MTI-Net's NYUD_MT: jpg images, png labels, npy depth / normals / edges, 795 train / 654 val at 480x640.

    The raw label 0 (unlabeled) becomes -1 and the 40 NYU classes 1..40 become 0..39, as MTI-Net's loader
    does (it writes 255 for "ignore"; here ignore is -1). Depth 0 = invalid; normals zero = invalid;
    edge binarised at 0.5. MTI-Net trains on semantic + depth; normal and edge are its auxiliary tasks."""

    name = "nyud"
    label_offset = 1
    class_names = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
                   "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow",
                   "mirror", "floor mat", "clothes", "ceiling", "books", "refrigerator", "television",
                   "paper", "towel", "shower curtain", "box", "whiteboard", "person", "night stand", "toilet",
                   "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")
    tasks = {"semantic": 40, "depth": 1, "normal": 3, "edge": 1}
    primary_tasks = {"semantic": 40, "depth": 1}

    def __init__(self, root, split="train", num_samples=None, cache=False):
        root, self.split = _check_folder(self.name, root, inner="NYUD_MT"), _resolve_split(split)
        ids = _read_split_list(self.name, root, "gt_sets", self.split)
        self.FILES = {"image": ("images", ".jpg", read_image), "semantic": ("segmentation", ".png", _read_pixels),
                      "depth": ("depth", ".npy", _read_npy), "normal": ("normals", ".npy", _read_npy),
                      "edge": ("edge", ".npy", _read_binary_edges)}
        self.paths = _find_files(self.name, root, ids, self.FILES)
        self._use(ids, num_samples, cache)


# ---- finding and reading the files: every failure is a DatasetError naming the path ------------------------


def _check_folder(name, root, *path, problem="folder missing (wrong layout?)", inner=None):
    """The folder root/path of dataset `name`, or its sub-folder `inner` when it has one (the folder that holds
    NYUD_MT or PASCAL_MT is fine too); with no `path`, the dataset's folder `root` (None or "": data/<name>
    under the working directory). A missing folder is a DatasetError naming it, `problem` saying what is wrong."""
    default = root is None or str(root) == ""
    folder = os.path.join(os.path.join("data", name) if default else os.path.expanduser(str(root)), *path)
    if not os.path.isdir(folder):
        if not path:  # the dataset's own folder
            problem = "dataset folder not found" + (f" (no --data-root PATH given; looked in the default folder "
                                                    f"{folder} under the working directory)" if default else "")
        raise dataset_error(name, problem, os.path.abspath(folder) if default and not path else folder)
    return os.path.join(folder, inner) if inner and os.path.isdir(os.path.join(folder, inner)) else folder


def _find_files(name, root, ids, files, missing="missing file"):
    """{id: {task: path}} for the samples `ids`, whose files are ROOT/<folder>/<id><extension> for each
    task -> (folder, extension, reader) of `files`; a missing folder or file is a DatasetError naming it,
    `missing` saying what is wrong."""
    paths = {i: {} for i in ids}
    for task, (folder, ext, _) in files.items():
        present = set(os.listdir(_check_folder(name, root, folder)))
        for i in ids:
            paths[i][task] = os.path.join(root, folder, i + ext)
            if i + ext not in present:
                raise dataset_error(name, missing, paths[i][task])
    return paths


def _read_split_list(name, root, folder, split):
    """The sample ids of a split: the lines of ROOT/<folder>/<split>.txt (NYUD's gt_sets, PASCAL's ImageSets)."""
    def read(path):
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]

    path = os.path.join(_check_folder(name, root, folder), f"{split}.txt")
    ids = _read(name, path, read, "split list")
    if not ids:
        raise dataset_error(name, "no samples (empty split list)", path)
    return ids


def _resolve_split(split):
    """The split name, "train" or "val"; "test" means "val", the split the papers report (NYUv2, CityScapes,
    NYUD and PASCAL have no other labelled test split)."""
    split = "val" if split == "test" else split
    if split not in ("train", "val"):
        raise DatasetError(f"split must be 'train' or 'val' (or 'test' = 'val'), got {split!r}")
    return split


def _read(name, path, read, what=None):
    """read(path), where any failure becomes a DatasetError naming the file: "missing file", or "cannot read
    this <what>" (by default: "image" for read_image, else "<extension> file") with the reason (numpy, PIL,
    read_image and read_mat raise ValueError, OSError, EOFError, ... for a damaged file)."""
    try:
        return read(path)
    except FileNotFoundError:
        raise dataset_error(name, "missing file", path) from None
    except Exception as error:
        what = what or ("image" if read is read_image else os.path.splitext(path)[1] + " file")
        problem = error.problem if isinstance(error, UnreadableFileError) else f"{type(error).__name__}: {error}"
        raise dataset_error(name, f"cannot read this {what} ({problem})", path) from None


def _read_npy(path):
    """Memory-map one .npy file."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _read_binary_edges(path):
    """NYUD's edge maps, binarised at 0.5 as MTI-Net's loader does (NaN or inf: no edge)."""
    edge = _read_npy(path)
    return np.isfinite(edge) & (edge > 0.5)


def _read_pixels(path, mode=None):
    """The stored values of a picture file: a label map (modes L, P, I;16 keep their numbers), or converted to
    `mode` (PASCAL's normals: "RGB")."""
    with Image.open(path) as picture:
        return np.asarray(picture if mode is None else picture.convert(mode))


def read_image(path, note=None):
    """An image file -> float (3, H, W) in [0, 1], EXIF orientation applied: the one image reader of the
    dataset loaders and `eval.py --image`. 8-bit files (grey, RGB, RGBA, palette) divide by 255; 16-bit and
    32-bit integer ones by their type's maximum; float ones (mode F) are used as they are in [0, 1], else
    rescaled from their own minimum and maximum, and `note(line)`, when given, says so. These three are grey,
    used for all channels (PIL's convert("RGB") would clip 16-bit values to 255: an all-white picture). An
    unreadable file, a decompression bomb or NaN / inf values raise UnreadableFileError."""
    try:
        with warnings.catch_warnings():  # PIL warns above 89M pixels, refuses above twice that: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                picture, mode = ImageOps.exif_transpose(picture), picture.mode
                if mode in ("I", "F") or mode.startswith("I;16"):
                    array = np.asarray(picture, dtype=np.float64)
                else:
                    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableFileError(str(path), f"{type(error).__name__}: {error}") from None
    if array.ndim == 2:
        if not np.isfinite(array).all():
            raise UnreadableFileError(str(path), "holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
            scale, how = (0.0, 65535.0), "a 16-bit image: values divided by 65535"
        elif mode == "I":
            scale, how = (0.0, 2.0 ** 31 - 1), "a 32-bit image: values divided by 2^31 - 1"
        elif low >= 0 and high <= 1:
            scale, how = (0.0, 1.0), None
        else:
            scale, how = (low, max(high, low + 1e-12)), f"a float image in [{low:.6g}, {high:.6g}]: rescaled"
        if how and note:
            note(f"{path} is {how} to [0, 1] (grey, used for all three channels)")
        grey = ((array - scale[0]) / (scale[1] - scale[0])).clip(0, 1).astype(np.float32)
        array = np.repeat(grey[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


# ---- the arrays read into the sample's tensors -------------------------------------------------------------
#
# In numpy, which runs on the calling thread. (Torch would spread these large elementwise ops over its thread
# pool: no gain in a DataLoader worker, and many times slower in the main process while the machine is busy.)

_negative_depth_noted = []  # the note on negative depth is printed once per process


def _to_tensor(task, array, path, label_offset=0):
    """A stored (H, W, C) or (H, W) array -> the tensor of `task` in the module docstring's convention; an
    image from read_image is one already. check_sample checks the values afterwards.
    image: uint8 divided by 255, floats as stored. Labels: float ids rounded (NaN: ignore), `label_offset`
    subtracted, the ignore values (-1 after the offset, or a stored -1 or 255) -1; any other id outside the
    classes is left for check_sample to name (labels of another class set must not silently become
    "ignore"). Others: float (C, H, W), NaN or inf (unknown) 0, "invalid". Depth is positive: 0 and negative
    values (another release's marker, -1) are invalid, read by the losses and metrics as `target > 0`."""
    if torch.is_tensor(array):
        return array
    array = np.moveaxis(array[:, :, None] if array.ndim == 2 else array, -1, 0)  # (C, H, W), still a view
    if task in LABEL_TASKS:
        array = array[0] if len(array) == 1 else array
        if array.dtype.kind == "f":  # MTAN's files store ids as floats
            array = np.where(np.isnan(array), -1, np.rint(array))
        labels = array.astype(np.int64) - label_offset  # a copy out of the memory map
        labels[(labels == -1) | (labels == -1 - label_offset) | (labels == 255 - label_offset)] = -1
        return torch.from_numpy(labels)
    values = np.array(array, dtype=np.float32, order="C")  # a copy out of the memory map
    if task == "image":
        return torch.from_numpy(values / 255 if array.dtype == np.uint8 else values)
    values[~np.isfinite(values)] = 0
    if task == "depth" and not _negative_depth_noted and float(values.min()) < 0:
        _negative_depth_noted.append(path)
        print(f"note: {path} holds negative depth values: read as invalid, as 0 is (README, 'Datasets')")
    return torch.from_numpy(values)


# ------------------------------------------------------------------------------------------------------------
# 3. Augmentation (batched, any device) and derived targets
# ------------------------------------------------------------------------------------------------------------
#
# MTAN's NYUv2 augmentation (lorenmt/mtan, im2im_pred/create_dataset.py, RandomScaleCrop; not used in the
# paper's tables): pick a scale s from {1.0, 1.2, 1.5}, crop an int(H/s) x int(W/s) window at a random
# position, resize it back to H x W (image and normals bilinear with align_corners=True; labels, depth and
# edges nearest, exactly as F.interpolate's default "nearest" picks pixels), divide depth by s (zooming in
# brings things closer), then flip horizontally with probability 1/2, negating the normals' x. Normals are not
# renormalised, as in MTAN.
#
# Here it runs on a whole batch at once, on the batch's device: every sample has its own crop, so each output
# pixel reads source rows and columns that differ per sample, and resizing becomes a gather. A mirror just
# reads the columns right to left. A nearest gather can only copy existing values, so ignore labels stay -1
# and invalid depth stays 0. For normals, the bilinear blend is multiplied by the nearest-resized validity
# mask: an invalid pixel stays exactly zero (MTAN would blend it with its neighbours into a short vector).


def augment_batch(batch, generator=None, scales=(1.0, 1.2, 1.5), flip_prob=0.5):
    """MTAN's random scale-crop and horizontal flip on a dict of batched tensors (any device).

    Each sample draws its own scale, crop position and flip from `generator` (None: torch's default CPU
    generator). A generator on the batch's device keeps everything there, with no host-device sync; a seeded
    generator gives the same crops on every run."""
    B, _, H, W = batch["image"].shape
    device = generator.device if generator is not None else torch.device("cpu")
    # torch.tensor(..., device=cuda) would be a blocking copy (a host-device sync every step); a non-blocking
    # copy of the 3 scales does not wait.
    scale = torch.tensor(scales, dtype=torch.float64).to(device, non_blocking=True)[
        torch.randint(len(scales), (B,), generator=generator, device=device)]
    position = torch.rand(B, 2, generator=generator, dtype=torch.float64, device=device)
    flip = torch.rand(B, generator=generator, device=device) < flip_prob
    h, w = torch.floor(H / scale), torch.floor(W / scale)
    top = torch.floor(position[:, 0] * (H - h + 1)).long()  # uniform in 0 .. H - h
    left = torch.floor(position[:, 1] * (W - w + 1)).long()
    return scale_crop_flip(batch, scale, top, left, flip)


def scale_crop_flip(batch, scale, top, left, flip):
    """The deterministic half of `augment_batch`. For each sample b: crop the int(H/scale[b]) x
    int(W/scale[b]) window whose corner is (top[b], left[b]) (it must fit in the image), resize it to H x W,
    divide depth by scale[b], and mirror it if flip[b]. scale, top, left, flip: (B,) tensors or sequences.
    Returns a new dict; entries that are not (B, [C,] H, W) maps pass unchanged."""
    B, _, H, W = batch["image"].shape
    device = batch["image"].device
    scale = torch.as_tensor(scale, dtype=torch.float64).to(device)
    top, left = torch.as_tensor(top).to(device).long(), torch.as_tensor(left).to(device).long()
    flip = torch.as_tensor(flip).to(device).bool()[:, None]  # (B, 1)
    h, w = torch.floor(H / scale).long(), torch.floor(W / scale).long()  # int(H / s), as MTAN computes it

    def mirror(columns):  # (B, W) -> the same columns read right to left where flip
        return torch.where(flip, columns.flip(1), columns)

    near_rows = _nearest_source(H, h) + top[:, None]  # (B, H) source row of each output row
    near_cols = mirror(_nearest_source(W, w) + left[:, None])  # (B, W)
    r0, r1, wr = _linear_source(H, h)
    c0, c1, wc = _linear_source(W, w)
    r0, r1, wr = r0 + top[:, None], r1 + top[:, None], wr[:, None, :, None]
    c0, c1, wc = mirror(c0 + left[:, None]), mirror(c1 + left[:, None]), mirror(wc)[:, None, None, :]
    every_row = torch.arange(H, device=device).expand(B, H)
    every_col = torch.arange(W, device=device).expand(B, W)

    def nearest(x):
        return _take(x, near_rows, near_cols)

    def bilinear(x):  # along rows, then along columns; a weight of 0 copies the pixel exactly
        x = _take(x, r0, every_col) * (1 - wr) + _take(x, r1, every_col) * wr
        return _take(x, every_row, c0) * (1 - wc) + _take(x, every_row, c1) * wc

    out = dict(batch)
    for key, x in batch.items():
        if not torch.is_tensor(x) or x.dim() not in (3, 4) or tuple(x.shape[-2:]) != (H, W):
            continue  # not a (B, [C,] H, W) map
        if key == "image":
            out[key] = bilinear(x)
        elif key == "normal":
            valid = (x != 0).any(1, keepdim=True)
            n = bilinear(x) * nearest(valid).to(x.dtype)
            n_x = torch.where(flip[:, :, None, None], -n[:, :1], n[:, :1])  # a mirror turns x around
            out[key] = torch.cat([n_x, n[:, 1:]], dim=1)
        elif key == "depth":
            out[key] = nearest(x) / scale.to(x.dtype)[:, None, None, None]
        elif x.dim() == 3:  # (B, H, W) label maps: semantic, parts
            out[key] = nearest(x[:, None])[:, 0]
        else:  # edge, saliency and any other map
            out[key] = nearest(x)
    return out


def _nearest_source(out_size, in_sizes):
    """(B, out_size) source index of each output index, for per-sample input sizes (B,), computed as
    F.interpolate(mode="nearest") does: floor(i * (in / out)) in float32."""
    scale = in_sizes.float() / _as_divisor(out_size, in_sizes)  # (B,)
    index = torch.floor(torch.arange(out_size, device=in_sizes.device).float() * scale[:, None]).long()
    return torch.minimum(index, (in_sizes - 1)[:, None])


def _linear_source(out_size, in_sizes):
    """The two source indices (B, out_size) and the weight of the second, as bilinear interpolation with
    align_corners=True computes them: position i * (in - 1) / (out - 1) in float32."""
    scale = (in_sizes - 1).float() / _as_divisor(max(out_size - 1, 1), in_sizes)  # (B,)
    position = torch.arange(out_size, device=in_sizes.device).float() * scale[:, None]
    last = (in_sizes - 1)[:, None]
    first = torch.minimum(torch.floor(position).long(), last)
    weight = (position - first.float()).clamp(0, 1)
    return first, torch.minimum(first + 1, last), weight


def _as_divisor(number, like):
    """`number` as a float32 tensor on `like`'s device, to divide by. CUDA divides a tensor by a Python number
    as a multiplication by its reciprocal, which can round differently from the CPU's true division (and so
    pick another source pixel); by a tensor it divides truly, as the CPU does either way."""
    return torch.full_like(like, number, dtype=torch.float32)


def _take(x, rows, cols):
    """x (B, C, H, W), rows (B, H'), cols (B, W') -> (B, C, H', W'): x[b, :, rows[b, i], cols[b, j]]."""
    B, C = x.shape[:2]
    x = x.gather(2, rows[:, None, :, None].expand(B, C, rows.shape[1], x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(B, C, x.shape[2], cols.shape[1]))


def semantic_edges(semantic):
    """Edge targets derived from semantic labels, for datasets without edge files (NYUv2, CityScapes) when
    MTI-Net uses edges as an auxiliary task: a pixel is an edge when its label differs from the label of its
    right or lower neighbour, both labels being valid (an ignored pixel next to a label is not an edge: the
    boundary is unknown there). The same rule draws the synthetic scenes' edges (with objects as labels).

    semantic: long (B, H, W) or (H, W), -1 = ignore. Returns float (B, 1, H, W) or (1, H, W) in {0, 1}."""
    valid = semantic >= 0
    edge = torch.zeros_like(valid)
    horizontal = (semantic[..., :, :-1] != semantic[..., :, 1:]) & valid[..., :, :-1] & valid[..., :, 1:]
    vertical = (semantic[..., :-1, :] != semantic[..., 1:, :]) & valid[..., :-1, :] & valid[..., 1:, :]
    edge[..., :, :-1] |= horizontal
    edge[..., :-1, :] |= vertical
    return edge.unsqueeze(-3).float()


def add_derived_targets(batch, tasks):
    """Edge targets from semantic boundaries (semantic_edges) when a run needs edges and the dataset has none
    (NYUv2, CityScapes). train.py calls it after augmentation, on the device, so the edges follow the
    augmented labels. batch: a dict of batched tensors; tasks: the tasks the run trains or evaluates. Returns
    a new dict when it adds edges (the input is not modified), else `batch` itself."""
    if "edge" in tasks and "edge" not in batch:
        batch = dict(batch, edge=semantic_edges(batch["semantic"]))
    return batch


# ------------------------------------------------------------------------------------------------------------
# 4. SyntheticScenes: procedural indoor rooms (the dataset; its renderer is appendix D)
# ------------------------------------------------------------------------------------------------------------
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

CLASS_NAMES = ("floor", "wall", "ceiling", "picture", "sphere", "box", "cylinder")
FLOOR, WALL, CEILING, PICTURE, SPHERE, BOX, CYLINDER = range(len(CLASS_NAMES))


class SyntheticScenes(_CachedDataset):
    """The embedded dataset: procedurally rendered indoor rooms with the NYUv2 tasks plus edges.

    SyntheticScenes(split, num_samples, resolution, seed, cache). Splits "train" (1000 samples by default)
    and "val" (200; "test" is the same split) never share a scene. `__getitem__` renders one sample on the
    CPU; `render_batch(indices, device)` renders a whole batch at once
    with the same code, meant for a GPU (on the CPU, sample by sample is faster: a batch pads every sample to
    the largest number of primitives of each kind). cache=True keeps every sample once rendered (0.5 MB at
    96x128, 0.5 GB for the train split), so later epochs cost nothing; each DataLoader worker has its own."""

    name = "synthetic"
    class_names = CLASS_NAMES
    DEFAULT_SIZES = {"train": 1000, "val": 200}

    def __init__(self, split="train", num_samples=None, resolution=(96, 128), seed=0, cache=False):
        split = _resolve_split(split)
        self.split, self.seed = split, int(seed)
        self.length = int(num_samples) if num_samples is not None else self.DEFAULT_SIZES[split]
        self.resolution = parse_resolution(resolution)
        K = len(CLASS_NAMES)
        self.tasks = {"semantic": K, "depth": 1, "normal": 3, "edge": 1}
        self.primary_tasks = {"semantic": K, "depth": 1, "normal": 3}
        self.cache = {} if cache else None

    def scene_seed(self, index):
        """A 63-bit seed for sample `index`, hashed from (seed, split, index): stable and split-specific."""
        return _hashed_seed("synthetic-scenes", self.seed, self.split, index)

    def scene(self, index):
        """The scene description of sample `index` (see `sample_scene`)."""
        return sample_scene(self.scene_seed(index))

    def render_batch(self, indices, device="cpu"):
        """Render samples `indices` at once on `device`: a dict of (B, ...) tensors (see `render_scenes`)."""
        scenes = [self.scene(range(self.length)[i]) for i in indices]
        assert scenes, "render_batch needs at least one index"
        return render_scenes(scenes, self.resolution, device)

    def load(self, index):
        """Sample `index` rendered alone on the CPU (a batch of one)."""
        return {key: value[0] for key, value in self.render_batch([index]).items()}


def _hashed_seed(*parts):
    """A 63-bit seed hashed (sha256) from `parts` joined by "/": the same on every machine and Python run
    (unlike hash()), and unrelated for neighbouring parts, so no two splits or samples share a scene."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def parse_resolution(resolution, flag="resolution (--resolution)"):
    """(H, W) from a pair or an "HxW" string; both must be positive multiples of 32 (the networks halve the
    resolution five times)."""
    try:
        if isinstance(resolution, str):
            resolution = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", resolution).groups()
        height, width = (int(r) for r in resolution)
    except (AttributeError, TypeError, ValueError):  # a string that is not HxW, not a pair, not numbers
        raise ValueError(f"{flag} must look like HxW (e.g. 96x128) or (height, width), got {resolution!r}") \
            from None
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ValueError(f"{flag} must be positive multiples of 32 (e.g. 96x128 or 288x384), "
                         f"got {height}x{width}")
    return height, width


# ------------------------------------------------------------------------------------------------------------
# 5. PASCAL-Context: MTI-Net's PASCAL_MT with five tasks
# ------------------------------------------------------------------------------------------------------------
#
# PASCAL_MT (the ASTMT release that SimonVandenhende/Multi-Task-Learning-PyTorch reads in
# data/pascal_context.py) keeps its JPEG images at their own sizes (about 500x375) and stores two of its
# labels in MATLAB .mat files: the Pascal-Part annotations (human parts) and the PASCAL-Context LabelMap (459
# classes), whose class boundaries are the edge labels and whose classes decide where the distilled normals
# count. Its labels are built with the infrastructure in the appendices: read_mat (appendix E), context_edges
# (edge labels: Laplacian(LabelMap) != 0, thinned to one-pixel lines, appendix F) and human_parts_map
# (Pascal-Part person parts -> 6 groups + background), in appendix B with the per-sample transforms.

PASCAL_VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                      "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                      "sheep", "sofa", "train", "tvmonitor")  # semantic ids 0..20 (the PNGs' values)
HUMAN_PART_NAMES = ("background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg")


def _mat_variable(variable):
    """A reader (for _read) of variable `variable` of a MATLAB file; a MatFileError when the file lacks it."""
    def read(path):
        variables = read_mat(path)
        if variable not in variables:
            raise MatFileError(path, f"no variable {variable!r}, only {', '.join(variables) or 'none'}")
        return variables[variable]

    return read


class PascalContext(_CachedDataset):
    """MTI-Net's PASCAL_MT: PASCAL-Context images with five tasks, 4,998 train / 5,105 val images.

    semantic  21 VOC classes (PASCAL_VOC_CLASSES), void 255 -> -1
    parts     7 (HUMAN_PART_NAMES); an image without annotated person parts is all -1
    saliency  distilled saliency binarised at x / 255 > 0.5
    normal    distilled normals 2 x / 255 - 1, kept on NORMAL_VALID_CONTEXT_CLASSES (elsewhere 0 = invalid)
    edge      context_edges(LabelMap)

    Every sample's image is resized to `size` (512x512, the aspect ratio is not kept). Training samples
    (targets_at_original_size=False, the default for split "train") have their targets resized with it;
    evaluation samples (the default for "val") keep their targets at the original image size, so predictions
    are upsampled to it and scored there, as the official evaluation does. Their sizes vary from image to
    image, so `variable_size` is True: batch them one at a time. augment=True applies augment_pascal_sample
    to training samples before the resize (never to val: the official test transform has none).
    cache=True keeps the decoded samples (before augmentation) in memory. `ids` lists the image ids."""

    name = "pascal"
    same_size = False
    class_names = PASCAL_VOC_CLASSES
    PART_NAMES = HUMAN_PART_NAMES
    tasks = {"semantic": 21, "parts": 7, "saliency": 1, "normal": 3, "edge": 1}  # the official task order
    primary_tasks = dict(tasks)
    # task -> (folder, file extension, reader); "context" is the PASCAL-Context LabelMap
    FILES = {"image": ("JPEGImages", ".jpg", read_image), "parts": ("human_parts", ".mat", _mat_variable("anno")),
             "saliency": ("sal_distill", ".png", _read_pixels),
             "normal": ("normals_distill", ".png", lambda path: _read_pixels(path, "RGB")),
             "context": (os.path.join("pascal-context", "trainval"), ".mat", _mat_variable("LabelMap"))}
    # the semantic labels: the first of these folders that holds an image's file
    SEMSEG_FOLDERS = (os.path.join("semseg", "VOC12"), os.path.join("semseg", "pascal-context"))

    def __init__(self, root, split="train", size=512, augment=False, targets_at_original_size=None,
                 num_samples=None, cache=False):
        root, self.split = _check_folder(self.name, root, inner="PASCAL_MT"), _resolve_split(split)
        self.size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
        self.augment = bool(augment) and self.split == "train"
        if targets_at_original_size is None:
            targets_at_original_size = self.split == "val"
        self.targets_at_original_size = self.variable_size = bool(targets_at_original_size)
        ids = _read_split_list(self.name, root, os.path.join("ImageSets", "Context"), self.split)
        self.paths = _find_files(self.name, root, ids, self.FILES)
        self._find_semseg(root, ids)
        self._use(ids, num_samples, cache)

    def _find_semseg(self, root, ids):
        """Add the semantic labels to self.paths: semseg/VOC12/<id>.png, or semseg/pascal-context/<id>.png."""
        semseg = [(folder, set(os.listdir(os.path.join(root, folder)))) for folder in self.SEMSEG_FOLDERS
                  if os.path.isdir(os.path.join(root, folder))]
        for i in ids:
            found = [folder for folder, present in semseg if i + ".png" in present]
            if not found:
                raise dataset_error(self.name, "missing file (in semseg/VOC12 or semseg/pascal-context)",
                                    os.path.join(root, self.SEMSEG_FOLDERS[0], i + ".png"))
            self.paths[i]["semantic"] = os.path.join(root, found[0], i + ".png")

    def load(self, index):
        """The decoded sample at the original size, before augmentation and resizing. Parts are still 0
        where no person is: the all-zero map becomes ignore only at the end (ignore_empty_parts)."""
        paths = self.sample_files(index)

        def read(task, reader=None, what=None):  # with the reader of the FILES table unless told otherwise
            return _read(self.name, paths[task], reader or self.FILES[task][2], what)

        image = read("image")
        size = tuple(image.shape[-2:])

        def parts_map(path):  # the Pascal-Part annotation -> human-part ids (H, W)
            return human_parts_map(self.FILES["parts"][2](path), size)

        label_map = np.asarray(read("context"))
        parts = read("parts", parts_map, "Pascal-Part annotation")
        saliency = read("saliency")
        saliency = saliency[..., 0] if saliency.ndim == 3 else saliency  # grey saved as RGB: equal channels
        normal = read("normal").astype(np.float32) * (2 / 255) - 1
        if normal.shape[:2] != label_map.shape:  # also a LabelMap that is not (H, W)
            raise dataset_error(self.name, f"normals of size {normal.shape[:2]} but the LabelMap of "
                                f"{paths['context']} is {label_map.shape}", paths["normal"])
        normal = normal * np.isin(label_map, list(NORMAL_VALID_CONTEXT_CLASSES))[..., None]
        sample = {
            "image": image,
            "semantic": _to_tensor("semantic", read("semantic", _read_pixels), paths["semantic"]),
            "parts": torch.from_numpy(parts),
            "saliency": torch.from_numpy((saliency.astype(np.float32) / 255 > 0.5).astype(np.float32))[None],
            "normal": torch.from_numpy(np.ascontiguousarray(normal.transpose(2, 0, 1), dtype=np.float32)),
            "edge": torch.from_numpy(context_edges(label_map).astype(np.float32))[None],
        }
        return _fit_to_image(sample)

    def __getitem__(self, index):
        return self.transform(super().__getitem__(index))  # decoded (and cached) at the original size

    def transform(self, sample):
        """Decoded sample -> what the network sees: augmentation (training), the resize, the ignore rules."""
        if self.augment:
            sample = augment_pascal_sample(sample)
        if self.targets_at_original_size:
            sample = resize_pascal_sample(sample, self.size, targets=False)
            sample["normal"] = unit_normals(sample["normal"])  # the official evaluation normalises the GT
        else:
            sample = resize_pascal_sample(sample, self.size)
        return ignore_empty_parts(sample)


def _fit_to_image(sample):
    """Resize every target whose size differs from the image's to it, as the official loader does (nearest
    for labels, cubic for normals): in PASCAL_MT they normally agree."""
    size = tuple(sample["image"].shape[-2:])
    wrong = {key: x for key, x in sample.items() if key != "image" and tuple(x.shape[-2:]) != size}
    if wrong:
        sample = dict(sample, **resize_pascal_sample(wrong, size))
    return sample

# Every dense dataset by name, for build_dataset (section 1): each class carries its name and its options.
DATASETS = {cls.name: cls for cls in (SyntheticScenes, NYUv2, CityScapes, NYUD, PascalContext)}


# ------------------------------------------------------------------------------------------------------------
# Appendices: the machinery that makes the repository self-contained
# ------------------------------------------------------------------------------------------------------------
#
# Sections 1-5 call into them through dataset_error, render_scenes, sample_scene, read_mat, context_edges,
# human_parts_map and the PASCAL transforms; train.py and eval.py call build_decathlon and the colour maps.


# ------------------------------------------------------------------------------------------------------------
# A. Errors and download notes
# ------------------------------------------------------------------------------------------------------------


class DatasetError(ValueError):
    """A dataset folder is missing, laid out differently, or holds a file that cannot be read.

    The message names the offending path, the layout that was expected and where to download the data, so
    no bare numpy or PIL traceback reaches the user."""


class UnreadableFileError(ValueError):
    """A file that read_image or read_mat cannot read: truncated, corrupt, or a format or feature they do not
    handle. The message is "<path>: <problem>"; both are attributes too."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


class MatFileError(UnreadableFileError):
    """A .mat file that read_mat cannot read: truncated, corrupt, not MATLAB v5, or a feature that PASCAL_MT's
    files do not use (appendix E)."""


# The ten Visual Decathlon domains, in the order of the class counts of lorenmt/mtan's
# visual_decathlon/model_wrn_mtan.py. Defined here because the download notes below list them.
DECATHLON_DOMAINS = ("imagenet12", "aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb", "omniglot",
                     "svhn", "ucf101", "vgg-flowers")

# Where each dataset comes from, one line each: (title, address, layout in one line). The downloads are the
# ones the official code names: the lorenmt/mtan README (NYUv2, CityScapes), SimonVandenhende/Multi-Task-
# Learning-PyTorch's data/nyud.py and data/pascal_context.py (NYUD_MT, PASCAL_MT), and the challenge's site
# (Decathlon). The README's "Datasets" table gives the full layout: shapes, value ranges, ignore values.
DOWNLOADS = {
    "nyuv2": ("NYUv2 (MTAN's preprocessed release, 288x384, 13 classes)",
              "https://www.dropbox.com/sh/86nssgwm6hm3vkb/AACrnUQ4GxpdrBbLjb6n-mWNa?dl=0",
              "ROOT/{train,val}/{image,label,depth,normal}/<i>.npy, files numbered 0, 1, 2, ... (no zero padding)"),
    "cityscapes": ("CityScapes (MTAN's preprocessed release, 128x256 or 256x512)",
                   "https://www.dropbox.com/sh/gaw6vh6qusoyms6/AADwWi0Tp3E3M4B2xzeGlsEna?dl=0 (128x256), "
                   "https://www.dropbox.com/sh/vj349qgg57nthi9/AACdZmIuK-Qb_gP6w1HrA43ta?dl=0 (256x512)",
                   "ROOT/{train,val}/{image,depth,label_2,label_7,label_19}/<i>.npy, numbered 0, 1, 2, ..."),
    "nyud": ("NYUD_MT (MTI-Net's NYUD release, 480x640, 40 classes)",
             "NYUD_MT.tgz from Google Drive, file id 14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw (download it by hand: "
             "the official automatic downloader is broken)",
             "ROOT/gt_sets/{train,val}.txt, images/<id>.jpg, segmentation/<id>.png, {depth,normals,edge}/<id>.npy"
             " (ROOT: the NYUD_MT folder or the folder that holds it)"),
    "pascal": ("PASCAL_MT (MTI-Net's PASCAL-Context release: 21 classes, human parts, saliency, normals, edges)",
               "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz (ASTMT's link, reported dead; "
               "copies of PASCAL_MT.tgz are re-hosted by other multi-task learning repositories)",
               "ROOT/ImageSets/Context/{train,val}.txt, JPEGImages/, semseg/{VOC12,pascal-context}/, human_parts/"
               "*.mat, sal_distill/, normals_distill/, pascal-context/trainval/*.mat (ROOT: PASCAL_MT or above)"),
    "decathlon": ("Visual Decathlon (decathlon-1.0-data)",
                  "https://www.robots.ox.ac.uk/~vgg/decathlon/ (the ImageNet part needs its own licence)",
                  f"ROOT/<domain>/{{train,val}}/<class>/<image>, domains {', '.join(DECATHLON_DOMAINS)}"),
}


def dataset_error(name, problem, path):
    """A DatasetError that names the path, the expected layout and the download location of dataset `name`."""
    title, address, layout = DOWNLOADS[name]
    return DatasetError(
        f"{title}: {problem}: {path}\n"
        f"Expected layout (ROOT is the --data-root folder, by default {os.path.join('data', name)}): {layout}\n"
        f"Download: {address}\n"
        "See the 'Datasets' section of README.md for the full layout.")


def sample_files(dataset, index):
    """{task: path} of the files that sample `index` of a dataset is read from (looking through a Subset), to
    name them in an error; {} for the synthetic datasets, which are code."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset.sample_files(index) if hasattr(dataset, "paths") else {}


# ------------------------------------------------------------------------------------------------------------
# B. The PASCAL transforms (augmentation and resizing of one sample) and label builders
# ------------------------------------------------------------------------------------------------------------
#
# A PASCAL sample is a dict of tensors at one size (H, W): image (3, H, W) in [0, 1], semantic and parts
# (H, W) long, saliency and edge (1, H, W) in {0, 1}, normal (3, H, W). Interpolation per map, as the official
# transforms: cubic for the image and the normals, nearest for every label. Unlike the official code, the
# normals are multiplied by their nearest-resampled validity, so an invalid (zero) normal stays exactly zero
# and is never blended into a short vector that renormalisation would turn into a "valid" one (as
# augment_batch does for NYUv2).


def augment_pascal_sample(sample, generator=None, max_rotation=20.0, scales=(0.75, 1.25), flip_prob=0.5):
    """MTI-Net's PASCAL training augmentation (RandomHorizontalFlip, then ScaleNRotate, of the official
    data/custom_transforms.py) on one sample at its own size: a horizontal flip with probability 1/2, then a
    rotation by an angle uniform in [-20, 20] degrees and a zoom by a factor uniform in [0.75, 1.25] about the
    centre. Draws from `generator` (a CPU torch.Generator; None = torch's
    global one, which DataLoader seeds per worker). Returns a new dict; the input is not modified."""
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    angle = -max_rotation + 2 * max_rotation * u[1]
    scale = scales[0] + (scales[1] - scales[0]) * u[2]
    if u[0] < flip_prob:
        sample = flip_pascal_sample(sample)
    return rotate_scale_pascal_sample(sample, angle, scale)


def flip_pascal_sample(sample):
    """Mirror every map left-right; a normal's x component (pointing right) changes sign."""
    out = {key: x.flip(-1) for key, x in sample.items()}
    if "normal" in out:
        out["normal"] = out["normal"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return out


def rotate_scale_pascal_sample(sample, angle, scale):
    """Rotate every map by `angle` degrees (counter-clockwise on screen) and zoom it by `scale` about the
    image centre, keeping its size. Pixels that come from outside the image are 0: black image, background for
    semantic and parts (not ignore), zero (invalid) normals, no edge, not salient."""
    out = dict(sample)
    if "normal" in out:
        out["normal"] = rotate_normals(out["normal"], angle)
    height, width = sample["image"].shape[-2:]
    grid = _rotation_grid(height, width, angle, scale)[None]  # (1, H, W, 2)

    def warp(x, mode):  # (C, H, W) -> (C, H, W)
        return F.grid_sample(x[None], grid, mode=mode, padding_mode="zeros", align_corners=True)[0]

    return _resample_maps(out, warp)


def rotate_normals(normal, angle):
    """Turn the in-plane part (x right, y down) of normals (3, H, W) as rotate_scale_pascal_sample turns the
    image by `angle` degrees. The official code writes it with phi = atan2(n_x, n_y) and
    n_x' = r sin(phi + a), n_y' = r cos(phi + a); expanding the sines gives this rotation. For a = 90:
    (1, 0, z) -> (0, -1, z), a vector pointing right turns to point up, as the picture turns
    counter-clockwise."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return torch.stack([c * normal[0] + s * normal[1], -s * normal[0] + c * normal[1], normal[2]])


def _rotation_grid(height, width, angle, scale):
    """grid_sample grid (H, W, 2) of the official ScaleNRotate: cv2.warpAffine with
    cv2.getRotationMatrix2D(centre=(W/2, H/2), angle, scale), which maps input pixel p to
    c + scale * R (p - c), R = [[cos, sin], [-sin, cos]] (counter-clockwise on screen for angle > 0; y is
    down). Each output pixel q reads the input at c + R^T (q - c) / scale."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                            torch.arange(width, dtype=torch.float64), indexing="ij")
    dx, dy = xs - width / 2, ys - height / 2
    source_x = width / 2 + (c * dx - s * dy) / scale
    source_y = height / 2 + (s * dx + c * dy) / scale
    # grid_sample's coordinates with align_corners=True: -1 and +1 are the centres of the first and last pixel
    grid_x, grid_y = 2 * source_x / max(width - 1, 1) - 1, 2 * source_y / max(height - 1, 1) - 1
    return torch.stack([grid_x, grid_y], -1).float()


def resize_pascal_sample(sample, size=(512, 512), targets=True):
    """The official FixedResize: every map to `size` (H, W) without keeping the aspect ratio (cubic for the
    image and normals, which are then renormalised; nearest for labels, the "floor" rule of cv2 and
    F.interpolate). targets=False resizes only the image: the evaluation transform, whose predictions are
    compared with the targets at the original size."""
    size = tuple(size)

    def resize(x, mode):  # (C, H, W) -> (C, *size)
        align_corners = False if mode == "bicubic" else None
        return F.interpolate(x[None], size=size, mode=mode, align_corners=align_corners)[0]

    if not targets:
        return dict(sample, image=resize(sample["image"], "bicubic").clamp_(0, 1))
    out = _resample_maps(sample, resize)
    if "normal" in out:
        out["normal"] = unit_normals(out["normal"])
    return out


def ignore_empty_parts(sample):
    """An all-background human-parts map (no person, or cropped out by augmentation) becomes all -1 (ignore),
    as the official AddIgnoreRegions, which runs after augmentation and resizing."""
    if "parts" in sample and not sample["parts"].any():
        sample = dict(sample, parts=torch.full_like(sample["parts"], -1))
    return sample


def unit_normals(normal):
    """(3, H, W) normals scaled to unit length as the official FixedResize does (norm + float32 eps); zero
    vectors (invalid) stay zero."""
    return normal / (normal.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps)


def _resample_maps(sample, resample):
    """Apply `resample(x (C, H, W) float, mode)` to every map of a sample with its interpolation."""
    out = {}
    for key, x in sample.items():
        if key == "image":  # cubic overshoots a little: keep the image in [0, 1]
            out[key] = resample(x, "bicubic").clamp_(0, 1)
        elif key == "normal":
            valid = (x != 0).any(0, keepdim=True).float()
            out[key] = resample(x, "bicubic") * resample(valid, "nearest")
        elif x.dim() == 2:  # (H, W) class ids: semantic, parts
            out[key] = resample(x[None].float(), "nearest")[0].long()
        else:  # (1, H, W) saliency, edge
            out[key] = resample(x.float(), "nearest")
    return out

# ---- the label builders: Pascal-Part person parts and PASCAL-Context edges ---------------------------------


PASCAL_PART_PERSON = 15  # Pascal-Part's class_ind of a person (its classes follow PASCAL_VOC_CLASSES)
# Pascal-Part's person part names -> the 6 groups of MTI-Net's (ASTMT's) 6-part setting (the official
# data/pascal_context.py): head with hair, ears, eyebrows, eyes, mouth and nose; torso with neck; upper arms;
# lower arms with hands; upper legs; lower legs with feet. l/r = left/right, u/l = upper/lower.
HUMAN_PART_GROUPS = {
    "head": 1, "hair": 1, "lear": 1, "rear": 1, "lebrow": 1, "rebrow": 1, "leye": 1, "reye": 1, "mouth": 1,
    "nose": 1, "torso": 2, "neck": 2, "luarm": 3, "ruarm": 3, "llarm": 4, "rlarm": 4, "lhand": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5, "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}
# The PASCAL-Context classes (LabelMap ids) on which the distilled normals are kept; elsewhere they are set to
# zero (invalid), because the network that produced them was trained on NYUD indoor scenes. Source: the
# official code (SimonVandenhende/Multi-Task-Learning-PyTorch, data/pascal_context.py at d16e10b) builds it
# from two files of its data/db_info/: every class name of nyu_classes.json (894 NYU names) that is also a
# key of context_classes.json (459 Context names -> LabelMap id), except "unknown", mapped to its Context id,
# plus "tvmonitor" (the NYU name is "television"): 169 names + tvmonitor = 170 classes.
NORMAL_VALID_CONTEXT_CLASSES = {
    3: "air conditioner", 4: "antenna", 6: "ashtray", 9: "bag", 10: "ball", 11: "balloon", 13: "barrel",
    15: "basket", 17: "bathtub", 18: "bed", 22: "bench", 23: "bicycle", 29: "blackboard", 30: "board",
    33: "book", 34: "bottle", 36: "bowl", 37: "box", 38: "bracelet", 39: "brick", 41: "broom", 43: "bucket",
    46: "cabinet", 49: "cake", 50: "calculator", 51: "calendar", 53: "camera", 55: "can", 56: "candle",
    59: "car", 61: "cart", 62: "case", 65: "cat", 66: "cd", 68: "ceiling", 69: "cell phone", 72: "chair",
    73: "chessboard", 78: "clock", 83: "coffee machine", 84: "comb", 85: "computer", 87: "cone",
    88: "container", 95: "corkscrew", 96: "counter", 101: "crate", 104: "cup", 105: "curtain",
    107: "cutting board", 111: "dishwasher", 113: "dog", 115: "door", 122: "drum", 124: "duck",
    135: "envelope", 141: "fan", 142: "faucet", 143: "fax machine", 146: "fire extinguisher",
    150: "fish tank", 154: "flag", 157: "flashlight", 158: "floor", 159: "flower", 165: "fork", 172: "fruit",
    174: "furnace", 181: "glass", 183: "globe", 184: "glove", 191: "guitar", 193: "hammer", 195: "handle",
    197: "hanger", 199: "hat", 202: "heater", 213: "ipod", 215: "ironing board", 216: "jar", 219: "key",
    220: "keyboard", 223: "knife", 225: "ladder", 228: "laptop", 230: "lid", 232: "light", 233: "light bulb",
    238: "lock", 239: "machine", 242: "map", 243: "mask", 246: "mattress", 250: "microphone",
    251: "microwave", 252: "mirror", 255: "money", 260: "mouse", 261: "mouse pad", 263: "napkin", 269: "oven",
    272: "pan", 273: "paper", 275: "paper cutter", 281: "pen", 283: "pencil", 284: "person", 285: "photo",
    286: "piano", 287: "picture", 288: "pig", 290: "pillow", 291: "pipe", 292: "pitcher", 293: "plant",
    295: "plate", 304: "pool table", 307: "pot", 309: "printer", 310: "projector", 314: "radiator",
    315: "radio", 319: "range hood", 323: "remote control", 329: "rope", 330: "rug", 331: "ruler",
    336: "scale", 342: "sculpture", 345: "sewing machine", 349: "shelves", 350: "shoe", 351: "shopping cart",
    352: "shovel", 355: "sign", 357: "sink", 368: "sofa", 370: "spatula", 371: "speaker", 374: "spoon",
    379: "stapler", 380: "stick", 383: "stool", 384: "stove", 397: "table", 401: "tape", 403: "telephone",
    405: "tent", 407: "toaster", 408: "toilet", 411: "toothbrush", 412: "towel", 413: "toy", 414: "toy car",
    417: "trampoline", 419: "tray", 421: "tricycle", 423: "trophy", 427: "tvmonitor", 429: "typewriter",
    430: "umbrella", 432: "vacuum cleaner", 440: "wall", 441: "wallet", 442: "wardrobe",
    443: "washing machine", 444: "watch", 446: "water dispenser", 454: "window", 457: "wire"
}


def context_edges(label_map):
    """Edge labels from a PASCAL-Context LabelMap (H, W) -> bool (H, W), as the official loader makes them:
    pixels where the 4-neighbour Laplacian of the class ids is not 0 (a 2-pixel band along every boundary
    between classes; rarely a boundary pixel whose neighbours' ids happen to average to its own is missed,
    as there), thinned to one-pixel lines."""
    x = np.asarray(label_map, dtype=np.float64)
    # OpenCV's Laplacian (kernel 0 1 0 / 1 -4 1 / 0 1 0) with its default border, which mirrors the image
    # without repeating the border pixel: numpy's "reflect".
    p = np.pad(x, 1, mode="reflect" if min(x.shape) > 1 else "edge")
    laplacian = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * x
    return thin(laplacian != 0)


def _struct_list(value):
    """A struct array from read_mat as a list of dicts ([] for an empty array)."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    if isinstance(value, np.ndarray) and value.size == 0:
        return []
    raise ValueError(f"expected a struct array, found {type(value).__name__}")


def human_parts_map(anno, shape):
    """Human-part ids (H, W) int64 from a Pascal-Part `anno` struct, as the official loader builds them:
    0 = background, 1..6 = HUMAN_PART_GROUPS. Every person object paints its parts in file order (a later
    part wins where masks overlap). The map is all 0 when no person with a non-empty mask is annotated, or
    none of them has parts; the dataset then ignores the whole map. `shape` is the size of an all-0 map."""
    objects = _struct_list(anno["objects"])
    people = [o for o in objects if int(np.asarray(o["class_ind"]).reshape(-1)[0]) == PASCAL_PART_PERSON]
    if not any(np.asarray(o["mask"]).any() for o in people):  # the official "has human parts" test (area > 0)
        return np.zeros(shape, dtype=np.int64)
    target = None
    for person in people:
        for part in _struct_list(person["parts"]):
            mask = np.asarray(part["mask"]).astype(bool)
            if target is None:
                target = np.zeros(mask.shape, dtype=np.int64)
            if part["part_name"] not in HUMAN_PART_GROUPS:
                raise ValueError(f"unknown person part {part['part_name']!r} "
                                 f"(known: {', '.join(HUMAN_PART_GROUPS)})")
            target[mask] = HUMAN_PART_GROUPS[part["part_name"]]
    return np.zeros(shape, dtype=np.int64) if target is None else target


# ------------------------------------------------------------------------------------------------------------
# C. Visual Decathlon: ten classification domains (MTAN's many-to-many experiment)
# ------------------------------------------------------------------------------------------------------------
#
# The official data is one image folder per domain, `decathlon-1.0-data/<domain>/{train,val,test}`, with one
# sub-folder per class (torchvision's ImageFolder convention, which the MTAN code uses; class index = position
# of the folder in sorted order). Images are small (the longer side about 72 pixels) and preprocessed exactly
# as the MTAN code does (lorenmt/mtan, visual_decathlon/model_wrn_mtan.py): resize the shorter side to 72,
# crop 72x72, normalise with the domain's mean and std. Training crops at random and flips; gtsrb, omniglot
# and svhn use a centre crop and no flip (traffic signs, characters and digits change meaning when mirrored).
# Deviation: the official val loader used the training transform; here val and test use the evaluation
# transform (centre crop, no flip). The domains are DECATHLON_DOMAINS (appendix A); the synthetic stand-in,
# SyntheticDecathlon, is appendix G.

DECATHLON_NO_FLIP = ("gtsrb", "omniglot", "svhn")

# RGB mean and std of each domain, from lorenmt/mtan's visual_decathlon/decathlon_mean_std.pickle.
DECATHLON_MEAN_STD = {
    "imagenet12": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "aircraft": ((0.4798, 0.5107, 0.5344), (0.2107, 0.2051, 0.2373)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "daimlerpedcls": ((0.482, 0.482, 0.482), (0.2361, 0.2361, 0.2361)),
    "dtd": ((0.527, 0.4703, 0.424), (0.2523, 0.2409, 0.2499)),
    "gtsrb": ((0.3392, 0.3118, 0.3205), (0.2756, 0.2658, 0.2709)),
    "omniglot": ((0.081, 0.081, 0.081), (0.2705, 0.2705, 0.2705)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)),
    "ucf101": ((0.4995, 0.4988, 0.4998), (0.109, 0.1081, 0.1068)),
    "vgg-flowers": ((0.4341, 0.3831, 0.2971), (0.2851, 0.2384, 0.264)),
}


class Decathlon(torch.utils.data.Dataset):
    """One domain of the Visual Decathlon: samples {"image": float (3, 72, 72) normalised, "label": long}.

    Decathlon(root, domain, split, train=None): `train` selects the random training transform (default: for
    the train split only). Class i is the i-th class folder of the train split in sorted order. The test split
    has no labels (label -1) unless it holds class folders."""

    def __init__(self, root, domain, split="train", train=None, size=72, num_samples=None):
        root = _check_folder("decathlon", root)
        self.domain, self.split, self.size = domain, split, size
        self.train = split == "train" if train is None else train
        self.mean, self.std = DECATHLON_MEAN_STD[domain]
        _check_folder("decathlon", root, domain, problem="domain folder missing")
        train_dir = _check_folder("decathlon", root, domain, "train", problem="train folder missing")
        self.classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
        if not self.classes:
            raise dataset_error("decathlon", "no class folders", train_dir)
        split_dir = _check_folder("decathlon", root, domain, split, problem=f"{split} folder missing")
        self.files = self._list(split_dir)
        if num_samples is not None:
            self.files = self.files[: int(num_samples)]

    def _list(self, split_dir):
        """(path, label) pairs: class folders if the split has them, else a flat unlabelled folder (test)."""
        if not any(os.path.isdir(os.path.join(split_dir, c)) for c in self.classes):
            files = [(os.path.join(split_dir, f), -1) for f in _image_files(split_dir)]
        else:
            files = []
            for label, name in enumerate(self.classes):
                folder = _check_folder("decathlon", split_dir, name, problem="class folder missing")
                images = _image_files(folder)
                if not images:
                    raise dataset_error("decathlon", "empty class folder (no images)", folder)
                files += [(os.path.join(folder, f), label) for f in images]
        if not files:
            raise dataset_error("decathlon", "no images in this split", split_dir)
        return files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        # greyscale images (omniglot, daimlerpedcls) are read as three equal channels
        image = _read("decathlon", path, read_image)
        return {"image": self.transform(image), "label": torch.tensor(label)}

    def transform(self, image):
        """Random crop and flip for training (centre crop, no flip for gtsrb/omniglot/svhn); centre crop for
        evaluation. Randomness comes from torch's global generator, which train.py seeds per epoch."""
        random_crop = self.train and self.domain not in DECATHLON_NO_FLIP
        top_left = tuple(torch.rand(2).tolist()) if random_crop else None
        image = resize_and_crop(image, self.size, top_left)
        if random_crop and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return normalise(image, self.mean, self.std)


def build_decathlon(name, root, split, domains=None, num_samples=None):
    """{domain: dataset} and {domain: number of classes} for "decathlon" or "synthetic-decathlon", in the
    official domain order (or the order of `domains`, a subset). For "decathlon", domains=None means every
    official domain with a folder under `root` (None: data/decathlon under the working directory)."""
    every = DECATHLON_DOMAINS if name == "decathlon" else tuple(SYNTHETIC_DECATHLON)
    if domains is None and name == "decathlon":
        domains = decathlon_domains_present(root)
    domains = list(domains or every)
    unknown = [d for d in domains if d not in every]
    if unknown:
        raise ValueError(f"unknown {name} domain(s) {', '.join(unknown)}; valid: {', '.join(every)}")
    if name == "decathlon":
        sets = {d: Decathlon(root, d, split, num_samples=num_samples) for d in domains}
        return sets, {d: len(s.classes) for d, s in sets.items()}
    sets = {d: SyntheticDecathlon(d, split, num_samples=num_samples) for d in domains}
    return sets, {d: s.num_classes for d, s in sets.items()}


def decathlon_domains_present(root):
    """The official domains that have a folder under `root`, in the official order. Many users have all but
    imagenet12, whose images need a separate licence; training then uses the other nine."""
    root = _check_folder("decathlon", root)
    present = [d for d in DECATHLON_DOMAINS if os.path.isdir(os.path.join(root, d))]
    if not present:
        raise dataset_error("decathlon", "no domain folder (aircraft, cifar100, ...) in this folder", root)
    return present


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif")


def _image_files(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def resize_and_crop(image, size, top_left=None):
    """Resize a (3, H, W) image so that its shorter side is `size` (bilinear), then crop size x size: at
    `top_left` (row, col) as fractions of the free range in [0, 1], or in the centre when it is None."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    fy, fx = (0.5, 0.5) if top_left is None else top_left
    top, left = round(fy * (new_h - size)), round(fx * (new_w - size))
    return image[:, top:top + size, left:left + size]


def normalise(image, mean, std):
    return (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ------------------------------------------------------------------------------------------------------------
# D. The ray caster: scenes, rays, hits, shading
# ------------------------------------------------------------------------------------------------------------
#
# sample_scene draws the few numbers of a scene (room, camera, light, materials, primitives, holes) from a
# seed; render_scenes ray-casts a batch of scenes into the samples of section 4.
#
# Determinism. Sample i of a split comes from a seed hashed from (seed, split, i). The scene's few numbers are
# drawn on the CPU with a torch.Generator; the renderer then uses only +, -, *, /, sqrt, floor, comparisons
# and min/max, which IEEE 754 rounds exactly the same way on every machine, vector width and thread count (no
# exp/sin/pow per pixel, no matmul or sum whose summation order could change). So a sample is bit-identical
# on every run and machine, and a batch rendered at once equals the samples rendered one by one. On a GPU the
# same code runs; the results then match the CPU's only to rounding.

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
    cross = (axis[1] * v[2] - axis[2] * v[1], axis[2] * v[0] - axis[0] * v[2],
             axis[0] * v[1] - axis[1] * v[0])
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
        return list(colorsys.hsv_to_rgb(self.uniform(*hues) % 1.0, self.uniform(*saturations),
                                        self.uniform(*values)))


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
            size = half + [math.cos(turn), math.sin(turn)]
            reach, half_height = math.hypot(half[0], half[2]), half[1]
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
            holes.append([cx + dice.uniform(-0.03, 0.03), cy + dice.uniform(-0.04, 0.04),
                          dice.uniform(0.015, 0.045), dice.uniform(0.015, 0.045),
                          math.cos(tilt), math.sin(tilt)])
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
    light = [math.cos(elevation) * math.sin(azimuth), math.sin(elevation),
             math.cos(elevation) * math.cos(azimuth), dice.uniform(0.55, 0.8), dice.uniform(0.25, 0.45)]
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


# ---- ray casting -------------------------------------------------------------------------------------------
#
# A vector is a tensor whose FIRST axis holds x, y, z, so `x, y, z = v` unpacks it and every component is a
# contiguous tensor (fast elementwise ops). Rays: direction (3, B, N) with N = H * W pixels, origin (3, B, 1)
# when a sample's rays share it (camera rays) or (3, B, N) (shadow rays). Primitive tables are column-first as
# well, (k, B, P) for k numbers per primitive, padded to the largest P of the batch, with a (B, P) mask of the
# real rows. The intersection functions return (B, N, P) distances, inf for a miss.


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
    materials = torch.stack([s["materials"] for s in scenes])  # (B, 4, 14)
    batch["materials"] = materials.permute(2, 0, 1).contiguous().to(device)
    for key in ("spheres", "boxes", "cylinders", "holes"):
        batch[key], batch[key + "_mask"] = _pad_columns([s[key] for s in scenes], device)
    return batch


def _object_tables(scene):
    """Per-sample tables indexed by object id: class (B, O) and material (14, B, O)."""
    B, device = scene["room"].shape[1], scene["room"].device
    classes = [torch.tensor(ROOM_CLASSES, device=device).expand(B, -1)]
    # object ids 0..6 are wall, wall, floor, ceiling, wall, wall, picture
    materials = [scene["materials"][:, :, [1, 1, 0, 2, 1, 1, 3]]]
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


def render_scenes(scenes, resolution, device="cpu", objects=False):
    """Ray-cast scenes (dicts from `sample_scene`) at resolution (H, W) on `device`.

    Returns the batched sample dict: image (B, 3, H, W), semantic (B, H, W), depth (B, 1, H, W),
    normal (B, 3, H, W), edge (B, 1, H, W). objects=True adds "object" (B, H, W): the id of the object seen in
    each pixel, with no sensor holes (ids 0..6 are the room and the picture, FIRST_PRIMITIVE + i the scene's
    i-th primitive, counting its spheres, then boxes, then cylinders). The other outputs do not change: the
    scenes are then rendered one at a time (a batch numbers its primitives in tables padded to its largest
    counts), which gives the same bits as a batch."""
    with _one_cpu_thread(device):
        if objects and len(scenes) > 1:
            samples = [_render([scene], resolution, device, objects) for scene in scenes]
            return {key: torch.cat([sample[key] for sample in samples]) for key in samples[0]}
        return _render(scenes, resolution, device, objects)


def _render(scenes, resolution, device, objects=False):
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
    edge = semantic_edges(torch.where(walls, torch.full_like(obj, BACK_WALL), obj).reshape(B, H, W))

    # 6. Sensor holes: invalid for depth, normal and semantic alike.
    hole = _hole_mask(s["holes"], s["holes_mask"], H, W)  # (B, N)
    semantic = torch.where(hole, -1, classes.gather(1, obj))
    depth = depth.masked_fill(hole, 0)
    n = n.masked_fill(hole, 0)

    def channels_first(x):  # (C, B, N) -> (B, C, H, W)
        return x.permute(1, 0, 2).reshape(B, -1, H, W).contiguous()

    out = {
        "image": channels_first(image),
        "semantic": semantic.reshape(B, H, W).long(),
        "depth": depth.reshape(B, 1, H, W),
        "normal": channels_first(n),
        "edge": edge,
    }
    if objects:
        out["object"] = obj.reshape(B, H, W)  # one scene: its own primitive numbers
    return out


# ------------------------------------------------------------------------------------------------------------
# E. A MATLAB v5 .mat reader (numpy, struct and zlib; no scipy), scoped to what PASCAL_MT's files hold
# ------------------------------------------------------------------------------------------------------------
#
# The format (MathWorks, "MAT-File Format", version 5): a 128-byte header, then one data element per variable.
# Every data element starts with an 8-byte tag, (type, number of bytes) as two uint32, and its data is padded
# to a multiple of 8 bytes. A variable is an miMATRIX element whose data is itself a list of elements: array
# flags (class and logical/complex bits), dimensions, name, then the values of the class. MATLAB's default
# `save` (v7) wraps each variable in an miCOMPRESSED element: a zlib stream holding the miMATRIX element.
# Arrays are stored in column-major (Fortran) order. The reader handles what PASCAL_MT's files (and scipy's
# savemat) hold; anything else (big-endian, complex values, UTF-16/32 text, sparse arrays, ...) is refused
# with one line naming it as unsupported.

_MI_NUMBERS = {1: "<i1", 2: "<u1", 3: "<i2", 4: "<u2", 5: "<i4", 6: "<u4", 7: "<f4", 9: "<f8", 12: "<i8",
               13: "<u8"}  # element type -> numpy type
_MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 14, 15, 16
_MX_NUMERIC = {6: np.float64, 7: np.float32, 8: np.int8, 9: np.uint8, 10: np.int16, 11: np.uint16,
               12: np.int32, 13: np.uint32, 14: np.int64, 15: np.uint64}  # array class -> value dtype
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_UNSUPPORTED = {3: "object", 5: "sparse", 16: "function handle", 17: "opaque (string, table, ...)"}
_COMPLEX_FLAG, _LOGICAL_FLAG = 0x0800, 0x0200  # bits of the array flags; the class is the low byte


def read_mat(path):
    """The variables of a MATLAB v5 .mat file (MATLAB's default format, compressed or not) as plain Python:

        numeric or logical array   numpy array with MATLAB's shape (2-D at least): a[i, j] is a(i+1, j+1)
        char array                 str (one row) or a list of str (one per row)
        struct                     dict field -> value when 1x1, otherwise a list of such dicts in MATLAB's
                                   linear (column-major) order
        cell array                 numpy object array with MATLAB's shape
        []  (an empty element)     numpy array of shape (0, 0)

    Returns {variable name: value}. A missing file raises FileNotFoundError; anything unreadable raises
    MatFileError naming the file (truncated, corrupt, MATLAB v4 or v7.3/HDF5, a feature named unsupported)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return _MatReader(raw, str(path)).variables()
    except MatFileError:
        raise
    except (ValueError, KeyError, IndexError, struct.error) as error:  # see _MatReader
        raise MatFileError(str(path), f"corrupt ({type(error).__name__}: {error})") from None


class _MatReader:
    """Walks the data elements of a MATLAB v5 file held in memory. It names the problems it checks for (the
    header, a truncated element, a corrupt compressed variable, an unsupported feature); any other inconsistency
    of a damaged file (an unknown data type, a count of values that does not fit the dimensions, ...) ends in
    a numpy or struct error, which read_mat reports as "corrupt"."""

    def __init__(self, raw, path):
        self.raw, self.path = raw, path
        if len(raw) < 128:
            self.fail(f"only {len(raw)} bytes, shorter than the 128-byte MAT-file header (truncated?)")
        # The header ends with a version and the characters "MI" written as one 16-bit number: they read "IM"
        # in a little-endian file and "MI" in a big-endian one.
        if raw[126:128] not in (b"IM", b"MI"):
            self.fail("not a MATLAB v5 MAT-file (no 'MI' endian indicator at byte 126; v4 is not supported)")
        if raw[126:128] == b"MI":
            self.unsupported("a big-endian file")
        version = struct.unpack("<H", raw[124:126])[0]
        if version != 0x0100:
            self.fail(f"MAT-file version 0x{version:04x} is not supported (v7.3 files are HDF5; save with "
                      "-v7)")

    def fail(self, problem):
        raise MatFileError(self.path, problem)

    def unsupported(self, feature):
        self.fail(f"unsupported: {feature} (this reader handles what PASCAL_MT's files hold: little-endian "
                  "numeric, logical, char, struct and cell arrays)")

    def element(self, buf, pos):
        """The data element at byte `pos` of `buf`: (type, data bytes, position of the next element)."""
        if pos + 8 > len(buf):
            self.fail(f"truncated: the element tag at byte {pos} runs past the end ({len(buf)} bytes)")
        first, count = struct.unpack_from("<II", buf, pos)
        if first >> 16:  # small element: type and byte count share 4 bytes, the (<= 4) data bytes follow
            kind, count = first & 0xFFFF, first >> 16
            if count > 4:
                self.fail(f"corrupt: a small data element at byte {pos} claims {count} bytes (4 at most)")
            return kind, buf[pos + 4:pos + 4 + count], pos + 8
        start = pos + 8
        if start + count > len(buf):
            self.fail(f"truncated: the element at byte {pos} holds {count} bytes, only {len(buf) - start} "
                      "follow")
        padded = count if first == _MI_COMPRESSED else (count + 7) // 8 * 8  # compressed data is not padded
        return first, buf[start:start + count], start + padded

    def numbers(self, kind, data):
        """Element data as a 1-D numpy array of its stored type."""
        if kind not in _MI_NUMBERS:  # 17, 18: UTF-16 or UTF-32 text
            self.unsupported(f"data element type {kind}")
        return np.frombuffer(data, _MI_NUMBERS[kind])

    def array(self, buf, pos):
        """The array element at byte `pos` of `buf` (a variable, a cell, a struct field), compressed or not:
        (name, value, position of the next element)."""
        kind, data, pos = self.element(buf, pos)
        if kind == _MI_COMPRESSED:
            try:
                data = zlib.decompress(data)
            except zlib.error as error:
                self.fail(f"corrupt compressed variable ({error})")
            kind, data, _ = self.element(data, 0)
        if kind != _MI_MATRIX:
            self.fail(f"corrupt: expected an array (element type 14), found element type {kind}")
        return (*self.matrix(data), pos)

    def variables(self):
        found, pos = {}, 128
        while pos < len(self.raw):
            name, value, pos = self.array(self.raw, pos)
            found[name] = value
        return found

    def matrix(self, buf):
        """(name, value) of the data of an miMATRIX element."""
        if not buf:  # MATLAB writes an empty array (say [] in a struct field) as an element with no data
            return "", np.zeros((0, 0))
        _, flags, pos = self.element(buf, 0)
        flags = struct.unpack("<II", flags)[0]
        kind, dims, pos = self.element(buf, pos)
        dims = tuple(int(d) for d in self.numbers(kind, dims))
        _, name, pos = self.element(buf, pos)
        name = name.decode("latin-1")
        mx = flags & 0xFF
        if mx in _MX_NUMERIC:
            return name, self.numeric(buf, pos, mx, flags, dims)
        if mx == _MX_CHAR:
            return name, self.char(buf, pos, dims)
        if mx in (_MX_CELL, _MX_STRUCT):
            return name, (self.cell if mx == _MX_CELL else self.struct)(buf, pos, dims)
        self.unsupported(f"variable {name!r} is a MATLAB {_MX_UNSUPPORTED.get(mx, f'class {mx}')} array")

    def numeric(self, buf, pos, mx, flags, dims):
        if flags & _COMPLEX_FLAG:
            self.unsupported("complex values")
        kind, data, pos = self.element(buf, pos)
        values = self.numbers(kind, data).astype(_MX_NUMERIC[mx]).reshape(dims, order="F")  # maybe stored smaller
        return values != 0 if flags & _LOGICAL_FLAG else values

    def char(self, buf, pos, dims):
        kind, data, pos = self.element(buf, pos)  # MATLAB writes UTF-16 code units (miUINT16), scipy UTF-8
        if kind == _MI_UTF8:
            codes = np.array([ord(c) for c in data.decode("utf-8")], dtype=np.int64)
        else:
            codes = self.numbers(kind, data).astype(np.int64)
        if dims[0] == 0 or codes.size == 0:
            return ""
        rows = codes.reshape(dims, order="F").reshape(dims[0], -1, order="F")  # (rows, characters per row)
        text = ["".join(chr(c) for c in row) for row in rows]
        return text[0] if len(text) == 1 else text

    def cell(self, buf, pos, dims):
        cells = np.empty(math.prod(dims), dtype=object)
        for i in range(cells.size):
            _, cells[i], pos = self.array(buf, pos)
        return cells.reshape(dims, order="F")

    def struct(self, buf, pos, dims):
        kind, length, pos = self.element(buf, pos)  # every field name takes this many bytes, NUL-padded
        length = int(self.numbers(kind, length)[0]) if length else 0
        _, names, pos = self.element(buf, pos)
        fields = [names[i:i + length].split(b"\0")[0].decode("latin-1")
                  for i in range(0, len(names), length)] if length else []
        items = []
        for _ in range(math.prod(dims)):  # the values run element by element, and field by field within one
            item = {}
            for field in fields:
                _, item[field], pos = self.array(buf, pos)
            items.append(item)
        return items[0] if len(items) == 1 else items


# ------------------------------------------------------------------------------------------------------------
# F. Guo-Hall thinning (PASCAL's edge labels, context_edges)
# ------------------------------------------------------------------------------------------------------------

def _thinning_tables():
    """Which pixels may go in each of the two subiterations of Guo & Hall's thinning ("Parallel thinning with
    two-subiteration algorithms", Comm. ACM 32(3), 1989, algorithm A1), the algorithm of
    skimage.morphology.thin that the official loader calls. Two bool tables indexed by a pixel's 8
    neighbours as bits: x1 = east, then counter-clockwise x2 = north-east, x3 = north, ..., x8 = south-east,
    with x_k in bit k-1."""
    x = [((np.arange(256) >> k) & 1).astype(bool) for k in range(8)]  # x[k] is x_(k+1), for all 256 codes
    # G1: exactly one 4-connected run of neighbours (Hilditch's crossing number is 1): the pixel is on an edge
    # of the shape, not a bridge between two parts.
    crossings = sum((~x[i] & (x[i + 1] | x[(i + 2) % 8])).astype(int) for i in (0, 2, 4, 6))
    # G2: 2 <= min(n1, n2) <= 3, counting neighbour pairs: not an end point, not inside the shape.
    n1 = sum((x[i] | x[i + 1]).astype(int) for i in (0, 2, 4, 6))
    n2 = sum((x[i + 1] | x[(i + 2) % 8]).astype(int) for i in (0, 2, 4, 6))
    g12 = (crossings == 1) & (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
    # G3 / G3': peel only the south-east side in the first subiteration, the north-west one in the second.
    first = g12 & ~((x[1] | x[2] | ~x[7]) & x[0])
    second = g12 & ~((x[5] | x[6] | ~x[3]) & x[4])
    return first, second


_THIN_TABLES = _thinning_tables()


def _neighbour_codes(mask):
    """(H, W) bool -> (H, W) uint8: the 8 neighbours as bits (east = bit 0, counter-clockwise); 0 outside."""
    p = np.pad(mask, 1).astype(np.uint8)
    return (p[1:-1, 2:] | p[:-2, 2:] << 1 | p[:-2, 1:-1] << 2 | p[:-2, :-2] << 3
            | p[1:-1, :-2] << 4 | p[2:, :-2] << 5 | p[2:, 1:-1] << 6 | p[2:, 2:] << 7)


def thin(mask):
    """Thin a binary (H, W) mask to lines one pixel wide with the same connectivity (Guo-Hall, as
    skimage.morphology.thin with no iteration limit): both subiterations until nothing changes."""
    skeleton = np.array(mask, dtype=bool)
    while True:
        before = int(skeleton.sum())
        for table in _THIN_TABLES:
            skeleton &= ~table[_neighbour_codes(skeleton)]
        if int(skeleton.sum()) == before:
            return skeleton


# ------------------------------------------------------------------------------------------------------------
# G. The synthetic Decathlon: four classification domains rendered from the synthetic scenes
# ------------------------------------------------------------------------------------------------------------
#
# Each domain asks a different question about a scene, shows the scene in its own style (so the domains have
# different image statistics, like the real ones) and has its own number of classes. Labels come from the
# scene description and from the renderer's object map (which object each pixel shows), and a scene is kept
# only when its image answers the question clearly: "count", for instance, skips scenes where a primitive
# shows as a sliver of a few pixels. Every domain is class-balanced (no class gets ahead of another by more
# than one sample), so chance, 1 / K, is also what the best constant answer scores. The questions are ones a
# small WRN learns in a few CPU minutes.
SYNTHETIC_DECATHLON = {  # domain: (number of classes, image style, question)
    "floor": (3, "grey", "the floor's pattern: plain, planks (stripes) or tiles (checks)"),
    "walls": (2, "bgr", "are the walls painted plain or with vertical stripes"),
    "count": (4, "colour", "how many primitives are visible: 1, 2, 3, or 4 and more"),
    "colour": (6, "dim", "the hue of the largest visible primitive, in six 60-degree bins starting at red"),
}
VISIBLE = 0.015  # a primitive is visible when it covers at least 1.5% of the image (61 pixels at 64x64)
WALLS = (LEFT_WALL, RIGHT_WALL, FRONT_WALL, BACK_WALL)


def _primitive_colours(scene):
    """The first colour of each primitive, in object-id order (spheres, then boxes, then cylinders)."""
    colours = []
    for kind in ("spheres", "boxes", "cylinders"):
        start = PRIMITIVE_SIZES[kind]  # the material follows the geometry; it starts with the colour
        colours += [row[start:start + 3].tolist() for row in scene[kind]]
    return colours


def synthetic_decathlon_label(domain, scene, objects):
    """The class of a rendered scene for `domain` (see SYNTHETIC_DECATHLON), or None when the image does not
    answer the question clearly. objects: (H, W) object ids from render_scenes(..., objects=True)."""
    colours = _primitive_colours(scene)
    counts = torch.bincount(objects.flatten(), minlength=FIRST_PRIMITIVE + len(colours))
    share = counts.double() / objects.numel()
    # materials: floor, walls, ceiling, picture; column 6 is the pattern. A big primitive may hide the floor.
    if domain == "floor":
        return int(scene["materials"][0, 6]) if share[FLOOR_FACE] >= 0.1 else None
    if domain == "walls":
        return int(scene["materials"][1, 6]) if share[list(WALLS)].sum() >= 0.1 else None
    areas = share[FIRST_PRIMITIVE:].tolist()
    if not any(a >= VISIBLE for a in areas):
        return None  # no primitive in view
    if domain == "count":  # 1, 2, 3, 4+ (5 visible primitives are rare)
        if any(VISIBLE / 2 <= a < VISIBLE for a in areas):
            return None  # a primitive on the edge of counting
        return min(sum(a >= VISIBLE for a in areas), 4) - 1
    order = sorted(range(len(areas)), key=areas.__getitem__, reverse=True)
    largest = order[0]
    if len(order) > 1 and areas[order[1]] > 0.7 * areas[largest]:
        return None  # two primitives of about the same size: which one is "the largest"?
    hue = colorsys.rgb_to_hsv(*colours[largest])[0] * 6  # in units of 60 degrees
    if abs(hue - round(hue)) < 0.1:
        return None  # within 6 degrees of a bin boundary
    return int(hue) % 6


def _styled(image, style):
    """A domain's look: "colour" as rendered, "grey", "dim" (half the light) or "bgr" (red and blue swapped,
    like a camera that stores its channels the other way round)."""
    if style == "grey":
        return image.mean(0, keepdim=True).expand(3, -1, -1).clone()
    if style == "dim":
        return image * 0.5
    if style == "bgr":
        return image.flip(0)
    return image


class SyntheticDecathlon(torch.utils.data.Dataset):
    """One synthetic classification domain (see SYNTHETIC_DECATHLON): {"image", "label"} samples at 64x64,
    deterministic like SyntheticScenes (sample i of a split is the same on every machine), rendered once and
    kept in memory. Training flips horizontally at random (no label depends on left and right).

    Sample i is the i-th scene of the split's seed sequence whose image answers the question (see
    synthetic_decathlon_label) and keeps the classes balanced, so the first N samples do not depend on how
    many are asked for."""

    DEFAULT_SIZES = {"train": 800, "val": 200}
    _statistics = {}  # (domain, resolution, seed) -> (mean, std), computed once per process
    _rendered = {}  # (domain, split, count, resolution, seed) -> (normalised images, labels), once per run

    def __init__(self, domain, split="train", num_samples=None, resolution=(64, 64), train=None, seed=0):
        split = _resolve_split(split)
        self.domain, self.split, self.seed = domain, split, seed
        self.resolution = parse_resolution(resolution)
        self.train = split == "train" if train is None else train
        self.num_classes, self.style, _ = SYNTHETIC_DECATHLON[domain]
        count = self.DEFAULT_SIZES[split] if num_samples is None else int(num_samples)
        key = (domain, split, count, self.resolution, seed)
        if key not in self._rendered:  # e.g. eval.py after train.py in one process needs the same splits
            images, labels = self._render(count, split)
            mean, std = self.statistics(images if split == "train" else None)
            self._rendered[key] = (normalise(images, mean, std), labels)  # normalised once, not per sample
        self.images, self.labels = self._rendered[key]
        self.mean, self.std = self.statistics()

    def _candidate(self, split, j):
        """Candidate scene j of a split, from a seed hashed from (seed, domain, split, j)."""
        return sample_scene(_hashed_seed("synthetic-decathlon", self.seed, self.domain, split, j))

    def _render(self, count, split):
        """Images and labels of the first `count` candidate scenes that answer the domain's question, rendered
        scene by scene (the same bits as a batch, and faster on a CPU: a batch pads every scene's tables)."""
        images, labels, j = [], [], 0
        while len(labels) < count:
            scene = self._candidate(split, j)
            j += 1
            rendered = render_scenes([scene], self.resolution, objects=True)
            label = synthetic_decathlon_label(self.domain, scene, rendered["object"][0])
            balanced = labels.count(label) <= len(labels) // self.num_classes  # no class gets ahead
            if label is not None and balanced:
                images.append(_styled(rendered["image"][0], self.style))
                labels.append(label)
        return torch.stack(images), torch.tensor(labels)

    def statistics(self, train_images=None):
        """Per-channel mean and std of the domain's first 64 training images (the official code ships such
        numbers for each real domain), so every split is normalised alike."""
        key = (self.domain, self.resolution, self.seed)
        if key not in self._statistics:
            if train_images is None or len(train_images) < 64:
                train_images, _ = self._render(64, "train")
            first = train_images[:64]
            self._statistics[key] = (tuple(first.mean((0, 2, 3)).tolist()),
                                     tuple(first.std((0, 2, 3)).clamp_min(1e-3).tolist()))
        return self._statistics[key]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "label": self.labels[index]}


# ------------------------------------------------------------------------------------------------------------
# H. Pictures: colour maps, the montage, and `python data.py`
# ------------------------------------------------------------------------------------------------------------


def _numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _plane(x):
    """A (1, H, W) or (H, W) map (tensor or array) as a float64 (H, W) array."""
    x = _numpy(x).astype(np.float64)
    return x.reshape(x.shape[-2:])


def _uint8(x):
    """Values in [0, 1] as uint8 0..255, clipped and rounded."""
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


# 20 colours that stay distinguishable side by side (Sasha Trubetskoy's list of distinct colours)
_DISTINCT_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                     (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                     (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                     (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]


def palette(num_classes):
    """num_classes colours as uint8 (K, 3): the 20 distinct colours, then hues spread by the golden ratio."""
    colours = list(_DISTINCT_COLOURS[:num_classes])
    for k in range(len(colours), num_classes):
        saturation, value = 0.7 if k % 2 else 0.45, 0.95 if k % 3 else 0.7
        r, g, b = colorsys.hsv_to_rgb((0.6180339887 * k) % 1.0, saturation, value)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return np.array(colours, dtype=np.uint8).reshape(num_classes, 3)


def colorize_semantic(labels, num_classes):
    """Class ids (H, W) (tensor or array) -> uint8 (H, W, 3); ignore (-1, or anything out of range) black."""
    labels = _numpy(labels).astype(np.int64)
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    known = (labels >= 0) & (labels < num_classes)
    out[known] = palette(num_classes)[labels[known]]
    return out


# five anchors of the "plasma" colour map, from far (dark purple) to near (bright yellow)
_DEPTH_COLOURS = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]],
                          dtype=np.float64)


def colorize_depth(depth, max_depth=None, min_depth=None):
    """Depth (1, H, W) or (H, W) -> uint8 (H, W, 3): near bright, far dark; invalid (0) black.

    The scale runs from min_depth to max_depth (default: the smallest and largest valid depth). Give a
    prediction its ground truth's range, so that both pictures use the same colours for the same depth."""
    depth = _plane(depth)
    valid = depth > 0
    out = np.zeros(depth.shape + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    lo = min_depth if min_depth is not None else depth[valid].min()
    hi = max_depth if max_depth is not None else depth[valid].max()
    # 0 (far) .. 4 (near) along the anchors
    x = np.clip((hi - depth[valid]) / max(hi - lo, 1e-12), 0, 1) * (len(_DEPTH_COLOURS) - 1)
    i = np.minimum(np.floor(x).astype(np.int64), len(_DEPTH_COLOURS) - 2)
    t = (x - i)[:, None]
    out[valid] = ((1 - t) * _DEPTH_COLOURS[i] + t * _DEPTH_COLOURS[i + 1]).round().astype(np.uint8)
    return out


def colorize_normal(normal):
    """Normals (3, H, W) in [-1, 1] -> uint8 (H, W, 3) as (n + 1) / 2; invalid (zero vector) black."""
    normal = _numpy(normal).astype(np.float64)
    rgb = (normal.transpose(1, 2, 0) + 1) / 2
    rgb[~(normal != 0).any(0)] = 0
    return _uint8(rgb)


def _grey(mask):
    """A (1, H, W) or (H, W) map in [0, 1] -> uint8 (H, W, 3) grey picture."""
    return np.repeat(_uint8(_plane(mask))[..., None], 3, axis=2)


def montage(samples, num_classes, class_names=None):
    """Rows of [image | semantic | depth | normals | edge | invalid mask] (a PIL image), one row per sample,
    under a line of column titles and above a colour legend of the classes (when class_names is given)."""
    titles = ["image", "semantic", "depth (near bright)", "normals", "edge", "invalid"]
    rows = []
    for s in samples:
        rows.append(np.concatenate([_uint8(_numpy(s["image"]).transpose(1, 2, 0)),
                                    colorize_semantic(s["semantic"], num_classes),
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
    parser = argparse.ArgumentParser(description="Render synthetic samples, every task, into a PNG montage.")
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
    height, width = dataset.resolution
    print(f"wrote {args.out}: {args.num} {args.split} samples at {height}x{width} (classes: "
          f"{', '.join(CLASS_NAMES)})")


if __name__ == "__main__":
    main()
