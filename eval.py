"""Evaluation for MTAN (Liu et al., CVPR 2019) and MTI-Net (Vandenhende et al., ECCV 2020).

Sections 1-4 are the evaluation, to be read top to bottom:

1. Metrics: an accumulator for every dense task of both papers. Sections 1 and 2 import torch, math and the
   standard library only, so they work when eval.py is copied alone into another project.
2. The multi-task performance Delta_m in its published conventions, the Visual Decathlon score, and the
   papers' table rows.
3. The evaluation loops: a whole split through a model into the accumulators (train.py's validation uses the
   same loop), and the Decathlon's per-domain evaluation with its BatchNorm re-estimation.
4. `python eval.py --checkpoint runs/NAME`: reading a checkpoint and rebuilding its model from the class and
   arguments it records (no train.py needed), evaluating it, eval.json.

Appendices: A. `python eval.py --compare RUN ...`, finished runs in one paper-style table from their
metrics.json; B. pictures of predictions and attention masks; C. the Visual Decathlon challenge's results
format; D. the machinery shared with train.py (atomic writes, strict JSON, one-line errors, number types, amp
and cuDNN settings, the clock of --bench). Only section 4 and the appendices import data.py, mtan.py and
mtinet.py, inside functions.

How the accumulators work
-------------------------
Each task has an accumulator with `update(pred, target)` once per batch and `compute()` once at the end. The
state is a handful of *additive* tensors (sums, counts, histograms) that live on the prediction's device:

* `update` never waits for the GPU: no `.item()`, `.cpu()`, `nonzero`, `masked_select` or boolean indexing.
  Invalid pixels are removed by multiplying (or `torch.where`-ing) a mask in, never by indexing.
* `compute` copies the whole state to the host in one transfer and returns plain Python floats.
* Every metric is pooled over all valid pixels of the dataset, not averaged per batch. The official MTAN code
  (and CAGrad / Nash-MTL, which reuse it) averages depth and normal errors *per batch* (the normal "median" is
  even a mean of per-batch medians), so its numbers depend on the batch size and on how the last, smaller
  batch falls. Pooling gives one well-defined number per dataset, is what LibMTL and the MTI-Net evaluation do
  for depth RMSE and normals, and is what makes the state additive (so several GPUs can simply sum it, see
  `all_reduce`). Pooled and per-batch values differ slightly for means and fractions and more for the median;
  compare like with like.
* Because the state is additive, `all_reduce()` sums it across `torch.distributed` ranks; afterwards every
  rank computes the global result.

Fractions are in [0, 1] and angles in degrees; `table_row` turns fractions into the percentages the papers
print.

Task names, target formats and ignore values are those of every dataset in data.py: semantic / parts = long
class ids with -1 ignored, depth 0 = invalid, normal all-zero vector = invalid, edge / saliency = {0, 1} maps
with logits as predictions.
"""

import argparse
import contextlib
import errno
import hashlib
import inspect
import json
import math
import os
import pathlib
import re
import shutil
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------------------
# 1. Metrics. The base accumulator: additive state on the prediction's device
# ------------------------------------------------------------------------------------------------------------


