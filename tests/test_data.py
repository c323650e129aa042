"""Tests of data.py: the synthetic scenes, the real loaders on tiny fake trees, augmentation, error messages.

Everything runs on the CPU at small sizes (64x96 synthetic images, 16x24 fake dataset files) and asserts
values: known answers and invariants, not just that the code runs.
"""
import hashlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from conftest import requires_cuda

RES = (64, 96)  # small synthetic resolution: a whole test file renders in seconds


@pytest.fixture(scope="module")
def scenes():
    """12 training samples rendered as one batch (shared by the read-only tests)."""
    dataset = data.SyntheticScenes("train", resolution=RES)
    return dataset, dataset.render_batch(range(12))


# ----------------------------------------------------------------------------------------------------------
# Synthetic scenes: determinism and splits
# ----------------------------------------------------------------------------------------------------------


def test_synthetic_samples_are_bit_identical_across_constructions():
    a = data.SyntheticScenes("train", resolution=RES)
    b = data.SyntheticScenes("train", resolution=RES)
    for i in (0, 7):
        sa, sb = a[i], b[i]
        assert sa.keys() == sb.keys() == {"image", "semantic", "depth", "normal", "edge"}
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    other_seed = data.SyntheticScenes("train", resolution=RES, seed=1)
    assert not torch.equal(a[0]["image"], other_seed[0]["image"])


def test_synthetic_sample_matches_its_recorded_bits():
    """A known answer: the hash of train sample 0 at 32x64, recorded when the renderer was written. It
    changes only if the scene sampler or the renderer changes (then update it, and say so: every synthetic
    result changes with it), or on a platform that rounds differently: with torch 2.13 on the CPU, an AMD EPYC
    machine renders the first digest and an Intel Xeon one the second, whatever ATen's vector capability
    (default, AVX2, AVX-512), so training results differ a little between the two as well."""
    dataset = data.SyntheticScenes("train", resolution=(32, 64))
    assert dataset.scene_seed(0) == 1604891773260832277
    sample = dataset[0]
    digest = hashlib.sha256()
    for key in ("image", "semantic", "depth", "normal", "edge"):
        digest.update(sample[key].numpy().tobytes())
    assert digest.hexdigest()[:16] in ("d00a0f196e6c2e97", "eeba6b448dd6077c")


def test_render_batch_equals_stacked_getitem(scenes):
    dataset, _ = scenes
    indices = [5, 0, 3]
    batch = dataset.render_batch(indices)
    for b, i in enumerate(indices):
        sample = dataset[i]
        for key in sample:
            assert torch.equal(batch[key][b], sample[key]), key


def test_train_and_val_never_share_a_scene():
    train = data.SyntheticScenes("train", resolution=RES)
    val = data.SyntheticScenes("val", resolution=RES)
    assert len(train) == 1000 and len(val) == 200
    train_seeds = {train.scene_seed(i) for i in range(len(train))}
    val_seeds = {val.scene_seed(i) for i in range(len(val))}
    assert len(train_seeds) == 1000 and not train_seeds & val_seeds
    assert not torch.equal(train[0]["image"], val[0]["image"])
    test = data.SyntheticScenes("test", resolution=RES)  # "test" is the val split
    assert torch.equal(test[1]["depth"], val[1]["depth"])
    assert len(data.SyntheticScenes("train", num_samples=10, resolution=RES)) == 10


def test_resolution_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        data.SyntheticScenes(resolution=(100, 128))
    with pytest.raises(ValueError, match="HxW"):
        data.SyntheticScenes(resolution="big")
    assert data.SyntheticScenes(resolution="32x64")[0]["image"].shape == (3, 32, 64)


def test_cache_keeps_rendered_samples():
    dataset = data.SyntheticScenes("train", num_samples=3, resolution=(32, 32), cache=True)
    first = dataset[1]
    assert list(dataset.cache) == [1]
    second = dataset[1]
    assert all(second[key] is first[key] for key in first)  # served from memory, not rendered again
    fresh = data.SyntheticScenes("train", num_samples=3, resolution=(32, 32))[1]
    assert all(torch.equal(fresh[key], first[key]) for key in first)


# ----------------------------------------------------------------------------------------------------------
# Synthetic scenes: the targets and their consistency
# ----------------------------------------------------------------------------------------------------------


