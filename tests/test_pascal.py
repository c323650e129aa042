"""PASCAL-Context (MTI-Net's PASCAL_MT, five tasks): the MATLAB v5 reader, the loader on a tiny fake tree,
edge thinning, the official augmentation, a few MTI-Net training steps, and the errors for bad input.

The test writes its own .mat files with the small v5 writer below (numeric arrays, logical, char, structs,
struct arrays, cells, compressed elements, both byte orders), so it needs neither scipy nor MATLAB."""
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
import mtinet
import train

# ---- a small MATLAB v5 writer ------------------------------------------------------------------------------

_MI = {"i1": 1, "u1": 2, "i2": 3, "u2": 4, "i4": 5, "u4": 6, "f4": 7, "f8": 9, "i8": 12, "u8": 13}
_MX = {"f8": 6, "f4": 7, "i1": 8, "u1": 9, "i2": 10, "u2": 11, "i4": 12, "u4": 13, "i8": 14, "u8": 15}


def _element(kind, payload, endian, small=True, pad=True):
    """One data element: the small format (type and size in 4 bytes, data in the next 4) for <= 4 bytes."""
    if small and len(payload) <= 4:
        return struct.pack(endian + "I", len(payload) << 16 | kind) + payload.ljust(4, b"\0")
    padding = (-len(payload)) % 8 if pad else 0
    return struct.pack(endian + "II", kind, len(payload)) + payload + b"\0" * padding


def _header(endian):
    text = b"MATLAB 5.0 MAT-file, written by tests/test_pascal.py".ljust(116, b" ")
    return text + b"\0" * 8 + struct.pack(endian + "H", 0x0100) + (b"IM" if endian == "<" else b"MI")


def _matrix(value, endian, name="", stored_as=None):
    """miMATRIX element of: dict (1x1 struct), list of dicts (1xN struct array), str (char row), numpy object
    array (cell), bool or numeric array (optionally stored in the smaller type `stored_as`, as MATLAB does)."""
    flags, body = 0, b""
    if isinstance(value, dict) or isinstance(value, list):
        items = [value] if isinstance(value, dict) else value
        fields = list(items[0]) if items else []
        cls, shape = 2, (1, len(items))
        body += _element(5, struct.pack(endian + "i", 32), endian)  # field name length
        body += _element(1, b"".join(f.encode().ljust(32, b"\0") for f in fields), endian)
        body += b"".join(_matrix(item[f], endian) for item in items for f in fields)
    elif isinstance(value, str):
        cls, shape = 4, (1, len(value))
        body += _element(4, np.array([ord(c) for c in value], endian + "u2").tobytes(), endian)
    elif isinstance(value, np.ndarray) and value.dtype == object:
        cls, shape = 1, value.shape
        body += b"".join(_matrix(v, endian) for v in value.flatten(order="F"))
    else:
        array = np.asarray(value)
        if array.dtype == bool:
            flags, array = 0x0200, array.astype(np.uint8)
        code = array.dtype.str[1:]
        cls, shape = _MX[code], array.shape
        stored = stored_as or code
        body += _element(_MI[stored], array.astype(endian + stored).tobytes(order="F"), endian)
    shape = tuple(shape) if len(shape) >= 2 else (1,) * (2 - len(shape)) + tuple(shape)
    head = _element(6, struct.pack(endian + "II", cls | flags, 0), endian)
    head += _element(5, np.array(shape, endian + "i4").tobytes(), endian)
    head += _element(1, name.encode(), endian)
    return _element(14, head + body, endian, small=False)


def write_mat(path, variables, compress=False, endian="<", stored_as=None):
    """Write {name: value} as a MATLAB v5 file; compress=True wraps every variable in a zlib element."""
    out = _header(endian)
    for name, value in variables.items():
        element = _matrix(value, endian, name, (stored_as or {}).get(name))
        out += _element(15, zlib.compress(element), endian, small=False, pad=False) if compress else element
    with open(path, "wb") as f:
        f.write(out)