class Metric:
    """An accumulator whose state is a dict of additive tensors.

    Subclasses implement `new_state(device)` (zeros of the right shapes), `update(pred, target)` and
    `compute()`. The state is created lazily on the first update, on the prediction's device, so the same
    object works on CPU and on any GPU without being told where.
    """

    def __init__(self):
        self.state = None

    def new_state(self, device):
        raise NotImplementedError

    def reset(self):
        self.state = None

    def _state_on(self, device):
        if self.state is None:
            self.state = self.new_state(device)
        return self.state

    def all_reduce(self):
        """Sum the state over torch.distributed ranks (no-op when not distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.state is None:  # a rank that saw no data still has to take part
            nccl = dist.get_backend() == "nccl"
            self.state = self.new_state(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
        for tensor in self.state.values():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def host_state(self):
        """The state on the CPU as float64, with a single device-to-host copy."""
        state = self.state if self.state is not None else self.new_state("cpu")
        flat = torch.cat([v.reshape(-1).to(torch.float64) for v in state.values()]).cpu()  # the one sync
        parts = flat.split([v.numel() for v in state.values()])
        return {k: part.reshape(v.shape) for (k, v), part in zip(state.items(), parts)}


def _ratio(num, den):
    """num / den as a float, NaN when den == 0 (no valid pixel was seen)."""
    return float(num / den) if float(den) != 0 else float("nan")


# ------------------------------------------------------------------------------------------------------------
# Semantic segmentation and human parts: a confusion matrix
# ------------------------------------------------------------------------------------------------------------


class SegMetrics(Metric):
    """Mean IoU and pixel accuracy from a dataset-wide confusion matrix.

    MTAN `utils.ConfMatrix` and MTI-Net `eval_semseg` both accumulate per-class counts over the whole dataset
    (rows = ground truth, columns = prediction), then

        IoU_c     = TP_c / (TP_c + FP_c + FN_c)          # one value per class
        mIoU      = mean_c IoU_c
        pixel_acc = sum_c TP_c / #valid pixels

    They disagree on a class absent from both the ground truth and the
    prediction (0 / 0), which happens on small subsets:

        absent="skip"  the class is left out of the mean (a nan-mean); default.
        absent="zero"  the class counts as IoU 0 (MTI-Net: TP / max(union, 1e-8)).
        absent="nan"   the whole mIoU is NaN (MTAN's plain mean over classes).

    On a full NYUv2 / PASCAL val set every class occurs and all three agree. A class present only in the
    prediction has IoU 0 under every rule.

    `pred` is either logits (B, K, H, W) or class ids (B, H, W); `target` is (B, H, W) long with
    `ignore_index` (and any id outside [0, K)) ignored. The MTAN paper's NYUv2 numbers used an older per-image
    mIoU, about 8 points lower than this one (`compute_miou`, kept commented out in lorenmt/mtan
    im2im_pred/utils.py).
    """

    def __init__(self, num_classes, ignore_index=-1, absent="skip"):
        super().__init__()
        if absent not in ("skip", "zero", "nan"):
            raise ValueError(f'absent must be "skip", "zero" or "nan", got {absent!r}')
        self.num_classes, self.ignore_index, self.absent = num_classes, ignore_index, absent

    def new_state(self, device):
        k = self.num_classes
        return {"confusion": torch.zeros(k, k, dtype=torch.long, device=device)}

    def image_mask(self, target):
        """Which images count, (B,) bool. Every image here; PartsMetrics overrides."""
        return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)

    @torch.no_grad()
    def update(self, pred, target):
        k = self.num_classes
        pred = (pred.argmax(1) if pred.dim() == 4 else pred).long()  # logits (B, K, H, W) -> class ids (B, H, W)
        target = (target[:, 0] if target.dim() == 4 else target).long()  # tolerate (B, 1, H, W)
        valid = (target != self.ignore_index) & (target >= 0) & (target < k)  # (B, H, W)
        valid &= self.image_mask(target)[:, None, None]
        # cell index GT * K + prediction; invalid pixels add 0 to cell 0. (torch.bincount would read the
        # largest index back to size its output, a host sync on CUDA, so we add into a fixed-size matrix.)
        cell = target.clamp(0, k - 1) * k + pred.clamp(0, k - 1)
        confusion = self._state_on(pred.device)["confusion"]
        confusion.view(-1).index_add_(0, cell.reshape(-1), valid.reshape(-1).long())

    def class_iou(self, conf=None):
        """Per-class IoU as a float64 CPU tensor (NaN for a class absent from GT and prediction)."""
        conf = self.host_state()["confusion"] if conf is None else conf
        return conf.diag() / (conf.sum(0) + conf.sum(1) - conf.diag())  # TP / (TP + FP + FN)

    def compute(self):
        conf = self.host_state()["confusion"]
        iou = self.class_iou(conf)  # NaN where TP + FP + FN == 0: an absent class is left out, 0 or NaN
        miou = {"skip": iou.nanmean, "zero": iou.nan_to_num(0.0).mean, "nan": iou.mean}[self.absent]()
        return {"miou": float(miou), "pixel_acc": _ratio(conf.diag().sum(), conf.sum())}


class PartsMetrics(SegMetrics):
    """Human-parts mIoU of MTI-Net on PASCAL-Context (`eval_human_parts`).

    The same dataset-wide confusion matrix as SegMetrics over 7 classes (background, head, torso, upper arm,
    lower arm, upper leg, lower leg), but an image only counts if it shows a person: the official evaluation
    skips an image whose ground truth is a single value, all background (0) or all void. Images without a
    person are all void in this project's loader, so they drop out either way; an all-background image is
    skipped explicitly here. Absent classes count as 0 by default, as in the official code.
    """

    def __init__(self, num_classes=7, ignore_index=-1, absent="zero"):
        super().__init__(num_classes, ignore_index, absent)

    def image_mask(self, target):
        return ~(target == 0).flatten(1).all(1)  # (B,): not all background


# ------------------------------------------------------------------------------------------------------------
# Depth: absolute, relative and RMS error over valid pixels
# ------------------------------------------------------------------------------------------------------------


class DepthMetrics(Metric):
    """Depth errors pooled over every valid pixel (target > 0: 0 or a negative value marks "invalid") of the
    dataset.

        abs_err = sum |p - t|       / N        # MTAN utils.depth_error
        rel_err = sum |p - t| / t   / N        # MTAN utils.depth_error
        rmse    = sqrt(sum (p - t)^2 / N)      # MTI-Net eval_depth: RMSE pooled over all pixels

    The official MTAN code computes abs_err and rel_err per batch and then averages the batch values, so pixels of a
    small last batch weigh more; we pool instead (see the module docstring). MTI-Net's `eval_depth` replaces
    predictions <= 0 by 1e-9 before the RMSE (it also takes logs): pass `clamp_nonpositive=True` to do the same.
    Inputs: pred and target (B, 1, H, W), in metres (NYU) or disparity units.
    """

    def __init__(self, clamp_nonpositive=False):
        super().__init__()
        self.clamp_nonpositive = clamp_nonpositive

    def new_state(self, device):
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        return {"abs": zero(torch.float64), "rel": zero(torch.float64),
                "sq": zero(torch.float64), "count": zero(torch.long)}

    @torch.no_grad()
    def update(self, pred, target):
        p, t = pred.float(), target.float()  # (B, 1, H, W)
        if self.clamp_nonpositive:
            p = torch.where(p <= 0, torch.full_like(p, 1e-9), p)
        valid = t > 0
        err = torch.where(valid, (p - t).abs(), torch.zeros_like(p))  # 0 on invalid pixels
        t_safe = torch.where(valid, t, torch.ones_like(t))  # avoids 0 / 0 on invalid pixels
        s = self._state_on(p.device)
        s["abs"] += err.sum(dtype=torch.float64)
        s["rel"] += (err / t_safe).sum(dtype=torch.float64)
        s["sq"] += (err * err).sum(dtype=torch.float64)
        s["count"] += valid.sum()

    def compute(self):
        s = self.host_state()
        n = s["count"]
        return {"abs_err": _ratio(s["abs"], n), "rel_err": _ratio(s["rel"], n),
                "rmse": math.sqrt(_ratio(s["sq"], n))}


# ------------------------------------------------------------------------------------------------------------
# Surface normals: angular error statistics, median from a fine histogram
# ------------------------------------------------------------------------------------------------------------


class NormalMetrics(Metric):
    """Angular error (degrees) between predicted and ground-truth normals.

    Per valid pixel (ground truth not the zero vector), after normalising the prediction (so its length does not
    matter) and the ground truth:

        angle = degrees(acos(clamp(<p, g>, -1, 1)))   # MTAN normal_error, MTI-Net eval_normals

    Reported over all valid pixels of the dataset: the mean, the median, the RMSE sqrt(mean angle^2)
    (MTI-Net), and the fractions of pixels with an angle *strictly below* 11.25, 22.5 and 30 degrees.

    The median needs every error, which does not fit a bounded state; we keep a histogram of `bins` equal bins over
    [0, 180] on the device (36000 bins = 0.005 degree) and interpolate linearly inside the bin holding the middle
    pixel, so the median is off by less than one bin width (checked against torch.median in the tests). The official
    MTAN code instead averages per-batch medians, which is not the dataset median. The angle is computed in float64:
    acos loses precision near 0 degrees in float32.
    """

    thresholds = (11.25, 22.5, 30.0)

    def __init__(self, bins=36000):
        super().__init__()
        self.bins = bins

    def new_state(self, device):
        f64 = dict(dtype=torch.float64, device=device)
        return {"sum": torch.zeros((), **f64), "sq": torch.zeros((), **f64),
                "count": torch.zeros((), dtype=torch.long, device=device),
                "within": torch.zeros(len(self.thresholds), dtype=torch.long, device=device),
                "hist": torch.zeros(self.bins, dtype=torch.long, device=device)}

    @torch.no_grad()
    def update(self, pred, target):
        p, g = pred.double(), target.double()  # (B, 3, H, W)
        valid = (g != 0).any(1)  # (B, H, W): the all-zero vector marks "no ground truth"
        p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        angle = torch.rad2deg(torch.acos((p * g).sum(1).clamp(-1, 1)))  # (B, H, W) in [0, 180]
        angle = torch.where(valid, angle, torch.zeros_like(angle))
        s = self._state_on(pred.device)
        s["sum"] += angle.sum()
        s["sq"] += (angle * angle).sum()
        s["count"] += valid.sum()
        s["within"] += torch.stack([(valid & (angle < t)).sum() for t in self.thresholds])
        # histogram bin of each angle; invalid pixels add 0
        idx = (angle * (self.bins / 180.0)).long().clamp(0, self.bins - 1)
        s["hist"].index_add_(0, idx.reshape(-1), valid.reshape(-1).long())

    def compute(self):
        s = self.host_state()
        n = s["count"]
        return {"mean": _ratio(s["sum"], n), "median": self._median(s["hist"]),
                "rmse": math.sqrt(_ratio(s["sq"], n)),
                **{f"within_{t:g}": _ratio(w, n) for t, w in zip(self.thresholds, s["within"])}}

    def _median(self, hist):
        """The 50 % point of the histogram, interpolated linearly inside its bin."""
        n = float(hist.sum())
        if n == 0:
            return float("nan")
        cum = hist.cumsum(0)  # pixels in bins 0..k
        k = int(torch.searchsorted(cum, torch.tensor([n / 2], dtype=cum.dtype)))  # bin with the middle
        below = float(cum[k] - hist[k])  # pixels in bins before k
        return (k + (n / 2 - below) / float(hist[k])) * (180.0 / self.bins)  # in degrees: times the bin width


# ------------------------------------------------------------------------------------------------------------
# Edges: the ODS F-score of the BSDS boundary benchmark
# ------------------------------------------------------------------------------------------------------------


def _dilate(x, radius, shape="disk"):
    """Max filter of (B, 1, H, W) `x` over a disk (or square) of `radius` pixels.

    The disk {dx^2 + dy^2 <= r^2} is the union of the centred rectangles (2|dy|+1) x (2 floor(sqrt(r^2 -
    dy^2))+1), dy = 0..floor(r), so its max filter is the max of r+1 rectangular max-pools. Max filtering
    commutes with thresholding: dilate(x)>=t == dilate(x>=t), which lets one call serve every threshold.
    """
    r = int(math.floor(radius + 1e-9))
    if shape == "square":
        return F.max_pool2d(x, 2 * r + 1, stride=1, padding=r)
    out = x
    for dy in range(r + 1):
        dx = int(math.floor(math.sqrt(max(radius * radius - dy * dy, 0.0)) + 1e-9))
        if dy or dx:
            out = torch.maximum(out, F.max_pool2d(x, (2 * dy + 1, 2 * dx + 1), stride=1, padding=(dy, dx)))
    return out


def _thinning_luts():
    """The two lookup tables of MATLAB's bwmorph(BW, 'thin'): which pixels the first and the second
    subiteration delete, indexed by the 8 neighbours as bits (x1 = east = bit 0, then counter-clockwise: x2 =
    north-east, x3 = north, ..., x8 = south-east). Guo & Hall, "Parallel thinning with two-subiteration
    algorithms" (Comm. ACM 32(3), 1989), algorithm A1, as MATLAB documents it. (2, 256) bool."""
    x = [(torch.arange(256) >> k) & 1 == 1 for k in range(8)]  # x[k] is x_(k+1), for all 256 codes
    # G1: one 4-connected run of neighbours (crossing number 1): removing the pixel splits nothing.
    g1 = sum((~x[i] & (x[i + 1] | x[(i + 2) % 8])).long() for i in (0, 2, 4, 6)) == 1
    # G2: 2 <= min(n1, n2) <= 3 counting pairs of neighbours: neither an end point nor an interior pixel.
    n1 = sum((x[i] | x[i + 1]).long() for i in (0, 2, 4, 6))
    n2 = sum((x[i + 1] | x[(i + 2) % 8]).long() for i in (0, 2, 4, 6))
    g12 = g1 & (torch.minimum(n1, n2) >= 2) & (torch.minimum(n1, n2) <= 3)
    # G3 / G3': the first subiteration peels south-east sides and north-west corners, the second the opposite.
    return torch.stack([g12 & ~((x[1] | x[2] | ~x[7]) & x[0]), g12 & ~((x[5] | x[6] | ~x[3]) & x[4])])


_THIN_LUTS = _thinning_luts()


def thin(x):
    """bwmorph(x, 'thin', Inf) of every (H, W) map of a (N, H, W) bool tensor at once: the two subiterations
    in turn, each deleting together the pixels its table marks, until two in a row delete nothing. A pixel's
    verdict changes only when a neighbour goes, so after a first look at every pixel only the neighbours of
    pixels deleted in the last two subiterations are looked at again (a queue, as fast thinning codes do)."""
    N, H, W = x.shape
    s = W + 2  # flat index of the zero-padded maps: the neighbours x1..x8 (east, then counter-clockwise) are
    nbr = torch.tensor([1, 1 - s, -s, -1 - s, -1, s - 1, s, s + 1], device=x.device)  # at these offsets
    bits, luts = (1 << torch.arange(8, device=x.device)).to(torch.uint8), _THIN_LUTS.to(x.device)
    p = F.pad(x.to(torch.uint8), (1, 1, 1, 1)).flatten()  # (N * (H + 2) * (W + 2),); the border stays 0
    cand, gone, i = p.nonzero()[:, 0], [], 0  # first look: every pixel
    slot = torch.zeros_like(p, dtype=torch.int)
    while cand.numel():
        cand = cand[p[cand] > 0]
        code = (p[cand[:, None] + nbr] * bits).sum(1, dtype=torch.uint8).long()  # (C,) neighbourhood code
        gone = gone[-1:] + [cand[luts[i % 2][code]]]
        p[gone[-1]] = 0  # all at once: the verdicts above saw the image before this subiteration
        i += 1
        if i >= 2:  # the neighbours of the pixels just deleted, each once (one of the writes to a slot wins)
            near = (torch.cat(gone)[:, None] + nbr).flatten()
            order = torch.arange(near.numel(), dtype=torch.int, device=x.device)
            slot[near] = order
            cand = near[slot[near] == order]
    return p.view(N, H + 2, W + 2)[:, 1:-1, 1:-1] > 0


def match_count(pred, gt, radius):
    """Size of a maximum one-to-one matching between the boundary pixels of pred (B, T, H, W) and gt (B, H, W)
    (bool), pairs only within Euclidean distance <= radius; one matching per (image, threshold) map.
    Returns the number of pairs per threshold, (T,) long.

    A bipartite graph: a vertex per predicted pixel and one per (threshold, GT pixel), an edge per pair
    within the radius. Augmenting paths (Hopcroft & Karp), vectorised over all maps: each phase grows
    alternating paths (free pixel - unpaired edge - pixel - paired edge - pixel ...) breadth-first from every
    free pixel of one side at once, each pixel reached remembering the nearest one that reached it first;
    then it walks back from every free pixel of the other side that was reached, keeps one path where paths
    meet (they share the rest of the way) and flips the kept ones: along a path the pairs change partners
    and both ends become paired, one pair more. When no path is left the matching is maximum (Berge, 1957).
    The first phase, paths of one edge, is a greedy nearest-first matching; a handful of phases follow."""
    B, T, H, W = pred.shape
    dev, big = pred.device, torch.iinfo(torch.long).max
    r = int(math.floor(radius + 1e-9))
    offsets = sorted((dy * dy + dx * dx, dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                     if dy * dy + dx * dx <= radius * radius)  # nearest first: rank k = distance order
    gb, gy, gx = gt.nonzero(as_tuple=True)  # (G,) each
    gid = torch.full((B, H + 2 * r, W + 2 * r), -1, dtype=torch.long, device=dev)  # padded: no bound checks
    gid[gb, gy + r, gx + r] = torch.arange(gb.numel(), device=dev)
    pb, pt, py, px = pred.nonzero(as_tuple=True)  # (P,) each
    P, N = pb.numel(), pb.numel() + T * gb.numel()  # vertices: P predicted px, then T copies of the GT px
    a, b, k = [], [], []  # edges: predicted px, GT vertex, offset rank
    for j, (_, dy, dx) in enumerate(offsets):
        g = gid[pb, py + r + dy, px + r + dx]  # (P,) the GT px at this offset, or -1
        hit = (g >= 0).nonzero()[:, 0]
        a.append(hit), b.append(P + pt[hit] * gb.numel() + g[hit]), k.append(torch.full_like(hit, j))
    a, b, k = torch.cat(a), torch.cat(b), torch.cat(k)  # (E,) each
    # Search from the smaller side of each map (predicted or GT px): it has the fewer free pixels.
    smaller = torch.bincount(pb * T + pt, minlength=B * T) <= torch.bincount(gb, minlength=B).repeat_interleave(T)
    fwd = smaller[pb[a] * T + pt[a]]
    src, dst = torch.where(fwd, a, b), torch.where(fwd, b, a)
    order = torch.argsort(src)
    src, dst, k = src[order], dst[order], k[order]  # (E,) grouped by source: edges of x are start[x]..start[x+1]
    start = torch.zeros(N + 1, dtype=torch.long, device=dev)
    start[1:] = torch.bincount(src, minlength=N).cumsum(0)
    is_src = torch.zeros(N, dtype=torch.bool, device=dev)
    is_src[src] = True
    mate = torch.full((N,), -1, dtype=torch.long, device=dev)
    seen, best, claim = (torch.full_like(mate, big) for _ in range(3))  # scratch, reset after use
    while True:
        # Breadth-first from every free source pixel: each pixel reached keeps the nearest one of the level
        # that reached it first (parent) and that edge's offset rank (pk).
        x = (is_src & (mate < 0)).nonzero()[:, 0]
        reached, parent, pk, stop = [], torch.full_like(mate, -1), torch.full_like(mate, -1), big
        while x.numel() and len(reached) < stop:
            n = start[x + 1] - start[x]  # (F,) edges of each frontier pixel
            e = torch.arange(int(n.sum()), device=dev) + torch.repeat_interleave(start[x] - n.cumsum(0) + n, n)
            e = e[(seen[dst[e]] == big) & (mate[src[e]] != dst[e])]  # unpaired edges to pixels not seen yet
            best.scatter_reduce_(0, dst[e], k[e], "amin")
            e = e[k[e] == best[dst[e]]]  # one edge per pixel reached (two sources are never at one offset)
            y = dst[e]
            best[y], seen[y], parent[y], pk[y] = big, 0, src[e], k[e]
            reached.append(y)
            x = mate[y][mate[y] >= 0]  # a paired pixel leads on to its partner only
            if stop == big and x.numel() < y.numel():  # found free pixels: search a little deeper, then stop
                stop = 2 * len(reached) + 4
        if reached:
            seen[torch.cat(reached)] = big
        free = [y[mate[y] < 0] for y in reached]  # free pixels reached, by level
        if not sum(f.numel() for f in free):
            return torch.zeros(T, dtype=torch.long, device=dev).index_add_(0, pt, (mate[:P] >= 0).long())
        # Walk back from the top level down. A path starts at its free pixel; where paths meet, the one with
        # the shortest, then nearest first edge goes on, the others wait for the next phase.
        path, y, walked = mate.new_empty(0), mate.new_empty(0), []
        for level in range(len(free) - 1, -1, -1):
            f = free[level]
            path = torch.cat([path, (level * len(offsets) + pk[f]) * N + f])  # key; start pixel = key % N
            y = torch.cat([y, f])
            x = parent[y]
            claim.scatter_reduce_(0, x, path, "amin")
            win = claim[x] == path
            claim[x] = big
            path, y, x = path[win], y[win], x[win]
            walked.append((path, x, y))
            y = mate[x]
        done = torch.zeros_like(is_src)
        done[path % N] = True  # paths that reached a free source pixel
        for p, x, y in walked:  # flip: every source pixel on a done path takes the pixel before it
            keep = done[p % N]
            mate[x[keep]], mate[y[keep]] = y[keep], x[keep]


class EdgeMetrics(Metric):
    """ODS F-score for edge maps, MTI-Net's PASCAL-Context "odsF".

    The number of record comes from the BSDS boundary benchmark (Martin, Fowlkes & Malik, "Learning to detect
    natural image boundaries using local brightness, color, and texture cues", PAMI 2004), run in MATLAB
    through SEISM by the MTI-Net repository's evaluation/eval_edge.py. For each threshold t = k / 100,
    k = 1..99, and each image:

      1. binarise the edge probability at >= t and thin it to lines one pixel wide
         (MATLAB `bwmorph(E >= t, 'thin', Inf)`);
      2. match predicted and ground-truth boundary pixels one-to-one, a pair only if they lie within
         maxDist = 0.0075 x the image diagonal of each other (Euclidean, <=), as many pairs as possible
         (`correspondPixels`: a minimum-cost assignment whose outliers cost so much that it first maximises the
         number of pairs, then shortens them; the ground truth, already thin, is used as it is);
      3. add up over the dataset: cntP = matched predicted px, sumP = predicted px, cntR = matched GT px, sumR =
         GT px. Then P(t) = cntP / sumP, R(t) = cntR / sumR, F = 2PR / (P + R), and
         odsF = the best F of the PR curve, interpolated linearly between neighbouring thresholds (BSDS
         `collect_eval_bdry` / `maxF`). ODS: one threshold for the whole dataset.

    `exact=True` does exactly this on the device (`thin` and `match_count` above): a maximum matching, whose size
    is the benchmark's to within a few pixels per map (its assignment only links a random few outliers).
    `exact=False` is a fast approximation with neither thinning nor one-to-one matching: a predicted pixel is
    a hit if any GT pixel lies within the tolerance and vice versa (dilations by a disk or square). Several
    predictions may claim one GT pixel, so blurry or broken maps score far off (measured on synthetic maps:
    -1 to +23 points), and it reports under another name, "approx_odsf", never beside the benchmark's. It is
    what training evaluates after every epoch: it never waits for the device, while the exact update reads
    sizes on the host as it thins and matches (its loops run until nothing changes), and costs seconds per
    large map on a CPU. `python eval.py --checkpoint` reports the exact odsf.

    State: the four counts per threshold (additive). `tolerance` is in pixels (`unit="pixels"`) or a fraction
    of the image diagonal (`unit="diagonal"`, 0.0075 as BSDS). Predictions are logits (B, 1, H, W); targets
    {0, 1} boundary maps of the same size.
    """

    def __init__(self, tolerance=0.0075, unit="diagonal", num_thresholds=99, shape="disk", exact=True):
        super().__init__()
        if unit not in ("pixels", "diagonal"):
            raise ValueError(f'unit must be "pixels" or "diagonal", got {unit!r}')
        if shape not in ("disk", "square") or (exact and shape != "disk"):
            raise ValueError(f'shape must be "disk" (or "square" with exact=False), got {shape!r}')
        self.tolerance, self.unit, self.shape, self.exact = tolerance, unit, shape, exact
        self.num_thresholds = num_thresholds  # thresholds k / (T + 1), k = 1..T (BSDS: 0.01..0.99)

    def new_state(self, device):
        return {k: torch.zeros(self.num_thresholds, dtype=torch.long, device=device)
                for k in ("cntP", "sumP", "cntR", "sumR")}

    def radius(self, height, width):
        if self.unit == "pixels":
            return float(self.tolerance)
        return self.tolerance * math.hypot(height, width)

    @torch.no_grad()
    def update(self, pred, target):
        prob = torch.sigmoid(pred.float())  # (B, 1, H, W)
        gt = target > 0.5
        r = self.radius(*prob.shape[-2:])
        T = self.num_thresholds
        t = torch.arange(1, T + 1, dtype=torch.float64, device=prob.device) / (T + 1)
        level = torch.bucketize(prob.double(), t, right=True)  # (B, 1, H, W): p >= t_k <=> level >= k
        s = self._state_on(prob.device)
        s["sumR"] += gt.sum()
        if self.exact:
            edges = thin((level >= torch.arange(1, T + 1, device=prob.device)[:, None, None]).flatten(0, 1))
            edges = edges.view(-1, T, *prob.shape[-2:])  # (B, T, H, W) thinned binary maps
            s["sumP"] += edges.sum((0, 2, 3))
            matched = match_count(edges, gt[:, 0], r)
            s["cntP"] += matched
            s["cntR"] += matched  # one-to-one: as many GT pixels as predicted ones
            return
        # p >= t_k counted from a histogram of levels: count of level >= k, k = 1..T
        at_least = lambda x, w: torch.zeros(T + 1, dtype=torch.long, device=x.device).index_add_(  # noqa: E731
            0, x.reshape(-1), w.reshape(-1).long()).flip(0).cumsum(0).flip(0)[1:]
        near_gt = _dilate(gt.float(), r, self.shape) > 0  # a GT pixel within r
        best_near = torch.bucketize(_dilate(prob, r, self.shape).double(), t, right=True)  # best level within r
        s["sumP"] += at_least(level, torch.ones_like(level))
        s["cntP"] += at_least(level, near_gt)
        s["cntR"] += at_least(best_near, gt)

    def compute(self):
        s = self.host_state()
        P = s["cntP"] / s["sumP"].clamp_min(1)  # 0 when nothing is predicted (BSDS convention)
        R = s["cntR"] / s["sumR"].clamp_min(1)
        d = torch.linspace(0, 1, 101, dtype=torch.float64)  # 100 steps between neighbouring thresholds
        P = torch.cat([P, (P[1:, None] * d + P[:-1, None] * (1 - d)).reshape(-1)])
        R = torch.cat([R, (R[1:, None] * d + R[:-1, None] * (1 - d)).reshape(-1)])
        f = 2 * P * R / (P + R).clamp_min(1e-300)
        return {"odsf" if self.exact else "approx_odsf": float(f.max())}


# ------------------------------------------------------------------------------------------------------------
# Saliency: max F and "mIoU" over 15 thresholds (MTI-Net / ASTMT eval_sal)
# ------------------------------------------------------------------------------------------------------------


class SaliencyMetrics(Metric):
    """Saliency maxF and mIoU exactly as MTI-Net's `eval_sal` (evaluation/eval_sal.py).

    For each image and each of 15 thresholds t = linspace(0.2, 0.9, 15), binarise the probability at > t and
    compute

        IoU  = TP / (TP + FP + FN)          (1 when GT and prediction are both empty)
        prec = TP / (TP + FP + 1e-12),  rec = TP / (TP + FN + 1e-12)

    then average each over *images* (not pixels) per threshold, and

        F(t) = 2 mP mR / (mP + mR + 1e-12)          # from the mean P and mean R
        maxf = max_t F(t),   miou = max_t mean IoU(t)   # "mIoU" = best threshold's mean IoU

    Delta_m uses miou. The official code reads 8-bit PNGs (255 x sigmoid, truncated); we threshold the float
    probability, which can move a pixel that sits within 1/255 of a threshold. Inputs: logits (B, 1, H, W),
    targets (B, 1, H, W) in {0, 1}.
    """

    def __init__(self, num_thresholds=15, low=0.2, high=0.9):
        super().__init__()
        self.num_thresholds, self.low, self.high = num_thresholds, low, high

    def new_state(self, device):
        z = lambda: torch.zeros(self.num_thresholds, dtype=torch.float64, device=device)  # noqa: E731
        return {"iou": z(), "prec": z(), "rec": z(),
                "images": torch.zeros((), dtype=torch.long, device=device)}

    @torch.no_grad()
    def update(self, pred, target):
        prob = torch.sigmoid(pred.float()).flatten(1)  # (B, HW)
        gt = (target > 0.5).flatten(1)  # (B, HW)
        t = torch.linspace(self.low, self.high, self.num_thresholds, device=prob.device)
        binary = prob[:, None, :] > t[None, :, None]  # (B, T, HW)
        tp = (binary & gt[:, None, :]).sum(-1).double()  # (B, T)
        n_pred = binary.sum(-1).double()  # TP + FP
        n_gt = gt.sum(-1, keepdim=True).double()  # TP + FN, (B, 1)
        union = n_pred + n_gt - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp))
        s = self._state_on(prob.device)
        s["iou"] += iou.sum(0)
        s["prec"] += (tp / (n_pred + 1e-12)).sum(0)
        s["rec"] += (tp / (n_gt + 1e-12)).sum(0)
        s["images"] += prob.shape[0]

    def compute(self):
        s = self.host_state()
        n = float(s["images"])
        if n == 0:
            return {"maxf": float("nan"), "miou": float("nan")}
        miou, mp, mr = s["iou"] / n, s["prec"] / n, s["rec"] / n  # per threshold
        f = 2 * mp * mr / (mp + mr + 1e-12)
        return {"maxf": float(f.max()), "miou": float(miou.max())}


