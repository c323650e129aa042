"""Known-answer tests for eval.py's metric library (CPU; the CUDA tests skip without a GPU)."""
import itertools
import math

import pytest
import torch
from conftest import requires_cuda

import eval as ev


def onehot_logits(labels, k):
    """(B, H, W) class ids -> (B, K, H, W) logits whose argmax is `labels`."""
    return torch.nn.functional.one_hot(labels.clamp_min(0), k).permute(0, 3, 1, 2).float() * 5


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return (torch.log(p) - torch.log1p(-p)).float()


# ------------------------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------------------------


def test_seg_perfect():
    target = torch.randint(0, 4, (2, 5, 6))
    m = ev.SegMetrics(4)
    m.update(onehot_logits(target, 4), target)
    r = m.compute()
    assert r == {"miou": 1.0, "pixel_acc": 1.0}


def test_seg_known_confusion_matrix():
    # 11 pixels, 3 classes, as (GT, prediction) pairs:
    # (0,0) x3, (0,1), (1,1) x2, (1,2) x2, (1,0), (2,2), (2,0)
    gt = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    pr = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 0, 2, 0])
    # class 0: TP 3, FP 2, FN 1 -> 3/6; class 1: TP 2, FP 1, FN 3 -> 2/6;
    # class 2: TP 1, FP 2, FN 1 -> 1/4; pixel accuracy 6/11
    m = ev.SegMetrics(3)
    m.update(pr.view(1, 1, -1), gt.view(1, 1, -1))
    r = m.compute()
    assert m.state["confusion"].tolist() == [[3, 1, 0], [1, 2, 2], [1, 0, 1]]  # rows GT, columns prediction
    assert m.class_iou().tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 4])
    assert r["miou"] == pytest.approx((3 / 6 + 2 / 6 + 1 / 4) / 3)
    assert r["pixel_acc"] == pytest.approx(6 / 11)


def test_seg_ignore_pixels_really_ignored():
    target = torch.tensor([[[0, 1, -1, -1]]])
    pred = torch.tensor([[[0, 1, 1, 0]]])  # wrong on the ignored pixels only
    m = ev.SegMetrics(2)
    m.update(pred, target)
    assert m.compute() == {"miou": 1.0, "pixel_acc": 1.0}
    # a custom ignore value, and ids >= K, are ignored too
    m = ev.SegMetrics(2, ignore_index=255)
    m.update(pred, torch.tensor([[[0, 1, 255, 7]]]))
    assert m.compute() == {"miou": 1.0, "pixel_acc": 1.0}


def test_seg_absent_class_rules():
    # class 2 appears nowhere; class 0 IoU 1/2 (TP 1, FN 1), class 1 IoU 1/2 (TP 1, FP 1)
    target = torch.tensor([[[0, 0, 1]]])
    pred = torch.tensor([[[0, 1, 1]]])
    results = {}
    for rule in ("skip", "zero", "nan"):
        m = ev.SegMetrics(3, absent=rule)
        m.update(pred, target)
        results[rule] = m.compute()["miou"]
    assert results["skip"] == pytest.approx(0.5)
    assert results["zero"] == pytest.approx(1 / 3)
    assert math.isnan(results["nan"])
    with pytest.raises(ValueError):
        ev.SegMetrics(3, absent="bogus")


def test_seg_class_only_in_prediction_counts_zero():
    target = torch.tensor([[[0, 0]]])
    pred = torch.tensor([[[0, 1]]])
    m = ev.SegMetrics(2)
    m.update(pred, target)
    assert m.compute()["miou"] == pytest.approx((1 / 2 + 0) / 2)


def test_parts_skips_images_without_person():
    k = 7
    with_person = torch.tensor([[0, 1], [2, 0]])
    all_background = torch.zeros(2, 2, dtype=torch.long)
    all_void = torch.full((2, 2), -1)
    target = torch.stack([with_person, all_background, all_void])
    pred = torch.stack([with_person, torch.full((2, 2), 3), torch.full((2, 2), 4)])  # wrong on skipped images
    m = ev.PartsMetrics(k)
    m.update(onehot_logits(pred, k), target)
    r = m.compute()
    assert r["pixel_acc"] == 1.0
    assert r["miou"] == pytest.approx(3 / 7)  # classes 0, 1, 2 perfect; 3..6 absent count 0 (official)
    plain = ev.SegMetrics(k, absent="zero")
    plain.update(onehot_logits(pred, k), target)
    assert plain.compute()["pixel_acc"] == pytest.approx(4 / 8)  # the all-background image counted


# ------------------------------------------------------------------------------------------------------------
# Depth
# ------------------------------------------------------------------------------------------------------------


def test_depth_known_values_and_invalid_pixels():
    target = torch.tensor([2.0, 4.0, 1.0, 0.0]).view(1, 1, 2, 2)
    pred = torch.tensor([3.0, 2.0, 1.0, 100.0]).view(1, 1, 2, 2)  # last pixel invalid
    m = ev.DepthMetrics()
    m.update(pred, target)
    r = m.compute()
    assert r["abs_err"] == pytest.approx((1 + 2 + 0) / 3)
    assert r["rel_err"] == pytest.approx((1 / 2 + 2 / 4 + 0) / 3)
    assert r["rmse"] == pytest.approx(math.sqrt((1 + 4 + 0) / 3))