# ---- the reader --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress,endian", [(False, "<"), (True, "<")])
def test_read_mat_numeric_char_struct_cell(tmp_path, compress, endian):
    rng = np.random.default_rng(0)
    matrix = rng.random((3, 4))
    volume = rng.random((2, 3, 4)).astype(np.float32)
    cells = np.empty((2, 2), dtype=object)
    cells[0, 0], cells[1, 0], cells[0, 1], cells[1, 1] = np.arange(3.0)[None], "text", {"a": 1.0}, np.zeros((0, 0))
    variables = {
        "matrix": matrix, "volume": volume,
        "ints": np.array([[-128, 0, 127]], dtype=np.int8), "u16": np.arange(6, dtype=np.uint16).reshape(3, 2),
        "big": np.array([[2 ** 40, -5]], dtype=np.int64), "huge": np.array([[2 ** 63 + 5]], dtype=np.uint64),
        "flags": np.array([[True, False], [False, True]]),
        "small_ints": np.array([[1.0, 2.0, 250.0]]),  # a double array stored as uint8, as MATLAB saves it
        "name": "hello",
        "anno": {"imname": "2008_000001", "objects": [{"class_ind": np.array([[15.0]]), "parts": []},
                                                      {"class_ind": np.array([[12.0]]), "parts": []}]},
        "cells": cells,
    }
    path = tmp_path / "v.mat"
    write_mat(path, variables, compress=compress, endian=endian, stored_as={"small_ints": "u1"})
    got = data.read_mat(path)
    assert list(got) == list(variables)
    assert got["matrix"].dtype == np.float64 and np.array_equal(got["matrix"], matrix)  # column-major undone
    assert got["volume"].shape == (2, 3, 4) and np.array_equal(got["volume"], volume)
    assert got["ints"].tolist() == [[-128, 0, 127]] and got["ints"].dtype == np.int8
    assert got["u16"].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert got["big"].tolist() == [[2 ** 40, -5]] and got["huge"].tolist() == [[2 ** 63 + 5]]
    assert got["flags"].dtype == bool and got["flags"].tolist() == [[True, False], [False, True]]
    assert got["small_ints"].dtype == np.float64 and got["small_ints"].tolist() == [[1.0, 2.0, 250.0]]
    assert got["name"] == "hello"
    anno = got["anno"]
    assert anno["imname"] == "2008_000001"
    assert [int(o["class_ind"][0, 0]) for o in anno["objects"]] == [15, 12]
    assert anno["objects"][0]["parts"] == []  # an empty struct array
    c = got["cells"]
    assert c.shape == (2, 2) and c[1, 0] == "text" and c[0, 0].tolist() == [[0.0, 1.0, 2.0]]
    assert c[0, 1] == {"a": np.array([[1.0]])} and c[1, 1].shape == (0, 0)


def test_read_mat_names_what_pascal_mt_does_not_use_as_unsupported(tmp_path):
    """The reader is scoped to PASCAL_MT's files: a big-endian file or a complex array is named unsupported."""
    path = tmp_path / "u.mat"
    write_mat(path, {"x": np.eye(2)}, endian=">")
    with pytest.raises(data.MatFileError, match=r"u\.mat: unsupported: a big-endian file"):
        data.read_mat(path)
    element = bytearray(_matrix(np.eye(2), "<", "z"))
    element[17] |= 0x08  # the complex bit (0x0800) of the array flags: bit 3 of their second byte
    path.write_bytes(_header("<") + bytes(element))
    with pytest.raises(data.MatFileError, match=r"u\.mat: unsupported: complex values"):
        data.read_mat(path)


def test_read_mat_agrees_with_scipy(tmp_path):
    """Cross-check on files written by scipy.io.savemat (skipped where scipy is not installed)."""
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    label_map = rng.integers(0, 460, size=(7, 5)).astype(np.uint16)
    for compress in (False, True):
        sio.savemat(tmp_path / "s.mat", {"LabelMap": label_map, "x": rng.random((2, 3)), "s": "abc",
                                         "st": {"a": np.arange(4.0), "b": "q"}}, do_compression=compress)
        got = data.read_mat(tmp_path / "s.mat")
        assert np.array_equal(got["LabelMap"], label_map) and got["LabelMap"].dtype == np.uint16
        assert got["s"] == "abc" and got["st"]["b"] == "q" and got["st"]["a"].tolist() == [[0, 1, 2, 3]]