# ------------------------------------------------------------------------------------------------------------
# One accumulator per task
# ------------------------------------------------------------------------------------------------------------


def metrics_for(tasks, **options):
    """A fresh accumulator per task, in the order of `tasks`.

    `tasks` maps task name -> output channels, e.g. {"semantic": 13, "depth": 1, "normal": 3}. `options` holds
    keyword arguments per task, e.g. metrics_for(tasks, edge={"tolerance": 1, "unit": "pixels"},
    semantic={"absent": "zero"}).
    """
    makers = {"semantic": SegMetrics, "parts": PartsMetrics, "depth": DepthMetrics, "normal": NormalMetrics,
              "edge": EdgeMetrics, "saliency": SaliencyMetrics}  # the first two take the number of classes
    for name in list(tasks) + list(options):
        if name not in makers:
            raise ValueError(f"no metrics for task {name!r}; known tasks: {', '.join(makers)}")
    for name in options:
        if name not in tasks:
            raise ValueError(f"options given for task {name!r}, which is not in {list(tasks)}")
    return {name: makers[name](*([channels] if name in ("semantic", "parts") else []), **options.get(name, {}))
            for name, channels in tasks.items()}


def average_results(history):
    """Mean of several results dicts, e.g. the last 10 epochs (the MTAN / Nash-MTL protocol)."""
    if not history:
        raise ValueError("average_results needs at least one results dict")
    return {task: {m: sum(r[task][m] for r in history) / len(history) for m in metrics}
            for task, metrics in history[0].items()}


# ------------------------------------------------------------------------------------------------------------
# 2. Multi-task performance Delta_m, the Decathlon score, the papers' tables
# ------------------------------------------------------------------------------------------------------------

# Results dicts are {task: {metric: value}} as returned by `evaluate`; a baseline must use the same units as
# the results (fractions or percentages alike), since Delta_m only uses ratios.

HIGHER_IS_BETTER = {"miou": True, "pixel_acc": True, "maxf": True, "odsf": True, "approx_odsf": True,
                    "within_11.25": True, "within_22.5": True, "within_30": True,
                    "abs_err": False, "rel_err": False, "rmse": False, "mean": False, "median": False}

# One metric per task, as MTI-Net's calculate_multi_task_performance (evaluation/evaluate_utils.py).
PRIMARY_METRIC = {"semantic": "miou", "parts": "miou", "saliency": "miou",
                  "edge": "odsf", "normal": "mean", "depth": "rmse"}

# The 9 NYUv2 metrics of Nash-MTL / CAGrad / FAMO, in their column order.
NYUV2_9 = (("semantic", "miou"), ("semantic", "pixel_acc"), ("depth", "abs_err"), ("depth", "rel_err"),
           ("normal", "mean"), ("normal", "median"), ("normal", "within_11.25"),
           ("normal", "within_22.5"), ("normal", "within_30"))

# Single-task rows ("STL") printed by the papers, in this file's units (fractions, degrees, metres). SegNet
# single-task NYUv2, the STL row of Nash-MTL (Navon et al., ICML 2022, Table 2) and CAGrad.
STL_NYUV2_SEGNET = {
    "semantic": {"miou": 0.3830, "pixel_acc": 0.6376},
    "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
    "normal": {"mean": 25.01, "median": 19.21, "within_11.25": 0.3014, "within_22.5": 0.5720, "within_30": 0.6915},
}
# MTI-Net repository README (v1), HRNet-18 single-task models on NYUD and PASCAL: reference rows for users.
STL_NYUD_HRNET18 = {"semantic": {"miou": 0.345}, "depth": {"rmse": 0.610}}
STL_PASCAL_HRNET18 = {"semantic": {"miou": 0.594}, "parts": {"miou": 0.603}, "saliency": {"miou": 0.670},
                      "edge": {"odsf": 0.692}, "normal": {"mean": 14.6}}
# The same README, ResNet-50 single-task on NYUD.
STL_NYUD_RESNET50 = {"semantic": {"miou": 0.401}, "depth": {"rmse": 0.571}}


def _relative_gain(results, baseline, task, metric):
    """(-1)^l (M - M_stl) / M_stl: positive when `results` beats the baseline."""
    for name, d in (("results", results), ("baseline", baseline)):
        if task not in d or metric not in d[task]:
            approx = (f" (only approx_{metric}, the per-epoch approximation: evaluate the runs with `eval.py "
                      f"--checkpoint RUN`, then compare with --from-eval --epoch last)") if f"approx_{metric}" in \
                d.get(task, {}) else ""
            raise KeyError(f"{name} has no value for {task}/{metric}{approx}")
    if metric not in HIGHER_IS_BETTER:
        raise KeyError(f"unknown metric {metric!r}: say whether higher is better in HIGHER_IS_BETTER")
    base = baseline[task][metric]
    if base == 0:
        raise ValueError(f"baseline {task}/{metric} is 0: relative change undefined")
    gain = (results[task][metric] - base) / base
    return gain if HIGHER_IS_BETTER[metric] else -gain


def delta_m(results, baseline, *, convention, tasks=None, metrics=None):
    """Relative multi-task performance against a single-task baseline, in percent.

    The three published conventions give different numbers and even different signs, so the caller must name one:

    convention="mtinet"  (Maninis et al. 2019 / MTI-Net / Auto-Lambda; higher is better)
        Delta_m = 100/T * sum_t (-1)^{l_t} (M_t - M_stl,t) / M_stl,t
        one metric per task (PRIMARY_METRIC: mIoU, odsF, mean angle, depth RMSE; override with metrics={"depth":
        "abs_err"} for Auto-Lambda), l_t = 1 if lower is better. Positive = better than single-task. Tasks: `tasks`
        if given (MTI-Net counts main tasks only), else all tasks of `results`.

    convention="nyuv2-9"  (Nash-MTL / CAGrad / FAMO; lower is better)
        Delta_m = 100/9 * sum_m (-1)^{h_m} (M_m - M_stl,m) / M_stl,m
        over the 9 NYUv2 metrics NYUV2_9, h_m = 1 if higher is better. Negative = better than single-task; use
        STL_NYUV2_SEGNET as baseline.

    convention="libmtl"  (LibMTL's Delta_p; higher is better)
        the mean of the per-metric gains within each task, then over tasks, over every metric the baseline lists for
        the task.
    """
    if convention == "nyuv2-9":
        return -100.0 * sum(_relative_gain(results, baseline, t, m) for t, m in NYUV2_9) / len(NYUV2_9)
    tasks = list(tasks if tasks is not None else results)
    if not tasks:
        raise ValueError("delta_m needs at least one task")
    if convention == "mtinet":
        chosen = dict(PRIMARY_METRIC, **(metrics or {}))
        missing = [t for t in tasks if t not in chosen]
        if missing:
            raise KeyError(f"no primary metric for {missing}; pass metrics={{task: metric}}")
        return 100.0 * sum(_relative_gain(results, baseline, t, chosen[t]) for t in tasks) / len(tasks)
    if convention == "libmtl":
        per_task = []
        for t in tasks:
            names = list((metrics or {}).get(t) or baseline.get(t, {}))
            if not names:
                raise KeyError(f"baseline has no metrics for task {t!r}")
            per_task.append(sum(_relative_gain(results, baseline, t, m) for m in names) / len(names))
        return 100.0 * sum(per_task) / len(per_task)
    raise ValueError(f'convention must be "mtinet", "nyuv2-9" or "libmtl", got {convention!r}')


# ------------------------------------------------------------------------------------------------------------
# Visual Decathlon score (Rebuffi, Bilen, Vedaldi, NeurIPS 2017)
# ------------------------------------------------------------------------------------------------------------

# Top-1 test accuracy (%) of the "Finetune" baseline (per-domain fine-tuned ResNet-26), keyed by the official
# domain (folder) names, MTAN Table 4.
FINETUNE = {"imagenet12": 59.87, "aircraft": 60.34, "cifar100": 82.12, "daimlerpedcls": 92.82, "dtd": 55.53,
            "gtsrb": 97.53, "vgg-flowers": 81.41, "omniglot": 87.69, "svhn": 96.55, "ucf101": 51.20}


def decathlon_score(accuracy, baseline=FINETUNE):
    """The challenge score S = sum_d alpha_d max(0, E_max_d - E_d)^gamma.

    E_d = 100 - accuracy (% top-1 error), E_max_d = 2 x the baseline's error, gamma = 2 and alpha_d = 1000 /
    E_max_d^2, so a perfect domain earns 1000 points and the baseline itself 250 per domain (2500 for 10).
    `accuracy` and `baseline` map domain name -> accuracy in percent; any domain names work as long as both
    dicts have the same ones.
    """
    missing = [d for d in baseline if d not in accuracy]
    unknown = [d for d in accuracy if d not in baseline]
    if missing or unknown:
        raise KeyError(f"decathlon_score: missing domains {missing}, unknown domains {unknown}; "
                       f"expected exactly {list(baseline)}")
    if max(accuracy.values()) <= 1.0 < max(baseline.values()):
        raise ValueError("decathlon_score: accuracies look like fractions; pass percentages (0-100)")
    score = 0.0
    for domain, base_acc in baseline.items():
        e_max = 2.0 * (100.0 - base_acc)
        if e_max <= 0:
            raise ValueError(f"decathlon_score: baseline accuracy of {domain!r} is 100 %, E_max would be 0")
        error = 100.0 - accuracy[domain]
        score += 1000.0 / e_max ** 2 * max(0.0, e_max - error) ** 2
    return score


# ------------------------------------------------------------------------------------------------------------
# Table rows as the papers print them
# ------------------------------------------------------------------------------------------------------------

# (task, metric) -> (column header, scale, decimals). Scale 100 makes a fraction the percentage the papers print.
COLUMNS = {
    ("semantic", "miou"): ("mIoU", 100, 2), ("semantic", "pixel_acc"): ("Pix Acc", 100, 2),
    ("parts", "miou"): ("Parts mIoU", 100, 2), ("parts", "pixel_acc"): ("Parts Acc", 100, 2),
    ("depth", "abs_err"): ("Abs", 1, 4), ("depth", "rel_err"): ("Rel", 1, 4), ("depth", "rmse"): ("RMSE", 1, 4),
    ("normal", "mean"): ("Mean", 1, 2), ("normal", "median"): ("Median", 1, 2),
    ("normal", "rmse"): ("Angle RMSE", 1, 2), ("normal", "within_11.25"): ("11.25", 100, 2),
    ("normal", "within_22.5"): ("22.5", 100, 2), ("normal", "within_30"): ("30", 100, 2),
    ("saliency", "maxf"): ("Sal maxF", 100, 2), ("saliency", "miou"): ("Sal mIoU", 100, 2),
    ("edge", "odsf"): ("odsF", 100, 2), ("edge", "approx_odsf"): ("approx odsF", 100, 2),
}

# Which metrics each table style shows per task; tasks a style does not list fall back to the MTI-Net columns.
STYLES = {
    # MTAN Table 3 (NYUv2) and Table 2 (CityScapes, whose Rel Err is printed x100)
    "mtan": {"semantic": ["miou", "pixel_acc"], "depth": ["abs_err", "rel_err"],
             "normal": ["mean", "median", "within_11.25", "within_22.5", "within_30"]},
    "mtan-cityscapes": {"semantic": ["miou", "pixel_acc"], "depth": ["abs_err", "rel_err"]},
    # MTI-Net tables: one metric per task (the Delta_m metrics)
    "mtinet": {"semantic": ["miou"], "parts": ["miou"], "saliency": ["miou"], "edge": ["odsf"],
               "normal": ["mean"], "depth": ["rmse"]},
}