def test_depth_perfect_and_clamp():
    target = torch.rand(2, 1, 4, 4) + 0.5
    m = ev.DepthMetrics()
    m.update(target.clone(), target)
    assert m.compute() == {"abs_err": 0.0, "rel_err": 0.0, "rmse": 0.0}
    m = ev.DepthMetrics(clamp_nonpositive=True)
    m.update(torch.tensor([-1.0]).view(1, 1, 1, 1), torch.tensor([2.0]).view(1, 1, 1, 1))
    assert m.compute()["abs_err"] == pytest.approx(2.0 - 1e-9)


# ------------------------------------------------------------------------------------------------------------
# Normals
# ------------------------------------------------------------------------------------------------------------


def normal_map(vectors):
    """list of 3-vectors -> (1, 3, 1, N)"""
    return torch.tensor(vectors, dtype=torch.float32).t().reshape(1, 3, 1, -1)


def test_normals_orthogonal_opposite_identical():
    gt = normal_map([[0, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 0]])
    pred = normal_map([[1, 0, 0], [0, 0, -1], [0, 0, 1], [1, 0, 0]])  # 90, 180, 0, 0 degrees
    m = ev.NormalMetrics()
    m.update(pred, gt)
    r = m.compute()
    assert r["mean"] == pytest.approx(270 / 4)
    assert r["rmse"] == pytest.approx(math.sqrt((90 ** 2 + 180 ** 2) / 4))
    assert r["within_11.25"] == r["within_22.5"] == r["within_30"] == 0.5
    one = ev.NormalMetrics()
    one.update(normal_map([[0, 1, 0]]), normal_map([[0, 0, 1]]))
    assert one.compute()["mean"] == pytest.approx(90.0)
    one = ev.NormalMetrics()
    one.update(normal_map([[0, 0, -1]]), normal_map([[0, 0, 1]]))
    assert one.compute()["mean"] == pytest.approx(180.0)


def test_normals_invalid_ignored_and_unnormalised_same():
    torch.manual_seed(0)
    gt = torch.nn.functional.normalize(torch.randn(2, 3, 8, 8), dim=1)
    gt[:, :, :2] = 0  # invalid rows
    pred = torch.nn.functional.normalize(torch.randn(2, 3, 8, 8), dim=1)
    a, b = ev.NormalMetrics(), ev.NormalMetrics()
    a.update(pred, gt)
    b.update(pred * (torch.rand(2, 1, 8, 8) * 10 + 0.1), gt)  # any positive length per pixel
    ra, rb = a.compute(), b.compute()
    for key in ra:
        assert ra[key] == pytest.approx(rb[key], rel=1e-6)  # float32 rounding of the scaled input
    assert int(a.state["count"]) == 2 * 6 * 8
    # the invalid pixels do not matter whatever the prediction there
    pred2 = pred.clone()
    pred2[:, :, :2] = torch.randn(2, 3, 2, 8)
    c = ev.NormalMetrics()
    c.update(pred2, gt)
    assert c.compute() == ra


def test_normals_within_is_strictly_below():
    # acos(0) is exactly 90 degrees in float64, so a 90-degree threshold shows
    # the strict comparison: an error equal to the threshold does not count.
    m = ev.NormalMetrics()
    m.thresholds = (90.0,)
    m.update(normal_map([[1, 0, 0], [0, 1, 0]]), normal_map([[0, 0, 1], [0, 0, 1]]))
    assert m.compute()["within_90"] == 0.0
    # just below and just above 30 degrees
    gt = normal_map([[0, 0, 1], [0, 0, 1]]).double()
    a, b = math.radians(29.99), math.radians(30.01)
    pred = torch.tensor([[math.sin(a), 0, math.cos(a)], [math.sin(b), 0, math.cos(b)]]).t().reshape(1, 3, 1, 2)
    m = ev.NormalMetrics()
    m.update(pred, gt)
    r = m.compute()
    assert r["mean"] == pytest.approx(30.0)
    assert r["within_30"] == 0.5 and r["within_22.5"] == 0.0 and r["within_11.25"] == 0.0


def angles_deg(pred, gt):
    """Reference: every valid angle, computed independently in float64."""
    p = torch.nn.functional.normalize(pred.double(), dim=1)
    g = gt.double()
    valid = (g != 0).any(1)
    cos = (p * torch.nn.functional.normalize(g, dim=1)).sum(1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))[valid]


