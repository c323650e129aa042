"""Train any model of this repository on any dataset: `python train.py --model mtan --data nyuv2`.

Read top to bottom, this file is:

1. Losses, one per task, written once (MTAN recipe and MTI-Net recipe).
2. Task weighting: equal, uncertainty (Kendall et al.) and DWA (MTAN paper, Eq. 7). Each is a small class
   that depends on torch only, so it can be lifted into another training loop.
3. The model table: which class builds each `--model`, and the recipe (optimiser, schedule, epochs, batch)
   of its family. Adding a model family means adding a row here, not touching the loop.
4. The loop: one epoch of training with no host-device synchronisation inside the step, evaluation with
   eval.py's accumulators, an atomic checkpoint after every epoch, exact resume.
5. The command line.

`python train.py` with no argument is the quickstart: MTAN with DWA on the embedded synthetic scenes,
small enough to finish on a laptop CPU in a few minutes.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as evaluation  # `eval` is a Python builtin; the module keeps its file name for the command line
import mtan
import mtinet

# ----------------------------------------------------------------------------------------------------------
# 1. Losses
#
# Every loss returns a 0-dim fp32 tensor and divides by `mask.sum().clamp_min(1)`: the count stays on the
# device (the official code's `torch.nonzero(...).size(0)` forces a host sync every step), and a batch with no
# valid pixel gives a loss of 0 instead of NaN.
# ----------------------------------------------------------------------------------------------------------


def cross_entropy_loss(logits, target):
    """Semantic segmentation and human parts: pixel-wise cross entropy, label -1 ignored (MTAN Eq. 5)."""
    total = F.cross_entropy(logits.float(), target, ignore_index=-1, reduction="sum")
    return total / (target != -1).sum().clamp_min(1)


def depth_l1_loss(pred, target):
    """Depth: L1 over valid pixels (target 0 = invalid), as in both official codebases."""
    mask = (target != 0).float()  # (B, 1, H, W)
    return ((pred.float() - target).abs() * mask).sum() / mask.sum().clamp_min(1)


def normal_validity(target):
    """(B, 1, H, W) float mask of valid normals. The contract marks invalid normals by an all-zero vector.

    Deviation: the official MTAN code tests `sum of the 3 components != 0`, which also drops a valid normal
    whose components happen to sum to 0; we test the absolute sum instead."""
    return (target.abs().sum(dim=1, keepdim=True) != 0).float()


def normal_cosine_loss(pred, target):
    """MTAN recipe: 1 - mean cosine similarity over valid pixels (Eq. 6 of the MTAN paper, as 1 - ...)."""
    mask = normal_validity(target)
    unit = F.normalize(pred.float(), dim=1, eps=1e-12)
    return 1 - (unit * target * mask).sum() / mask.sum().clamp_min(1)


def normal_l1_loss(pred, target):
    """MTI-Net recipe: L1 between the L2-normalised prediction and the target, averaged over the valid
    elements (3 per valid pixel), as the official `NormalsLoss(normalize=True, norm=1)`."""
    mask = normal_validity(target)
    unit = F.normalize(pred.float(), dim=1, eps=1e-12)
    return ((unit - target).abs() * mask).sum() / (3 * mask.sum()).clamp_min(1)


def balanced_bce_loss(logits, target, pos_weight=None):
    """Edges and saliency: binary cross entropy with positives weighted by w and negatives by 1 - w,
    summed and divided by the number of pixels (MTI-Net's `BalancedCrossEntropyLoss`).

    Edges use the fixed w = 0.95; saliency uses w = (#negatives / #pixels) of the batch."""
    positive = (target >= 0.5).float()
    if pos_weight is None:
        pos_weight = 1 - positive.mean()
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), positive, reduction="none")
    weights = pos_weight * positive + (1 - pos_weight) * (1 - positive)
    return (weights * per_pixel).sum() / positive.numel()


def task_loss(task, pred, target, normal_loss="cosine"):
    """The loss of one task. `normal_loss` is "cosine" (MTAN recipe) or "l1" (MTI-Net recipe)."""
    if task in ("semantic", "parts"):
        return cross_entropy_loss(pred, target)
    if task == "depth":
        return depth_l1_loss(pred, target)
    if task == "normal":
        return normal_cosine_loss(pred, target) if normal_loss == "cosine" else normal_l1_loss(pred, target)
    if task == "edge":
        return balanced_bce_loss(pred, target, pos_weight=0.95)
    if task == "saliency":
        return balanced_bce_loss(pred, target)
    raise ValueError(f"no loss is defined for task {task!r}")


def upsample_to(pred, target):
    """Bilinear upsampling of a coarse prediction to the label size (MTI-Net deep supervision, Sec. 3.7)."""
    size = target.shape[-2:]
    if pred.shape[-2:] == size:
        return pred
    return F.interpolate(pred, size=size, mode="bilinear", align_corners=False)


def multitask_losses(outputs, batch, loss_tasks, normal_loss):
    """(K,) fp32 tensor of per-task losses, in the order of `loss_tasks`.

    `outputs` is either the model's prediction dict, or `(preds, aux)` for models with deep supervision
    (MTI-Net, PAD-Net): aux is a list of per-scale dicts of initial predictions, each supervised with the same
    loss at the label size (MTI-Net's loss: sum over scales s and tasks t of L_t(up(P_t^s)) + final losses)."""
    preds, aux = outputs if isinstance(outputs, tuple) else (outputs, [])
    losses = []
    for task in loss_tasks:
        target = batch[task]
        loss = task_loss(task, preds[task], target, normal_loss) if task in preds else 0.0
        for scale in aux:
            if task in scale:
                loss = loss + task_loss(task, upsample_to(scale[task], target), target, normal_loss)
        losses.append(loss)
    return torch.stack(losses)


# ----------------------------------------------------------------------------------------------------------
# 2. Task weighting
#
# Each weighting turns the (K,) vector of task losses into one scalar to back-propagate. All three keep their
# state as tensors or plain lists, so a checkpoint stores them and resume is exact.
# ----------------------------------------------------------------------------------------------------------


class EqualWeighting(nn.Module):
    """Equal weighting: the plain sum of the task losses (the official code sums, it does not average)."""

    def __init__(self, num_tasks):
        super().__init__()
        self.num_tasks = num_tasks

    def weights(self):
        return torch.ones(self.num_tasks)

    def forward(self, losses):  # (K,) -> scalar
        return losses.sum()

    def end_epoch(self, epoch_losses):
        pass


class UncertaintyWeighting(nn.Module):
    """Kendall, Gal and Cipolla (CVPR 2018) as the official MTAN code applies it: one learned log-variance
    s_k per task and the loss sum_k exp(-s_k)/2 * L_k + s_k/2, the same form for every task (classification
    included). s starts at -0.5, so every task starts with the weight exp(0.5)/2 = 0.8244.
    The total can become negative: the s_k/2 terms are not bounded below."""

    def __init__(self, num_tasks, initial=-0.5):
        super().__init__()
        self.log_variance = nn.Parameter(torch.full((num_tasks,), float(initial)))

    def weights(self):
        return (torch.exp(-self.log_variance) / 2).detach()

    def forward(self, losses):
        s = self.log_variance
        return (torch.exp(-s) / 2 * losses + s / 2).sum()

    def end_epoch(self, epoch_losses):
        pass