def table_row(results, tasks=None, style="mtan"):
    """[(column header, formatted value)] for one results dict {task: {metric: value}}.

    style: "mtan" (NYUv2 columns mIoU, Pix Acc, Abs, Rel, Mean, Median, 11.25, 22.5, 30), "mtan-cityscapes"
    (Rel Err x100, as MTAN Table 2), "mtinet" (one metric per task) or "all" (every metric of every task).
    `tasks` selects and orders the tasks (default: those of `results`). A metric missing from `results` prints
    as "-".
    """
    if style != "all" and style not in STYLES:
        raise ValueError(f'style must be one of {list(STYLES) + ["all"]}, got {style!r}')
    row = []
    for task in (tasks if tasks is not None else results):
        values = results.get(task, {})
        names = style != "all" and (STYLES[style].get(task) or STYLES["mtinet"].get(task)) or list(values)
        for metric in names:
            if metric not in values and f"approx_{metric}" in values:  # the per-epoch approximation, named so
                metric = f"approx_{metric}"
            header, scale, decimals = COLUMNS.get((task, metric), (f"{task} {metric}", 1, 4))
            if style == "mtan-cityscapes" and (task, metric) == ("depth", "rel_err"):
                header, scale, decimals = "Rel Err", 100, 2
            value = values.get(metric)
            text = "-" if value is None else f"{value * scale:.{decimals}f}"
            row.append((header, text))
    return row


def format_table(rows, tasks=None, style="mtan"):
    """A Markdown table (aligned, readable as plain text), one line per method.

    `rows` is a dict {name: row} or a list of (name, row) pairs or a list of unnamed rows, where each row is
    either a `table_row` output or a results dict {task: {metric: value}} (turned into a row with `tasks` and
    `style`). Columns are the union of the rows' headers in first-seen order.
    """
    rows = list(rows.items() if isinstance(rows, dict) else rows)
    named = bool(rows) and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], (list, dict))
                               for r in rows)
    names = [str(n) for n, _ in rows] if named else None
    rows = [r for _, r in rows] if named else rows
    rows = [table_row(r, tasks, style) if isinstance(r, dict) else r for r in rows]
    headers = []
    for row in rows:
        headers += [h for h, _ in row if h not in headers]
    table = [[dict(row).get(h, "-") for h in headers] for row in rows]
    if names is not None:
        headers = ["method"] + headers
        table = [[n] + r for n, r in zip(names, table)]
    widths = [max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(headers)]
    left = 1 if names is not None else 0  # the method names are left-aligned, numbers right-aligned
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i < left else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join(":" + "-" * (w + 1) if i < left else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in table])


def format_decathlon_table(rows, baseline=None):
    """A Markdown table of per-domain top-1 accuracy (%) for rows [(name, {domain: {"accuracy": fraction}})],
    with the mean and, when a baseline is known (the official domains use FINETUNE), the Decathlon score."""
    domains = list(rows[0][1])
    if baseline is None and set(domains) == set(FINETUNE):
        baseline = FINETUNE
    headers = ["method"] + domains + ["mean"] + (["score"] if baseline else [])
    table = []
    for name, results in rows:
        accuracy = {d: 100 * results[d]["accuracy"] for d in domains}
        cells = [name] + [f"{accuracy[d]:.2f}" for d in domains] + [f"{sum(accuracy.values()) / len(domains):.2f}"]
        if baseline:
            cells.append(f"{decathlon_score(accuracy, baseline):.0f}")
        table.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in table])


def format_metrics(results):
    """One compact line for logs: "semantic miou 0.3911 pixel_acc 0.6531 | depth abs_err 0.5510 ..."."""
    return " | ".join(f"{task} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                      for task, metrics in results.items())


# ------------------------------------------------------------------------------------------------------------
# 3. Evaluation loops
#
# One pass over a split with the model in eval mode, every batch fed to the accumulators on the device.
# train.py's validation calls the same functions, so the numbers of a training log and of `python eval.py` are
# the same ones.
# ------------------------------------------------------------------------------------------------------------


def to_device(batch, device, channels_last=False):
    """A batch dict on `device`; the image in channels_last layout when asked (faster convolutions)."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def autocast(amp, device):
    """bf16/fp16 autocast ("bf16", "fp16" or "off") for the model's forward pass; losses and metrics stay in
    fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def all_reduce(tensor):
    """Sum a tensor over torch.distributed ranks in place; the identity in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def variable_size(dataset):
    """True for splits whose targets keep each image's own size (PASCAL val): they cannot be stacked."""
    return getattr(getattr(dataset, "dataset", dataset), "variable_size", False)  # looks through a Subset


@torch.no_grad()
def evaluate(model, loader, tasks, device, amp="off", channels_last=False, normalise=None, exact_edges=True):
    """Pixel-pooled metrics {task: {metric: value}} of every task over a whole split. `normalise` maps the
    [0, 1] image to the model's input (ImageNet statistics for a pretrained backbone). Under torchrun each
    rank evaluates its shard and the accumulators are summed across ranks, so the numbers equal a
    single-process evaluation of the same weights. Edges: the benchmark's odsF, or with `exact_edges=False`
    (training's evaluation after every epoch) the fast approximation, approx_odsf (EdgeMetrics)."""
    import data  # edges derived from semantic labels, for datasets without edge files

    model.eval()
    metrics = metrics_for(tasks, **({"edge": {"exact": exact_edges}} if "edge" in tasks else {}))
    for batch in loader:
        batch = data.add_derived_targets(to_device(batch, device, channels_last), tasks)
        image = batch["image"] if normalise is None else normalise(batch["image"])
        with autocast(amp, device):
            preds = model(image)
        for task, meter in metrics.items():
            pred, target = preds[task].float(), batch[task]
            if pred.shape[-2:] != target.shape[-2:]:  # PASCAL val: evaluated at each image's original size
                pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            meter.update(pred, target)
    for meter in metrics.values():
        meter.all_reduce()
    return {task: meter.compute() for task, meter in metrics.items()}


def classification_totals(loss_sum, logits, label):
    """(3,) loss sum, correct answers and images of one batch, kept on the device so nothing waits for it.
    torch.full, not torch.tensor: building a CUDA tensor from a Python number is a blocking copy."""
    count = torch.full((), len(label), device=logits.device)
    return torch.stack([loss_sum, (logits.argmax(1) == label).sum(), count])


# Batch normalisation across Decathlon domains. The backbone's BN layers are shared, so after an epoch their
# running statistics describe mostly the domain trained last (the final BN, with momentum 0.9, only its last
# batch), and every other domain would be evaluated with the wrong statistics. The official evaluation script
# (lorenmt/mtan visual_decathlon/model_wrn_eval.py) therefore trains one more epoch on each domain before
# predicting it, "to compute dataset-specific BN statistics". Here the statistics are re-estimated without
# touching the weights: before a domain is evaluated, a few batches of its training data run through the
# network in training mode, and the shared statistics are put back after. The batches depend on the seed only,
# so every torchrun rank and eval.py compute the same statistics.
BN_CALIBRATION_BATCHES = 10


@torch.no_grad()
def calibrate_batchnorm(model, dataset, index, cfg, device, batches=BN_CALIBRATION_BATCHES):
    """Set the BN running statistics to the average over `batches` shuffled training batches of domain
    `index`. Returns what restore_batchnorm needs to put the previous statistics back."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None = a cumulative average over the batches seen
    model.train()
    loader = torch.utils.data.DataLoader(  # train.py's loader of epoch 0, without the torchrun shard
        dataset, batch_size=cfg["batch_size"], shuffle=True, num_workers=cfg["workers"],
        generator=torch.Generator().manual_seed(cfg["seed"] * 1000),
        drop_last=cfg["drop_last"] and len(dataset) > cfg["batch_size"])
    with torch.random.fork_rng(devices=[]):  # the same batches, crops and flips in train.py and eval.py
        torch.manual_seed(cfg["seed"])
        for step, batch in enumerate(loader):
            if step == batches:
                break
            with autocast(cfg["amp"], device):
                model(batch["image"].to(device), index)
    model.eval()
    return list(zip(norms, saved))


def restore_batchnorm(saved):
    for m, (momentum, *buffers) in saved:
        m.momentum = momentum
        for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), buffers):
            buffer.copy_(value)


@torch.no_grad()
def evaluate_decathlon(model, loaders, cfg, device, calibration=None):
    """Top-1 accuracy (a fraction) and mean cross entropy of every domain's split, summed across ranks.
    calibration: {domain: training dataset} to re-estimate each domain's BN statistics first (see above)."""
    model.eval()
    results = {}
    for index, (domain, loader) in enumerate(loaders.items()):
        saved = calibrate_batchnorm(model, calibration[domain], index, cfg, device) if calibration else []
        totals = torch.zeros(3, device=device)
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            with autocast(cfg["amp"], device):
                logits = model(image, index).float()
            totals += classification_totals(F.cross_entropy(logits, label, reduction="sum"), logits, label)
        restore_batchnorm(saved)
        loss_sum, correct, count = all_reduce(totals).tolist()
        results[domain] = {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1)}
    return results


# ------------------------------------------------------------------------------------------------------------
# 4. `python eval.py --checkpoint RUN`: reading a checkpoint, evaluating it, eval.json
#
# A run folder of train.py holds last.pt, log.jsonl, metrics.json and curves.png. The checkpoint records the
# model's module, class and constructor arguments (`model_args`), so the model is rebuilt here from mtan.py or
# mtinet.py alone, as nanoGPT's sample.py rebuilds its GPT.
# ------------------------------------------------------------------------------------------------------------
class CheckpointError(Exception):
    pass


# The entries of a checkpoint and their types: evaluating needs the first three, resuming all of them.
CHECKPOINT = {"config": dict, "model": dict, "model_args": dict, "epoch": int, "history": list,
              "optimizer": dict, "weighting": dict}
# The configuration keys eval.py reads (--checkpoint, --compare); resuming reads every key of train.py's DEFAULTS.
# A checkpoint of another version that lacks one is refused, never completed from DEFAULTS: a default need not
# be what the run did. Only MODEL_FACTS, which follow from the model and its tasks, are recomputed (migrated).
CONFIG_KEYS = ("model", "data", "data_root", "tasks", "batch_size", "subset", "resolution", "num_classes",
               "augment", "backbone")
MODEL_FACTS = ("family", "single_task", "baseline")


def load_checkpoint(path, resuming=False, model_facts=None, config_keys=()):
    """Read a checkpoint written by train.py, with one-line errors for the usual mistakes: the entries that
    evaluating (or, `resuming`, training on) needs, the configuration keys that the command reads (and
    `config_keys`), a history of epochs 1, 2, ..., `epoch`, weights that are tensors and finite. A file of an
    older version gets the facts `model_facts(model, tasks)` computes (train.py's, from its MODELS) or, without
    it, is refused: never completed from defaults. weights_only=True: loading never runs code from the file."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass a run folder (runs/NAME) or its last.pt")
    ckpt = read_weights(path, "checkpoint")
    for key, kind in list(CHECKPOINT.items())[:None if resuming else 3]:
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"{path} is not a checkpoint of train.py (its '{key}' entry is missing or "
                                  f"not a {kind.__name__})")
    if not all(torch.is_tensor(v) for v in ckpt["model"].values()):
        raise CheckpointError(f"{path} is not a checkpoint of train.py (its 'model' entry holds non-tensors)")
    cfg, numbered = ckpt["config"], [isinstance(r, dict) and r.get("epoch") for r in ckpt.get("history", [])]
    if "history" in ckpt and (numbered != list(range(1, len(numbered) + 1)) or ckpt.get("epoch") != len(numbered)):
        raise CheckpointError(f"{path} is not a checkpoint of train.py (its 'history' does not hold the records of "
                              f"epochs 1 to its 'epoch' {ckpt.get('epoch')})")
    if model_facts and not all(k in cfg for k in MODEL_FACTS):  # an older run: the facts of today's models
        with contextlib.suppress(KeyError):  # a model this version does not know: refused below
            cfg.update({k: v for k, v in model_facts(cfg["model"], cfg["tasks"]).items() if k not in cfg})
    missing = [k for k in CONFIG_KEYS + MODEL_FACTS + tuple(config_keys) if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: its configuration lacks '{missing[0]}' (written by another version of "
                              f"train.py); evaluate or resume it with that version, or train the run again")
    return ckpt


def read_weights(path, what):
    """torch.load of a user's file (a checkpoint, --pretrained), with one line naming it when it cannot be
    read (truncated, corrupt, not a torch file, a pickle that would run code) or when a weight of it (a
    checkpoint: of its model) is not finite: NaN weights are named at load, not blamed on the learning
    rate."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {what} {path} ({type(e).__name__}): it is corrupt or not a torch "
                              f"file; use another file") from None
    weights = state.get("model", state) if isinstance(state, dict) else {}
    bad = [k for k, v in getattr(weights, "items", dict)() if torch.is_tensor(v) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{what} {path}: non-finite weights in {bad[0]} and {len(bad) - 1} more "
                              f"tensors: the file is damaged or its run diverged")
    return state


def model_from_checkpoint(ckpt):
    """The (untrained) model a checkpoint's weights belong to, built from its recorded class and arguments."""
    import mtan
    import mtinet

    args = ckpt["model_args"]
    module = {"mtan": mtan, "mtinet": mtinet}[args["module"]]
    return getattr(module, args["class"])(**args["kwargs"])


# The input sizes each model class accepts (its forward raises otherwise): SegNet's five 2x2 poolings
# (mtan.py), MTAN-DeepLabv3's output stride 8. The HRNet models and DeepLabv3 resize their outputs to any
# input size.
INPUT_MULTIPLE = {"SegNet": 32, "MTAN": 32, "DenseSegNet": 32, "CrossStitchSegNet": 32, "MTANDeepLabv3": 8}


def check_first_samples(model, splits, count=2):
    """Read the first samples of each split of files ({name: dataset}) before any training or evaluation
    starts, so that a damaged file, a label outside the class range or an image outside [0, 1] (data.py checks
    them as it reads) stops the run at once, and check that their size fits the model. The synthetic scenes
    (code, no file) are skipped. The random state is left as it was (PASCAL's training samples draw their
    augmentation)."""
    import data

    multiple = INPUT_MULTIPLE.get(type(model).__name__)
    with torch.random.fork_rng(devices=[]):
        for split, dataset in splits.items():
            for index in range(min(count, len(dataset)) if data.sample_files(dataset, 0) else 0):
                height, width = dataset[index]["image"].shape[-2:]
                if multiple and (height % multiple or width % multiple):
                    raise data.DatasetError(
                        f"{data.sample_files(dataset, index)['image']}: the {split} images are {height}x{width}, "
                        f"but {type(model).__name__} needs heights and widths that are multiples of {multiple} "
                        f"(the SegNet models: 32, MTAN-DeepLabv3: 8; the HRNet models and DeepLabv3 take any "
                        f"size): crop or pad them")