def test_normals_median_matches_torch_median():
    torch.manual_seed(1)
    gt = torch.nn.functional.normalize(torch.randn(4, 3, 64, 96), dim=1)
    pred = torch.nn.functional.normalize(gt + 0.5 * torch.randn_like(gt), dim=1)
    m = ev.NormalMetrics()
    for i in range(4):
        m.update(pred[i:i + 1], gt[i:i + 1])
    errors = angles_deg(pred, gt)
    r = m.compute()
    assert abs(r["median"] - float(torch.median(errors))) < 0.01
    assert r["mean"] == pytest.approx(float(errors.mean()), rel=1e-9)
    assert r["within_22.5"] == pytest.approx(float((errors < 22.5).double().mean()))
    # a tiny odd-sized case: the median lies inside the right bin
    m = ev.NormalMetrics()
    m.update(pred[:1, :, :1, :3], gt[:1, :, :1, :3])
    few = angles_deg(pred[:1, :, :1, :3], gt[:1, :, :1, :3])
    assert abs(m.compute()["median"] - float(torch.median(few))) < 0.01


# ------------------------------------------------------------------------------------------------------------
# Edges
# ------------------------------------------------------------------------------------------------------------


def edge_maps(gt_col, pred_col, size=8):
    gt = torch.zeros(1, 1, size, size)
    gt[..., gt_col] = 1
    pred = torch.full((1, 1, size, size), -10.0)
    pred[..., pred_col] = 10.0
    return pred, gt


def edge_f(pred, gt, **kw):
    """The approximation (no thinning, no one-to-one matching): training's evaluation after every epoch."""
    m = ev.EdgeMetrics(exact=False, **kw)
    m.update(pred, gt)
    return m.compute()["approx_odsf"]


def test_edge_shifted_line_and_tolerance():
    pred, gt = edge_maps(3, 4)
    assert edge_f(pred, gt, tolerance=1, unit="pixels") == pytest.approx(1.0)
    assert edge_f(pred, gt, tolerance=0, unit="pixels") == 0.0
    pred2, _ = edge_maps(3, 5)
    assert edge_f(pred2, gt, tolerance=1, unit="pixels") == 0.0
    assert edge_f(pred2, gt, tolerance=2, unit="pixels") == pytest.approx(1.0)
    assert edge_f(gt * 20 - 10, gt, tolerance=0, unit="pixels") == pytest.approx(1.0)  # perfect


def test_edge_disk_versus_square_and_diagonal_unit():
    gt = torch.zeros(1, 1, 8, 6)
    gt[0, 0, 3, 2] = 1
    pred = torch.full((1, 1, 8, 6), -10.0)
    pred[0, 0, 4, 3] = 10.0  # diagonal neighbour: distance sqrt(2)
    assert edge_f(pred, gt, tolerance=1, unit="pixels") == 0.0
    assert edge_f(pred, gt, tolerance=1, unit="pixels", shape="square") == pytest.approx(1.0)
    assert edge_f(pred, gt, tolerance=1.5, unit="pixels") == pytest.approx(1.0)
    # 8 x 6 image: diagonal 10 px, so 0.15 x diagonal = 1.5 px
    assert edge_f(pred, gt, tolerance=0.15, unit="diagonal") == pytest.approx(1.0)
    assert edge_f(pred, gt, tolerance=0.1, unit="diagonal") == 0.0


def test_edge_hand_computed_thresholds():
    # GT: column 3. Prediction: column 4 with p = 0.9 on rows 0-3 and 0.4 on rows 4-7,
    # plus a false positive at (0, 7) with p = 0.6. Tolerance 1 px, disk.
    gt = torch.zeros(1, 1, 8, 8)
    gt[..., 3] = 1
    prob = torch.full((1, 1, 8, 8), 0.001)
    prob[0, 0, :4, 4] = 0.9
    prob[0, 0, 4:, 4] = 0.4
    prob[0, 0, 0, 7] = 0.6
    m = ev.EdgeMetrics(tolerance=1, unit="pixels", exact=False)
    m.update(logit(prob), gt)
    # t <= 0.4: P = 8/9, R = 1 -> F = 16/17; 0.4 < t <= 0.6: P = 4/5, R = 4/8;
    # 0.6 < t <= 0.9: P = 1, R = 1/2 -> F = 2/3. odsF = 16/17.
    assert m.compute()["approx_odsf"] == pytest.approx(16 / 17)


# The exact odsF: the BSDS benchmark's thinning and one-to-one matching, known answers

ON, OFF = 10.0, -10.0  # logits: p = 0.99995 and 0.00005


def f_exact(pred, gt, tolerance, unit="pixels"):
    m = ev.EdgeMetrics(tolerance=tolerance, unit=unit, exact=True)
    m.update(pred, gt)
    return m.compute()["odsf"]


def maps(h, w, gt_px, pred_px):
    """Logits and a GT map of (1, 1, h, w) with the listed (row, col) pixels on."""
    gt, pred = torch.zeros(1, 1, h, w), torch.full((1, 1, h, w), OFF)
    for y, x in gt_px:
        gt[0, 0, y, x] = 1
    for y, x in pred_px:
        pred[0, 0, y, x] = ON
    return pred, gt