class DynamicWeightAverage(nn.Module):
    """Dynamic Weight Average, MTAN paper Eq. (7):

        w_k(t-1) = L_k(t-1) / L_k(t-2)
        lambda_k(t) = K * exp(w_k(t-1) / T) / sum_i exp(w_i(t-1) / T)

    L_k(t) is the mean over the training batches of epoch t of the *unweighted* loss of task k (the author
    confirmed: unweighted, issue #53). For the first two epochs there is no ratio yet and lambda = 1.
    The weights sum to K and stay fixed for a whole epoch."""

    def __init__(self, num_tasks, temperature=2.0):
        super().__init__()
        self.num_tasks = num_tasks
        self.temperature = temperature
        self.history = []  # one list of K epoch-mean losses per finished epoch (plain floats: checkpointable)
        self.register_buffer("lambdas", torch.ones(num_tasks))

    def weights(self):
        return self.lambdas.detach().clone()

    def forward(self, losses):
        return (self.lambdas.to(losses.device) * losses).sum()

    def end_epoch(self, epoch_losses):
        """Record this epoch's mean losses and compute the weights of the next epoch (Eq. 7)."""
        self.history.append([float(v) for v in epoch_losses])
        if len(self.history) < 2:
            return
        ratio = torch.tensor(self.history[-1]) / torch.tensor(self.history[-2])  # w_k(t-1), (K,)
        self.lambdas.copy_(self.num_tasks * torch.softmax(ratio / self.temperature, dim=0))

    def get_extra_state(self):
        return {"history": self.history}

    def set_extra_state(self, state):
        self.history = [list(map(float, row)) for row in state["history"]]


def build_weighting(name, num_tasks, temperature=2.0):
    if name == "equal":
        return EqualWeighting(num_tasks)
    if name == "uncertainty":
        return UncertaintyWeighting(num_tasks)
    if name == "dwa":
        return DynamicWeightAverage(num_tasks, temperature)
    raise ValueError(f"--weighting must be one of equal, uncertainty, dwa (got {name!r})")


# ----------------------------------------------------------------------------------------------------------
# 3. Models and recipes
#
# RECIPES holds each model family's published training recipe; MODELS maps every `--model` name to its family
# and to a function building it from the task dict and the configuration. Flags override any recipe value.
# ----------------------------------------------------------------------------------------------------------

RECIPES = {
    # MTAN paper / official code: Adam 1e-4, StepLR(100, 0.5) stepped per epoch, 200 epochs, batch 2.
    "segnet": dict(optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="step", step_size=100, epochs=200,
                   batch_size=2, normal_loss="cosine", drop_last=False),
    # MTI-Net official configs: Adam 1e-4 with (coupled L2) weight decay 1e-4, poly decay per epoch,
    # 100 epochs, batch 8 with drop_last.
    "hrnet": dict(optimizer="adam", lr=1e-4, weight_decay=1e-4, schedule="poly", step_size=0, epochs=100,
                  batch_size=8, normal_loss="l1", drop_last=True),
    # MTAN's Visual Decathlon code: SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-5, StepLR(50, 0.5),
    # 300 epochs over all domains, then 100 epochs fine-tuning every domain but ImageNet with a fresh SGD at
    # lr 0.01; batch 128.
    "wrn": dict(optimizer="sgd", lr=0.1, weight_decay=5e-5, schedule="step", step_size=50, epochs=300,
                finetune_epochs=100, finetune_lr=0.01, batch_size=128, normal_loss=None, drop_last=False,
                wrn_depth=28),
}

# The embedded synthetic scenes are a smoke test and a teaching aid, not a benchmark: on them the default is a
# quarter-width network at 96x128, a larger learning rate and a handful of epochs, so that a CPU run ends in
# minutes. Every value can be overridden by a flag.
SYNTHETIC_PRESET = dict(width=0.25, resolution="96x128", epochs=12, batch_size=8, lr=1e-3, subset=320,
                        eval_every=2)
# The synthetic Decathlon domains are 64x64 with 800 training images each: a WRN-10-1 (width 0.25 of the
# widening factor 4) for 8 + 2 epochs of batch 16 (50 steps per domain and epoch) learns all four in about
# four minutes on a 2-core CPU, a minute of it rendering (val: 94.5 / 100 / 53 / 72.5 % where chance is 33 / 50
# / 25 / 17 %). Fewer steps (e.g. batch 50 on 400 images) leave the harder domains at chance;
# lr 0.02 learns faster early on than the recipe's 0.1 and ends as well.
SYNTHETIC_DECATHLON_PRESET = dict(width=0.25, wrn_depth=10, epochs=8, finetune_epochs=2, batch_size=16,
                                  lr=0.02, step_size=4)

# MTI-Net's fixed task weights (official configs): chosen so the task losses have similar magnitudes. They
# multiply each task's loss before `--weighting` combines the main tasks.
MTINET_TASK_WEIGHTS = {"semantic": 1.0, "depth": 1.0, "normal": 10.0, "edge": 50.0, "parts": 2.0,
                       "saliency": 5.0}


def _segnet(variant):
    return lambda tasks, aux, cfg: mtan.SegNet(tasks, variant=variant, width=cfg["width"])


MODELS = {
    # name: (family, builder(tasks, aux_tasks, cfg), single-task model?)
    "single": ("segnet", _segnet("standard"), True),
    "stan": ("segnet", lambda t, a, c: mtan.MTAN(t, width=c["width"]), True),
    "split": ("segnet", _segnet("standard"), False),
    "split-wide": ("segnet", _segnet("wide"), False),
    "split-deep": ("segnet", _segnet("deep"), False),
    "dense": ("segnet", lambda t, a, c: mtan.DenseSegNet(t, width=c["width"]), False),
    "cross-stitch": ("segnet", lambda t, a, c: mtan.CrossStitchSegNet(t, width=c["width"]), False),
    "mtan": ("segnet", lambda t, a, c: mtan.MTAN(t, width=c["width"]), False),
    "mtinet": ("hrnet", lambda t, a, c: mtinet.MTINet(t, aux_tasks=a or None,
                                                      fpm_softmax=c.get("fpm_softmax", "tasks")), False),
    "padnet": ("hrnet", lambda t, a, c: mtinet.PADNet(t, aux_tasks=a or None), False),
    "hrnet-mtl": ("hrnet", lambda t, a, c: mtinet.HRNetMultiTask(t), False),
    # Visual Decathlon: one classifier per domain; `tasks` maps each domain to its number of classes.
    "wrn-mtan": ("wrn", lambda t, a, c: mtan.WideResNetMTAN(list(t.values()), domains=list(t), depth=c["wrn_depth"],
                                                              widen_factor=max(1, round(4 * c["width"]))), False),
}
DENSE_DATASETS = ["synthetic", "nyuv2", "cityscapes", "nyud", "pascal"]
DECATHLON_DATASETS = ["decathlon", "synthetic-decathlon"]


def build_model(cfg):
    """The model of a resolved configuration (also used by eval.py to rebuild a checkpoint's model)."""
    _, builder, _ = MODELS[cfg["model"]]
    return builder(dict(cfg["tasks"]), dict(cfg["aux_tasks"]), cfg)


def has_deep_supervision(model):
    return isinstance(model, (mtinet.MTINet, mtinet.PADNet))


# ----------------------------------------------------------------------------------------------------------
# 4. The loop
# ----------------------------------------------------------------------------------------------------------