def build_parser():
    p = ArgumentParser(description="Evaluate a checkpoint of train.py: the paper's table, eval.json, "
                       "and optional pictures of predictions and attention masks; or, with --compare, "
                       "one paper-style table of finished runs.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", type=text, metavar="PATH", help="runs/NAME/last.pt (or the run "
                      "folder)")
    what.add_argument("--compare", nargs="*", metavar="RUN", help="run folders of train.py: one table row per "
                      "configuration from metrics.json (no re-evaluation), the mean ± sample std (n - 1) of its "
                      "seeds, with parameters and delta_m (its seeds' mean ± std, each against the mean of the "
                      "seeds of the single-task runs among them)")
    p.add_argument("--data-root", type=text, metavar="DIR", help="dataset folder, if it moved since "
                   "training")
    p.add_argument("--split", choices=["train", "val", "test"], help="the split to evaluate (default val)")
    p.add_argument("--baseline", type=text, metavar="FILE", help="eval.json or metrics.json of a baseline "
                   "run: adds delta_m (Decathlon: comma-separated eval.json files of single-domain runs, "
                   "for the score; --compare: comma-separated run folders or metrics.json / eval.json files "
                   "of single-task runs, instead of the single-task runs among those compared)")
    p.add_argument("--convention", choices=["mtinet", "nyuv2-9", "libmtl"],
                   help="delta_m convention (default mtinet; see delta_m's docstring)")
    p.add_argument("--save-vis", type=text, metavar="DIR", help="write input / ground truth / prediction "
                   "PNGs into this new (or empty) folder; else into DIR-2, DIR-3, ...")
    p.add_argument("--replace-eval", action="store_true", help="replace the run's eval.json even when it is of "
                   "another split or other data (kept otherwise)")
    p.add_argument("--num-vis", type=positive_int, metavar="N", help="how many samples --save-vis draws "
                   "(default 4)")
    p.add_argument("--image", type=text, metavar="FILE", help="predict one image of any size and write "
                   "per-task PNGs into a new folder beside it")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], help="mixed precision (default: the training's on "
                   "the device it trained on; on another device that device's default: bf16 on a GPU, fp16 on "
                   "GPUs without bf16, off on a CPU)")
    p.add_argument("--batch-size", type=positive_int, metavar="N")
    p.add_argument("--subset", type=positive_int, metavar="N", help="evaluate only the first N samples")
    p.add_argument("--bench", type=positive_int, metavar="N", help="time N evaluations of the split (images/s, "
                   "metrics included), print one JSON line and exit (dense datasets)")
    compare = p.add_argument_group("--compare only")
    compare.add_argument("--epoch", choices=list(EPOCH_CHOICES), help="protocol: the mean of the last 10 "
                         "evaluations (the MTAN paper's protocol, default); last: the last evaluation")
    compare.add_argument("--from-eval", action="store_true", help="the numbers of each run's eval.json (written "
                         "by --checkpoint) instead of its last evaluation during training")
    compare.add_argument("--style", choices=list(STYLES) + ["all"], help="the table's columns (default: the "
                         "MTI-Net paper's for NYUD, PASCAL and HRNet models, else the MTAN paper's)")
    compare.add_argument("--json", action="store_true", help="print the numbers as one JSON document")
    compare.add_argument("--per-seed", action="store_true", help="one row per run, not one per configuration")
    return p


# Which flags each mode of eval.py takes (README, "Training", rule 3): --compare; --checkpoint, which evaluates
# a dense run's split, a Decathlon run's domains, times the split (--bench) or predicts one picture (--image).
# A typed flag outside its modes is one error line (check_flags), never silently ignored; --checkpoint and
# --compare go everywhere. Defaults are filled in after the check, so a flag is "typed" exactly when not None.
MODE_NAMES = {"checkpoint": "--checkpoint", "decathlon": "a Decathlon run", "bench": "--bench", "image": "--image",
              "compare": "--compare"}
EVAL_FLAG_SCOPE = {
    "data_root": "checkpoint decathlon bench", "split": "checkpoint decathlon bench",
    "subset": "checkpoint decathlon bench", "batch_size": "checkpoint decathlon bench",
    "device": "checkpoint decathlon bench image", "amp": "checkpoint decathlon bench image",
    "baseline": "checkpoint decathlon compare", "convention": "checkpoint compare",
    "replace_eval": "checkpoint decathlon", "save_vis": "checkpoint", "num_vis": "checkpoint",
    "image": "checkpoint", "bench": "checkpoint",  # the flags that choose a mode: refused in the others
    "epoch": "compare", "from_eval": "compare", "style": "compare", "json": "compare", "per_seed": "compare",
}
EVAL_DEFAULTS = {"split": "val", "convention": "mtinet", "num_vis": 4}


def check_flags(args, mode):
    """Refuse a typed flag outside its EVAL_FLAG_SCOPE, in one line; then fill in EVAL_DEFAULTS."""
    for flag, modes in EVAL_FLAG_SCOPE.items():
        if getattr(args, flag) not in (None, False) and flag != mode and mode not in modes.split():
            where = " and ".join(MODE_NAMES[m] for m in modes.split() if m != "decathlon")
            raise UsageError(f"--{flag.replace('_', '-')} applies to {where}, not {MODE_NAMES[mode]}")
    if args.num_vis and not args.save_vis:
        raise UsageError("--num-vis applies to --save-vis (how many samples it draws)")
    for flag, value in EVAL_DEFAULTS.items():
        setattr(args, flag, value if getattr(args, flag) is None else getattr(args, flag))


def load_run(args):
    """(config, model on its device, device) of a checkpoint; one-line errors for user mistakes."""
    ckpt = load_checkpoint(args.checkpoint)
    cfg = dict(ckpt["config"])
    cfg["checkpoint_epoch"] = ckpt.get("epoch")  # eval.json records it: --compare --from-eval checks it
    cfg["data_root"] = args.data_root or cfg["data_root"]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (drop --device, or pass "
                         "--device cpu)")
    trained_on, trained_amp = cfg.get("device"), cfg.get("amp", "off")
    cfg["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(args, "amp", None):
        cfg["amp"] = args.amp
    elif cfg["device"] != trained_on:  # a GPU run's bf16 autocast would run silently (and slowly) on a CPU
        cfg["amp"] = default_amp(cfg["device"])
        if cfg["amp"] != trained_amp:
            print(f"amp {cfg['amp']} on {cfg['device']} (the run trained with amp {trained_amp} on {trained_on}; "
                  f"--amp chooses)")
    cfg["compile"] = False  # compiling pays off over many training steps, not one evaluation
    cfg["channels_last"] = cfg.get("channels_last", False)  # as in training: faster on CPU and GPU alike
    cfg.setdefault("deterministic", False)
    try:
        model = model_from_checkpoint(ckpt)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # model_args of another version, edited by hand
        raise UsageError(f"{args.checkpoint} records a model this code cannot build ({type(e).__name__}: "
                         f"{e})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"the weights in {args.checkpoint} do not fit a {cfg['model']} model: "
                         f"{first_line(e)}") from None
    device = torch.device(cfg["device"])
    model = model.to(device, memory_format=torch.channels_last if cfg["channels_last"] else torch.preserve_format)
    return cfg, model.eval(), device


def input_normalisation(cfg, device):
    """ImageNet statistics for a run trained from ImageNet weights (--pretrained), else the identity."""
    if not cfg.get("pretrained"):
        return torch.nn.Identity()
    import mtinet

    return mtinet.ImageNetNormalisation().to(device)


def evaluation_split(cfg, args):
    import data

    dataset, _ = data.build_dataset(cfg["data"], cfg["data_root"], args.split, **dataset_options(cfg))
    subset = args.subset or cfg.get("subset")
    if subset:
        dataset = torch.utils.data.Subset(dataset, range(min(subset, len(dataset))))
    return dataset


def evaluation_loader(dataset, cfg):
    """The split in order, one pass; batch 1 where targets keep each image's size (PASCAL val)."""
    return torch.utils.data.DataLoader(dataset, batch_size=1 if variable_size(dataset) else cfg["batch_size"],
                                       num_workers=cfg.get("workers", 0), pin_memory=cfg["device"] == "cuda")


def main(argv=None):
    args = build_parser().parse_args(argv)
    import data

    try:
        return compare_command(args) if args.compare is not None else evaluate_checkpoint(args)
    except (KeyboardInterrupt, BrokenPipeError) as stop:
        stop_quietly(stop)
    except (data.DatasetError, CheckpointError, UsageError, FloatingPointError, OSError) as error:
        sys.exit(error_line(error))  # a user's mistake: one line (a bug keeps its traceback)
    except (RuntimeError, MemoryError, ValueError) as error:  # out of memory: one line; anything else: a bug
        sys.exit(resource_error(error, f"the run's model at batch {args.batch_size or 'of the run'} and the "
                                       f"split's image size (--image: {MAX_SIDE} pixels at most)"))


def evaluate_checkpoint(args):
    cfg, model, device = load_run(args)
    decathlon = cfg["data"] in DECATHLON_DATASETS
    check_flags(args, "decathlon" if decathlon else "image" if args.image else "bench" if args.bench else
                "checkpoint")
    configure_torch(cfg)  # on a GPU the cuDNN autotuner and TF32 of training; the checkpoint's --deterministic
    normalise = input_normalisation(cfg, device)
    if args.image:
        return predict_image(args, cfg, model, device, normalise)
    cfg["batch_size"] = args.batch_size or cfg["batch_size"]
    if args.save_vis:  # a new or empty folder (else FOLDER-2, ...), made now: an unwritable one stops at once
        empty = os.path.isdir(args.save_vis) and not os.listdir(args.save_vis)
        args.save_vis = args.save_vis if empty else new_folder(args.save_vis)
    if decathlon:
        return evaluate_decathlon_checkpoint(args, cfg, model, device)
    dataset = evaluation_split(cfg, args)
    check_first_samples(model, {args.split: dataset})
    loader = evaluation_loader(dataset, cfg)
    if args.bench:
        return bench_evaluation(args, cfg, model, loader, device, normalise)
    results = evaluate(model, loader, cfg["tasks"], device, cfg["amp"], cfg["channels_last"], normalise)
    rows = [(f"{cfg['model']} ({args.split})", results)]
    report = {"checkpoint": args.checkpoint, "split": args.split, "model": cfg["model"], "data": cfg["data"],
              "tasks": cfg["tasks"], "metrics": results, "epoch": cfg["checkpoint_epoch"],
              "data_root": cfg["data_root"], "evaluated_on": evaluation_set(dict(cfg, subset=args.subset or
                                                                                cfg.get("subset"))),
              "sample_ids": sample_ids(dataset)}
    if args.baseline:
        baseline = read_baseline_source(args.baseline, "last", False)["numbers"]
        rows.append(("baseline", baseline))
        try:
            report["delta_m"] = delta_m(results, baseline, convention=args.convention)
        except (KeyError, ValueError) as e:  # a task or a metric missing, a metric of 0
            raise UsageError(f"--baseline {args.baseline}: no delta_m ({e.args[0]}); it must be the "
                             f"eval.json or metrics.json of a run on the same tasks") from None
        report["delta_m_convention"] = args.convention
    print(format_table(rows, cfg["tasks"]))
    if "delta_m" in report:
        print(f"delta_m ({args.convention} convention) = {report['delta_m']:+.2f} %")
    write_report(report, args)
    if args.save_vis:
        save_visualisations(args, cfg, model, dataset, device, normalise)
    return report


def bench_evaluation(args, cfg, model, loader, device, normalise):
    """--bench N: the speed of evaluating the split as training evaluates it (`evaluate`: loading, forward,
    metric updates and the final reduction to numbers), the median of N passes after a one-batch warm-up.
    Prints one JSON line and returns it as a dict; writes no file."""
    batch = next(iter(loader))
    run_split = lambda batches: evaluate(model, batches, cfg["tasks"], device, cfg["amp"], cfg["channels_last"],
                                         normalise)  # ends by reading the metrics
    run_split([batch])  # warm-up: autotuning, lazy state
    median = DeviceClock(device).median_seconds(lambda _: run_split(loader), args.bench)
    images = len(loader.dataset)
    result = {"model": cfg["model"], "data": cfg["data"], "split": args.split, "images": images,
              "images_per_s": round(images / median, 2), "seconds_per_pass": round(median, 3),
              **speed_fields(cfg, device, batch["image"]), "batch_size": loader.batch_size}
    print(strict_json(result))
    return result


def evaluate_decathlon_checkpoint(args, cfg, model, device):
    """Per-domain top-1 accuracy, the mean and the Decathlon score. The official domains are scored against
    the paper's Finetune baseline; the synthetic ones against single-domain networks trained by train.py:

        python train.py --model wrn-mtan --data synthetic-decathlon --task floor --out runs/single-floor
        ... (one run per domain), then
        python eval.py --checkpoint runs/NAME/last.pt --baseline runs/single-floor/eval.json,...

    (each baseline's eval.json comes from `python eval.py --checkpoint runs/single-DOMAIN/last.pt`). Each
    domain's BN statistics are re-estimated from its training split first, as during training
    (calibrate_batchnorm). With `--split test` on the official data and ROOT/annotations/
    <domain>_test_stripped.json present, the predictions go to results.json in the challenge's format."""
    import data

    domains = list(cfg["tasks"])
    calibration, _ = data.build_decathlon(cfg["data"], cfg["data_root"], "train", domains=domains,
                                          num_samples=cfg.get("subset"))
    if args.split == "test" and cfg["data"] == "decathlon" and test_annotations(cfg["data_root"], domains):
        return write_decathlon_results(args, cfg, model, device, calibration)
    sets, _ = data.build_decathlon(cfg["data"], cfg["data_root"], args.split, domains=domains,
                                   num_samples=args.subset or cfg.get("subset"))
    if any(label < 0 for s in sets.values() for _, label in getattr(s, "files", [])):  # official test split
        raise UsageError(f"the {args.split} split has no labels; for the official test split put the "
                         "challenge's annotations/<domain>_test_stripped.json files in the data root")
    loaders = {d: evaluation_loader(s, cfg) for d, s in sets.items()}
    results = evaluate_decathlon(model, loaders, cfg, device, calibration)
    baseline = decathlon_baseline(args, sets)
    rows = [(f"{cfg['model']} ({args.split})", results)]
    if args.baseline:
        rows.append(("baseline", {d: {"accuracy": baseline[d] / 100} for d in domains}))
    print(format_decathlon_table(rows, baseline))
    accuracy = {d: 100 * r["accuracy"] for d, r in results.items()}
    report = {"checkpoint": args.checkpoint, "split": args.split, "model": cfg["model"], "data": cfg["data"],
              "evaluated_on": evaluation_set(dict(cfg, subset=args.subset or cfg.get("subset"))),
              "tasks": cfg["tasks"], "metrics": results, "accuracy": accuracy,
              "mean_accuracy": sum(accuracy.values()) / len(accuracy)}
    if baseline:
        report["decathlon_score"] = decathlon_score(accuracy, baseline)
        if len(accuracy) < len(FINETUNE) and cfg["data"] == "decathlon":
            print(f"(score over {len(accuracy)} domains: at most {1000 * len(accuracy)} points)")
    elif cfg["data"] == "synthetic-decathlon":
        print("no Decathlon score: pass --baseline with the eval.json files of single-domain runs "
              "(see `python eval.py --help` and the README)")
    write_report(report, args)
    return report



def decathlon_baseline(args, sets):
    """{domain: accuracy %} that the score measures against, for exactly the evaluated domains: the
    single-domain runs of --baseline, else the paper's Finetune row for official domains, else None."""
    domains = list(sets)
    if args.baseline:
        baseline = {domain: accuracy for path in args.baseline.split(",") for domain, accuracy in
                    read_json(path, "decathlon eval.json", f"--baseline {path}")[0]["accuracy"].items()}
        missing = [d for d in domains if d not in baseline]
        if missing:
            raise UsageError(f"--baseline has no accuracy for {', '.join(missing)}: pass the eval.json of "
                             "one single-domain run per domain, comma separated")
        return measurable_baseline({d: baseline[d] for d in domains}, {d: len(s) for d, s in sets.items()})
    if set(domains) <= set(FINETUNE):  # official domains, maybe not all ten
        return {d: FINETUNE[d] for d in domains}
    return None


def measurable_baseline(baseline, sizes):
    """A baseline that is 100 % right on a domain leaves the score nothing to scale by (E_max = 2 x 0). On a
    split of N images the smallest error that can be measured is one image, 100 / N %: a perfect baseline is
    taken to have made that one mistake, so the score stays defined and a perfect model still earns the
    domain's 1000."""
    adjusted = dict(baseline)
    for domain, size in sizes.items():
        if adjusted.get(domain, 0.0) >= 100.0:
            adjusted[domain] = 100.0 - 100.0 / size
            print(f"baseline {domain}: 100 % on {size} images; its error is taken as one image, "
                  f"{100.0 / size:.2f} %, so that the score is defined")
    return adjusted


def run_folder(checkpoint):
    """The run folder of --checkpoint, which names either the folder or a file in it."""
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))