def test_line_against_its_one_pixel_shift():
    # GT column 3, prediction column 4 of an 8 x 8 image: every pixel pairs with its neighbour at distance 1.
    col = lambda c: [(y, c) for y in range(8)]  # noqa: E731
    pred, gt = maps(8, 8, col(3), col(4))
    assert f_exact(pred, gt, 1) == pytest.approx(1.0)
    assert f_exact(pred, gt, 0.99) == 0.0  # nothing within reach
    pred, _ = maps(8, 8, [], col(5))  # two pixels away
    assert f_exact(pred, gt, 1.99) == 0.0
    assert f_exact(pred, gt, 2) == pytest.approx(1.0)  # distance <= maxDist counts


def test_just_inside_and_just_outside_max_dist():
    # one GT pixel and one predicted pixel diagonally next to it: distance sqrt(2) = 1.414
    pred, gt = maps(8, 6, [(3, 2)], [(4, 3)])
    assert f_exact(pred, gt, 1.41) == 0.0
    assert f_exact(pred, gt, 1.42) == pytest.approx(1.0)
    # maxDist as a fraction of the diagonal (10 px for 8 x 6): 0.142 -> 1.42 px, 0.141 -> 1.41 px
    assert f_exact(pred, gt, 0.142, unit="diagonal") == pytest.approx(1.0)
    assert f_exact(pred, gt, 0.141, unit="diagonal") == 0.0


def test_two_predictions_claiming_one_gt_pixel_count_once():
    # GT (3, 3); predictions left and right of it, both at distance 1. One-to-one: one pair, so P = 1/2, R = 1
    # and F = 2/3 (the approximation counts both predictions as hits: F = 1).
    pred, gt = maps(7, 7, [(3, 3)], [(3, 2), (3, 4)])
    assert f_exact(pred, gt, 1) == pytest.approx(2 / 3)
    approx = ev.EdgeMetrics(tolerance=1, unit="pixels", exact=False)
    approx.update(pred, gt)
    assert approx.compute()["approx_odsf"] == pytest.approx(1.0)


def test_maximum_matching_not_greedy():
    # Row: GT at x = 0 and 3, predictions at x = 2 and 5, maxDist 2. Pairing the nearest pair (2, 3) first
    # leaves both others alone; the maximum matching pairs 2-0 and 5-3: P = R = 1.
    pred, gt = maps(3, 8, [(1, 0), (1, 3)], [(1, 2), (1, 5)])
    assert f_exact(pred, gt, 2) == pytest.approx(1.0)


def test_three_pixel_band_thinned_to_one():
    # A band 3 px wide across an 8 x 9 image thins to its middle column, a pixel shorter at each end (bwmorph
    # 'thin' peels the corners too): 6 pixels. Against the middle column as GT: P = 6/6, R = 6/8, F = 6/7.
    band = torch.zeros(1, 8, 9, dtype=torch.bool)
    band[0, :, 3:6] = True
    line = torch.zeros_like(band)
    line[0, 1:7, 4] = True
    assert torch.equal(ev.thin(band), line)
    assert torch.equal(ev.thin(line), line)  # a thin line stays as it is
    pred = torch.where(band[:, None], ON, OFF)
    gt = torch.zeros(1, 1, 8, 9)
    gt[..., 4] = 1
    m = ev.EdgeMetrics(tolerance=1, unit="pixels", exact=True)
    m.update(pred, gt)
    assert m.state["sumP"].tolist() == [6] * 99 and m.state["cntR"].tolist() == [6] * 99
    assert m.compute()["odsf"] == pytest.approx(6 / 7)


def test_empty_prediction_and_empty_ground_truth():
    pred, gt = maps(6, 6, [(2, 2), (2, 3)], [])
    assert f_exact(pred, gt, 1) == 0.0  # P = R = 0
    pred, gt = maps(6, 6, [], [(2, 2)])
    m = ev.EdgeMetrics(tolerance=1, unit="pixels", exact=True)
    m.update(pred, gt)
    assert m.state["sumP"].tolist() == [1] * 99 and m.state["sumR"].sum() == 0
    assert m.compute()["odsf"] == 0.0


def test_thresholds_and_batches_add_up():
    # Image 1: GT column 3; prediction column 4 with p = 0.85 on rows 0-3 and 0.35 on rows 4-7, and a false
    # positive (0, 7) at 0.55. Image 2: the same GT, an empty prediction. Over both: t <= 0.35: P = 8/9,
    # R = 8/16 (the best F); 0.35 < t <= 0.55: P = 4/5, R = 4/16; 0.55 < t <= 0.85: P = 1, R = 4/16.
    gt = torch.zeros(2, 1, 8, 8)
    gt[..., 3] = 1
    prob = torch.full((2, 1, 8, 8), 0.001)
    prob[0, 0, :4, 4], prob[0, 0, 4:, 4], prob[0, 0, 0, 7] = 0.85, 0.35, 0.55
    logits = torch.log(prob) - torch.log1p(-prob)
    whole, parts = (ev.EdgeMetrics(tolerance=1, unit="pixels", exact=True) for _ in range(2))
    whole.update(logits, gt)
    parts.update(logits[:1], gt[:1])
    parts.update(logits[1:], gt[1:])
    assert all(torch.equal(whole.state[k], parts.state[k]) for k in whole.state)
    t = [29, 39, 49, 59, 79, 89]  # t = 0.3, 0.4, ..., 0.9
    assert whole.state["cntP"][t].tolist() == [8, 4, 4, 4, 4, 0]
    assert whole.state["sumP"][t].tolist() == [9, 5, 5, 4, 4, 0]
    assert whole.state["sumR"].tolist() == [16] * 99
    assert whole.compute()["odsf"] == pytest.approx(2 * (8 / 9) * 0.5 / (8 / 9 + 0.5))  # R = 8/16