def test_read_mat_errors_name_the_file(tmp_path):
    path = tmp_path / "t.mat"
    write_mat(path, {"LabelMap": np.arange(200, dtype=np.float64).reshape(10, 20)})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])  # cut inside the array
    with pytest.raises(data.MatFileError, match=r"t\.mat: truncated"):
        data.read_mat(path)
    write_mat(path, {"LabelMap": np.ones((30, 30))}, compress=True)
    raw = path.read_bytes()
    path.write_bytes(raw[:140])  # cut inside the compressed element
    with pytest.raises(data.MatFileError, match=r"t\.mat: truncated"):
        data.read_mat(path)
    path.write_bytes(raw[:128] + raw[128:136] + bytes(len(raw) - 136))  # compressed data replaced by zeros
    with pytest.raises(data.MatFileError, match=r"t\.mat: corrupt compressed variable"):
        data.read_mat(path)
    path.write_bytes(b"MATLAB 7.3 MAT-file".ljust(124, b" ") + struct.pack("<H", 0x0200) + b"IM" + bytes(64))
    with pytest.raises(data.MatFileError, match="v7.3"):
        data.read_mat(path)
    path.write_bytes(b"not a mat file")
    with pytest.raises(data.MatFileError, match="header"):
        data.read_mat(path)


# ---- a tiny PASCAL_MT tree ---------------------------------------------------------------------------------

SIZES = {"2008_000001": (40, 48), "2008_000002": (36, 52), "2008_000003": (44, 40), "2008_000004": (32, 56)}
SPLITS = {"train": ["2008_000001", "2008_000002"], "val": ["2008_000003", "2008_000004"]}
WALL, SKY, PERSON_CONTEXT = 440, 360, 284  # Context ids: wall and person keep normals, sky does not
NORMAL_PNG = (255, 128, 64)  # decodes to (1, 0.0039, -0.498)