def learning_rate(cfg, epoch):
    """The learning rate of an epoch. Both schedules are functions of the epoch alone, so resuming needs no
    scheduler object: StepLR(step_size, 0.5) of the MTAN code; poly lr0 * (1 - e/E)^0.9 of MTI-Net."""
    if cfg.get("finetune_epochs") and epoch >= cfg["epochs"]:  # Decathlon phase 2: a fresh StepLR at lr 0.01
        return cfg["finetune_lr"] * 0.5 ** ((epoch - cfg["epochs"]) // cfg["step_size"])
    if cfg["schedule"] == "step":
        return cfg["lr"] * 0.5 ** (epoch // cfg["step_size"])
    if cfg["schedule"] == "poly":
        return cfg["lr"] * (1 - epoch / cfg["epochs"]) ** 0.9
    return cfg["lr"]


def build_optimizer(cfg, params, device, lr=None):
    # Fused optimisers run the whole update in one kernel (CUDA, and CPU since PyTorch 2.4): on a 2-core CPU,
    # Adam's step over MTAN's 44M parameters takes 24 ms fused against 117 ms with the default per-parameter
    # loop. With fp16, GradScaler hands its inf check to the fused kernel instead of reading it on the host.
    fused = {"fused": True} if device.type in ("cuda", "cpu") and cfg.get("fused", True) else {}
    lr = cfg["lr"] if lr is None else lr
    if cfg["optimizer"] == "sgd":
        # Not fused: the fused SGD kernel (torch 2.x) fails when a parameter gets its first gradient after
        # others already hold momentum buffers, which wrn-mtan's per-domain attention chains do. The foreach
        # path handles that and is still one multi-tensor update.
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg["weight_decay"],
                               foreach=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg["weight_decay"], **fused)


def to_device(batch, device, channels_last=False):
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def add_derived_targets(batch, tasks):
    """Edge targets from semantic boundaries when a run needs edges and the dataset has none (NYUv2,
    CityScapes). Computed after augmentation, on the device, so they follow the augmented labels."""
    if "edge" in tasks and "edge" not in batch:
        batch = dict(batch, edge=data.semantic_edges(batch["semantic"]))
    return batch


class InputNormalisation(nn.Module):
    """ImageNet mean/std normalisation, applied only when an ImageNet-pretrained backbone is loaded (MTI-Net).
    SegNet models take the image as stored, in [0, 1], as the MTAN code does."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, image):
        return (image - self.mean) / self.std


def autocast(cfg, device):
    """bf16/fp16 autocast for the model's forward pass; losses and metrics are computed in fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"])
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class Progress:
    """A progress line every `every` seconds: epoch, step, loss, images/s, ETA. Reading the loss is the only
    host-device synchronisation of the training loop, and it happens only when a line is printed."""

    def __init__(self, epoch, num_epochs, steps, batch_size, enabled=True, every=5.0, name=""):
        self.epoch, self.num_epochs, self.steps, self.batch_size = epoch, num_epochs, steps, batch_size
        self.name = f"{name}  " if name else ""  # the Decathlon's domain
        self.enabled, self.every, self.start, self.last = enabled, every, time.time(), time.time()

    def maybe_print(self, step, running_loss):
        now = time.time()
        if not self.enabled or (now - self.last < self.every and step + 1 != self.steps):
            return
        self.last = now
        rate = (step + 1) * self.batch_size / (now - self.start)
        eta = (self.steps - step - 1) * self.batch_size / max(rate, 1e-9)
        print(f"epoch {self.epoch + 1}/{self.num_epochs}  {self.name}step {step + 1}/{self.steps}  "
              f"loss {float(running_loss) / (step + 1):.4f}  {rate:.1f} img/s  epoch ETA {eta:.0f}s", flush=True)


def training_step(run, batch):
    """One optimiser step on a batch already on the device. Returns the (K,) task losses (after the fixed
    task weights, before `--weighting`) and the total that was back-propagated, both still on the device."""
    cfg = run["cfg"]
    with autocast(cfg, run["device"]):
        outputs = run["compiled"](run["normalise"](batch["image"]), **run["forward_kwargs"])
    losses = multitask_losses(outputs, batch, run["loss_tasks"], cfg["normal_loss"]) * run["task_weights"]
    num_main = len(cfg["tasks"])
    total = run["weighting"](losses[:num_main]) + losses[num_main:].sum()  # aux tasks: fixed weights only
    backward_and_step(run, total)
    return losses.detach(), total.detach()


def backward_and_step(run, loss):
    """Gradients of `loss` and one optimiser step, for the dense and the Decathlon loops alike."""
    run["optimizer"].zero_grad(set_to_none=True)
    # fp16 gradients underflow without loss scaling; the scaler is a no-op unless --amp fp16 (bf16 has fp32's
    # exponent range and needs none). With a fused optimiser the scaler's inf check stays on the device.
    run["scaler"].scale(loss).backward()
    average_gradients_across_ranks(run["weighting"])  # DDP averages the model's; uncertainty's live outside it
    run["scaler"].step(run["optimizer"])
    run["scaler"].update()


def train_one_epoch(run, epoch):
    """One pass over the training split. Returns the (K,) mean losses of the epoch over all batches (and all
    ranks), which feed DWA and the log, and the first step with a non-finite loss (-1 if none)."""
    cfg, device = run["cfg"], run["device"]
    run["model"].train()
    for group in run["optimizer"].param_groups:
        group["lr"] = learning_rate(cfg, epoch)
    if run["train_tensors"] is not None:  # --data-on-device
        loader = DeviceBatches(run["train_tensors"], cfg, epoch)
    else:
        loader = make_loader(run["train_set"], cfg, epoch, train=True)
    augment = torch.Generator(device=device).manual_seed(cfg["seed"] * 1000 + epoch)
    loss_sum = torch.zeros(len(run["loss_tasks"]), device=device)
    total_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    progress = Progress(epoch, cfg["epochs"], len(loader), cfg["batch_size"] * world_size(), is_main())
    for step, batch in enumerate(loader):
        batch = to_device(batch, device, cfg["channels_last"])
        if cfg["augment"] and cfg["data"] != "pascal":  # MTAN's scale-crop-flip, on the device
            batch = data.augment_batch(batch, generator=augment)
        batch = add_derived_targets(batch, run["loss_tasks"])
        losses, total = training_step(run, batch)
        # Bookkeeping stays on the device: no .item() in the step.
        loss_sum += losses
        total_sum += total
        bad = ~torch.isfinite(losses).all()
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
        progress.maybe_print(step, total_sum)
    counts = torch.tensor(float(len(loader)), device=device)
    loss_sum, counts, first_bad = all_reduce(loss_sum), all_reduce(counts), all_reduce(first_bad, "max")
    return (loss_sum / counts.clamp_min(1)).cpu(), int(first_bad)


@torch.no_grad()
def evaluate(model, loader, tasks, device, cfg, normalise=nn.Identity()):
    """Pixel-pooled metrics of every task over a whole split, accumulated on the device (eval.py). Under
    torchrun each rank evaluates its shard and the accumulators are summed across ranks, so the numbers equal
    a single-process evaluation of the same weights."""
    model.eval()
    metrics = evaluation.metrics_for(tasks)
    for batch in loader:
        batch = add_derived_targets(to_device(batch, device, cfg["channels_last"]), tasks)
        with autocast(cfg, device):
            preds = model(normalise(batch["image"]))
        for task, meter in metrics.items():
            # PASCAL is evaluated at each image's original size: predictions are upsampled to the target.
            meter.update(upsample_to(preds[task].float(), batch[task]), batch[task])
    for meter in metrics.values():
        meter.all_reduce()
    return {task: meter.compute() for task, meter in metrics.items()}


def make_loader(dataset, cfg, epoch, train):
    """A DataLoader whose order depends only on (seed, epoch), so a resumed run sees the same batches.
    Under torchrun, training uses a DistributedSampler (a different shard per rank, reshuffled per epoch)
    and evaluation a plain stride over the split (no padding: every sample is counted exactly once)."""
    generator = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
    drop_last = train and cfg["drop_last"] and len(dataset) > cfg["batch_size"]
    # Targets of different sizes (PASCAL val, kept at the original image size) cannot be stacked: batch 1.
    batch_size = 1 if not train and getattr(getattr(dataset, "dataset", dataset), "variable_size", False) \
        else cfg["batch_size"]
    sampler = None
    if world_size() > 1 and train:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=cfg["seed"], drop_last=drop_last)
        sampler.set_epoch(epoch)
    elif world_size() > 1:
        sampler = list(range(rank(), len(dataset), world_size()))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        generator=generator if train and sampler is None else None, drop_last=drop_last,
        num_workers=cfg["workers"], pin_memory=cfg["device"] == "cuda")