def write_report(report, args):
    """eval.json beside the checkpoint, written atomically. Refused: non-finite metrics (a diverged model, or a
    split without a valid target), which would replace a good eval.json with one no strict parser reads; and
    replacing an eval.json of another split or other data without --replace-eval (nothing the user had is
    replaced unasked: a quick --subset evaluation must not cost the full split's)."""
    path = os.path.join(run_folder(args.checkpoint), "eval.json")
    bad = non_finite_metrics(report["metrics"])
    if bad:
        raise UsageError(f"non-finite metrics ({', '.join(bad)}): the model diverged or the split has no "
                         f"valid target for them; {path} was not written")
    if os.path.exists(path) and not args.replace_eval:
        old = read_json(path, ("eval.json", "decathlon eval.json"))[0]
        on = [(blob.get("evaluated_on"), blob.get("sample_ids")) for blob in (report, old)]
        ours, theirs = data_in_words(*on)
        if (report["split"], ours) != (old.get("split"), theirs):
            raise UsageError(f"{path} holds the {old.get('split')} split on {theirs}, this evaluation the "
                             f"{report['split']} split on {ours}: kept (pass --replace-eval to replace it)")
    write_text_atomic(strict_json(report, indent=2), path)
    print(f"wrote {path}")


# What eval.py reads of each kind of JSON file that train.py and eval.py write: (what it is, {key: shape}). The
# one reader, read_json, checks a file against its kind where it is read, so every command that reads the file
# refuses it with the same line, naming the file and the key.
JSON_FILES = {
    "eval.json": ("the eval.json of python eval.py --checkpoint", {"metrics": "results"}),
    "metrics.json": ("the metrics.json of train.py", {"final": "results", "mean_last_10": "results",
                                                       "epochs": "count"}),
    "decathlon eval.json": ("an eval.json of a Decathlon run", {"accuracy": "numbers"}),
}
NUMBERS = lambda v: isinstance(v, dict) and all(type(n) in (int, float) for n in v.values())  # NaN: check_seeds
SHAPES = {  # shape: (its test, how a value that fails it is named)
    "results": (lambda v: isinstance(v, dict) and all(map(NUMBERS, v.values())),
                "expected {{task: {{metric: number}}}} under '{key}'"),
    "numbers": (NUMBERS, "expected {{name: number}} under '{key}'"),
    "count": (lambda v: type(v) is int, "'{key}' is not a number of epochs"),
}


def read_json(path, kinds, label=None):
    """(the JSON object in `path`, its kind): the first of `kinds` (one name, or a tuple) whose first key the file
    has, else the last, checked against JSON_FILES. One line naming the file (`label`) and the key otherwise."""
    label, kinds = label or path, (kinds,) if isinstance(kinds, str) else kinds
    try:
        with open(path) as f:
            blob = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {label} ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict):
        raise UsageError(f"{label} holds a JSON {type(blob).__name__}, not an object as eval.py and train.py write")
    kind = next((k for k in kinds if next(iter(JSON_FILES[k][1])) in blob), kinds[-1])
    what, keys = JSON_FILES[kind]
    for key, shape in keys.items():
        test, words = SHAPES[shape]
        if not test(blob.get(key)):
            raise UsageError(f"{label} is not {what}: " + words.format(key=key))
    return blob, kind


# ============================================================================================================
# Appendices: --compare, pictures, the Decathlon's results format, and the machinery shared with train.py
# ============================================================================================================

# ------------------------------------------------------------------------------------------------------------
# Appendix A. Comparing runs: `python eval.py --compare RUN ...`
#
# `python eval.py --compare RUN ...` puts finished runs side by side as the papers do: the MTAN paper's Table
# 3 (One Task, STAN, Split, Dense, Cross-Stitch and MTAN under equal, uncertainty and DWA weighting) and the
# MTI-Net paper's NYUD ablation table (single-task, multi-task baseline, PAD-Net, MTI-Net, with and without
# auxiliary tasks, with Delta_m against the single-task rows). Nothing is re-evaluated: the numbers are those
# train.py wrote to metrics.json (or, with --from-eval, those `python eval.py --checkpoint` wrote to
# eval.json), the parameter count is read off the checkpoint's weights and the row's name off its
# configuration, which records what train.py's MODELS table says of the model: its family ("hrnet": the
# configuration's "backbone" means something), whether the run is a single-task one, and whether its network
# is a plain single-task baseline (STAN, MTAN's attention network on one task, is a row of MTAN's tables to
# compare with the baseline rather than the baseline itself).
# ------------------------------------------------------------------------------------------------------------

DEFAULT_HRNET = "w18-small-v2"  # the MTI-Net paper's HRNet-18
EPOCH_CHOICES = {"protocol": "mean_last_10", "last": "final"}  # --epoch -> the key of metrics.json
DELTA_M_HEADER = "Delta_m %"


def read_finished_run(folder):
    """What --compare needs of a run folder: its configuration, metrics.json, the parameter count of last.pt's
    weights, how many evaluations the run made, the data it was evaluated on, and eval.json when there is one.
    One-line errors for a folder that is not a finished run of train.py, or whose two files disagree."""
    if os.path.isfile(folder) and os.path.basename(folder) in ("last.pt", "metrics.json", "eval.json"):
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a run folder: --compare expects folders that train.py wrote "
                         "(each with metrics.json and last.pt)")
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        raise UsageError(f"{folder} is not a finished run: it has no metrics.json (train.py writes it after "
                         f"the last epoch; continue a stopped run with python train.py --resume {folder})")
    metrics = read_json(path, "metrics.json")[0]
    if not os.path.isfile(os.path.join(folder, "last.pt")):
        raise UsageError(f"{folder} has metrics.json but no last.pt: --compare reads the configuration and "
                         "the parameter count from the checkpoint")
    ckpt = load_checkpoint(folder)
    cfg = ckpt["config"]
    if cfg["data"] in DECATHLON_DATASETS:
        raise UsageError(f"{folder} is a Visual Decathlon run: --compare makes the dense-task tables; score a "
                         "Decathlon run with python eval.py --checkpoint FOLDER --baseline ...")
    # What both files record must agree: a run resumed for more epochs and stopped again keeps the metrics.json
    # of its earlier end, and a last.pt copied from another run would lend its name to metrics.json's numbers.
    for key, recorded in (("epochs", ckpt.get("epoch", metrics["epochs"])), ("model", cfg["model"])):
        if metrics.get(key, recorded) != recorded:
            raise UsageError(f"{path} says {key} {metrics[key]} but {folder}/last.pt {recorded}: they are not of "
                             "one finished run (resumed and not finished, or one file copied from another run)")
    evaluations = sum("val" in record for record in ckpt.get("history", [])) or None
    eval_path = os.path.join(folder, "eval.json")
    return {"folder": folder, "config": cfg, "metrics": metrics, "params": count_parameters(ckpt["model"]),
            "evaluations": evaluations, "eval_json": eval_path if os.path.isfile(eval_path) else None,
            "evaluated_on": (evaluation_set(cfg), ckpt.get("sample_ids"))}


def run_numbers(run, epoch, from_eval):
    """The numbers of a run: metrics.json's mean of the last evaluations (epoch "protocol") or its last
    evaluation ("last"), or with from_eval the "metrics" of eval.json, which must be of last.pt's epoch and of
    the data the run was evaluated on. Returns {"numbers": {task: {metric: value}}, "source": where they come
    from, in words, "file" and "key": the file and the key that hold them}."""
    if not from_eval:
        key = EPOCH_CHOICES[epoch]
        return {"numbers": run["metrics"][key], "source": f"metrics.json {key}", "key": key,
                "file": os.path.join(run["folder"], "metrics.json")}
    if run["eval_json"] is None:
        raise UsageError(f"--from-eval: {run['folder']} has no eval.json (write it with python eval.py "
                         f"--checkpoint {run['folder']}, or drop --from-eval)")
    path, last = run["eval_json"], run["metrics"]["epochs"]  # last.pt's epoch (read_finished_run)
    blob = read_json(path, "eval.json")[0]
    on = (blob.get("evaluated_on"), blob.get("sample_ids"))
    theirs, ours = data_in_words(on, run["evaluated_on"])
    if blob.get("epoch") != last or theirs != ours:
        raise UsageError(f"--from-eval: {path} is of epoch {blob.get('epoch')} on {theirs}, but last.pt holds "
                         f"epoch {last} on {ours}: evaluate it again with python eval.py --checkpoint "
                         f"{run['folder']}")
    return {"numbers": blob["metrics"], "source": f"eval.json {blob.get('split', 'val')} split", "file": path,
            "key": "metrics"}


def row_name(cfg, weighting=True):
    """A short name from the configuration: the model, then the task of a single-task run or the weighting of
    a multi-task one (left out when `weighting` is False), the HRNet when not the paper's, the auxiliary
    tasks, and the seed when not 0: "mtan dwa", "single semantic", "mtinet w48 +normal,edge", "split dwa seed
    1"."""
    parts = [cfg["model"],
             next(iter(cfg["tasks"])) if cfg["single_task"] else weighting and cfg.get("weighting", "equal"),
             cfg["family"] == "hrnet" and cfg["backbone"] != DEFAULT_HRNET and cfg["backbone"],
             cfg.get("aux_tasks") and "+" + ",".join(cfg["aux_tasks"]),
             cfg.get("seed", 0) and f"seed {cfg['seed']}"]
    return " ".join(part for part in parts if part)


def row_names(runs):
    """Unique row names. The weighting is named unless every multi-task run uses equal weighting (as in the
    MTI-Net tables, where it is not what the rows compare); rows whose names differ at most in the seed are
    told apart by the configuration keys in which they differ ("mtan dwa [eval_every 2]"), else (the same
    name) by their folder's name."""
    weighting = any(cfg.get("weighting", "equal") != "equal" for cfg in (r["config"] for r in runs)
                    if not cfg["single_task"])
    names, unique = [row_name(r["config"], weighting) for r in runs], []
    bases = [row_name(dict(r["config"], seed=0), weighting) for r in runs]  # rows that seem to be seeds of one
    for name, base, run in zip(names, bases, runs):
        twins = [r["config"] for b, r in zip(bases, runs) if b == base]
        keys = sorted({k for cfg in twins for k in cfg if k not in RUN_ONLY})
        differ = [f"{k} {run['config'].get(k)}" for k in keys if len({repr(c.get(k)) for c in twins}) > 1]
        folder = os.path.basename(os.path.normpath(run["folder"]))
        unique.append(f"{name} [{', '.join(differ) or folder}]" if differ or names.count(name) > 1 else name)
    return unique


def evaluation_set(cfg):
    """The data a run was evaluated on, in words: runs evaluated on different data cannot share a table."""
    words = [cfg["data"], cfg["data"] == "synthetic" and str(cfg.get("resolution")),
             cfg["data"] == "cityscapes" and f"{cfg.get('num_classes', 7)} classes",
             cfg.get("subset") and f"(first {cfg['subset']} samples)"]
    return " ".join(word for word in words if word)


def sample_ids(dataset):
    """"N samples, ids DIGEST": which samples a split holds, which evaluation_set's words cannot say. The ids
    are the dataset's names of its samples, not its folder's: a moved tree keeps its digest, another tree
    with another val list does not. train.py records it in last.pt ("sample_ids"), eval.py in eval.json."""
    indices = range(len(dataset))
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, [dataset.indices[i] for i in indices]
    ids = getattr(dataset, "ids", range(len(dataset)))
    text = "\n".join([str(getattr(dataset, "split", ""))] + [str(ids[i]) for i in indices])
    return f"{len(indices)} samples, ids {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def data_in_words(a, b):
    """Two evaluations, each (evaluation_set's words, sample_ids), in words that differ exactly when they saw
    different data: the ids are named where the words alone are equal. Ids that one side does not record (a
    file of an older version) are not held against it."""
    if a[0] == b[0] and None not in (a[1], b[1]) and a[1] != b[1]:
        return f"{a[0]}: {a[1]}", f"{b[0]}: {b[1]}"
    return a[0], b[0]


def check_comparable(runs):
    """One-line errors for runs that cannot share a table: a folder given twice, runs evaluated on different
    data (another dataset, resolution, subset, class count or list of samples), a task with different outputs
    in two runs."""
    folders = [os.path.realpath(r["folder"]) for r in runs]
    for r, folder in zip(runs, folders):
        if folders.count(folder) > 1:
            raise UsageError(f"{r['folder']} is given twice to --compare")
    for r in runs[1:]:
        first, other = data_in_words(runs[0]["evaluated_on"], r["evaluated_on"])
        if first != other:
            raise UsageError(f"{runs[0]['folder']} ({first}) and {r['folder']} ({other}) were evaluated on "
                             "different data: they cannot share a table")
    channels = {}
    for r in runs:
        for task, n in r["config"]["tasks"].items():
            seen = channels.setdefault(task, (n, r["folder"]))
            if seen[0] != n:
                raise UsageError(f"task {task} has {seen[0]} outputs in {seen[1]} but {n} in {r['folder']}: "
                                 "the task sets cannot share a table")


def read_baseline_source(path, epoch, from_eval):
    """A --baseline of --compare (of --checkpoint: epoch "last"): a run folder (its numbers chosen as the rows'
    are), train.py's metrics.json (the --epoch key; beside its last.pt, which says what data it was evaluated
    on) or eval.json ("metrics").
    Returns a run as read_finished_run does with the fields of run_numbers, or for a lone file {"folder",
    "config": None, "data" and "evaluated_on" (None where the file does not say), "numbers", "file", "key"}."""
    if os.path.isdir(path) or (os.path.basename(path) == "metrics.json"
                               and os.path.isfile(os.path.join(os.path.dirname(path), "last.pt"))):
        run = read_finished_run(path)
        return dict(run, folder=path, data=run["config"]["data"],
                    **run_numbers(run, epoch, from_eval and os.path.isdir(path)))
    blob, kind = read_json(path, ("eval.json", "metrics.json"), f"--baseline {path}")
    key = "metrics" if kind == "eval.json" else EPOCH_CHOICES[epoch]
    return {"folder": path, "config": None, "data": blob.get("data"), "numbers": blob[key], "file": path,
            "key": key, "evaluated_on": (blob.get("evaluated_on"), blob.get("sample_ids"))}


def find_baselines(runs, named=None):
    """{task: the run whose numbers are that task's single-task reference}. Without `named` (the --baseline
    sources), the first single-task run of each task in command-line order whose model is a plain single-task
    network (single, hrnet-mtl, deeplab), else the first of any single-task model (stan). With `named`, those
    alone, each task from the first source that has it."""
    chosen = {}
    if named:
        for source in named:
            for task in source["numbers"]:
                chosen.setdefault(task, source)
        return chosen
    for plain_only in (True, False):
        for run in runs:
            cfg = run["config"]
            if cfg["single_task"] and (cfg["baseline"] or not plain_only):
                chosen.setdefault(next(iter(cfg["tasks"])), run)
    return chosen