def person_box(h, w):
    return slice(h // 4, 3 * h // 4), slice(w // 2 - 4, w // 2 + 4)  # rows, columns: across the centre


def make_pascal_tree(root):
    """Writes PASCAL_MT under root/PASCAL_MT. Images 1 and 3 show a person (semseg in semseg/VOC12), 2 and 4
    only a cat (semseg in semseg/pascal-context, the fallback folder)."""
    base = root / "PASCAL_MT"
    folders = ["ImageSets/Context", "JPEGImages", "semseg/VOC12", "semseg/pascal-context", "human_parts",
               "sal_distill", "normals_distill", "pascal-context/trainval"]
    for folder in folders:
        (base / folder).mkdir(parents=True)
    for split, ids in SPLITS.items():
        (base / "ImageSets/Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for n, (i, (h, w)) in enumerate(SIZES.items()):
        has_person = n % 2 == 0
        rows, cols = person_box(h, w)
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)
        Image.fromarray(image).save(base / "JPEGImages" / f"{i}.jpg", quality=95)
        semseg = np.zeros((h, w), np.uint8)
        semseg[rows, cols] = 15 if has_person else 8
        semseg[0, :] = 255  # void
        Image.fromarray(semseg).save(base / "semseg" / ("VOC12" if has_person else "pascal-context") / f"{i}.png")
        label_map = np.full((h, w), WALL, np.uint16)
        label_map[:, w // 2:] = SKY
        label_map[rows, cols] = PERSON_CONTEXT
        write_mat(base / "pascal-context/trainval" / f"{i}.mat", {"LabelMap": label_map.astype(np.float64)},
                  compress=True, stored_as={"LabelMap": "u2"})
        person = np.zeros((h, w), np.uint8)
        person[rows, cols] = 1
        parts, top = [], rows.start
        for name, first, last in (("hair", top, top + 2), ("head", top + 2, top + 5), ("torso", top + 5, top + 12),
                                  ("lhand", top + 12, top + 14), ("rfoot", rows.stop - 2, rows.stop)):
            mask = np.zeros((h, w), np.uint8)
            mask[first:last, cols] = 1
            parts.append({"part_name": name, "mask": mask})
        objects = [{"class": "person", "class_ind": np.array([[15.0]]), "mask": person, "parts": parts},
                   {"class": "dog", "class_ind": np.array([[12.0]]), "mask": person * 0, "parts": []}]
        if not has_person:
            objects = [{"class": "cat", "class_ind": np.array([[8.0]]), "mask": person, "parts": []}]
        write_mat(base / "human_parts" / f"{i}.mat", {"anno": {"imname": i, "objects": objects}}, compress=n < 2)
        saliency = np.full((h, w), 100, np.uint8)
        saliency[:, : w // 2] = 200
        saliency[0, 0], saliency[0, 1] = 128, 127  # 128 / 255 > 0.5, 127 / 255 is not
        Image.fromarray(saliency).save(base / "sal_distill" / f"{i}.png")
        normals = np.tile(np.array(NORMAL_PNG, np.uint8), (h, w, 1))
        Image.fromarray(normals).save(base / "normals_distill" / f"{i}.png")
    return base


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pascal")
    make_pascal_tree(root)
    return root


def test_pascal_val_sample_keeps_targets_at_original_size(pascal_root):
    dataset, tasks = data.build_dataset("pascal", pascal_root, "val", size=64)
    assert tasks == {"semantic": 21, "parts": 7, "saliency": 1, "normal": 3, "edge": 1}
    assert len(dataset) == 2 and dataset.variable_size and dataset.ids == SPLITS["val"]
    h, w = SIZES["2008_000003"]
    rows, cols = person_box(h, w)
    s = dataset[0]
    assert s["image"].shape == (3, 64, 64) and 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["semantic"].shape == (h, w) and s["semantic"].dtype == torch.long
    assert (s["semantic"][0] == -1).all() and (s["semantic"][rows, cols] == 15).all()
    assert s["semantic"][1:].min() == 0 and set(s["semantic"].unique().tolist()) == {-1, 0, 15}
    # parts: hair + head -> 1, torso -> 2, hand -> 4 (lower arm), foot -> 6 (lower leg), 0 elsewhere
    parts = s["parts"]
    assert parts.shape == (h, w) and parts.dtype == torch.long
    assert parts[rows.start, cols.start] == 1 and parts[rows.start + 4, cols.start] == 1
    assert parts[rows.start + 5, cols.start] == 2 and parts[rows.start + 12, cols.start] == 4
    assert parts[rows.stop - 1, cols.start] == 6 and parts[0, 0] == 0
    assert set(parts.unique().tolist()) == {0, 1, 2, 4, 6}
    # saliency: x / 255 > 0.5
    sal = s["saliency"]
    assert sal.shape == (1, h, w) and sal[0, 0, 0] == 1 and sal[0, 0, 1] == 0
    assert (sal[0, 1:, : w // 2] == 1).all() and (sal[0, :, w // 2:] == 0).all()
    # normals: 2 x / 255 - 1, unit, kept on wall and person, zero on sky
    normal = s["normal"]
    expected = torch.tensor([2 * v / 255 - 1 for v in NORMAL_PNG])
    expected = expected / expected.norm()
    valid = torch.zeros(h, w, dtype=torch.bool)
    valid[:, : w // 2] = True  # wall
    valid[rows, cols] = True  # person, also right of the centre
    assert torch.allclose(normal[:, valid], expected[:, None].expand(3, int(valid.sum())), atol=1e-6)
    assert (normal[:, ~valid] == 0).all() and (~valid).sum() > 100  # sky
    # edges: one-pixel lines on the wall | sky boundary and around the person box
    edge = s["edge"][0]
    assert edge.shape == (h, w) and set(edge.unique().tolist()) == {0.0, 1.0}
    below = rows.stop + 2  # rows below the person: only the wall | sky boundary
    assert (edge[below:-1].sum(1) == 1).all() and (edge[below:-1, w // 2 - 1] == 1).all()
    # the image without a person: parts ignored everywhere
    s = dataset[1]
    h, w = SIZES["2008_000004"]
    assert s["parts"].shape == (h, w) and (s["parts"] == -1).all()
    assert set(s["semantic"].unique().tolist()) == {-1, 0, 8}  # from semseg/pascal-context


def test_pascal_train_sample_is_resized(pascal_root):
    dataset, _ = data.build_dataset("pascal", pascal_root, "train", size=(48, 64))
    assert not dataset.variable_size and len(dataset) == 2
    for s in (dataset[0], dataset[1]):
        assert s["image"].shape == (3, 48, 64) and s["semantic"].shape == (48, 64)
        assert s["parts"].shape == (48, 64) and s["saliency"].shape == (1, 48, 64)
        assert s["normal"].shape == (3, 48, 64) and s["edge"].shape == (1, 48, 64)
        norm = s["normal"].norm(dim=0)
        assert ((norm - 1).abs() < 1e-5)[norm > 0].all() and (norm == 0).any() and (norm > 0).any()
    assert set(dataset[0]["parts"].unique().tolist()) == {0, 1, 2, 4, 6}
    assert (dataset[1]["parts"] == -1).all()
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 48, 64)
    raw = dataset.load(0)  # decoded at the original size, before the resize
    assert raw["image"].shape == (3, *SIZES["2008_000001"]) and raw["parts"].max() == 6


# ---- edges -------------------------------------------------------------------------------------------------


def test_edges_are_thinned_to_one_pixel():
    labels = np.ones((8, 10), dtype=np.int64)
    labels[:, 5:] = 2
    # The Laplacian marks columns 4 and 5 (both sides of the boundary); thinning keeps column 4 (and, as
    # skimage's thin, shortens the line by its end pixel at the top).
    expected = np.zeros((8, 10), dtype=bool)
    expected[1:, 4] = True
    assert np.array_equal(data.context_edges(labels), expected)
    # A square region: a two-pixel ring becomes a closed one-pixel curve, every pixel with two neighbours.
    labels = np.ones((10, 12), dtype=np.int64)
    labels[3:7, 3:9] = 3
    edge = data.context_edges(labels)
    neighbours = sum(np.roll(np.roll(edge, dy, 0), dx, 1).astype(int)
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
    assert edge.sum() == 15 and (neighbours[edge] == 2).all()
    assert not edge[:2].any() and not edge[8:].any()  # stays on the boundary band
    # A 3-pixel-thick bar thins to its middle row (minus the end pixels).
    bar = np.zeros((7, 12), dtype=bool)
    bar[2:5, 1:11] = True
    thinned = data.thin(bar)
    assert thinned.sum(0)[2:10].tolist() == [1] * 8 and thinned[3, 2:10].all()


# ---- augmentation ------------------------------------------------------------------------------------------


def _synthetic_sample(h=30, w=40):
    g = torch.Generator().manual_seed(0)
    normal = torch.zeros(3, h, w)
    normal[0, :, : w // 2], normal[2, :, : w // 2] = 0.6, 0.8  # valid on the left half only
    return {"image": torch.rand(3, h, w, generator=g),
            "semantic": torch.randint(-1, 21, (h, w), generator=g),
            "parts": torch.randint(0, 7, (h, w), generator=g),
            "saliency": (torch.rand(1, h, w, generator=g) > 0.5).float(),
            "normal": normal,
            "edge": (torch.rand(1, h, w, generator=g) > 0.8).float()}


def test_augmentation_keeps_labels_in_range_and_normals_unit():
    sample = _synthetic_sample()
    for seed in range(6):
        out = data.augment_pascal_sample(sample, torch.Generator().manual_seed(seed))
        out = data.resize_pascal_sample(out, (32, 32))
        assert out["semantic"].dtype == torch.long and -1 <= out["semantic"].min() and out["semantic"].max() <= 20
        assert 0 <= out["parts"].min() and out["parts"].max() <= 6
        for key in ("saliency", "edge"):
            assert set(out[key].unique().tolist()) <= {0.0, 1.0}
        # n / (|n| + float32 eps) as the official: a nearly cancelled cubic blend ends a little short of 1
        norm = out["normal"].norm(dim=0)
        assert ((norm - 1).abs() < 1e-3)[norm > 0].all() and (norm > 0).any()
        assert 0 <= out["image"].min() and out["image"].max() <= 1
    a = data.augment_pascal_sample(sample, torch.Generator().manual_seed(3))
    b = data.augment_pascal_sample(sample, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)  # a seeded generator repeats itself


def test_rotation_turns_normals_with_the_picture():
    """90 degrees counter-clockwise on screen: a pixel right of the centre moves above it, and a normal
    pointing right, (1, 0, z), points up, (0, -1, z) in the x-right, y-down frame."""
    h = w = 21  # odd, so the pixel grid is symmetric about the centre cv2 uses (w/2, h/2) up to half a pixel
    n = torch.zeros(3, h, w)
    n[0], n[2] = 0.6, 0.8
    image = torch.zeros(3, h, w)
    image[:, 10, 16] = 1.0  # 6 pixels right of the centre row
    sample = {"image": image, "normal": n, "semantic": torch.zeros(h, w, dtype=torch.long)}
    out = data.rotate_scale_pascal_sample(sample, 90.0, 1.0)
    assert torch.allclose(out["normal"][:, 10, 10], torch.tensor([0.0, -0.6, 0.8]), atol=1e-6)
    row, col = divmod(int(out["image"][0].argmax()), w)
    assert col in (10, 11) and row in (4, 5)  # above the centre, the vector's new direction
    assert torch.allclose(data.rotate_normals(torch.tensor([1.0, 0.0, 0.5]).view(3, 1, 1), 90.0).view(3),
                          torch.tensor([0.0, -1.0, 0.5]), atol=1e-7)
    flipped = data.flip_pascal_sample(sample)
    assert torch.equal(flipped["normal"][0], -n[0]) and flipped["image"][0, 10, 4] == 1


def test_zoom_out_fills_borders_with_zero():
    sample = _synthetic_sample()
    sample["semantic"] = torch.full_like(sample["semantic"], 7)
    out = data.rotate_scale_pascal_sample(sample, 0.0, 0.75)
    assert out["semantic"][0, 0] == 0 and out["semantic"][15, 20] == 7  # background, not ignore
    assert (out["image"][:, 0, 0] == 0).all() and (out["normal"][:, 0, 0] == 0).all()
    assert data.ignore_empty_parts({"parts": torch.zeros(4, 4, dtype=torch.long)})["parts"].eq(-1).all()


# ---- training ----------------------------------------------------------------------------------------------


def test_mtinet_trains_on_the_fake_tree(pascal_root):
    torch.manual_seed(0)
    dataset, tasks = data.build_dataset("pascal", pascal_root, "train", size=64, augment=True)
    assert dataset.augment
    model = mtinet.MTINet(tasks)
    assert sum(p.numel() for p in model.parameters()) == 24_494_171
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
    weights = torch.tensor([train.RECIPES["hrnet"]["task_weights"][t] for t in tasks])
    assert weights.tolist() == [1.0, 2.0, 5.0, 10.0, 50.0]
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    before = model.backbone.conv1.weight.detach().clone()
    for _ in range(2):
        outputs = model(batch["image"], return_aux=True)
        losses = train.multitask_losses(outputs, batch, list(tasks), normal_loss="l1") * weights
        assert torch.isfinite(losses).all() and (losses > 0).all()
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
    assert not torch.equal(before, model.backbone.conv1.weight)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors(pascal_root, tmp_path):
    with pytest.raises(data.DatasetError, match="dataset folder not found"):
        data.build_dataset("pascal", tmp_path / "nowhere", "train")
    with pytest.raises(data.DatasetError, match=r"folder missing.*ImageSets.Context(.|\n)*Expected layout"):
        data.build_dataset("pascal", tmp_path, "train")
    base = make_pascal_tree(tmp_path / "copy")
    (base / "sal_distill" / "2008_000002.png").unlink()
    with pytest.raises(data.DatasetError, match=r"missing file: .*sal_distill.2008_000002\.png"):
        data.build_dataset("pascal", base, "train")
    os.remove(base / "semseg" / "pascal-context" / "2008_000004.png")
    with pytest.raises(data.DatasetError, match=r"missing file \(in semseg/VOC12 or semseg/pascal-context\)"):
        data.build_dataset("pascal", base, "val")
    with pytest.raises(data.DatasetError, match="split must be"):
        data.build_dataset("pascal", pascal_root, "trainval")
    with pytest.raises(ValueError, match="option 'resolution'|--resolution"):
        data.build_dataset("pascal", pascal_root, "train", resolution=(64, 64))
    # a truncated .mat file is reported when the sample is read, with its path and the layout
    mat = base / "pascal-context" / "trainval" / "2008_000001.mat"
    mat.write_bytes(mat.read_bytes()[:150])
    (base / "sal_distill" / "2008_000002.png").write_bytes(
        (pascal_root / "PASCAL_MT" / "sal_distill" / "2008_000002.png").read_bytes())
    dataset, _ = data.build_dataset("pascal", base, "train")
    with pytest.raises(data.DatasetError, match=r"cannot read this \.mat file \(truncated(.|\n)*2008_000001\.mat"):
        dataset[0]
    write_mat(mat, {"Labels": np.zeros((2, 2))})
    with pytest.raises(data.DatasetError, match="no variable 'LabelMap'"):
        dataset[0]