def stack_on_device(dataset, device, workers=0):
    """--data-on-device: every sample of `dataset` stacked once into (N, ...) tensors on `device` (NYUv2's 795
    training samples take about 2.8 GB as float32; whether that fits is the user's call). The tensors are
    allocated up front and filled chunk by chunk, so the host never holds more than one chunk."""
    tensors, start = {}, 0
    for chunk in torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers):
        for key, value in chunk.items():
            if key not in tensors:
                tensors[key] = torch.empty((len(dataset), *value.shape[1:]), dtype=value.dtype, device=device)
            tensors[key][start:start + len(value)].copy_(value)
        start += len(value)
    return tensors


class DeviceBatches:
    """One epoch of batches drawn by index from tensors held on the device: no DataLoader worker, no host copy.
    The indices come from make_loader over range(N), i.e. from the very sampler (seed, epoch, drop_last and
    torchrun shard) a DataLoader over the samples would use, so the batches are the same with or without
    --data-on-device, and a resumed run draws the same ones."""

    def __init__(self, tensors, cfg, epoch):
        first = next(iter(tensors.values()))
        self.tensors, self.device = tensors, first.device
        self.indices = make_loader(range(len(first)), dict(cfg, workers=0), epoch, train=True)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        for index in self.indices:  # (B,) int64, pinned on CUDA runs: the copy below does not block
            index = index.to(self.device, non_blocking=True)
            yield {key: value[index] for key, value in self.tensors.items()}


# ---- the Visual Decathlon loop (wrn-mtan) --------------------------------------------------------------------
#
# Classification domains never share a batch: as in the official code, each epoch visits the domains in turn,
# each with a full pass over its own training data, its own attention chain and classifier, and plain cross
# entropy. No task weighting is involved. After `epochs` epochs comes the fine-tuning phase: a fresh SGD at
# `finetune_lr` for `finetune_epochs` more epochs over every domain but ImageNet.


def decathlon_domains(cfg, epoch):
    in_finetuning = epoch >= cfg["epochs"]
    return [d for d in cfg["tasks"] if not (in_finetuning and d == "imagenet12")]


def train_decathlon_epoch(run, epoch):
    """Returns {domain: {"loss", "accuracy"}} of this epoch's training passes (accuracy as a fraction)."""
    cfg, device = run["cfg"], run["device"]
    if epoch == cfg["epochs"]:  # the fine-tuning phase starts with a new optimiser (no momentum carried over)
        run["optimizer"] = build_optimizer(cfg, run["model"].parameters(), device, cfg["finetune_lr"])
    run["model"].train()
    for group in run["optimizer"].param_groups:
        group["lr"] = learning_rate(cfg, epoch)
    stats, domains = {}, decathlon_domains(cfg, epoch)
    for index, domain in enumerate(cfg["tasks"]):  # index: the domain's attention chain and classifier
        if domain not in domains:
            continue
        loader = make_loader(run["train_set"][domain], cfg, epoch * 100 + index, train=True)
        totals = torch.zeros(3, device=device)  # loss sum, correct, count: on the device, no sync per step
        progress = Progress(epoch, total_epochs(cfg), len(loader), cfg["batch_size"] * world_size(), is_main(),
                            name=domain)
        for step, batch in enumerate(loader):
            image, label = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            with autocast(cfg, device):
                logits = run["compiled"](image, index)
            loss = F.cross_entropy(logits.float(), label)
            backward_and_step(run, loss)
            totals += classification_totals(loss.detach() * len(label), logits, label)
            # Progress divides a running sum by the steps taken: hand it the mean loss per image times those
            progress.maybe_print(step, totals[0] / totals[2] * (step + 1))
        loss_sum, correct, count = all_reduce(totals).tolist()
        stats[domain] = {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}
    return stats


def classification_totals(loss_sum, logits, label):
    """(3,) loss sum, correct answers and images of one batch, kept on the device so nothing waits for it.
    torch.full, not torch.tensor: building a CUDA tensor from a Python number is a blocking copy."""
    count = torch.full((), len(label), device=logits.device)
    return torch.stack([loss_sum, (logits.argmax(1) == label).sum(), count])


# Batch normalisation across domains. The backbone's BN layers are shared, so after an epoch their running
# statistics describe mostly the domain trained last (the final BN, with momentum 0.9, only its last batch),
# and every other domain would be evaluated with the wrong statistics. The official evaluation script therefore
# trains one more epoch on each domain before predicting it, "to compute dataset-specific BN statistics". Here
# the statistics are re-estimated without touching the weights: before a domain is evaluated, a few batches of
# its training data run through the network in training mode, and the shared statistics are put back after.
BN_CALIBRATION_BATCHES = 10


@torch.no_grad()
def calibrate_batchnorm(model, dataset, index, cfg, device, batches=BN_CALIBRATION_BATCHES):
    """Set the BN running statistics to the average over `batches` shuffled training batches of domain `index`.
    Returns what restore_batchnorm needs to put the previous statistics back."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None = a cumulative average over the batches seen
    model.train()
    with torch.random.fork_rng(devices=[]):  # the same batches, crops and flips in train.py and eval.py
        torch.manual_seed(cfg["seed"])
        for step, batch in enumerate(make_loader(dataset, cfg, 0, train=True)):
            if step == batches:
                break
            with autocast(cfg, device):
                model(batch["image"].to(device), index)
    model.eval()
    return list(zip(norms, saved))


def restore_batchnorm(saved):
    for m, (momentum, mean, var, tracked) in saved:
        m.momentum = momentum
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(tracked)


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
            with autocast(cfg, device):
                logits = model(image, index).float()
            totals += classification_totals(F.cross_entropy(logits, label, reduction="sum"), logits, label)
        restore_batchnorm(saved)
        loss_sum, correct, count = all_reduce(totals).tolist()
        results[domain] = {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1)}
    return results


def total_epochs(cfg):
    return cfg["epochs"] + (cfg.get("finetune_epochs") or 0)


def is_decathlon(cfg):
    return cfg["data"] in DECATHLON_DATASETS


# ---- distributed training (torchrun) -----------------------------------------------------------------------
#
# `torchrun --nproc_per_node=N train.py ...` starts N copies of this script with RANK/WORLD_SIZE set. Each rank
# trains on its shard; DDP averages the model's gradients. Everything averaged over an epoch (the DWA losses,
# the metric accumulators) is summed across ranks, so every rank computes the same task weights and the
# evaluation equals a single-process one. Only rank 0 prints and writes files.


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main():
    return rank() == 0


def all_reduce(tensor, op="sum"):
    """Sum (or max) a tensor over ranks; the identity in a single process."""
    if world_size() > 1:
        reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor


def average_gradients_across_ranks(module):
    """The uncertainty log-variances are not inside the DDP model: average their gradients by hand."""
    if world_size() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            all_reduce(p.grad).div_(world_size())


def broadcast_buffers(model):
    """Copy rank 0's BatchNorm statistics to every rank before evaluating: each rank updated its own
    running statistics on its own last batches, and the evaluation must use one set of weights."""
    if world_size() > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


def init_distributed(cfg):
    """Join the process group when started by torchrun; returns the device of this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.device(cfg["device"])
    cuda = cfg["device"] == "cuda"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# ---- checkpoints ------------------------------------------------------------------------------------------


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a run killed at any moment leaves either the previous
    complete file or the new complete file, never a truncated one (os.replace is atomic on POSIX)."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text_atomic(text, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class CheckpointError(Exception):
    pass