def test_sample_shapes_dtypes_and_ranges(scenes):
    dataset, batch = scenes
    H, W = RES
    K = len(data.CLASS_NAMES)
    assert dataset.tasks == {"semantic": K, "depth": 1, "normal": 3, "edge": 1} and K >= 6
    assert list(dataset.tasks) == ["semantic", "depth", "normal", "edge"]
    s = dataset[0]
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    assert s["semantic"].shape == (H, W) and s["semantic"].dtype == torch.long
    assert s["depth"].shape == (1, H, W) and s["normal"].shape == (3, H, W) and s["edge"].shape == (1, H, W)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["image"].std() > 0.05  # a picture, not a flat colour
    assert batch["semantic"].min() >= -1 and batch["semantic"].max() < K
    depth = batch["depth"]
    assert depth.min() == 0  # holes
    assert 0.5 < depth[depth > 0].min() and depth.max() < 10  # metres: a room a few metres deep
    assert set(batch["edge"].unique().tolist()) == {0.0, 1.0}


def test_normals_are_unit_and_face_the_camera(scenes):
    _, batch = scenes
    H, W = RES
    normal, valid = batch["normal"], batch["depth"][:, 0] > 0
    length = normal.norm(dim=1)
    assert torch.allclose(length[valid], torch.ones(()), atol=1e-5)
    fx, fy, cx, cy = data.camera_intrinsics(H, W)
    ray_x = ((torch.arange(W) + 0.5 - cx) / fx).expand(H, W)
    ray_y = ((torch.arange(H) + 0.5 - cy) / fy)[:, None].expand(H, W)
    facing = normal[:, 0] * ray_x + normal[:, 1] * ray_y + normal[:, 2]  # normal . viewing ray
    assert (facing[valid] < 0).all()
    floor = batch["semantic"] == data.FLOOR
    assert (normal[:, 1][floor] < -0.8).all()  # camera y points down, so the floor's normal points "up" = -y


def test_normals_agree_with_finite_differences_of_depth(scenes):
    """Back-project the depth map with the intrinsics, take cross products of neighbouring 3D points: on the
    floor (a plane) that normal must match the rendered one. Depth as ray length instead of z, or normals in
    a different frame, would fail by many degrees."""
    _, batch = scenes
    H, W = RES
    fx, fy, cx, cy = data.camera_intrinsics(H, W)
    u = (torch.arange(W, dtype=torch.float64) + 0.5 - cx) / fx
    v = (torch.arange(H, dtype=torch.float64) + 0.5 - cy) / fy
    angles = []
    for b in range(batch["depth"].shape[0]):
        z = batch["depth"][b, 0].double()
        points = torch.stack([u[None, :] * z, v[:, None] * z, z])  # (3, H, W) camera frame
        du = points[:, :-1, 1:] - points[:, :-1, :-1]
        dv = points[:, 1:, :-1] - points[:, :-1, :-1]
        n = torch.linalg.cross(du, dv, dim=0)
        n = n / n.norm(dim=0, keepdim=True)
        n = torch.where((n * points[:, :-1, :-1]).sum(0) > 0, -n, n)  # face the camera
        floor = batch["semantic"][b] == data.FLOOR
        region = floor[:-1, :-1] & floor[:-1, 1:] & floor[1:, :-1]  # all three pixels on the floor plane
        cosine = (n * batch["normal"][b, :, :-1, :-1].double()).sum(0)[region].clamp(-1, 1)
        angles.append(torch.rad2deg(torch.acos(cosine)))
    angles = torch.cat(angles)
    assert angles.numel() > 5000
    assert angles.median() < 0.1 and angles.max() < 2.0


def test_invalid_pixels_agree_across_tasks_and_form_blobs(scenes):
    _, batch = scenes
    invalid_depth = batch["depth"][:, 0] == 0
    invalid_normal = (batch["normal"] == 0).all(1)
    ignored = batch["semantic"] == -1
    assert torch.equal(invalid_depth, invalid_normal) and torch.equal(invalid_depth, ignored)
    fraction = invalid_depth.float().mean().item()
    assert 0.002 < fraction < 0.05  # a small fraction of the pixels
    sizes = [size for mask in invalid_depth for size in _component_sizes(mask.numpy())]
    assert len(sizes) >= 5
    assert np.mean(sizes) > 20 and np.median(sizes) > 10  # blobs, not salt noise