# ------------------------------------------------------------------------------------------------------------
# Saliency
# ------------------------------------------------------------------------------------------------------------


def test_saliency_hand_computed():
    # image A: GT top row salient; p = 0.95, 0.52 (GT) and 0.33, 0.10 (background).
    # image B: nothing salient, p = 0.1 everywhere: empty prediction at every threshold.
    prob = torch.tensor([[[[0.95, 0.52], [0.33, 0.10]]], [[[0.1, 0.1], [0.1, 0.1]]]])
    gt = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    m = ev.SaliencyMetrics()
    m.update(logit(prob), gt)
    # thresholds 0.20 0.25 0.30: A predicts 3 px -> IoU 2/3, P 2/3, R 1; B IoU 1, P 0, R 0
    #   mIoU 5/6, mP 1/3, mR 1/2 -> F 0.4
    # thresholds 0.35 .. 0.50: A predicts the 2 GT px -> IoU 1, P 1, R 1 -> mIoU 1, mP = mR = 1/2, F 0.5
    # thresholds 0.55 .. 0.90: A predicts 1 px -> IoU 1/2, P 1, R 1/2 -> mIoU 3/4, mP 1/2, mR 1/4, F 1/3
    r = m.compute()
    assert r["maxf"] == pytest.approx(0.5)
    assert r["miou"] == pytest.approx(1.0)


def test_saliency_perfect_and_thresholds():
    gt = (torch.rand(3, 1, 6, 6) > 0.5).float()
    m = ev.SaliencyMetrics()
    m.update(gt * 20 - 10, gt)
    assert m.compute() == pytest.approx({"maxf": 1.0, "miou": 1.0})
    assert torch.allclose(torch.linspace(0.2, 0.9, 15)[[0, 1, -1]], torch.tensor([0.2, 0.25, 0.9]))


# ------------------------------------------------------------------------------------------------------------
# Properties shared by every accumulator
# ------------------------------------------------------------------------------------------------------------


def random_batch(task, b, gen, device="cpu"):
    h, w = 12, 16
    if task in ("semantic", "parts"):
        k = 5 if task == "semantic" else 7
        target = torch.randint(-1, k, (b, h, w), generator=gen)
        if task == "parts":
            target[0] = 0  # an all-background image, skipped
        return torch.randn(b, k, h, w, generator=gen), target
    if task == "depth":
        target = torch.rand(b, 1, h, w, generator=gen) * 3
        target[target < 0.5] = 0
        return torch.rand(b, 1, h, w, generator=gen) * 3, target
    if task == "normal":
        target = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=gen), dim=1)
        target[:, :, :3] = 0
        return torch.randn(b, 3, h, w, generator=gen), target
    target = (torch.rand(b, 1, h, w, generator=gen) > 0.8).float()
    return torch.randn(b, 1, h, w, generator=gen) * 3, target


TASKS = {"semantic": 5, "depth": 1, "normal": 3, "edge": 1, "saliency": 1, "parts": 7}


def test_pooled_over_batches_equals_concatenation():
    gen = torch.Generator().manual_seed(0)
    for task in TASKS:
        (p1, t1), (p2, t2) = random_batch(task, 2, gen), random_batch(task, 3, gen)
        options = {"edge": {"tolerance": 2, "unit": "pixels"}} if task == "edge" else {}
        split = ev.metrics_for({task: TASKS[task]}, **options)[task]
        whole = ev.metrics_for({task: TASKS[task]}, **options)[task]
        split.update(p1, t1)
        split.update(p2, t2)
        whole.update(torch.cat([p1, p2]), torch.cat([t1, t2]))
        a, b = split.compute(), whole.compute()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (task, key)
            assert math.isfinite(a[key]), (task, key)


def test_update_needs_no_data_on_the_host():
    # Meta tensors have shapes but no data: anything that reads values back
    # (.item(), .cpu(), nonzero, masked_select, boolean indexing, bincount)
    # raises on them. So an update that runs on "meta" cannot sync with the
    # host on a GPU either; the CUDA test below checks the same directly. (The exact edge metric's thinning
    # and matching loop until nothing changes, which the host must read: training evaluates with exact=False.)
    gen = torch.Generator().manual_seed(4)
    for task, m in ev.metrics_for(TASKS, edge={"tolerance": 2, "unit": "pixels", "exact": False}).items():
        pred, target = random_batch(task, 2, gen)
        m.update(pred.to("meta"), target.to("meta"))
        assert all(t.device.type == "meta" for t in m.state.values()), task
    with pytest.raises(Exception):
        torch.ones(3, device="meta").sum().item()