def load_checkpoint(path):
    """Read a checkpoint written by this script, with one-line errors for the usual mistakes."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass a run folder (runs/NAME) or its last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}): it is corrupt or not a "
                              f"checkpoint of this repository; start a new run or use another file") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of train.py (it has no 'config'/'model' entries)")
    return ckpt


# ---- the run ------------------------------------------------------------------------------------------------


def setup_run(cfg):
    """Build data, model, optimiser and weighting from a resolved configuration."""
    device = init_distributed(cfg)
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    train_set, val_set = datasets_for(cfg)
    model = build_model(cfg).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    normalise = nn.Identity()
    if cfg.get("pretrained"):
        load_pretrained(model, cfg["pretrained"])
        normalise = InputNormalisation().to(device)
    weighting = build_weighting(cfg["weighting"], len(cfg["tasks"]), cfg["temperature"]).to(device)
    params = list(model.parameters()) + list(weighting.parameters())
    loss_tasks = list(cfg["tasks"]) + [t for t in cfg["aux_tasks"] if t not in cfg["tasks"]]
    task_weights = torch.tensor([cfg["task_weights"].get(t, 1.0) for t in loss_tasks], device=device)
    compiled = wrap_for_training(model, cfg, device)
    train_tensors = stack_on_device(train_set, device, cfg["workers"]) if cfg.get("data_on_device") else None
    return dict(cfg=cfg, device=device, model=model, train_set=train_set, val_set=val_set,
                train_tensors=train_tensors, optimizer=build_optimizer(cfg, params, device), weighting=weighting,
                normalise=normalise, loss_tasks=loss_tasks, task_weights=task_weights, compiled=compiled,
                scaler=torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16"),
                forward_kwargs={"return_aux": True} if has_deep_supervision(model) else {})


def wrap_for_training(model, cfg, device):
    """The module the training step calls: DDP under torchrun (SyncBatchNorm with --sync-bn), then
    torch.compile with --compile. Evaluation and checkpoints use the plain model underneath."""
    if world_size() > 1:
        if cfg.get("sync_bn"):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Dense's dead decoder block and the other domains' chains of wrn-mtan get no gradient: tell DDP.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg["model"] in ("dense", "wrn-mtan"))
    return torch.compile(model) if cfg["compile"] else model


def datasets_for(cfg):
    """Train and val splits with every target the run needs (edges derived from semantics if missing)."""
    if cfg["data"] in DECATHLON_DATASETS:
        if cfg["data"] == "synthetic-decathlon" and is_main():
            print("rendering the synthetic Decathlon domains (about a minute on a CPU)...", flush=True)
        return [data.build_decathlon(cfg["data"], cfg["data_root"], split, domains=list(cfg["tasks"]),
                                     num_samples=cfg["subset"])[0] for split in ("train", "val")]
    sets = []
    for split in ("train", "val"):
        dataset, _ = data.build_dataset(cfg["data"], cfg["data_root"], split, **dataset_options(cfg))
        if cfg["subset"]:
            dataset = torch.utils.data.Subset(dataset, range(min(cfg["subset"], len(dataset))))
        sets.append(dataset)
    return sets


def dataset_options(cfg):
    options = {}
    if cfg["data"] == "synthetic":
        options["resolution"] = parse_resolution(cfg["resolution"])
        options["cache"] = True  # render each scene once; later epochs read it from memory
    if cfg["data"] == "cityscapes":
        options["num_classes"] = cfg["num_classes"]
    if cfg["data"] == "pascal":  # PASCAL augments each sample itself (rotation, scale, fixed resize)
        options["augment"] = cfg["augment"]
    return options


def load_pretrained(model, path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    skipped = mtinet.load_hrnet_imagenet(model.backbone, state)
    print(f"loaded ImageNet HRNet weights from {path}; skipped {len(skipped)} classifier keys")


def run_training(cfg, resume_from=None):
    """Train (or continue) a run; returns the final metrics dict that is also written to metrics.json."""
    run = setup_run(cfg)
    start_epoch, history = 0, []
    if resume_from is not None:
        run["model"].load_state_dict(resume_from["model"])
        run["optimizer"].load_state_dict(resume_from["optimizer"])
        run["weighting"].load_state_dict(resume_from["weighting"])
        if resume_from.get("scaler"):  # fp16 runs: the loss scale carries on where it was
            run["scaler"].load_state_dict(resume_from["scaler"])
        start_epoch, history = resume_from["epoch"], list(resume_from["history"])
        say(f"resumed {cfg['out']} after epoch {start_epoch}")
    if is_main():  # the log holds exactly the epochs of the checkpoint, even if a run died after writing it
        os.makedirs(cfg["out"], exist_ok=True)
        write_text_atomic("".join(json.dumps(r) + "\n" for r in history), os.path.join(cfg["out"], "log.jsonl"))
    if is_decathlon(cfg):
        val_loader = {d: make_loader(s, cfg, 0, train=False) for d, s in run["val_set"].items()}
    else:
        val_loader = make_loader(run["val_set"], cfg, 0, train=False)
    say(describe(cfg, run))
    for epoch in range(start_epoch, total_epochs(cfg)):
        history.append(train_and_evaluate_epoch(run, epoch, val_loader))
        if is_main():
            save_atomic(checkpoint_state(run, epoch + 1, history), os.path.join(cfg["out"], "last.pt"))
            with open(os.path.join(cfg["out"], "log.jsonl"), "a") as f:
                f.write(json.dumps(history[-1]) + "\n")
            draw_curves(history, os.path.join(cfg["out"], "curves.png"))
    return finish(run, history)


def say(text):
    if is_main():
        print(text, flush=True)


def train_and_evaluate_epoch(run, epoch, val_loader):
    # Transforms that draw random numbers (the Decathlon crops and flips) use torch's global generator: seed it
    # per epoch, so a resumed run draws the same numbers as an uninterrupted one.
    torch.manual_seed(run["cfg"]["seed"] * 1000 + epoch)
    if is_decathlon(run["cfg"]):
        return train_and_evaluate_decathlon_epoch(run, epoch, val_loader)
    cfg = run["cfg"]
    start = time.time()
    weights = run["weighting"].weights().tolist()  # the weights used during this epoch
    mean_losses, first_bad = train_one_epoch(run, epoch)
    if first_bad >= 0:
        names = [t for t, v in zip(run["loss_tasks"], mean_losses.tolist()) if not math.isfinite(v)]
        raise FloatingPointError(
            f"non-finite loss for task(s) {', '.join(names) or '?'} at epoch {epoch + 1}, step {first_bad + 1}; "
            f"stopped without overwriting {cfg['out']}/last.pt (the last good epoch). Try a lower --lr.")
    run["weighting"].end_epoch(mean_losses[: len(cfg["tasks"])].tolist())
    record = {"epoch": epoch + 1, "lr": learning_rate(cfg, epoch),
              "train_loss": dict(zip(run["loss_tasks"], mean_losses.tolist())),
              "task_weights": dict(zip(cfg["tasks"], weights))}
    if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
        broadcast_buffers(run["model"])
        record["val"] = evaluate(run["model"], val_loader, cfg["tasks"], run["device"], cfg, run["normalise"])
    record["seconds"] = round(time.time() - start, 2)
    say(summary_line(record))
    return record


def train_and_evaluate_decathlon_epoch(run, epoch, val_loaders):
    cfg, start = run["cfg"], time.time()
    stats = train_decathlon_epoch(run, epoch)
    bad = [d for d, v in stats.items() if not math.isfinite(v["loss"])]
    if bad:
        raise FloatingPointError(f"non-finite loss for domain(s) {', '.join(bad)} at epoch {epoch + 1}; stopped "
                                 f"without overwriting {cfg['out']}/last.pt. Try a lower --lr.")
    record = {"epoch": epoch + 1, "lr": learning_rate(cfg, epoch),
              "train_loss": {d: v["loss"] for d, v in stats.items()},
              "train_accuracy": {d: v["accuracy"] for d, v in stats.items()}}
    if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == total_epochs(cfg):
        broadcast_buffers(run["model"])
        record["val"] = evaluate_decathlon(run["model"], val_loaders, cfg, run["device"], run["train_set"])
    record["seconds"] = round(time.time() - start, 2)
    say(summary_line(record))
    return record


@torch.no_grad()
def trivial_baseline(run):
    """Metrics of the best input-independent predictor, as a yardstick for the final table: the most frequent
    training class, the mean training depth, the mean training normal direction (edges: none)."""
    cfg, device, tasks = run["cfg"], run["device"], run["cfg"]["tasks"]
    constants = {"semantic": torch.zeros(tasks.get("semantic", 1), device=device),
                 "depth": torch.zeros(2, device=device), "normal": torch.zeros(3, device=device)}
    for batch in make_loader(run["train_set"], cfg, 0, train=False):
        batch = to_device(batch, device)
        # masks multiply in rather than index: boolean indexing would wait for the device on every batch
        if "semantic" in tasks:
            labels, valid = batch["semantic"].flatten(), (batch["semantic"] >= 0).flatten().float()
            constants["semantic"].scatter_add_(0, labels.clamp_min(0), valid)  # class histogram of valid pixels
        if "depth" in tasks:
            valid = (batch["depth"] != 0).float()
            constants["depth"] += torch.stack([(batch["depth"] * valid).sum(), valid.sum()])
        if "normal" in tasks:
            constants["normal"] += batch["normal"].sum(dim=(0, 2, 3))  # invalid normals are zero vectors
    prediction = {"semantic": (constants["semantic"] == constants["semantic"].max()).float(),
                  "depth": constants["depth"][:1] / constants["depth"][1].clamp_min(1),
                  "normal": F.normalize(constants["normal"], dim=0), "edge": torch.full((1,), -10.0, device=device)}

    class Constant(nn.Module):
        def forward(self, image):
            shape = (image.shape[0], -1, *image.shape[-2:])
            return {t: prediction[t].view(1, -1, 1, 1).expand(shape) for t in tasks}

    loader = make_loader(run["val_set"], cfg, 0, train=False)
    return evaluate(Constant(), loader, {t: c for t, c in tasks.items() if t in prediction}, device, cfg)


def checkpoint_state(run, epochs_done, history):
    """Everything needed to continue exactly, in types `torch.load(weights_only=True)` accepts."""
    return {"model": run["model"].state_dict(), "optimizer": run["optimizer"].state_dict(),
            "weighting": run["weighting"].state_dict(), "epoch": epochs_done, "config": run["cfg"],
            "history": history, "rng": {"torch": torch.get_rng_state()}, "scaler": run["scaler"].state_dict()}


def finish(run, history):
    """The final table: the last evaluation, and the paper's protocol (mean of the last 10 evaluations)."""
    cfg = run["cfg"]
    evaluated = [r["val"] for r in history if "val" in r]
    last10 = evaluated[-10:]
    mean_last10 = {task: {k: sum(r[task][k] for r in last10) / len(last10) for k in last10[-1][task]}
                   for task in last10[-1]}
    result = {"final": evaluated[-1], "mean_last_10": mean_last10, "epochs": len(history),
              "model": cfg["model"], "data": cfg["data"], "tasks": cfg["tasks"],
              "next_task_weights": run["weighting"].weights().tolist()}
    if not is_main():
        return result
    write_text_atomic(json.dumps(result, indent=2), os.path.join(cfg["out"], "metrics.json"))
    print("\nfinal evaluation (val split):")
    rows = [("last epoch", evaluated[-1]), (f"mean of last {len(last10)} evals", mean_last10)]
    # Under torchrun only rank 0 gets here, and evaluate() all-reduces: the other ranks have returned, so skip.
    if cfg["data"] == "synthetic" and world_size() == 1:  # the quickstart: how far above a constant predictor
        result["trivial"] = trivial_baseline(run)
        write_text_atomic(json.dumps(result, indent=2), os.path.join(cfg["out"], "metrics.json"))
        rows.append(("trivial predictor", result["trivial"]))
    if is_decathlon(cfg):
        print(evaluation.format_decathlon_table(rows))
    else:
        print(evaluation.format_table(rows, cfg["tasks"]))
    return result