def _component_sizes(mask):
    """Sizes of the 4-connected components of a boolean (H, W) array (a plain flood fill)."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, size = True, [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        sizes.append(size)
    return sizes


def test_classes_cover_the_scene(scenes):
    _, batch = scenes
    present = set(batch["semantic"].unique().tolist()) - {-1}
    assert len(present) >= 6
    assert {data.FLOOR, data.WALL, data.SPHERE, data.BOX, data.CYLINDER} <= present


def test_edges_mark_semantic_and_depth_discontinuities(scenes):
    """Every label change between neighbours is an edge, and so is every depth discontinuity. On planar
    surfaces (everything but spheres and cylinders) a discontinuity is exact: two neighbours that face the same
    way but lie on different planes (plane offset n . P differs) are two surfaces, one behind the other. A
    steep but continuous plane (a box face seen edge-on) jumps in depth too, yet keeps its offset."""
    _, batch = scenes
    H, W = RES
    semantic, depth, normal, edge = batch["semantic"], batch["depth"][:, 0], batch["normal"], batch["edge"][:, 0]
    fx, fy, cx, cy = data.camera_intrinsics(H, W)
    u, v = (torch.arange(W) + 0.5 - cx) / fx, (torch.arange(H) + 0.5 - cy) / fy
    offset = (normal[:, 0] * u + normal[:, 1] * v[:, None] + normal[:, 2]) * depth  # n . P, (B, H, W)
    planar = (semantic >= 0) & (semantic != data.SPHERE) & (semantic != data.CYLINDER)
    changes, jumps = 0, 0
    horizontal = ((..., slice(None, -1)), (..., slice(1, None)))
    vertical = ((..., slice(None, -1), slice(None)), (..., slice(1, None), slice(None)))
    for a, b in (horizontal, vertical):  # pixel a and its right / lower neighbour b
        label_change = (semantic[a] >= 0) & (semantic[b] >= 0) & (semantic[a] != semantic[b])
        parallel = (normal[a] * normal[b]).sum(1) > math.cos(math.radians(1))
        depth_jump = planar[a] & planar[b] & parallel & ((offset[a] - offset[b]).abs() > 0.02)
        assert (edge[a][label_change] == 1).all()
        assert (edge[a][depth_jump] == 1).all()
        changes, jumps = changes + label_change.sum(), jumps + depth_jump.sum()
    assert changes > 100 and jumps > 10
    assert 0.01 < edge.mean() < 0.15  # thin lines, not regions


# ----------------------------------------------------------------------------------------------------------
# Real datasets on tiny fake trees in the official formats
# ----------------------------------------------------------------------------------------------------------

SMALL = (16, 24)


def _unit_normals(rng, shape):
    n = rng.normal(size=shape + (3,))
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def write_nyuv2(root, counts=(("train", 2), ("val", 1)), size=SMALL):
    """A fake MTAN NYUv2 tree: image float64 HxWx3, label float HxW (-1 ignore), depth HxWx1, normal HxWx3."""
    rng = np.random.default_rng(0)
    H, W = size
    for split, count in counts:
        for folder in ("image", "label", "depth", "normal"):
            os.makedirs(os.path.join(root, split, folder), exist_ok=True)
        for i in range(count):
            label = rng.integers(-1, 13, size).astype(np.float64)
            depth = rng.uniform(0.5, 9.0, (H, W, 1)).astype(np.float32)
            depth[:3] = 0
            normal = _unit_normals(rng, size).astype(np.float32)
            normal[:3] = 0
            for folder, array in (("image", rng.random((H, W, 3))), ("label", label), ("depth", depth),
                                  ("normal", normal)):
                np.save(os.path.join(root, split, folder, f"{i}.npy"), array)
    return root


def test_nyuv2_loader_reads_the_official_layout(tmp_path):
    root = write_nyuv2(str(tmp_path))
    train = data.NYUv2(root, "train")
    assert len(train) == 2 and len(data.NYUv2(root, "val")) == 1 and len(data.NYUv2(root, "test")) == 1
    assert train.tasks == {"semantic": 13, "depth": 1, "normal": 3} and train.name == "nyuv2"
    s = train[1]
    folder = os.path.join(root, "train")
    image = np.load(os.path.join(folder, "image", "1.npy"))
    label = np.load(os.path.join(folder, "label", "1.npy"))
    depth = np.load(os.path.join(folder, "depth", "1.npy"))
    normal = np.load(os.path.join(folder, "normal", "1.npy"))
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 16, 24)
    assert torch.equal(s["image"], torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32)))
    assert s["semantic"].dtype == torch.long and torch.equal(s["semantic"], torch.from_numpy(label.astype(np.int64)))
    assert (s["semantic"] == -1).any() and s["semantic"].max() == 12
    assert torch.equal(s["depth"], torch.from_numpy(depth.transpose(2, 0, 1)))
    assert (s["depth"][:, :3] == 0).all() and (s["normal"][:, :3] == 0).all()
    assert torch.equal(s["normal"], torch.from_numpy(normal.transpose(2, 0, 1)))
    assert len(data.NYUv2(root, "train", num_samples=1)) == 1


def test_nyuv2_loader_normalises_other_ignore_values(tmp_path):
    root = write_nyuv2(str(tmp_path), counts=(("train", 1), ("val", 1)))
    label = np.zeros(SMALL, dtype=np.uint8)
    label[0, :5] = 255  # a copy that stores "ignore" as 255
    label[1, :5] = 12
    np.save(os.path.join(root, "train", "label", "0.npy"), label)
    semantic = data.NYUv2(root, "train")[0]["semantic"]
    assert (semantic[0, :5] == -1).all() and (semantic[1, :5] == 12).all() and (semantic[2:] == 0).all()


def test_nyuv2_cache_and_memory_map_give_the_same_sample(tmp_path):
    root = write_nyuv2(str(tmp_path))
    cached = data.NYUv2(root, "train", cache=True)
    first, plain = cached[0], data.NYUv2(root, "train")[0]
    assert all(torch.equal(first[key], plain[key]) for key in plain)
    assert cached[0]["image"] is first["image"]


def write_cityscapes(root, counts=(("train", 2), ("val", 1)), size=SMALL):
    rng = np.random.default_rng(1)
    H, W = size
    for split, count in counts:
        for folder in ("image", "depth", "label_2", "label_7", "label_19"):
            os.makedirs(os.path.join(root, split, folder), exist_ok=True)
        for i in range(count):
            disparity = rng.uniform(0, 0.49, (H, W, 1)).astype(np.float32)
            disparity[-4:] = 0  # sky / invalid
            np.save(os.path.join(root, split, "image", f"{i}.npy"), rng.random((H, W, 3)).astype(np.float32))
            np.save(os.path.join(root, split, "depth", f"{i}.npy"), disparity)
            for n in (2, 7, 19):
                np.save(os.path.join(root, split, f"label_{n}", f"{i}.npy"),
                        rng.integers(-1, n, size).astype(np.float32))
    return root


def test_cityscapes_loader_picks_the_label_set(tmp_path):
    root = write_cityscapes(str(tmp_path))
    for n in (2, 7, 19):
        dataset = data.CityScapes(root, "train", num_classes=n)
        assert dataset.tasks == {"semantic": n, "depth": 1} and len(dataset) == 2
        s = dataset[0]
        expected = np.load(os.path.join(root, "train", f"label_{n}", "0.npy")).astype(np.int64)
        assert torch.equal(s["semantic"], torch.from_numpy(expected))
        assert (s["semantic"] == -1).any() and s["semantic"].max() == n - 1
    s = data.CityScapes(root, "val")[0]
    assert s.keys() == {"image", "semantic", "depth"} and s["depth"].shape == (1, 16, 24)
    assert (s["depth"][0, -4:] == 0).all() and s["depth"].max() < 0.5  # inverse depth, kept as stored
    with pytest.raises(ValueError, match="2, 7 or 19"):
        data.CityScapes(root, "train", num_classes=5)


def write_nyud(root, ids=(("train", ["0001", "0002"]), ("val", ["0003"])), size=SMALL):
    """A fake NYUD_MT tree: jpg images, uint8 png labels 0..40 (0 = unlabeled), npy depth/normals/edge."""
    rng = np.random.default_rng(2)
    H, W = size
    for folder in ("gt_sets", "images", "segmentation", "depth", "normals", "edge"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for split, names in ids:
        with open(os.path.join(root, "gt_sets", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
        for name in names:
            Image.fromarray(np.full((H, W, 3), (200, 40, 90), dtype=np.uint8)).save(
                os.path.join(root, "images", name + ".jpg"), quality=95)
            label = rng.integers(0, 41, size).astype(np.uint8)
            label[0, 0], label[0, 1], label[0, 2] = 0, 1, 40
            Image.fromarray(label).save(os.path.join(root, "segmentation", name + ".png"))
            depth = rng.uniform(0.7, 9.5, size).astype(np.float32)
            depth[5] = 0
            normals = _unit_normals(rng, size).astype(np.float32)
            normals[5] = 0
            edge = (rng.random(size) < 0.1).astype(np.float32)
            np.save(os.path.join(root, "depth", name + ".npy"), depth)
            np.save(os.path.join(root, "normals", name + ".npy"), normals)
            np.save(os.path.join(root, "edge", name + ".npy"), edge)
    return root


def test_nyud_loader_shifts_labels_and_reads_every_task(tmp_path):
    root = write_nyud(str(tmp_path / "NYUD_MT"))
    dataset = data.NYUD(str(tmp_path), "train")  # the folder holding NYUD_MT works too
    assert len(dataset) == 2 and len(data.NYUD(root, "val")) == 1
    assert dataset.tasks == {"semantic": 40, "depth": 1, "normal": 3, "edge": 1}
    s = dataset[0]
    raw = np.array(Image.open(os.path.join(root, "segmentation", "0001.png"))).astype(np.int64)
    assert torch.equal(s["semantic"], torch.from_numpy(raw - 1))  # 0 (unlabeled) -> -1, 1..40 -> 0..39
    assert s["semantic"][0, :3].tolist() == [-1, 0, 39]
    assert s["image"].shape == (3, 16, 24)
    assert torch.allclose(s["image"][:, 8, 12], torch.tensor([200, 40, 90]) / 255, atol=0.03)  # jpeg
    assert torch.equal(s["depth"][0], torch.from_numpy(np.load(os.path.join(root, "depth", "0001.npy"))))
    assert (s["depth"][0, 5] == 0).all() and (s["normal"][:, 5] == 0).all()
    assert torch.allclose(s["normal"][:, 0].norm(dim=0), torch.ones(()), atol=1e-5)
    edge = np.load(os.path.join(root, "edge", "0001.npy"))
    assert torch.equal(s["edge"][0], torch.from_numpy(edge)) and set(s["edge"].unique().tolist()) == {0.0, 1.0}


def test_build_dataset_returns_the_primary_tasks(tmp_path):
    dataset, tasks = data.build_dataset("synthetic", None, "val", resolution=(32, 64), num_samples=4)
    K = len(data.CLASS_NAMES)
    assert tasks == {"semantic": K, "depth": 1, "normal": 3} and list(tasks) == ["semantic", "depth", "normal"]
    assert len(dataset) == 4 and dataset.resolution == (32, 64) and dataset.name == "synthetic"
    assert len(dataset.class_names) == K
    _, tasks = data.build_dataset("nyuv2", write_nyuv2(str(tmp_path / "nyuv2")), "train")
    assert tasks == {"semantic": 13, "depth": 1, "normal": 3}
    dataset, tasks = data.build_dataset("cityscapes", write_cityscapes(str(tmp_path / "cs")), "val", num_classes=19)
    assert tasks == {"semantic": 19, "depth": 1} and dataset.name == "cityscapes" and len(dataset.class_names) == 19
    dataset, tasks = data.build_dataset("nyud", write_nyud(str(tmp_path / "nyud")), "train", num_samples=1)
    assert tasks == {"semantic": 40, "depth": 1} and list(tasks) == ["semantic", "depth"]
    assert dataset.tasks == {"semantic": 40, "depth": 1, "normal": 3, "edge": 1} and len(dataset) == 1
    assert len(dataset.class_names) == 40 and len(data.NYUv2.class_names) == 13  # names for the pictures
    assert data.build_dataset("nyuv2", str(tmp_path / "nyuv2"), "train", resolution=None)[1] == tasks | {
        "semantic": 13, "normal": 3}
    with pytest.raises(ValueError, match="synthetic, nyuv2, cityscapes, nyud"):
        data.build_dataset("imagenet", None, "train")
    with pytest.raises(ValueError, match="--resolution"):
        data.build_dataset("nyuv2", str(tmp_path / "nyuv2"), "train", resolution=(96, 128))


# ----------------------------------------------------------------------------------------------------------
# Bad input: every error names the path, the layout and the download notes
# ----------------------------------------------------------------------------------------------------------


def _error(call):
    with pytest.raises(data.DatasetError) as info:
        call()
    error = info.value
    assert "Expected layout" in str(error) and "README.md" in str(error)
    assert error.__cause__ is None  # no numpy / PIL traceback attached
    assert error.__context__ is None or error.__suppress_context__
    return str(error)


def test_missing_root_names_the_path_and_the_download(tmp_path):
    missing = str(tmp_path / "nowhere")
    message = _error(lambda: data.NYUv2(missing, "train"))
    assert missing in message and "dropbox.com/sh/86nssgwm6hm3vkb" in message
    message = _error(lambda: data.NYUD(missing, "train"))
    assert missing in message and "14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw" in message
    assert "--data-root" in _error(lambda: data.build_dataset("cityscapes", None, "train"))


def test_wrong_layout_names_the_missing_folder(tmp_path):
    root = write_nyuv2(str(tmp_path))
    os.rename(os.path.join(root, "train", "normal"), os.path.join(root, "train", "normals"))
    message = _error(lambda: data.NYUv2(root, "train"))
    assert os.path.join(root, "train", "normal") in message
    message = _error(lambda: data.CityScapes(str(tmp_path), "train"))  # a NYUv2 tree is no CityScapes tree
    assert os.path.join(str(tmp_path), "train", "label_7") in message


def test_empty_split_is_reported(tmp_path):
    root = str(tmp_path)
    for folder in ("image", "label", "depth", "normal"):
        os.makedirs(os.path.join(root, "val", folder))
    message = _error(lambda: data.NYUv2(root, "val"))
    assert "no samples" in message and os.path.join(root, "val", "image") in message
    nyud = write_nyud(str(tmp_path / "nyud"))
    open(os.path.join(nyud, "gt_sets", "val.txt"), "w").close()
    assert "empty split" in _error(lambda: data.NYUD(nyud, "val"))


def test_missing_and_unreadable_files_are_named(tmp_path):
    root = write_nyuv2(str(tmp_path / "nyuv2"))
    os.remove(os.path.join(root, "train", "label", "1.npy"))
    assert os.path.join(root, "train", "label", "1.npy") in _error(lambda: data.NYUv2(root, "train"))
    broken = os.path.join(root, "val", "depth", "0.npy")
    with open(broken, "wb") as f:
        f.write(b"this is not a numpy file")
    dataset = data.NYUv2(root, "val")  # files are checked for presence when built, read when used
    message = _error(lambda: dataset[0])
    assert broken in message and "cannot read" in message
    nyud = write_nyud(str(tmp_path / "nyud"))
    jpg = os.path.join(nyud, "images", "0003.jpg")
    with open(jpg, "wb") as f:
        f.write(b"\x00" * 10)
    assert jpg in _error(lambda: data.NYUD(nyud, "val")[0])


def test_size_mismatch_names_both_files(tmp_path):
    root = write_nyuv2(str(tmp_path), counts=(("train", 1), ("val", 1)))
    label = os.path.join(root, "train", "label", "0.npy")
    np.save(label, np.zeros((16, 25)))
    message = _error(lambda: data.NYUv2(root, "train")[0])
    assert "size mismatch" in message and label in message and os.path.join(root, "train", "image", "0.npy") in message
    np.save(os.path.join(root, "val", "normal", "0.npy"), np.zeros((16, 24, 2)))
    assert "expected (H, W, 3)" in _error(lambda: data.NYUv2(root, "val")[0])


def test_sample_rules_print_the_excess_and_the_stored_value(tmp_path):
    """check_sample's bounds: a value is printed with the digits that show its excess; a label as stored."""
    root = write_nyuv2(str(tmp_path / "nyuv2"), counts=(("train", 2), ("val", 1)))
    depth = os.path.join(root, "train", "depth", "0.npy")
    np.save(depth, np.full((16, 24, 1), data.MAX_DEPTH, np.float32))  # the bound itself is fine
    assert float(data.NYUv2(root, "train")[0]["depth"].max()) == data.MAX_DEPTH
    np.save(depth, np.full((16, 24, 1), 100.0001, np.float32))
    assert "depth up to 100.0001, expected metres" in _error(lambda: data.NYUv2(root, "train")[0])
    np.save(os.path.join(root, "train", "image", "1.npy"), np.full((16, 24, 3), 1.0011))
    assert "image values in [1.0011, 1.0011]" in _error(lambda: data.NYUv2(root, "train")[1])
    with pytest.raises(IndexError):
        data.NYUv2(root, "val")[1]
    nyud = write_nyud(str(tmp_path / "nyud"))
    Image.fromarray(np.full(SMALL, 45, np.uint8)).save(os.path.join(nyud, "segmentation", "0003.png"))
    assert "label value 45 outside the expected range 1..40" in _error(lambda: data.NYUD(nyud, "val")[-1])