def test_reset_and_return_keys():
    gen = torch.Generator().manual_seed(1)
    keys = {"semantic": {"miou", "pixel_acc"}, "parts": {"miou", "pixel_acc"},
            "depth": {"abs_err", "rel_err", "rmse"},
            "normal": {"mean", "median", "rmse", "within_11.25", "within_22.5", "within_30"},
            "edge": {"odsf"}, "saliency": {"maxf", "miou"}}
    metrics = ev.metrics_for(TASKS)
    assert list(metrics) == list(TASKS)
    for task, m in metrics.items():
        pred, target = random_batch(task, 2, gen)
        m.update(pred, target)
        first = m.compute()
        assert set(first) == keys[task]
        assert all(isinstance(v, float) for v in first.values())
        m.reset()
        assert m.state is None
        m.update(pred, target)
        assert m.compute() == first
        m.all_reduce()  # not distributed: a no-op
        assert m.compute() == first


def test_metrics_for_errors_and_options():
    with pytest.raises(ValueError, match="no metrics for task"):
        ev.metrics_for({"semantic": 13, "flow": 2})
    with pytest.raises(ValueError, match="not in"):
        ev.metrics_for({"semantic": 13}, depth={})
    m = ev.metrics_for({"semantic": 13, "edge": 1},
                       semantic={"absent": "zero"}, edge={"tolerance": 3, "unit": "pixels"})
    assert m["semantic"].num_classes == 13 and m["semantic"].absent == "zero"
    assert m["edge"].radius(100, 100) == 3.0


def test_empty_accumulators_give_nan():
    for m in ev.metrics_for({"semantic": 3, "depth": 1, "normal": 3, "saliency": 1}).values():
        assert all(math.isnan(v) for v in m.compute().values())


# ------------------------------------------------------------------------------------------------------------
# Delta_m on published rows
# ------------------------------------------------------------------------------------------------------------

DWA_ROW = {"semantic": {"miou": 0.3911, "pixel_acc": 0.6531}, "depth": {"abs_err": 0.5510, "rel_err": 0.2285},
           "normal": {"mean": 27.61, "median": 23.18, "within_11.25": 0.2417, "within_22.5": 0.5018,
                      "within_30": 0.6239}}


def test_delta_m_nyuv2_9_mtan_dwa_row():
    assert ev.delta_m(DWA_ROW, ev.STL_NYUV2_SEGNET, convention="nyuv2-9") == pytest.approx(3.57, abs=0.005)
    assert ev.delta_m(ev.STL_NYUV2_SEGNET, ev.STL_NYUV2_SEGNET, convention="nyuv2-9") == 0.0


def rows_mtinet():
    """(single-task row, multi-task row, printed Delta_m %) from the MTI-Net repository README's NYUD table."""
    def nyud(seg, rmse):
        return {"semantic": {"miou": seg}, "depth": {"rmse": rmse}}

    def pascal(seg, parts, sal, edge=None, normal=None):
        row = {"semantic": {"miou": seg}, "parts": {"miou": parts}, "saliency": {"miou": sal}}
        if edge is not None:
            row.update(edge={"odsf": edge}, normal={"mean": normal})
        return row

    hr, rn, pc = nyud(34.5, 0.610), nyud(40.1, 0.571), pascal(59.4, 60.3, 67.0, 69.2, 14.6)
    return [
        (hr, nyud(33.9, 0.610), -0.75), (hr, nyud(35.4, 0.614), 1.13), (hr, nyud(35.5, 0.593), 2.90),
        (hr, nyud(36.2, 0.563), 6.36), (hr, nyud(37.6, 0.539), 10.32),
        (rn, nyud(39.8, 0.573), -0.55), (rn, nyud(39.9, 0.565), 0.26), (rn, nyud(40.0, 0.572), -0.17),
        (pc, pascal(56.3, 60.4, 65.8), -2.26), (pc, pascal(55.4, 59.4, 65.4, 71.6, 15.0), -1.98),
        (pc, pascal(52.7, 60.5, 66.0), -4.08), (pc, pascal(63.1, 62.1, 67.2), 3.20),
        (pc, pascal(62.8, 62.2, 67.4, 73.0, 14.8), 2.72),
    ]


def half_unit(x):
    """Half a unit of the last printed digit (34.5 -> 0.05, 0.610 -> 0.0005)."""
    return 0.05 if x > 1 else 0.0005