def summary_line(record):
    losses = " ".join(f"{t} {v:.4f}" for t, v in record["train_loss"].items())
    text = f"epoch {record['epoch']} done: train loss [{losses}]"
    if "task_weights" in record:
        text += " weights [" + " ".join(f"{v:.3f}" for v in record["task_weights"].values()) + "]"
    text += f" lr {record['lr']:.2e}"
    if "val" in record:
        text += "\n  val " + evaluation.format_metrics(record["val"])
    return text


def describe(cfg, run):
    params = sum(p.numel() for p in run["model"].parameters())
    sizes = [sum(map(len, s.values())) if isinstance(s, dict) else len(s) for s in (run["train_set"], run["val_set"])]
    return (f"{cfg['model']} on {cfg['data']} ({sizes[0]} train / {sizes[1]} val), "
            f"tasks {dict(cfg['tasks'])}" + (f", aux {dict(cfg['aux_tasks'])}" if cfg["aux_tasks"] else "")
            + f", {params:,} parameters, device {cfg['device']}, weighting {cfg['weighting']}, "
            f"batch {cfg['batch_size']}, {total_epochs(cfg)} epochs, run folder {cfg['out']}")


# ---- --bench: speed of the training step ------------------------------------------------------------------

# Dense peak throughput in TFLOP/s of common GPUs, for the MFU figure (vendor datasheets, without sparsity).
# Keys are matched against torch.cuda.get_device_name(); `--peak-tflops` overrides.
PEAK_TFLOPS = {  # name: (bf16/fp16 tensor cores, tf32 tensor cores)
    "H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0), "A10": (125.0, 62.5), "4090": (165.0, 82.6), "3090": (71.0, 35.6), "V100": (125.0, 15.7),
}