def test_read_image_reads_every_bit_depth_upright(tmp_path):
    """One reader for the loaders and eval.py --image: 8-bit RGB as before, 16-bit grey not white, EXIF turned."""
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    expected = torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.equal(data.read_image(tmp_path / "rgb.png"), expected)
    Image.fromarray(np.full((5, 7), 65535 // 2, np.uint16)).save(tmp_path / "grey16.png")
    notes = []
    grey = data.read_image(tmp_path / "grey16.png", note=notes.append)
    assert grey.shape == (3, 5, 7) and abs(float(grey.max()) - 0.5) < 1e-4 and "16-bit" in notes[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: the camera was turned; the picture is shown turned back
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    assert data.read_image(tmp_path / "turned.jpg").shape == (3, 7, 5)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(data.UnreadableFileError, match="bad.png"):
        data.read_image(tmp_path / "bad.png")


# ----------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------


def _augmentable_batch():
    """Two synthetic samples (with holes) at a small size, as a training loop would batch them."""
    dataset = data.SyntheticScenes("train", resolution=(32, 64))
    batch = dataset.render_batch([0, 1])
    assert (batch["depth"] == 0).any()
    return batch


def test_scale_one_without_flip_is_the_identity():
    batch = _augmentable_batch()
    out = data.augment_batch(batch, torch.Generator().manual_seed(0), scales=(1.0,), flip_prob=0.0)
    assert all(torch.equal(out[key], batch[key]) for key in batch)


def test_flip_mirrors_every_map_and_negates_normal_x():
    batch = _augmentable_batch()
    out = data.augment_batch(batch, scales=(1.0,), flip_prob=1.0)
    for key in ("image", "semantic", "depth", "edge"):
        assert torch.equal(out[key], batch[key].flip(-1)), key
    assert torch.equal(out["normal"][:, 0], -batch["normal"][:, 0].flip(-1))
    assert torch.equal(out["normal"][:, 1:], batch["normal"][:, 1:].flip(-1))


def test_scale_crop_matches_the_official_crop_and_interpolate():
    """Against MTAN's RandomScaleCrop written with F.interpolate, one sample at a time."""
    batch = _augmentable_batch()
    scale, top, left, flip = [1.2, 1.5], [3, 10], [7, 0], [False, True]
    out = data.scale_crop_flip(batch, scale, top, left, flip)
    H, W = batch["image"].shape[-2:]
    for b in range(2):
        h, w = int(H / scale[b]), int(W / scale[b])

        def official(x, mode):
            crop = x[b: b + 1, :, top[b]: top[b] + h, left[b]: left[b] + w].float()
            if mode == "bilinear":
                resized = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=True)
            else:
                resized = F.interpolate(crop, size=(H, W), mode="nearest")
            return resized.flip(-1) if flip[b] else resized

        assert torch.allclose(out["image"][b: b + 1], official(batch["image"], "bilinear"), atol=1e-6)
        assert torch.equal(out["semantic"][b: b + 1], official(batch["semantic"][:, None], "nearest")[:, 0].long())
        assert torch.equal(out["depth"][b: b + 1], official(batch["depth"], "nearest") / scale[b])
        assert torch.equal(out["edge"][b: b + 1], official(batch["edge"], "nearest"))
        normal = official(batch["normal"], "bilinear")
        valid = official((batch["normal"] != 0).any(1, keepdim=True), "nearest") > 0
        if flip[b]:
            normal = normal * torch.tensor([-1.0, 1.0, 1.0])[:, None, None]
        assert torch.allclose(out["normal"][b: b + 1], normal * valid, atol=1e-6)


def test_depth_is_divided_by_the_scale():
    batch = _augmentable_batch()
    batch["depth"] = torch.where(batch["depth"] > 0, torch.full_like(batch["depth"], 3.0), batch["depth"])
    out = data.augment_batch(batch, scales=(1.5,))
    assert set(out["depth"].unique().tolist()) == {0.0, 2.0}


def test_augmentation_keeps_labels_and_invalid_pixels_honest():
    batch = _augmentable_batch()
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        out = data.augment_batch(batch, generator)
        assert set(out["semantic"].unique().tolist()) <= set(batch["semantic"].unique().tolist())
        assert set(out["edge"].unique().tolist()) <= {0.0, 1.0}
        invalid = out["depth"][:, 0] == 0
        assert invalid.any()
        assert torch.equal(invalid, out["semantic"] == -1)  # nearest uses one pixel map for every label map
        assert (out["normal"].permute(1, 0, 2, 3)[:, invalid] == 0).all()  # exactly zero, not blended
        valid_depth = out["depth"][out["depth"] > 0]
        assert valid_depth.min() >= batch["depth"][batch["depth"] > 0].min() / 1.5 - 1e-6


def test_augmentation_draws_per_sample_and_is_reproducible():
    one = data.SyntheticScenes("train", resolution=(32, 64)).render_batch([0])
    batch = {key: value.expand(8, *value.shape[1:]).clone() for key, value in one.items()}
    a = data.augment_batch(batch, torch.Generator().manual_seed(5))
    b = data.augment_batch(batch, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[key], b[key]) for key in a)
    distinct = {a["image"][i].numpy().tobytes() for i in range(8)}
    assert len(distinct) > 2  # the 8 copies got different crops / flips


# ----------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------


def test_colour_maps():
    labels = torch.tensor([[-1, 0], [1, 6]])
    rgb = data.colorize_semantic(labels, 7)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert (rgb[0, 0] == 0).all() and len({tuple(c) for c in rgb.reshape(-1, 3)}) == 4
    depth = torch.tensor([[[0.0, 1.0, 5.0]]])
    rgb = data.colorize_depth(depth)
    assert rgb.shape == (1, 3, 3) and (rgb[0, 0] == 0).all()
    assert rgb[0, 1].astype(int).sum() > rgb[0, 2].astype(int).sum()  # near is brighter than far
    # a given range: 3 m on the range [1, 5] is drawn as 3 m is in the picture of [[1, 3, 5]], whatever else
    # the map holds (a prediction drawn on its ground truth's range)
    reference = data.colorize_depth(torch.tensor([[1.0, 3.0, 5.0]]))
    assert (data.colorize_depth(torch.tensor([[3.0, 2.9]]), max_depth=5.0, min_depth=1.0)[0, 0] == reference[0, 1]).all()
    assert not (data.colorize_depth(torch.tensor([[3.0, 2.9]]))[0, 0] == reference[0, 1]).all()
    normal = torch.zeros(3, 1, 2)
    normal[:, 0, 1] = torch.tensor([0.0, 0.0, -1.0])
    rgb = data.colorize_normal(normal)
    assert (rgb[0, 0] == 0).all() and rgb[0, 1].tolist() == [128, 128, 0]


def test_palette_colours_are_distinct():
    for k in (7, 13, 40):
        colours = data.palette(k)
        assert colours.shape == (k, 3) and len({tuple(c) for c in colours}) == k and colours.sum(1).min() > 0


def test_montage_command_writes_a_png(tmp_path):
    out = str(tmp_path / "montage.png")
    data.main(["--out", out, "--num", "2", "--resolution", "32x64"])
    with Image.open(out) as picture:
        assert picture.size == (6 * 64, 14 + 2 * 32 + 14)  # titles, 2 rows, legend


# ----------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------------


def test_renderer_and_augmentation_keep_every_tensor_on_the_device():
    """On the "meta" device (shapes only, no data) any tensor left on the CPU raises a device-mismatch
    error, so this checks the GPU code path on a machine without a GPU."""
    dataset = data.SyntheticScenes("train", resolution=(32, 64))
    batch = dataset.render_batch(range(3), "meta")
    assert all(value.device.type == "meta" for value in batch.values())
    assert batch["image"].shape == (3, 3, 32, 64) and batch["semantic"].dtype == torch.long
    out = data.augment_batch(batch)
    assert all(value.device.type == "meta" and value.shape == batch[key].shape for key, value in out.items())


@requires_cuda
def test_render_and_augment_on_cuda_match_the_cpu():
    """Rendering on the GPU: the same scenes up to the float32 rounding of the geometry, which can move a pixel
    on an object's boundary to the other side (the bounds allow 0.5 % of the pixels).
    The augmentation of the same batch with the same (CPU) draws: exactly the CPU's result, because it only
    gathers pixels and blends them with weights that both devices compute with the same IEEE operations (the
    source positions divide by a tensor, not by a Python number, which CUDA would turn into a multiplication
    by its reciprocal: data._as_divisor)."""
    dataset = data.SyntheticScenes("train", resolution=RES)
    cpu = dataset.render_batch(range(4))
    gpu = {key: value.cpu() for key, value in dataset.render_batch(range(4), "cuda").items()}
    assert (gpu["semantic"] == cpu["semantic"]).float().mean() > 0.995
    assert torch.allclose(gpu["depth"], cpu["depth"], atol=1e-4) or \
        ((gpu["depth"] - cpu["depth"]).abs() > 1e-3).float().mean() < 0.005
    out_cpu = data.augment_batch(cpu, torch.Generator().manual_seed(0))
    out_gpu = data.augment_batch({k: v.cuda() for k, v in cpu.items()}, torch.Generator().manual_seed(0))
    for key in out_cpu:
        assert torch.equal(out_gpu[key].cpu(), out_cpu[key]), key