def test_delta_m_mtinet_rows_within_rounding():
    # The printed rows are rounded; the printed Delta_m must lie inside the range
    # that Delta_m takes when every printed input moves by up to half a unit.
    for stl, mtl, printed in rows_mtinet():
        tasks = list(mtl)
        value = ev.delta_m(mtl, stl, convention="mtinet")
        cells = [(d, t) for t in tasks for d in (mtl, stl)]
        lo, hi = math.inf, -math.inf
        for signs in itertools.product((-1, 1), repeat=len(cells)):
            moved = {"mtl": {t: dict(mtl[t]) for t in tasks}, "stl": {t: dict(stl[t]) for t in tasks}}
            for (d, t), s in zip(cells, signs):
                key = "mtl" if d is mtl else "stl"
                metric = next(iter(d[t]))
                moved[key][t][metric] = d[t][metric] + s * half_unit(d[t][metric])
            v = ev.delta_m(moved["mtl"], moved["stl"], convention="mtinet")
            lo, hi = min(lo, v), max(hi, v)
        assert lo - 0.005 <= printed <= hi + 0.005, (mtl, printed, value, lo, hi)
        assert abs(value - printed) < 0.2


def test_delta_m_mtinet_exact_rows_and_options():
    stl = ev.STL_NYUD_HRNET18
    mti = {"semantic": {"miou": 0.362}, "depth": {"rmse": 0.563}}
    expected = 100 * ((0.362 - 0.345) / 0.345 + (0.610 - 0.563) / 0.610) / 2
    assert ev.delta_m(mti, stl, convention="mtinet") == pytest.approx(expected)
    assert ev.delta_m(mti, stl, convention="mtinet") == pytest.approx(6.32, abs=0.005)
    # only main tasks: pass tasks=
    assert ev.delta_m(mti, stl, convention="mtinet", tasks=["semantic"]) == pytest.approx(100 * 0.017 / 0.345)
    # Auto-Lambda style: depth measured by abs_err
    a = {"semantic": {"miou": 0.4464}, "depth": {"abs_err": 0.4332}, "normal": {"mean": 24.48}}
    b = {"semantic": {"miou": 0.4337}, "depth": {"abs_err": 0.5224}, "normal": {"mean": 22.40}}
    assert ev.delta_m(a, b, convention="mtinet", metrics={"depth": "abs_err"}) == pytest.approx(3.57, abs=0.01)


def test_delta_m_libmtl_and_errors():
    assert ev.delta_m(ev.STL_NYUV2_SEGNET, ev.STL_NYUV2_SEGNET, convention="libmtl") == 0.0
    better = {"semantic": {"miou": 0.44, "pixel_acc": 0.66}, "depth": {"abs_err": 0.5, "rel_err": 0.2}}
    base = {"semantic": {"miou": 0.40, "pixel_acc": 0.60}, "depth": {"abs_err": 0.5, "rel_err": 0.25}}
    assert ev.delta_m(better, base, convention="libmtl") == pytest.approx(100 * ((0.1 + 0.1) / 2 + (0 + 0.2) / 2) / 2)
    with pytest.raises(ValueError, match="convention"):
        ev.delta_m(better, base, convention="maninis")
    with pytest.raises(TypeError):
        ev.delta_m(better, base)  # the convention is never implicit
    with pytest.raises(KeyError, match="rmse"):
        ev.delta_m(better, base, convention="mtinet")


# ------------------------------------------------------------------------------------------------------------
# Visual Decathlon score
# ------------------------------------------------------------------------------------------------------------

DOMAINS = ("imagenet12", "aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb", "vgg-flowers", "omniglot",
           "svhn", "ucf101")
# MTAN Table 4 (right), columns ImNet Airc C100 DPed DTD GTSR Flwr Oglt SVHN UCF
SCRATCH = dict(zip(DOMAINS, (59.87, 57.10, 75.73, 91.20, 37.77, 96.55, 56.30, 88.74, 96.63, 43.27)))
MTAN_DECATHLON = dict(zip(DOMAINS, (63.90, 61.81, 81.59, 91.63, 56.44, 98.80, 81.04, 89.83, 96.88, 50.63)))


def test_decathlon_published_rows():
    assert tuple(ev.FINETUNE) == DOMAINS  # the paper's Table 4 column order
    assert ev.decathlon_score(ev.FINETUNE) == pytest.approx(2500.0, abs=1e-9)
    assert ev.decathlon_score(MTAN_DECATHLON) == pytest.approx(2943.5, abs=0.5)
    assert ev.decathlon_score(SCRATCH) == pytest.approx(1626.7, abs=0.05)
    assert ev.decathlon_score(dict.fromkeys(DOMAINS, 100.0)) == pytest.approx(10000.0)


def test_decathlon_errors_and_custom_baseline():
    missing = dict(MTAN_DECATHLON)
    del missing["svhn"]
    with pytest.raises(KeyError, match="svhn"):
        ev.decathlon_score(missing)
    with pytest.raises(KeyError, match="mnist"):
        ev.decathlon_score(dict(MTAN_DECATHLON, mnist=99.0))
    with pytest.raises(ValueError, match="percentages"):
        ev.decathlon_score({d: a / 100 for d, a in MTAN_DECATHLON.items()})
    base = {"shapes": 80.0, "stripes": 50.0}
    # E_max = 40 and 100; errors 10 and 100 -> 1000 (30/40)^2 + 0
    assert ev.decathlon_score({"shapes": 90.0, "stripes": 0.0}, baseline=base) == pytest.approx(562.5)