# The configuration keys that change how fast a run goes or where it reads and writes, not what its numbers
# mean: runs that differ only in these are seeds of one row, and each must be another seed. Under --epoch last
# eval_every joins them; the protocol's mean of the last 10 evaluations spans more epochs when they are
# further apart.
RUN_ONLY = ("seed", "out", "device", "workers", "compile", "cuda_graph", "data_on_device", "peak_tflops",
            "data_root", "channels_last", "fused", "deterministic")


def seed_groups(runs, epoch="protocol", per_seed=False):
    """The runs grouped by their configuration without RUN_ONLY (each run alone with per_seed), in command-line
    order: each metric's mean over a group's runs and their sample standard deviation (n - 1 in the
    denominator: statistics.stdev, numpy's ddof=1; None for one run). A group of seeds names no seed. A lone
    --baseline file (no configuration) is a group of its own. check_seeds checks each group."""
    groups, ignored = {}, RUN_ONLY + (("eval_every",) if epoch == "last" else ())
    for run in runs:
        key = repr(sorted(kv for kv in (run["config"] or {"file": run["folder"]}).items() if kv[0] not in ignored))
        groups.setdefault(key, []).append(run)
    for members in groups.values():
        check_seeds(members)
    rows = []
    for members in [[run] for run in runs] if per_seed else groups.values():
        cfg, results, std = members[0]["config"], [run["numbers"] for run in members], None
        if len(members) > 1:
            cfg = {k: v for k, v in cfg.items() if k != "seed"}
            std = {t: {k: statistics.stdev([r[t][k] for r in results]) for k in values}
                   for t, values in results[0].items()}
        rows.append({"folder": members[0]["folder"], "runs": [r["folder"] for r in members], "members": members,
                     "config": cfg, "numbers": average_results(results), "std": std})
    return rows


def check_seeds(members):
    """One-line errors, naming the file and the key, for a seed group that is not distinct seeds with the same
    finite metrics: a copy of a run is not a second seed, and a mean ± std needs every number of every seed."""
    seeds, names = {}, lambda run: {f"{t} {m}" for t, values in run["numbers"].items() for m in values}
    for run in members if len(members) > 1 else []:  # a row of one run shows its numbers as they are
        seed = (run["config"] or {}).get("seed", 0)  # a lone --baseline file given twice: seed 0 twice
        twin = seeds.setdefault(seed, run)
        if twin is not run:
            raise UsageError(f"{twin['folder']} and {run['folder']} are both seed {seed} of one configuration: a "
                             "copy of a run is not a second seed (drop one, or train another)")
        for a, b in ((run, members[0]), (members[0], run)):
            bad = [f"{n} under '{a['key']}' is not a finite number" for n in non_finite_metrics(a["numbers"])]
            bad += [f"no {n} under '{a['key']}', which {b['file']} has" for n in sorted(names(b) - names(a))]
            if bad:
                raise UsageError(f"{a['file']}: {bad[0]}: the seeds of a row need the same finite metrics")


def row_delta_m(numbers, reference, tasks, convention):
    """(Delta_m in %, the tasks it covers) of one row against {task: single-task numbers}, or (None, []) when
    the convention has nothing to measure. mtinet and libmtl use the row's main tasks that have a baseline;
    the nyuv2-9 convention needs all of semantic, depth and normal."""
    if convention == "nyuv2-9":
        tasks = ["semantic", "depth", "normal"]
        if not all(t in numbers and t in reference for t in tasks):
            return None, []
    if not tasks:
        return None, []
    try:
        return delta_m(numbers, reference, convention=convention, tasks=tasks), tasks
    except (KeyError, ValueError) as e:  # a baseline metric of 0, a metric missing from a file
        raise UsageError(f"Delta_m ({convention} convention): {e}") from None


def compare_runs(folders, epoch="protocol", convention="mtinet", baseline=None, from_eval=False,
                 per_seed=False):
    """The rows of the --compare table, one per seed group (seed_groups) in command-line order: dicts with the
    row's name, runs, seeds and n, model, dataset, tasks, parameter count, epochs, evaluations averaged, metrics
    (the seeds' mean) and std, Delta_m (the mean of the seeds' Delta_m, each against the mean of the baseline's
    seeds) and its std, the tasks it covers and the baseline of each, and where the numbers come from."""
    if not folders:
        raise UsageError("--compare needs at least one run folder, e.g. eval.py --compare runs/mtan-table/*")
    runs = [read_finished_run(folder) for folder in folders]
    check_comparable(runs)
    for run in runs:
        run.update(run_numbers(run, epoch, from_eval))
    if from_eval and len({run["source"] for run in runs}) > 1:
        raise UsageError("--from-eval: the eval.json files are of different splits ("
                         + ", ".join(f"{r['folder']}: {r['source']}" for r in runs) + ")")
    named = None
    if baseline:  # the runs of one configuration among them are seeds of one baseline, as among the rows
        named = [read_baseline_source(path, epoch, from_eval) for path in baseline.split(",")]
        for source in named:
            theirs, ours = data_in_words(source["evaluated_on"], runs[0]["evaluated_on"])
            if source["data"] not in (None, runs[0]["config"]["data"]) or theirs not in (None, ours):
                raise UsageError(f"--baseline {source['folder']} is a {source['data']} run "
                                 f"({theirs or source['data']}), the compared runs are on {ours}: they cannot "
                                 "share a table")
            if len(source["numbers"]) > 1:
                raise UsageError(f"--baseline {source['folder']} is a multi-task run (tasks "
                                 f"{', '.join(source['numbers'])}): a baseline is a single-task run")
        named = seed_groups(named, epoch)
    groups = seed_groups(runs, epoch, per_seed)
    baselines = find_baselines(groups, named)
    reference = {task: source["numbers"][task] for task, source in baselines.items()}
    rows = []
    for group, name in zip(groups, row_names(groups)):
        cfg, members = group["config"], group["members"]
        # Main tasks only: MTI-Net's Delta_m leaves the auxiliary tasks out (train.py does not evaluate them).
        tasks = [t for t in cfg["tasks"] if t in reference]
        deltas = [row_delta_m(run["numbers"], reference, tasks, convention) for run in members]
        (value, covered), values, spread = deltas[0], [d for d, _ in deltas], None
        if value is not None and len(values) > 1:  # n - 1 in the denominator, as for the metrics
            value, spread = statistics.fmean(values), statistics.stdev(values)
        evaluations = min([10] + [r["evaluations"] or 10 for r in members])
        evaluated = 1 if (epoch == "last" or from_eval) else evaluations
        rows.append({"name": name, "run": group["folder"], "runs": group["runs"], "n": len(members),
                     "seeds": [r["config"].get("seed", 0) for r in members], "model": cfg["model"],
                     "family": cfg["family"], "data": cfg["data"],
                     "evaluated_on": evaluation_set(cfg), "tasks": list(cfg["tasks"]),
                     "aux_tasks": list(cfg.get("aux_tasks") or {}),
                     "params": members[0]["params"], "epochs": members[0]["metrics"]["epochs"],
                     "evaluations": evaluated, "numbers": members[0]["source"], "metrics": group["numbers"],
                     "std": group["std"], "delta_m": value, "delta_m_std": spread, "delta_m_tasks": covered,
                     "baselines": {t: ",".join(baselines[t]["runs"]) for t in covered}})
    return rows


def comparison_style(rows):
    """format_table's style: the MTI-Net paper's one metric per task for its datasets (NYUD, PASCAL) and its
    models, MTAN's CityScapes columns on CityScapes, else MTAN's NYUv2 columns (the synthetic scenes too)."""
    if rows[0]["data"] in ("nyud", "pascal") or any(r["family"] == "hrnet" for r in rows):
        return "mtinet"
    return "mtan-cityscapes" if rows[0]["data"] == "cityscapes" else "mtan"


def table_tasks(rows):
    """Every main task of the table, multi-task rows' order first (a single-task row lists one task)."""
    tasks = []
    for row in sorted(rows, key=lambda r: len(r["tasks"]) == 1):  # stable: command-line order otherwise
        tasks += [t for t in row["tasks"] if t not in tasks]
    return tasks


def format_params(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def span(values):
    """"10" for equal values, "2-10" for a range."""
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


CONVENTION_WORDS = {
    "mtinet": "mtinet convention (Maninis et al. 2019, MTI-Net: one metric per main task; higher is better)",
    "nyuv2-9": "nyuv2-9 convention (the 9 NYUv2 metrics of semantic, depth and normal; lower is better)",
    "libmtl": "libmtl convention (every metric, averaged per task, then over tasks; higher is better)",
}


def format_comparison(doc):
    """The Markdown table of --compare with the lines above it that say which numbers it shows and what
    Delta_m measures against, and a note under it for rows whose Delta_m leaves tasks out."""
    rows, tasks = doc["rows"], table_tasks(doc["rows"])
    epochs, evaluations = span([r["epochs"] for r in rows]), span([r["evaluations"] for r in rows])
    if doc["from_eval"]:
        split = rows[0]["numbers"].split(" ", 1)[1]  # "eval.json val split" -> "val split"
        numbers = f"the eval.json of each run ({split}, from python eval.py --checkpoint)"
    elif doc["epoch"] == "protocol":
        numbers = (f"the mean of the last {evaluations} evaluations of each run (the MTAN paper's protocol; "
                   "--epoch last for the last one)")
    else:
        numbers = "the last evaluation of each run (--epoch protocol for the mean of the last 10)"
    lines = [f"numbers: {numbers}, after {epochs} epochs, data: {rows[0]['evaluated_on']}"]
    seeds = any(r["n"] > 1 for r in rows)
    if seeds:
        lines.append("a row of n seeds: mean ± sample standard deviation (n - 1) over its seeds; its "
                     "Delta_m: the mean ± std of its seeds' Delta_m, each against the mean of the baseline's "
                     "seeds")
    if doc["baselines"]:
        against = ", ".join(f"{task} {folder}" for task, folder in doc["baselines"].items())
        lines.append(f"Delta_m: {CONVENTION_WORDS[doc['convention']]}, against {against}")
    else:
        lines.append(f"Delta_m: no single-task run of {', '.join(tasks)} among the runs (add them, or pass "
                     "--baseline)")
    table = []
    for r in rows:
        cells = table_row(r["metrics"], tasks, doc["style"])
        if r["std"]:  # the same columns, scales and decimals
            cells = [(h, v if s == "-" else f"{v} ± {s}")
                     for (h, v), (_, s) in zip(cells, table_row(r["std"], tasks, doc["style"]))]
        delta = "-" if r["delta_m"] is None else f"{round(r['delta_m'], 9) + 0:+.2f}"  # + 0: no "-0.00"
        delta += "" if r["delta_m_std"] is None else f" ± {r['delta_m_std']:.2f}"
        cells = ([("n", str(r["n"]))] if seeds else []) + cells + [("Params", format_params(r["params"])),
                                                                   (DELTA_M_HEADER, delta)]
        table.append((r["name"], cells))
    lines += ["", format_table(table)]
    for r in rows:
        left_out = [t for t in r["tasks"] if t not in r["delta_m_tasks"]]
        if r["delta_m"] is not None and left_out:
            lines.append(f"{r['name']}: Delta_m without {', '.join(left_out)} (no single-task baseline)")
    return "\n".join(lines)


def compare_command(args):
    """`python eval.py --compare RUN ...`: the table (Markdown, or with --json one JSON document) of finished
    runs; returns the document."""
    check_flags(args, "compare")
    if args.from_eval and args.epoch == "protocol":
        raise UsageError("--from-eval replaces the last evaluation by eval.json's; it goes with --epoch last, "
                         "not --epoch protocol")
    epoch = args.epoch or ("last" if args.from_eval else "protocol")
    rows = compare_runs(args.compare, epoch=epoch, convention=args.convention, baseline=args.baseline,
                        from_eval=args.from_eval, per_seed=args.per_seed)
    baselines = {task: runs for row in rows for task, runs in row["baselines"].items()}
    doc = {"epoch": epoch, "from_eval": args.from_eval, "convention": args.convention,
           "style": args.style or comparison_style(rows), "data": rows[0]["data"],
           "baselines": dict(sorted(baselines.items(), key=lambda kv: table_tasks(rows).index(kv[0]))),
           "rows": rows}
    print(strict_json(doc, indent=2) if args.json else format_comparison(doc))
    return doc


def count_parameters(state_dict):
    """Parameters of a model from its state dict (BatchNorm statistics and other buffers excluded)."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(v.numel() for k, v in state_dict.items() if not k.endswith(buffers) and v.is_floating_point())


# ------------------------------------------------------------------------------------------------------------
# Appendix B. Pictures: predictions and attention masks (--save-vis, --image)
# ------------------------------------------------------------------------------------------------------------


def task_picture(task, tensor, num_classes, truth=None):
    """A (H, W, 3) uint8 picture of one task's target or prediction (data.py's colour maps). A depth
    prediction given its `truth` is drawn on the truth's range, so equal colours mean equal depths."""
    import data

    if task in ("semantic", "parts"):
        labels = tensor.argmax(0) if tensor.dim() == 3 else tensor
        return data.colorize_semantic(labels.cpu(), num_classes)
    if task == "depth":
        valid = tensor.new_zeros(0) if truth is None else truth[truth > 0]
        scale = dict(min_depth=float(valid.min()), max_depth=float(valid.max())) if valid.numel() else {}
        return data.colorize_depth(tensor.float().cpu(), **scale)
    if task == "normal":
        return data.colorize_normal(tensor.float().cpu())
    probability = torch.sigmoid(tensor.float()) if tensor.min() < 0 or tensor.max() > 1 else tensor.float()
    grey = (probability[0].clamp(0, 1) * 255).byte().cpu().numpy()
    return grey[..., None].repeat(3, axis=2)


def save_row(tiles, names, path):
    """(H, W, 3) uint8 pictures side by side, 2 white pixels apart, each named in a strip above it."""
    from PIL import Image, ImageDraw

    height, gap, strip = tiles[0].shape[0], 2, 14
    widths = [t.shape[1] for t in tiles]
    row = Image.new("RGB", (sum(widths) + gap * (len(tiles) - 1), height + strip), "white")
    draw, x = ImageDraw.Draw(row), 0
    for tile, name, width in zip(tiles, names, widths):
        row.paste(Image.fromarray(tile), (x, strip))
        draw.text((x + 2, 1), name, fill="black")
        x += width + gap
    row.save(path)


def image_picture(image):
    return (image.clamp(0, 1).permute(1, 2, 0) * 255).byte().cpu().numpy()


def model_outputs(model, image, with_attention):
    """Predictions (and MTAN's attention masks when asked and available) for a (1, 3, H, W) batch."""
    with torch.no_grad():
        return model(image, return_attention=True) if with_attention else (model(image), None)


def has_attention(model):
    return "return_attention" in inspect.signature(model.forward).parameters


def attention_picture(mask):
    """The first encoder attention mask of a task (C, H, W) as a picture: the channel mean, rescaled per image
    as in the MTAN paper's Fig. 5, in a blue-to-yellow colour map."""
    import data

    mean = mask.float().mean(0)
    mean = (mean - mean.min()) / (mean.max() - mean.min()).clamp_min(1e-12)
    return data.colorize_depth(mean[None] + 1e-3)