def forward_flops_per_image(run, batch):
    """FLOPs of one forward pass for one image, counted by torch.utils.flop_counter (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = run["model"]
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(run["normalise"](batch["image"][:1]), **run["forward_kwargs"])
    model.train()
    return counter.get_total_flops()


def peak_tflops(cfg, device):
    if cfg.get("peak_tflops"):
        return cfg["peak_tflops"]
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return half if cfg["amp"] in ("bf16", "fp16") else tf32
    return None


def benchmark(cfg, steps, warmup=None, sync_every_step=False):
    """Time `steps` training steps after `warmup` ones and return one JSON-able dict. The batches are taken
    from the training split and moved to the device beforehand: the figure is the model's training speed
    (forward, losses, backward, optimiser), not the data loader's.

    Warm-up: 5 steps on a GPU (cuDNN's autotuner and torch.compile settle there), 2 on a CPU. The timed steps
    run back to back as in training, with no synchronisation between them: on a GPU, CUDA events recorded
    between steps mark the device's timeline, and we synchronise once before reading them. On a CPU every op
    has finished when it returns, so the wall clock is read directly. `sync_every_step` (the hidden
    --sync-every-step) adds the official loops' per-step .item() on every loss, for the baseline."""
    run = setup_run(cfg)
    device = run["device"]
    warmup = warmup if warmup is not None else (5 if device.type == "cuda" else 2)
    loader = make_loader(run["train_set"], cfg, 0, train=True)
    batches = [to_device(b, device, cfg["channels_last"]) for b, _ in zip(loader, range(4))]
    batches = [add_derived_targets(b, run["loss_tasks"]) for b in batches]
    flops = forward_flops_per_image(run, batches[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def mark():  # a point in time on the device's timeline
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    for i in range(warmup):
        training_step(run, batches[i % len(batches)])
    synchronize(device)
    marks = [mark()]
    for i in range(steps):
        losses, _ = training_step(run, batches[(warmup + i) % len(batches)])
        if sync_every_step:  # the official loops read every task loss with .item(), every step
            for value in losses:
                value.item()
        marks.append(mark())
    synchronize(device)
    times = sorted(a.elapsed_time(b) / 1000 if device.type == "cuda" else b - a for a, b in zip(marks, marks[1:]))
    median = times[len(times) // 2]
    batch_size = batches[0]["image"].shape[0]
    result = {"model": cfg["model"], "data": cfg["data"], "images_per_s": round(batch_size / median, 2),
              "ms_per_step": round(1000 * median, 2), "peak_mem_mb": round(peak_memory_mb(device), 1),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "amp": cfg["amp"], "channels_last": cfg["channels_last"], "compile": cfg["compile"],
              "batch_size": batch_size, "resolution": "x".join(map(str, batches[0]["image"].shape[-2:])),
              "gflops_per_image": round(flops / 1e9, 3), "sync_every_step": sync_every_step,
              "fused_optimizer": cfg.get("fused", True),
              "world_size": world_size()}
    peak = peak_tflops(cfg, device)
    if peak:  # model FLOPs utilisation: forward + backward taken as 3x the forward FLOPs
        result["mfu"] = round(3 * flops * batch_size / median / (peak * 1e12), 4)
    return result


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    """Peak memory: allocated CUDA memory on a GPU, the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- curves.png, drawn with pillow ----------------------------------------------------------------------


def draw_curves(history, path):
    """Three panels: per-task training loss (log scale), task weights, and one validation metric per task."""
    from PIL import Image, ImageDraw

    # (title, {line name: values}, how the bottom and top of the y axis are labelled)
    panels = [("train loss (log scale)", {t: [math.log10(max(r["train_loss"].get(t, math.nan), 1e-12))
                                          for r in history] for t in history[0]["train_loss"]},
               lambda v: f"{10 ** v:.3g}")]
    if "task_weights" in history[0]:
        panels.append(("task weights", {t: [r["task_weights"][t] for r in history]
                                        for t in history[0]["task_weights"]}, lambda v: f"{v:.3g}"))
    evaluated = [r for r in history if "val" in r]
    if evaluated:
        series = {}
        for task, values in evaluated[0]["val"].items():
            key = next(iter(values))
            line = [r["val"][task][key] for r in evaluated]
            series[f"{task} {key} {line[-1]:.3g}"] = rescaled(line)  # the name ends with the last value
        # Metrics live on different scales (mIoU in [0, 1], angles in degrees): each line is drawn on its own
        # range, from its lowest (bottom) to its highest value (top).
        panels.append(("val metrics (each on its own range)", series, lambda v: "max" if v > 0.5 else "min"))
    width, height = 360, 260
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, series, tick) in enumerate(panels):
        plot_panel(draw, (i * width, 0, (i + 1) * width, height), title, series, tick)
    image.save(path)


def rescaled(values):
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in values]


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_panel(draw, box, title, series, tick):
    x0, y0, x1, y1 = box
    left, top, right, bottom = x0 + 45, y0 + 22, x1 - 10, y1 - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, y0 + 5), title, fill="black")
    values = [v for vs in series.values() for v in vs if math.isfinite(v)]
    if not values:
        return
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    draw.text((x0 + 4, top), tick(hi), fill="black")
    draw.text((x0 + 4, bottom - 10), tick(lo), fill="black")
    for k, (name, vs) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        n = max(len(vs) - 1, 1)
        points = [(left + (right - left) * j / n, bottom - (bottom - top) * (v - lo) / (hi - lo))
                  for j, v in enumerate(vs) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=colour)
        draw.text((left + (k % 2) * 150, bottom + 5 + (k // 2) * 11), name, fill=colour)


# ----------------------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------------------


def parse_resolution(text):
    """data.parse_resolution's checks (HxW, multiples of 32), as a one-line command-line error."""
    try:
        return data.parse_resolution(text, flag="--resolution")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def build_parser():
    p = argparse.ArgumentParser(description="Train MTAN, MTI-Net and their baselines. With no argument: the "
                                "quickstart (MTAN + DWA on the embedded synthetic scenes).")
    p.add_argument("--model", choices=list(MODELS), default="mtan")
    p.add_argument("--data", choices=DENSE_DATASETS + DECATHLON_DATASETS, default="synthetic")
    p.add_argument("--data-root", help="dataset folder (see README, 'Datasets')")
    p.add_argument("--task", help="the task of a single-task model (single, stan, or hrnet-mtl with one task); "
                   "for wrn-mtan: train on one Decathlon domain only (the single-domain baseline)")
    p.add_argument("--aux-tasks", help="MTI-Net/PAD-Net auxiliary tasks, comma separated, e.g. normal,edge")
    p.add_argument("--task-weights", help="fixed loss weights, e.g. semantic=1,depth=1,normal=10,edge=50")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--weighting", choices=["equal", "uncertainty", "dwa"])
    p.add_argument("--temperature", type=float, help="DWA temperature T (default 2)")
    p.add_argument("--augment", action="store_true", help="the official augmentation (scale-crop and flip)")
    p.add_argument("--width", type=float, help="channel width multiplier of SegNet models (1.0 = the paper)")
    p.add_argument("--wrn-depth", type=int, help="wrn-mtan: depth of the wide ResNet, 6n + 4 (28 = the paper)")
    p.add_argument("--finetune-epochs", type=int, help="wrn-mtan: epochs of the second, fine-tuning phase")
    p.add_argument("--num-classes", type=int, help="CityScapes classes: 2, 7 or 19 (default 7)")
    p.add_argument("--subset", type=int, help="use only the first N samples of each split")
    p.add_argument("--resolution", help="HxW of the synthetic scenes, multiples of 32")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--out", help="run folder (default runs/<model>-<data>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    p.add_argument("--pretrained", metavar="PATH", help="ImageNet HRNet weights (hrnet_w18_small_model_v2.pth)")
    p.add_argument("--fpm-softmax", choices=["tasks", "official"], default="tasks",
                   help="MTI-Net's FPM softmax: across tasks per channel (the paper) or the official code's "
                   "grouping of adjacent channels")
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--amp", choices=["bf16", "fp16", "off"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default on: it is faster on CPU and GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model: the first step compiles, "
                   "and a smaller last batch of an epoch compiles once more; later steps and epochs reuse both")
    p.add_argument("--workers", type=int)
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun")
    p.add_argument("--bench", type=int, metavar="N", help="time N training steps, print one JSON line, exit")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for the MFU of --bench")
    p.add_argument("--data-on-device", action="store_true", help="hold the whole training split on the device "
                   "(no DataLoader during training; needs the memory: NYUv2 takes about 2.8 GB)")
    # The baseline of the benchmark, not a training option: read every loss and wait for the device after each
    # step, as the official training loops do (.item() per loss), to measure what removing those syncs gains.
    p.add_argument("--sync-every-step", action="store_true", help=argparse.SUPPRESS)
    # Likewise: the optimiser's default per-parameter loop instead of the fused kernel, for the baseline.
    p.add_argument("--no-fused", dest="fused", action="store_false", help=argparse.SUPPRESS)
    return p


def resolve_config(args, parser):
    """Flags > recipe of the model family > synthetic preset. Returns a plain dict (stored in checkpoints)."""
    family, _, single_task = MODELS[args.model]
    if (family == "wrn") != (args.data in DECATHLON_DATASETS):
        parser.error(f"--model wrn-mtan goes with --data {' or '.join(DECATHLON_DATASETS)}, and the dense models "
                     f"with {', '.join(DENSE_DATASETS)} (got --model {args.model} --data {args.data})")
    cfg = dict(RECIPES[family])
    if args.data == "synthetic":
        cfg.update(SYNTHETIC_PRESET)
    if args.data == "synthetic-decathlon":
        cfg.update(SYNTHETIC_DECATHLON_PRESET)
    cfg.update(model=args.model, data=args.data, data_root=args.data_root, weighting="equal", temperature=2.0,
               width=cfg.get("width", 1.0), resolution=cfg.get("resolution"), subset=cfg.get("subset"),
               eval_every=cfg.get("eval_every", 1), num_classes=7, seed=0, workers=0, amp=None,
               device="cuda" if torch.cuda.is_available() else "cpu", pretrained=None)
    if args.model == "mtan" and args.data == "synthetic":
        cfg["weighting"] = "dwa"  # the quickstart: MTAN + DWA
    for key, value in vars(args).items():
        if value is not None and value is not False and key not in ("resume", "task", "aux_tasks", "task_weights",
                                                                    "bench", "sync_every_step"):
            cfg[key] = value
    if cfg["amp"] is None:  # the fast path by default on a GPU (fp16 on GPUs without bf16); opt-in on a CPU
        cuda = cfg["device"] == "cuda"
        cfg["amp"] = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "off"
    cfg["augment"], cfg["compile"], cfg["fused"] = args.augment, args.compile, args.fused
    cfg["channels_last"] = args.channels_last is not False
    cfg["deterministic"], cfg["sync_bn"] = args.deterministic, args.sync_bn
    cfg["data_on_device"] = args.data_on_device
    if args.data_on_device and (args.data == "pascal" or args.data in DECATHLON_DATASETS):
        parser.error(f"--data-on-device: the {args.data} training samples are augmented one by one (PASCAL) or "
                     f"kept per domain (Decathlon); it applies to the other dense datasets")
    if args.resolution and args.data != "synthetic":
        parser.error("--resolution applies to --data synthetic only (real datasets have a fixed size)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    cfg["tasks"], cfg["aux_tasks"] = resolve_tasks(args, parser, single_task)
    cfg["task_weights"] = resolve_task_weights(args, parser, family, cfg)
    cfg["out"] = args.out or os.path.join("runs", f"{args.model}-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def dataset_tasks(args, parser):
    """(primary tasks, every target provided) of the chosen dataset, or a one-line error."""
    options = {"resolution": (64, 64)} if args.data == "synthetic" else {}
    if args.data == "synthetic-decathlon":  # known without rendering anything
        tasks = {domain: spec[0] for domain, spec in data.SYNTHETIC_DECATHLON.items()}
        return tasks, tasks
    try:
        if args.data == "decathlon":
            _, tasks = data.build_decathlon(args.data, args.data_root, "train")  # the domains found under ROOT
            missing = [d for d in data.DECATHLON_DOMAINS if d not in tasks]
            if missing and not args.task:
                print(f"note: no folder for {', '.join(missing)} in {args.data_root}: training on the other "
                      f"{len(tasks)} domains")
            return tasks, tasks
        dataset, tasks = data.build_dataset(args.data, args.data_root, "train", **options)
    except Exception as e:  # missing folder, wrong layout: data.py's message says what is expected
        raise SystemExit(f"error: {e}") from None
    return tasks, dataset.tasks


def resolve_tasks(args, parser, single_task):
    primary, available = dataset_tasks(args, parser)
    if "semantic" in available and "edge" not in available:
        available = dict(available, edge=1)  # derived from the semantic labels on the fly (data.semantic_edges)
    if single_task and not args.task:
        parser.error(f"--model {args.model} is a single-task model: choose --task from {', '.join(primary)}")
    if args.task:
        if args.task not in available:
            parser.error(f"--task {args.task}: the {args.data} dataset has tasks {', '.join(available)}")
        if not single_task and args.model not in ("hrnet-mtl", "wrn-mtan"):
            parser.error(f"--task applies to single-task models (single, stan, hrnet-mtl), not {args.model}")
        primary = {args.task: available[args.task]}
    aux = {}
    for name in filter(None, (args.aux_tasks or "").split(",")):
        if args.model not in ("mtinet", "padnet"):
            parser.error("--aux-tasks applies to --model mtinet and padnet only")
        if name not in available:
            parser.error(f"--aux-tasks {name}: the {args.data} dataset has tasks {', '.join(available)}")
        aux[name] = available[name]
    return dict(primary), aux


def resolve_task_weights(args, parser, family, cfg):
    weights = {}
    if family == "hrnet":
        weights = {t: MTINET_TASK_WEIGHTS.get(t, 1.0) for t in list(cfg["tasks"]) + list(cfg["aux_tasks"])}
    for item in filter(None, (args.task_weights or "").split(",")):
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            parser.error(f"--task-weights expects name=value pairs, got {item!r}")
    return weights


def configure_torch(cfg):
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif cfg["device"] == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    resume = None
    if args.resume:
        try:
            resume = load_checkpoint(args.resume)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        cfg = dict(resume["config"])
        cfg["out"] = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume)
        if args.epochs:
            cfg["epochs"] = args.epochs  # the one setting a resumed run may change: train for longer
        if args.device:
            cfg["device"] = args.device
    else:
        cfg = resolve_config(args, parser)
        if cfg["data"] == "synthetic" and not any(a.startswith("--width") for a in (argv or sys.argv[1:])):
            width = f"width {cfg['width']}, " if MODELS[cfg["model"]][0] == "segnet" else ""  # HRNet has no width
            print(f"synthetic data preset: {width}{cfg['resolution']}, {cfg['epochs']} epochs, "
                  f"batch {cfg['batch_size']}, lr {cfg['lr']}, at most {cfg['subset']} samples per split "
                  f"(override any of them with flags)")
    configure_torch(cfg)
    if args.bench:
        result = benchmark(cfg, args.bench, sync_every_step=args.sync_every_step)
        say(json.dumps(result))  # under torchrun: rank 0's figures (images/s per rank)
        return result
    try:
        return run_training(cfg, resume)
    except (FloatingPointError, data.DatasetError) as e:  # a DatasetError: a split or an image file met late
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