# ------------------------------------------------------------------------------------------------------------
# Table rows
# ------------------------------------------------------------------------------------------------------------


def test_table_row_nyuv2_and_subsets():
    row = ev.table_row(DWA_ROW)
    assert row == [("mIoU", "39.11"), ("Pix Acc", "65.31"), ("Abs", "0.5510"), ("Rel", "0.2285"),
                   ("Mean", "27.61"), ("Median", "23.18"), ("11.25", "24.17"), ("22.5", "50.18"), ("30", "62.39")]
    city = {"semantic": {"miou": 0.5329, "pixel_acc": 0.9109},
            "depth": {"abs_err": 0.0144, "rel_err": 0.3414, "rmse": 0.1}}
    assert ev.table_row(city, style="mtan-cityscapes") == [("mIoU", "53.29"), ("Pix Acc", "91.09"),
                                                           ("Abs", "0.0144"), ("Rel Err", "34.14")]
    nyud = {"semantic": {"miou": 0.362, "pixel_acc": 0.7}, "depth": {"rmse": 0.563, "abs_err": 0.4}}
    assert ev.table_row(nyud, style="mtinet") == [("mIoU", "36.20"), ("RMSE", "0.5630")]
    pascal = {"semantic": {"miou": 0.628}, "parts": {"miou": 0.622}, "saliency": {"miou": 0.674, "maxf": 0.8},
              "edge": {"odsf": 0.73}, "normal": {"mean": 14.8}}
    headers = [h for h, _ in ev.table_row(pascal, style="mtinet")]
    assert headers == ["mIoU", "Parts mIoU", "Sal mIoU", "odsF", "Mean"]
    assert ev.table_row({"semantic": {"miou": 0.5}}, tasks=["semantic", "depth"])[2:] == [("Abs", "-"), ("Rel", "-")]


def test_format_table():
    text = ev.format_table({"STL": ev.table_row(ev.STL_NYUV2_SEGNET), "MTAN+DWA": ev.table_row(DWA_ROW)})
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split("|")[1].strip() == "method" and set(lines[1]) <= set("|-:")
    assert "38.30" in lines[2] and "39.11" in lines[3]
    # results dicts and (name, results) pairs are turned into rows on the way
    assert ev.format_table([("STL", ev.STL_NYUV2_SEGNET), ("MTAN+DWA", DWA_ROW)]) == text
    nyud = ev.format_table([ev.STL_NYUD_HRNET18], {"semantic": 40, "depth": 1}, style="mtinet")
    assert nyud.splitlines()[0].split() == ["|", "mIoU", "|", "RMSE", "|"]
    assert "34.50" in nyud and "0.6100" in nyud


def test_format_metrics():
    line = ev.format_metrics({"semantic": {"miou": 0.5, "pixel_acc": 0.75}, "depth": {"rmse": 0.6}})
    assert line == "semantic miou 0.5000 pixel_acc 0.7500 | depth rmse 0.6000"


# ------------------------------------------------------------------------------------------------------------
# CUDA: state on the device, no host sync in update
# ------------------------------------------------------------------------------------------------------------


@requires_cuda
def test_all_accumulators_on_cuda_match_cpu():
    """The same batch through CPU and CUDA accumulators: the state stays on the GPU; counts and histograms are
    integers (exact), and the float64 sums of per-pixel errors agree to their rounding (1e-6). A pixel whose
    value lies within an ulp of a histogram bin or threshold edge could land on the other side on the other
    device; with these random values that is too improbable to allow for."""
    gen = torch.Generator().manual_seed(2)
    for task in TASKS:
        pred, target = random_batch(task, 3, gen)
        cpu, gpu = ev.metrics_for({task: TASKS[task]})[task], ev.metrics_for({task: TASKS[task]})[task]
        cpu.update(pred, target)
        gpu.update(pred.cuda(), target.cuda())
        assert all(t.is_cuda for t in gpu.state.values())
        a, b = cpu.compute(), gpu.compute()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (task, key)


@requires_cuda
def test_update_does_not_sync_with_host():
    """Every accumulator's update under set_sync_debug_mode("error"): a blocking host-device call raises."""
    gen = torch.Generator().manual_seed(3)
    batches = {task: [x.cuda() for x in random_batch(task, 2, gen)] for task in TASKS}
    metrics = ev.metrics_for(TASKS, edge={"exact": False})  # the exact odsF loops on the host (see above)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # first call creates the state, second reuses it
            for task, m in metrics.items():
                m.update(*batches[task])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for m in metrics.values():
        m.compute()


def test_eval_py_works_copied_alone(tmp_path):
    # The rule of eval.py's module docstring: the metric library needs nothing but torch (no data/mtan/mtinet).
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(ev.__file__, tmp_path / "eval.py")
    script = ("import torch, eval as ev; m = ev.SegMetrics(3); t = torch.tensor([[[0, 1, 2]]]); m.update(t, t); "
              "assert m.compute()['miou'] == 1.0; print(ev.decathlon_score(ev.FINETUNE))")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2500.0"