def save_visualisations(args, cfg, model, dataset, device, normalise):
    """One PNG per sample: the input, then ground truth and prediction of every task; for MTAN one more PNG
    with the first encoder stage's attention mask of each task (the paper's Fig. 5)."""
    os.makedirs(args.save_vis, exist_ok=True)
    attention_wanted = has_attention(model)
    for i in range(min(args.num_vis, len(dataset))):
        sample = dataset[i]
        image = sample["image"][None].to(device)
        preds, attention = model_outputs(model, normalise(image), attention_wanted)
        tiles, names = [image_picture(sample["image"])], ["input"]
        for task, channels in cfg["tasks"].items():
            tiles += [task_picture(task, sample[task], channels),
                      task_picture(task, preds[task][0], channels, truth=sample[task])]
            names += [f"{task} truth", f"{task} predicted"]
        save_row(tiles, names, os.path.join(args.save_vis, f"{i:03d}_gt_pred.png"))
        if attention:
            masks = [attention_picture(attention[task][0][0]) for task in cfg["tasks"]]
            save_row([tiles[0]] + masks, ["input"] + [f"{task} attention" for task in cfg["tasks"]],
                     os.path.join(args.save_vis, f"{i:03d}_attention.png"))
    print(f"wrote {min(args.num_vis, len(dataset))} samples to {args.save_vis} (columns: input, then ground "
          f"truth and prediction of {', '.join(cfg['tasks'])})")


MAX_SIDE = 1024  # --image: the longest side the model sees (a 4000x4000 photo would not fit in memory)


def predict_image(args, cfg, model, device, normalise):
    """Run one image of any size: resized to the run's resolution (synthetic scenes) or to multiples of 32
    (SegNet and HRNet need them) with at most MAX_SIDE pixels a side, one picture per task resized back to the
    original size, written into a new folder beside the image (no file is replaced)."""
    from PIL import Image

    array = read_image(args.image)
    height, width = array.shape[:2]
    scale = min(1.0, MAX_SIDE / max(height, width))
    size = (max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32))
    if cfg["data"] == "synthetic":
        size = dataset_options(cfg)["resolution"]
    image = torch.from_numpy(array).permute(2, 0, 1)[None].to(device)
    image = F.interpolate(image, size=size, mode="bilinear", antialias=True)
    preds, _ = model_outputs(model, normalise(image), False)
    folder = new_folder(os.path.splitext(args.image)[0] + "_predictions")
    written = []
    for task, channels in cfg["tasks"].items():
        picture = Image.fromarray(task_picture(task, preds[task][0].float(), channels))  # labels: nearest
        resample = Image.NEAREST if task in ("semantic", "parts") else Image.BILINEAR
        written.append(os.path.join(folder, f"{task}.png"))
        picture.resize((width, height), resample).save(written[-1])
    print(f"wrote {', '.join(os.path.basename(p) for p in written)} into the new folder {folder}")
    return written


def read_image(path):
    """(H, W, 3) float32 in [0, 1]: data.read_image (any bit depth, EXIF orientation), a rescaling said on one
    line, an unreadable file one error line."""
    import data

    try:
        return data.read_image(path, note=lambda line: print(f"note: --image {line}")).permute(1, 2, 0).numpy()
    except data.UnreadableFileError as e:
        raise UsageError(f"cannot read --image {e.path}: {e.problem}") from None


# ------------------------------------------------------------------------------------------------------------
# Appendix C. The Visual Decathlon challenge's results format
# ------------------------------------------------------------------------------------------------------------
#
# The Decathlon server takes one JSON list of {"image_id", "category_id"} for the test images, ids as in the
# devkit's COCO-style ROOT/annotations/<domain>_test_stripped.json ("images": id and file_name; "categories":
# id). Class index i (the i-th class folder in sorted order, as ImageFolder numbers them) is taken to be the
# i-th category in sorted id order. This is the assumption of the official MTAN script coco_results.py, and it
# holds when the class folders sort like the category ids (the devkit numbers both in the same order).


def test_annotations(root, domains):
    """{domain: path of its test annotations} for the domains that have the file."""
    paths = {d: os.path.join(str(root), "annotations", f"{d}_test_stripped.json") for d in domains}
    return {d: p for d, p in paths.items() if os.path.isfile(p)}


def read_test_annotations(root, path):
    """([(image id, image path)], [category ids sorted]) from a *_test_stripped.json. A file_name reads
    "data/<domain>/test/..." in the devkit: the path under ROOT is what follows "data/"."""
    import data

    try:
        with open(path) as f:
            blob = json.load(f)
        images = [(int(im["id"]), str(im["file_name"])) for im in blob["images"]]
        categories = sorted(int(c["id"]) for c in blob["categories"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise data.DatasetError(f"cannot read test annotations {path}: {type(e).__name__}: {e}") from None
    files = [(i, os.path.join(root, name.removeprefix("data/"))) for i, name in images]
    return files, categories


def write_decathlon_results(args, cfg, model, device, calibration):
    """Predict every annotated test image of each domain and write results.json beside the checkpoint."""
    import data

    results, counts = [], {}
    for domain, path in test_annotations(cfg["data_root"], list(cfg["tasks"])).items():
        files, categories = read_test_annotations(cfg["data_root"], path)
        dataset = data.Decathlon(cfg["data_root"], domain, "train", train=False)  # the classes and transform
        if len(categories) != len(dataset.classes):
            raise data.DatasetError(f"{path}: {len(categories)} categories, but {len(dataset.classes)} class "
                                    f"folders in {os.path.join(cfg['data_root'], domain, 'train')}")
        dataset.files = [(p, -1) for _, p in files]  # the annotated test images instead of the training ones
        index = list(cfg["tasks"]).index(domain)
        saved = calibrate_batchnorm(model, calibration[domain], index, cfg, device)
        with torch.no_grad(), autocast(cfg["amp"], device):
            predicted = torch.cat([model(batch["image"].to(device), index).argmax(1).cpu()
                                   for batch in evaluation_loader(dataset, cfg)])
        restore_batchnorm(saved)
        results += [{"image_id": i, "category_id": categories[c]} for (i, _), c in zip(files, predicted.tolist())]
        counts[domain] = len(files)
    out = os.path.join(run_folder(args.checkpoint), "results.json")
    write_text_atomic(json.dumps(results), out)
    print(f"wrote {out}: {len(results)} test predictions ({', '.join(f'{d} {n}' for d, n in counts.items())})")
    return {"results": out, "predictions": counts}


# ------------------------------------------------------------------------------------------------------------
# Appendix D. Machinery shared with train.py
#
# Atomic writes and strict JSON, the one-line errors of both command lines and their number types, the amp and
# cuDNN settings, and the clock of --bench. train.py imports them from here (train.py imports eval.py, never
# the other way round).
# ------------------------------------------------------------------------------------------------------------

DECATHLON_DATASETS = ("decathlon", "synthetic-decathlon")


def dataset_options(cfg):
    """The data.build_dataset options of a run's configuration."""
    import data

    if cfg["data"] == "synthetic":  # cache: render each scene once; later epochs read it from memory
        return {"resolution": data.parse_resolution(cfg["resolution"], flag="--resolution"), "cache": True}
    if cfg["data"] == "cityscapes":
        return {"num_classes": cfg["num_classes"]}
    # PASCAL augments each sample itself (rotation, scale, fixed resize)
    return {"augment": cfg["augment"]} if cfg["data"] == "pascal" else {}


def write_atomic(path, write):
    """`write(tmp)` writes a temporary file, then a rename puts it at `path` (os.replace is atomic on POSIX):
    a reader, or a run killed at any moment, sees the previous complete file or the new one, never half a
    file. The temporary name carries the process id, so two processes never write into each other's; a failed
    write (a full disk) removes it, leaves the previous file as it was, and is reported under `path`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        # torch's file writer reports a full disk as a RuntimeError ("unexpected pos ..."): ask the disk
        full = isinstance(e, RuntimeError) and shutil.disk_usage(os.path.dirname(path) or ".").free < 2**20
        if full or (isinstance(e, OSError) and e.errno):
            code = errno.ENOSPC if full else e.errno
            raise OSError(code, os.strerror(code), path) from None
        raise


def write_text_atomic(text, path):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def first_line(error):
    """An exception's message on one line. torch lists every mismatched tensor of a state dict below a heading
    ("Error(s) in loading state_dict for MTAN:"): keep the heading, the first mismatch and how many follow."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}" + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    return lines[0]


def new_folder(path):
    """Create a folder that did not exist, `path` or else `path-2`, `path-3`, ..., and return it: os.mkdir
    is exclusive, so of two processes started together each gets its own, and no file there is replaced."""
    for folder in [path] + [f"{path}-{count}" for count in range(2, 1000)]:
        with contextlib.suppress(FileExistsError):
            os.makedirs(folder)
            return folder
    raise UsageError(f"cannot create a new folder {path}: {path}-2 to {path}-999 exist too")


def remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def strict_json(obj, **options):
    """json.dumps that writes only standard JSON: a non-finite float (NaN, inf) becomes null. Python's default
    writes NaN and Infinity, which strict parsers (browsers, jq, most other languages) reject."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **options)


def finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def non_finite_metrics(results):
    """["task metric", ...] of the non-finite values of a {task: {metric: value}} dict."""
    return [f"{task} {name}" for task, values in results.items() for name, value in values.items()
            if isinstance(value, float) and not math.isfinite(value)]


# ---- one-line errors ---------------------------------------------------------------------------------------

# OS errors a user causes (a full disk, a read-only or missing folder): one line instead of a traceback. Any
# other exception is a bug of this repository and keeps its traceback.
USER_OS_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "read-only file system", errno.ENOENT: "no such file or folder",
                  errno.ENOTDIR: "not a folder", errno.EISDIR: "is a folder", errno.EEXIST: "already exists"}


class UsageError(Exception):
    """A mistake on the command line or in a file it names: `error: ...` on one line, no traceback."""


def error_line(error, full_disk_hint=""):
    """The `error: ...` line each script's `main` exits with, for the errors a user can cause: this
    repository's own (data.DatasetError, CheckpointError, UsageError, FloatingPointError) and USER_OS_ERRORS.
    Any other OSError is raised again with its traceback. `full_disk_hint` follows a full-disk error
    (train.py: the run folder keeps its last good checkpoint)."""
    message = str(error)
    if "Original Traceback" in message:  # raised in a DataLoader worker, which wraps it in its traceback
        message = re.split(rf"\n\S*{type(error).__name__}: ", message, maxsplit=1)[-1]
    if not isinstance(error, OSError):  # a DatasetError's first line is the error; the expected layout
        return f"error: {message}"  # and the download follow it
    if error.errno not in USER_OS_ERRORS:
        raise error
    where = f": {error.filename}" if error.filename else ""
    hint = full_disk_hint if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"error: {USER_OS_ERRORS[error.errno]}{where}{hint}"


def resource_error(error, sizes):
    """The `error: ...` line of running out of memory (on a GPU or the CPU) with the `sizes` that caused it,
    or of BatchNorm given a batch of one sample. Any other error is a bug: raised again with its traceback."""
    memory = re.search(r"out of memory|not enough memory|can't allocate", str(error))
    if memory or isinstance(error, MemoryError):
        return (f"error: out of memory with {sizes}: lower --batch-size (or --width, --resolution, --subset "
                f"for --data-on-device), or pass --device cpu")
    if "Expected more than 1 value per channel" in str(error):
        return (f"error: a batch of one sample ({sizes}): this model's BatchNorm needs batches of two or "
                f"more: raise --batch-size (or --subset)")
    raise error


def stop_quietly(stop, next_step=""):
    """Ctrl-C (exit status 130) or the reader of stdout gone (`train.py ... | head -1`, status 1): one line on
    stderr. Stdout goes to /dev/null first: flushing the closed pipe at exit would raise again."""
    if isinstance(stop, BrokenPipeError):
        with contextlib.suppress(OSError, ValueError):  # io.UnsupportedOperation: no file descriptor (tests)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    interrupted = isinstance(stop, KeyboardInterrupt)
    what = "interrupted (Ctrl-C)" if interrupted else "stdout was closed (a pipe's reader ended)"
    print(f"error: {what}{next_step}", file=sys.stderr, flush=True)
    sys.exit(130 if interrupted else 1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `error: argument --lr: must be > 0, got 0` instead of the usage block
    (train.py's usage alone is 20 lines) followed by the message."""

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists every flag)\n")


def number_type(kind, low, low_inclusive=True, high=math.inf):
    """An argparse `type`: an int or a finite float at least (or, with low_inclusive=False, above) `low`, and
    below `high`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not low_inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if low_inclusive else '>'} {low:g}, got {text}")
        if value >= high:
            raise argparse.ArgumentTypeError(f"must be < {high}, got {text}")
        return value
    return parse


def text(value):
    """The argparse `type` of every string flag (paths, names, lists): an empty or blank value is refused, so
    that an unset shell variable (`--resume "$RUN"`) is an error rather than the flag's default."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty string (an unset shell variable?)")
    return value


positive_int = number_type(int, 1)


# ---- speed settings and measurement ------------------------------------------------------------------------


def default_amp(device):
    """The precision a device gets unless --amp says otherwise: bf16 autocast on a GPU (fp16 on GPUs without
    bf16 units, such as the V100 and T4), fp32 on a CPU (bf16 is slower on CPUs without bf16 units, and fp32
    keeps CPU results identical across machines)."""
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "off"


def configure_torch(cfg):
    """--deterministic, or on a GPU the fast settings: TF32 matrix products and convolutions."""
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif cfg["device"] == "cuda":
        # No cuDNN autotuner (cudnn.benchmark): on an H200 it gained nothing measurable, took half a minute at
        # the start and its trial workspaces tripled the peak memory (README, Performance).
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    """Peak memory: allocated CUDA memory on a GPU, the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class DeviceClock:
    """Time marks on the device's timeline, for `--bench` in train.py and here. On a GPU, CUDA events recorded
    between steps let the steps run back to back with no synchronisation; one synchronisation at the end reads
    them. On a CPU every op has finished when it returns, so the wall clock is read directly. Creating the
    clock resets the GPU's peak-memory counter."""

    def __init__(self, device):
        self.device, self.marks = device, []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def start(self):
        synchronize(self.device)
        self.marks = [self._now()]

    def mark(self):
        self.marks.append(self._now())

    def _now(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def median_seconds(self, run, times):
        """Call run(i) for i in range(times), back to back; the median seconds of one call."""
        self.start()
        for i in range(times):
            run(i)
            self.mark()
        return self.median_interval()

    def median_interval(self):
        """The median time in seconds between consecutive marks."""
        synchronize(self.device)
        cuda = self.device.type == "cuda"
        times = sorted(a.elapsed_time(b) / 1000 if cuda else b - a for a, b in zip(self.marks, self.marks[1:]))
        return times[len(times) // 2]


def speed_fields(cfg, device, image):
    """The fields every --bench line carries: memory, device, precision, layout, batch and resolution."""
    return {"peak_mem_mb": round(peak_memory_mb(device), 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "amp": cfg["amp"], "channels_last": cfg["channels_last"], "batch_size": image.shape[0],
            "resolution": "x".join(map(str, image.shape[-2:]))}


if __name__ == "__main__":
    main()
