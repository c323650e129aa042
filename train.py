"""Train any model of this repository on any dataset: `python train.py --model mtinet --data nyuv2`.

Sections 1-5 are the training, to be read top to bottom:

1. Losses, one per task, written once (the MTAN recipe and the MTI-Net recipe).
2. Task weighting: equal, uncertainty (Kendall et al.) and DWA (MTAN paper, Eq. 7). Each is a small class that
   depends on torch only, so it can be lifted into another training loop.
3. The loop, on one screen: `run_training` (the epochs, where DWA updates its weights) -> `train_one_epoch`
   (the batches) -> `training_step` (forward, losses, weighting, backward, optimiser step).
4. The loop's helpers, in the order it first calls them: the run and its optimiser, the loaders and the
   schedule, the progress line, the batch and the CUDA graph, the torchrun helpers, the checks after each
   epoch, the run folder's log, checkpoint and final table.
5. Models, recipes and configuration: which class each `--model` builds and what else it implies
   (`ModelSpec`), the published recipe of each model family, and every configuration key with its default.

Sections 6-11 are machinery you can skip on a first reading: 6. the Visual Decathlon (a classification
benchmark with its own loop), 7. --data-on-device, 8. joining torchrun's process group, 9. the run folder (its
lock, checkpoints, curves), 10. `--bench`, 11. the command line and which flags apply where (FLAG_SCOPE).

`python train.py` with no argument is the quickstart: MTAN with DWA on the embedded synthetic scenes, small
enough to finish on a laptop CPU in a few minutes. The evaluation loop, checkpoint reading and the metrics
live in eval.py (train.py imports eval.py, never the other way round).
"""

import argparse
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import eval as evaluation  # `eval` is a Python builtin; the module keeps its file name for the command line
import mtan
import mtinet

UsageError = evaluation.UsageError  # a user's mistake: `error: ...` on one line (eval.py, appendix D)

# ------------------------------------------------------------------------------------------------------------
# 1. Losses
#
# Every loss returns a 0-dim fp32 tensor and divides by `mask.sum().clamp_min(1)`: the count stays on the
# device (the official code's `torch.nonzero(...).size(0)` forces a host sync every step), and a batch with no
# valid pixel gives a loss of 0 instead of NaN.
# ------------------------------------------------------------------------------------------------------------

def cross_entropy_loss(logits, target):
    """Semantic segmentation and human parts: pixel-wise cross entropy, label -1 ignored (MTAN Eq. 5)."""
    if logits.is_cuda and torch.are_deterministic_algorithms_enabled():  # --deterministic on a GPU (eval.py)
        total = deterministic_cross_entropy_sum(logits.float(), target)
    else:
        total = F.cross_entropy(logits.float(), target, ignore_index=-1, reduction="sum")
    return total / (target != -1).sum().clamp_min(1)


def deterministic_cross_entropy_sum(logits, target):
    """F.cross_entropy(logits, target, ignore_index=-1, reduction="sum") for (B, C, H, W) logits, from kernels
    that are deterministic on a GPU (the loss above under --deterministic there): torch's CUDA 2-D nll_loss
    sums with atomic adds, in an order that changes from run to run; a one-hot selection and a plain sum do
    not. It costs a (B, C, H, W) mask."""
    classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1, 1)
    chosen = target.unsqueeze(1) == classes  # the label's class; label -1 (ignored) chooses none
    return -torch.where(chosen, F.log_softmax(logits, dim=1), 0).sum()


def depth_l1_loss(pred, target):
    """Depth: L1 over valid pixels, as in both official codebases; a depth is positive, so 0 (their marker)
    and any negative value are invalid."""
    mask = (target > 0).float()  # (B, 1, H, W)
    return ((pred.float() - target).abs() * mask).sum() / mask.sum().clamp_min(1)


def normal_validity(target):
    """(B, 1, H, W) float mask of valid normals. Datasets mark an invalid normal by an all-zero vector.

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
    """Edges and saliency: binary cross entropy with positives weighted by w and negatives by 1 - w, summed
    and divided by the number of pixels (MTI-Net's `BalancedCrossEntropyLoss`).

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


def upsample_to_label(pred, target):
    """Bilinear upsampling of a coarse prediction to the label size (MTI-Net deep supervision, Sec. 3.7)."""
    size = target.shape[-2:]
    if pred.shape[-2:] == size:
        return pred
    # In fp32: under --amp bf16 the prediction is bf16, and the backward of a bf16 bilinear upsampling to the
    # label size accumulates with bf16 atomics, many times slower (README, Performance). A no-op in fp32.
    return mtinet.upsample_to(pred.float(), size)  # F.interpolate(bilinear), deterministic under --deterministic


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
                loss = loss + task_loss(task, upsample_to_label(scale[task], target), target, normal_loss)
        losses.append(loss)
    return torch.stack(losses)


# ------------------------------------------------------------------------------------------------------------
# 2. Task weighting
#
# Each weighting turns the (K,) vector of task losses into one scalar to back-propagate. All three keep their
# state as tensors or plain lists, so a checkpoint stores them and resume is exact.
# ------------------------------------------------------------------------------------------------------------

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
    """Kendall, Gal and Cipolla (CVPR 2018) as the official MTAN code applies it: one learned log-variance s_k
    per task and the loss sum_k exp(-s_k)/2 * L_k + s_k/2, the same form for every task (classification
    included). s starts at -0.5, so every task starts with the weight exp(0.5)/2 = 0.8244. The total can
    become negative: the s_k/2 terms are not bounded below."""

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
    confirmed: unweighted, lorenmt/mtan issue #53). For the first two epochs there is no ratio yet and
    lambda = 1. The weights sum to K and stay fixed for a whole epoch."""

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


# ------------------------------------------------------------------------------------------------------------
# 3. The loop
#
# Three functions, each calling the next. Nothing inside an epoch waits for the device: the losses are summed
# on the device and read once per epoch, so a GPU never idles while Python catches up. The batches of an epoch
# depend only on (seed, epoch), which makes a resumed run continue exactly where the killed one stopped.
# ------------------------------------------------------------------------------------------------------------

def run_training(cfg, resume_from=None):
    """Train (or continue) a dense multi-task run; returns the final metrics, also written to metrics.json."""
    run = setup_run(cfg, resume_from)  # model, optimiser, weighting, data: see `Run` in section 4
    open_run_folder(run)
    val_loader = make_loader(run.val_set, cfg, 0, train=False)
    for epoch in range(run.start_epoch, cfg["epochs"]):
        start = time.time()
        torch.manual_seed(cfg["seed"] * 1000 + epoch)  # dropout and random transforms: the same after a resume
        weights = run.weighting.weights().tolist()  # lambda_k(t): DWA's weights stay fixed for the whole epoch
        mean_losses = train_one_epoch(run, epoch)  # (K,) epoch means of the task losses, on the host
        run.weighting.end_epoch(mean_losses[:len(cfg["tasks"])].tolist())  # DWA, Eq. (7): next epoch's weights
        record = {"epoch": epoch + 1, "lr": float(run.optimizer.param_groups[0]["lr"]),  # learning_rate(cfg, epoch)
                  "train_loss": dict(zip(run.loss_tasks, mean_losses.tolist())),
                  "task_weights": dict(zip(cfg["tasks"], weights))}
        if evaluation_due(cfg, epoch):
            broadcast_buffers(run.model)
            record["val"] = evaluation.evaluate(run.model, val_loader, cfg["tasks"], run.device, cfg["amp"],
                                                cfg["channels_last"], run.normalise, exact_edges=False)
        record["seconds"] = round(time.time() - start, 2)
        save_epoch(run, record)  # log.jsonl, last.pt (atomic), curves.png
    return finish(run)  # metrics.json and the final table


def train_one_epoch(run, epoch):
    """One pass over the training split: the (K,) mean task losses over all batches and ranks (DWA's L_k(t))."""
    run.model.train()
    set_learning_rate(run.optimizer, run.cfg, epoch)
    batches = epoch_batches(run, epoch)  # the same batches for the same (seed, epoch), on every rank as many
    augment = torch.Generator(device=run.device).manual_seed(run.cfg["seed"] * 1000 + epoch)
    loss_sum = torch.zeros(len(run.loss_tasks), device=run.device)  # on the device: no host sync per step
    first = torch.zeros_like(loss_sum)  # the first step's losses: the reference of check_epoch in epoch 1
    progress = Progress(epoch, run.cfg["epochs"], len(batches), run.cfg["batch_size"])
    for step, batch in enumerate(batches):
        batch = prepare_batch(run, batch, augment)
        losses = run.graph(batch) if run.graph else training_step(run, batch)  # the graph replays training_step
        loss_sum += losses
        if step == 0:
            first = losses.clone()  # a CUDA graph returns its losses in the same tensors every step
        progress.maybe_print(step, loss_sum)  # reads the loss (a sync) only when it prints, every 5 s
    means = torch.stack([all_reduce(loss_sum) / max(len(batches) * world_size(), 1),
                         all_reduce(first) / world_size()]).cpu()  # (2, K): the one sync of the epoch
    mean_losses, first_losses = (dict(zip(run.loss_tasks, m.tolist())) for m in means)
    check_epoch(run, mean_losses, epoch, first_losses)  # diverged? every task's labels seen?
    return means[0]


def training_step(run, batch):
    """One optimiser step on a batch already on the device. Returns the (K,) task losses (after the fixed task
    weights, before `--weighting`), still on the device."""
    with evaluation.autocast(run.cfg["amp"], run.device):  # bf16/fp16 forward with --amp; losses in fp32
        outputs = run.compiled(run.normalise(batch["image"]), **run.forward_kwargs)
    losses = multitask_losses(outputs, batch, run.loss_tasks, run.cfg["normal_loss"]) * run.task_weights
    num_main = len(run.cfg["tasks"])
    total = run.weighting(losses[:num_main]) + losses[num_main:].sum()  # aux tasks: fixed weights only
    run.optimizer.zero_grad(set_to_none=True)
    # fp16 gradients underflow without loss scaling; the scaler is a no-op unless --amp fp16 (bf16 has fp32's
    # exponent range and needs none). With a fused optimiser the scaler's inf check stays on the device.
    run.scaler.scale(total).backward()
    average_gradients_across_ranks(run.weighting)  # DDP averages the model's; uncertainty's live outside it
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return losses.detach()


# ------------------------------------------------------------------------------------------------------------
# 4. The run and the loop's helpers, in the order the loop first calls them
#
# `setup_run` (with the optimiser), the run folder opened, the loaders, then per epoch: the learning rate, the
# batches, the progress line, each batch prepared (and, on a GPU, the step's CUDA graph), the torchrun sums,
# the checks of the epoch's losses, the evaluation's schedule, then `save_epoch`, and at the end `finish`.
#
# Under torchrun (`torchrun --nproc_per_node=N train.py ...`) each rank trains on its shard and DDP averages the
# model's gradients; everything averaged over an epoch (the DWA losses, the metric accumulators) is summed
# across ranks, so every rank computes the same task weights and the evaluation equals a single-process one.
# Only rank 0 prints and writes files.
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything one training run holds, built once by `setup_run`."""
    cfg: dict  # the resolved configuration; saved in last.pt
    device: torch.device
    model: nn.Module  # the plain model: evaluation and checkpoints use it
    compiled: nn.Module  # what the training step calls: the model under DDP and/or torch.compile
    normalise: nn.Module  # ImageNet mean/std for a pretrained backbone, else the identity
    forward_kwargs: dict  # {"return_aux": True} for models with deep supervision (MTI-Net, PAD-Net)
    loss_tasks: list  # main tasks, then auxiliary ones: the order of every (K,) loss vector
    task_weights: torch.Tensor  # (K,) fixed loss weights (MTI-Net's recipe), applied before `weighting`
    weighting: nn.Module  # equal, uncertainty or DWA, over the main tasks
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for --amp fp16, a no-op otherwise
    train_set: object  # a dataset (the Decathlon: {domain: dataset})
    val_set: object
    train_tensors: dict = None  # --data-on-device: the training split stacked on the device
    graph: "CudaGraphStep" = None  # training_step recorded as a CUDA graph (on a GPU), else None
    start_epoch: int = 0  # epochs already done (a resumed run)
    history: list = field(default_factory=list)  # one log record per finished epoch


def setup_run(cfg, resume_from=None):
    """Build data, model, optimiser and weighting from a resolved configuration, and restore the state of a
    checkpoint to continue from."""
    device = init_distributed(cfg)
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    train_set, val_set = datasets_for(cfg)
    model = build_model(cfg).to(device)
    if cfg["data"] not in DECATHLON_DATASETS:  # a bad file, or a size the model cannot take, stops the run now
        evaluation.check_first_samples(model, {"train": train_set, "val": val_set})
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    normalise = nn.Identity()
    if cfg.get("pretrained"):
        if resume_from is None:  # a resumed run's weights are all in its checkpoint: the file may have moved
            load_pretrained(model, cfg["pretrained"])
        normalise = mtinet.ImageNetNormalisation().to(device)
    weighting = build_weighting(cfg["weighting"], len(cfg["tasks"]), cfg["temperature"]).to(device)
    params = list(model.parameters()) + list(weighting.parameters())
    loss_tasks = list(cfg["tasks"]) + [t for t in cfg["aux_tasks"] if t not in cfg["tasks"]]
    run = Run(cfg=cfg, device=device, model=model, compiled=wrap_for_training(model, cfg, device),
              normalise=normalise, loss_tasks=loss_tasks,
              forward_kwargs={"return_aux": True} if MODELS[cfg["model"]].aux else {},
              task_weights=torch.tensor([cfg["task_weights"].get(t, 1.0) for t in loss_tasks], device=device),
              weighting=weighting, optimizer=build_optimizer(cfg, params, device),
              scaler=torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16"),
              train_set=train_set, val_set=val_set,
              train_tensors=stack_on_device(train_set, device, cfg["workers"]) if cfg["data_on_device"] else None)
    graph = cfg.get("cuda_graph") and device.type == "cuda"  # a GPU run resumed on a CPU continues eagerly
    run.graph = CudaGraphStep(run) if graph else None
    if resume_from is not None:
        try:
            run.model.load_state_dict(resume_from["model"])
            run.optimizer.load_state_dict(resume_from["optimizer"])
            run.weighting.load_state_dict(resume_from["weighting"])
        except (RuntimeError, ValueError, KeyError) as e:  # torch lists every mismatched tensor: keep one line
            raise evaluation.CheckpointError(f"the weights in {cfg['out']}/last.pt do not fit its configuration "
                                             f"({evaluation.first_line(e)})") from None
        if resume_from.get("scaler"):  # fp16 runs: the loss scale carries on where it was
            run.scaler.load_state_dict(resume_from["scaler"])
        run.start_epoch, run.history = resume_from["epoch"], list(resume_from["history"])
        say(f"resumed {cfg['out']} after epoch {run.start_epoch}")
    return run


def build_optimizer(cfg, params, device, lr=None):
    # Fused optimisers run the whole update in one kernel (CUDA, and CPU since PyTorch 2.4), several times
    # faster than the default per-parameter loop (README, "Performance"). With fp16, GradScaler hands its inf
    # check to the fused kernel instead of reading it on the host.
    fused = {"fused": True} if device.type in ("cuda", "cpu") and cfg.get("fused", True) else {}
    lr = cfg["lr"] if lr is None else lr
    if cfg["optimizer"] == "sgd":
        # Not fused: the fused SGD kernel (torch 2.x) fails when a parameter gets its first gradient after
        # others already hold momentum buffers, which wrn-mtan's per-domain attention chains do. The foreach
        # path handles that and is still one multi-tensor update.
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg["weight_decay"],
                               foreach=True)
    if cfg.get("cuda_graph") and device.type == "cuda":  # its step counters on the device (CudaGraphStep)
        fused["capturable"] = True
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg["weight_decay"], **fused)


def open_run_folder(run):
    """Create the run folder and write log.jsonl with exactly the epochs of the checkpoint being continued (a
    run can die after writing the log line of an epoch whose checkpoint it never finished)."""
    if is_main() and run.history:  # a new run's log.jsonl begins with its first epoch (save_epoch)
        evaluation.write_text_atomic("".join(evaluation.strict_json(r) + "\n" for r in run.history),
                                     os.path.join(run.cfg["out"], "log.jsonl"))
    say(describe(run))


def describe(run):
    cfg = run.cfg
    params = sum(p.numel() for p in run.model.parameters())
    sizes = [sum(map(len, s.values())) if isinstance(s, dict) else len(s) for s in (run.train_set, run.val_set)]
    return (f"{cfg['model']} on {cfg['data']} ({sizes[0]} train / {sizes[1]} val), "
            f"tasks {dict(cfg['tasks'])}" + (f", aux {dict(cfg['aux_tasks'])}" if cfg["aux_tasks"] else "")
            + f", {params:,} parameters, device {cfg['device']}, weighting {cfg['weighting']}, "
            f"batch {cfg['batch_size']}, {total_epochs(cfg)} epochs, run folder {cfg['out']}"
            + (f"\n{DETERMINISM[run.device.type]}" if cfg["deterministic"] else ""))


def make_loader(dataset, cfg, epoch, train):
    """A DataLoader whose order depends only on (seed, epoch), so a resumed run sees the same batches. Under
    torchrun, training uses a DistributedSampler (a different shard per rank, reshuffled per epoch) and
    evaluation a plain stride over the split (no padding: every sample is counted exactly once)."""
    generator = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
    # A last batch of one sample is dropped: BatchNorm's statistics need two (a bigger one is kept, as the
    # MTAN recipe does, unless the recipe drops it).
    last = len(dataset) % cfg["batch_size"]
    drop_last = train and (cfg["drop_last"] or last == 1) and len(dataset) > cfg["batch_size"]
    # Targets of different sizes (PASCAL val, kept at the original image size) cannot be stacked: batch 1.
    batch_size = 1 if not train and evaluation.variable_size(dataset) else cfg["batch_size"]
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


def set_learning_rate(optimizer, cfg, epoch):
    lr = learning_rate(cfg, epoch)
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # read by a CUDA graph (CudaGraphStep): the same tensor, a new value
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


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


def epoch_batches(run, epoch):
    """The training batches of an epoch: from the device with --data-on-device, else from a DataLoader."""
    if run.train_tensors is not None:
        return DeviceBatches(run.train_tensors, run.cfg, epoch)
    return make_loader(run.train_set, run.cfg, epoch, train=True)


class Progress:
    """A progress line every `every` seconds, printed by rank 0: epoch, step, loss, images/s (of all ranks),
    ETA. Reading the loss is the only host-device synchronisation of the training loop, and it happens only
    when a line is printed."""

    def __init__(self, epoch, num_epochs, steps, batch_size, every=5.0, name=""):
        self.epoch, self.num_epochs, self.steps = epoch, num_epochs, steps
        self.batch_size = batch_size * world_size()  # the images of one step over all ranks
        self.name = f"{name}  " if name else ""  # the Decathlon's domain
        self.enabled, self.every, self.start, self.last = is_main(), every, time.time(), time.time()

    def maybe_print(self, step, loss_sum):
        """`loss_sum`: the running sum of the step losses, a tensor on the device (its elements summed)."""
        now = time.time()
        if not self.enabled or (now - self.last < self.every and step + 1 != self.steps):
            return
        self.last = now
        rate = (step + 1) * self.batch_size / (now - self.start)
        eta = (self.steps - step - 1) * self.batch_size / max(rate, 1e-9)
        print(f"epoch {self.epoch + 1}/{self.num_epochs}  {self.name}step {step + 1}/{self.steps}  "
              f"loss {float(loss_sum.sum()) / (step + 1):.4f}  {rate:.1f} img/s  epoch ETA {eta:.0f}s",
              flush=True)


def prepare_batch(run, batch, augment):
    """A loader's batch on the device, with MTAN's scale-crop-flip (--augment) drawn from `augment`, and the
    targets derived from others (edges from semantic labels) computed after it, so they follow the crop."""
    cfg = run.cfg
    batch = evaluation.to_device(batch, run.device, cfg["channels_last"])
    if cfg["augment"] and cfg["data"] != "pascal":  # PASCAL augments each sample in its loader instead
        batch = data.augment_batch(batch, generator=augment)  # its gathers return NCHW: channels_last again
        batch = evaluation.to_device(batch, run.device, cfg["channels_last"])
    return data.add_derived_targets(batch, run.loss_tasks)


class CudaGraphStep:
    """`training_step` recorded once as a CUDA graph and replayed for every batch of the same shape (the
    default on a GPU; `--no-cuda-graph` turns it off).

    Why: at the papers' batch sizes one step is a few thousand small kernels (MTAN, batch 2: about 2,800), and
    Python launches them more slowly than the GPU runs them, so the GPU waits on the host most of the step. A
    CUDA graph is the recorded sequence of those kernels with their arguments and memory addresses; one
    `replay()` launches all of them (PyTorch docs, "CUDA Graphs", whole-network capture). What it asks for:
    * fixed addresses: each batch is copied into `self.batch`, the tensors the graph reads, and the losses come
      back in the same output tensor every step (the loop adds them up before the next replay);
    * nothing on the host inside the step: the optimiser is built with `capturable=True` and reads its learning
      rate from a device tensor (set_learning_rate fills it in place), DWA's weights are a device buffer;
    * static shapes: a smaller last batch runs eagerly instead.
    The first steps run eagerly on a side stream, so that lazy initialisations and the optimiser's state exist
    before the recording; recording runs nothing, so every batch is trained exactly once."""

    def __init__(self, run, warmup=3):
        self.run, self.warmup, self.graph, self.shapes = run, warmup, None, None

    def __call__(self, batch):
        shapes = {key: value.shape for key, value in batch.items()}
        if self.graph is None and self.warmup > 0:  # eager warm-up steps, on a side stream
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                losses = training_step(self.run, batch)
            torch.cuda.current_stream().wait_stream(side)
            return losses
        if self.graph is None:  # record once
            for group in self.run.optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=self.run.device)
            self.batch, self.shapes = {key: value.clone() for key, value in batch.items()}, shapes
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.losses = training_step(self.run, self.batch)  # (K,), the graph's output tensor
        if shapes != self.shapes:  # a smaller last batch
            return training_step(self.run, batch)
        for key, value in batch.items():
            self.batch[key].copy_(value)
        self.graph.replay()
        return self.losses


all_reduce = evaluation.all_reduce  # sums a tensor over ranks; the identity in a single process

def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main():
    return rank() == 0


def average_gradients_across_ranks(module):
    """The uncertainty log-variances are not inside the DDP model: average their gradients by hand."""
    if world_size() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            all_reduce(p.grad).div_(world_size())


def broadcast_buffers(model):
    """Copy rank 0's BatchNorm statistics to every rank before evaluating: each rank updated its own running
    statistics on its own last batches, and the evaluation must use one set of weights."""
    if world_size() > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


EXPLOSION = 1e4  # a training loss this many times its reference has diverged, even while it is still finite

def check_epoch(run, losses, epoch, first=None):
    """The checks after an epoch, on the host (nothing is checked per step). A diverged run stops before its
    weights overwrite the last good checkpoint: a loss of `losses` (the epoch means {task: value}) diverged
    when it is non-finite or above EXPLOSION times its reference, the mean over the first epoch (in the first
    epoch: `first`, the first step's). The training samples are finite (data.py checks images and turns NaN or
    inf targets into the 'invalid' marker as it reads them), so the cause is the optimisation. After a dense
    run's first epoch: did every task see a label (check_labels_seen)?"""
    reference, since = (run.history[0]["train_loss"], "the first epoch") if run.history else (first or {},
                                                                                         "the first step")
    bad = [t for t, v in losses.items() if not math.isfinite(v)]
    exploded = [f"{t} {v:.3g} against {reference[t]:.3g}" for t, v in losses.items()
                if math.isfinite(v) and reference.get(t, 0) > 0 and v > EXPLOSION * reference[t]]
    if bad or exploded:
        what = (f"non-finite loss for {', '.join(bad)} in epoch {epoch + 1} (training)" if bad else
                f"the training loss exploded in epoch {epoch + 1} (above {EXPLOSION:g} times its value in "
                f"{since}): {', '.join(exploded)}")
        amp = " or --amp off" if run.cfg["amp"] == "fp16" else ""
        raise FloatingPointError(f"{what}; {kept(run)}. The training samples are finite, so the model "
                                 f"diverged: try a lower --lr (this run: {run.cfg['lr']:g}){amp}")
    if not run.history and run.cfg["data"] not in DECATHLON_DATASETS:
        check_labels_seen(run, losses)


def check_labels_seen(run, mean_losses):
    """End of a run's first epoch: did every task see a label? A task's epoch-mean loss equals the loss of a
    batch without any valid target (0; 1 for the cosine normal loss: 1 - 0) only when it saw (almost) none.
    Only then are its valid targets counted, over the training split on the host, so the check costs nothing
    per step; none at all stops the run with one line: its head would train for days on nothing."""
    cfg, suspects = run.cfg, []
    for task, mean in mean_losses.items():
        weight = cfg["task_weights"].get(task, 1.0)
        empty = weight * (1.0 if task == "normal" and cfg["normal_loss"] == "cosine" else 0.0)
        if task in ("semantic", "parts", "depth", "normal") and weight and abs(mean - empty) <= 1e-6 * max(1, empty):
            suspects.append(task)
    if not suspects:
        return
    counts = torch.zeros(len(suspects), dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        for batch in make_loader(run.train_set, dict(cfg, device="cpu"), 0, train=False):
            counts += torch.stack([valid_targets(task, batch[task]).double() for task in suspects])
    counts = all_reduce(counts.to(run.device)).tolist()  # under torchrun each rank counted its shard
    empty = [task for task, count in zip(suspects, counts) if count == 0]
    if empty:
        files = data.sample_files(run.train_set, 0)  # NYUv2 and CityScapes name the semantic files "label..."
        named = [path for key, path in files.items() if key in empty or ("semantic" in empty and "label" in key)]
        where = f" (e.g. {', '.join(named or files.values())})" if files else ""
        raise data.DatasetError(f"no valid {' or '.join(empty)} target in the {len(run.train_set)} training "
                                f"samples{where}: every value is the 'invalid' marker (labels -1, depth "
                                f"<= 0, normals 0); a head without labels learns nothing: check the files, "
                                f"or leave the task out with --tasks")


def valid_targets(task, target):
    """How many targets of a batch the loss of `task` counts (the masks of section 1); None for tasks whose
    every pixel is a target (edges, saliency)."""
    if task in ("semantic", "parts"):
        return (target != -1).sum()
    if task == "depth":
        return (target > 0).sum()
    if task == "normal":
        return normal_validity(target).sum()
    return None


def evaluation_due(cfg, epoch):
    """Evaluate every `eval_every` epochs, and always after the last one."""
    return (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == total_epochs(cfg)


def save_epoch(run, record):
    """Print the epoch's summary, then append it to the history, last.pt, log.jsonl and curves.png. An epoch
    whose val metrics are not finite is not saved: the run stops, and last.pt keeps the last good epoch."""
    say(summary_line(record))
    bad = evaluation.non_finite_metrics(record.get("val", {}))
    if bad:
        raise FloatingPointError(f"non-finite val metrics ({', '.join(bad)}) in epoch {record['epoch']}: the model "
                                 f"diverged, or the val split has no valid target for them; {kept(run)}")
    run.history.append(record)
    if is_main():
        out = run.cfg["out"]
        save_atomic(checkpoint_state(run), os.path.join(out, "last.pt"))
        with open(os.path.join(out, "log.jsonl"), "a") as f:
            f.write(evaluation.strict_json(record) + "\n")
        draw_curves(run.history, os.path.join(out, "curves.png"))


def summary_line(record):
    losses = " ".join(f"{t} {v:.4f}" for t, v in record["train_loss"].items())
    text = f"epoch {record['epoch']} done: train loss [{losses}]"
    if "task_weights" in record:
        text += " weights [" + " ".join(f"{v:.3f}" for v in record["task_weights"].values()) + "]"
    text += f" lr {record['lr']:.2e}"
    if "val" in record:
        text += "\n  val " + evaluation.format_metrics(record["val"])
    return text


def kept(run):
    """What a run stopped by an error leaves: the checkpoint of its last good epoch, if any."""
    if not run.history:
        return "stopped before writing a checkpoint"
    return f"stopped without overwriting {run.cfg['out']}/last.pt (epoch {len(run.history)}, the last good one)"


def finish(run):
    """The final table: the last evaluation, and the paper's protocol (the mean of the last 10 evaluations),
    plus on the synthetic scenes the metrics of a constant predictor (`trivial_baseline`) as a yardstick."""
    cfg = run.cfg
    evaluated = [r["val"] for r in run.history if "val" in r]
    last10 = evaluated[-10:]
    result = {"final": evaluated[-1], "mean_last_10": evaluation.average_results(last10),
              "epochs": len(run.history), "model": cfg["model"], "data": cfg["data"], "tasks": cfg["tasks"],
              "next_task_weights": run.weighting.weights().tolist()}
    if not is_main():
        return result
    rows = [("last epoch", result["final"]), (f"mean of last {len(last10)} evals", result["mean_last_10"])]
    # Under torchrun only rank 0 gets here, and evaluate() all-reduces: the other ranks have returned, so skip.
    if cfg["data"] == "synthetic" and world_size() == 1:
        result["trivial"] = trivial_baseline(run)
        rows.append(("trivial predictor", result["trivial"]))
    evaluation.write_text_atomic(evaluation.strict_json(result, indent=2), os.path.join(cfg["out"], "metrics.json"))
    print("\nfinal evaluation (val split):")
    if cfg["data"] in DECATHLON_DATASETS:
        print(evaluation.format_decathlon_table(rows))
    else:
        print(evaluation.format_table(rows, cfg["tasks"]))
    return result


@torch.no_grad()
def trivial_baseline(run):
    """Metrics of the best input-independent predictor, as a yardstick for the final table: the most frequent
    training class, the mean training depth, the mean training normal direction (edges: none)."""
    cfg, device, tasks = run.cfg, run.device, run.cfg["tasks"]
    constants = {"semantic": torch.zeros(tasks.get("semantic", 1), device=device),
                 "depth": torch.zeros(2, device=device), "normal": torch.zeros(3, device=device)}
    for batch in make_loader(run.train_set, cfg, 0, train=False):
        batch = evaluation.to_device(batch, device)
        # masks multiply in rather than index: boolean indexing would wait for the device on every batch
        if "semantic" in tasks:
            labels, valid = batch["semantic"].flatten(), (batch["semantic"] >= 0).flatten().float()
            constants["semantic"].scatter_add_(0, labels.clamp_min(0), valid)  # class histogram of valid pixels
        if "depth" in tasks:
            valid = (batch["depth"] > 0).float()
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

    loader = make_loader(run.val_set, cfg, 0, train=False)
    return evaluation.evaluate(Constant(), loader, {t: c for t, c in tasks.items() if t in prediction}, device,
                               cfg["amp"], cfg["channels_last"], exact_edges=False)


def say(text):
    if is_main():
        print(text, flush=True)


# ------------------------------------------------------------------------------------------------------------
# 5. Models, recipes and configuration
#
# RECIPES holds each model family's published training recipe, MODELS says which class every `--model` builds,
# DEFAULTS lists every configuration key. A run's configuration is one merge, later sources winning:
# DEFAULTS < the family's recipe < the synthetic-data preset < the flags the user typed (`resolve_config`).
# ------------------------------------------------------------------------------------------------------------

RECIPES = {
    # MTAN paper / official code: Adam 1e-4, StepLR(100, 0.5) stepped per epoch, 200 epochs, batch 2.
    "segnet": dict(optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="step", step_size=100, epochs=200,
                   batch_size=2, normal_loss="cosine", drop_last=False),
    # MTI-Net official configs: Adam 1e-4 with (coupled L2) weight decay 1e-4, poly decay per epoch, 100
    # epochs, batch 8 with drop_last; fixed task weights, chosen so the task losses have similar magnitudes
    # (they multiply each task's loss before `--weighting` combines the main tasks).
    "hrnet": dict(optimizer="adam", lr=1e-4, weight_decay=1e-4, schedule="poly", step_size=0, epochs=100,
                  batch_size=8, normal_loss="l1", drop_last=True,
                  task_weights={"semantic": 1.0, "depth": 1.0, "normal": 10.0, "edge": 50.0, "parts": 2.0,
                                "saliency": 5.0}),
    # MTAN's Visual Decathlon code: SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-5, StepLR(50, 0.5),
    # 300 epochs over all domains, then 100 epochs fine-tuning every domain but ImageNet with a fresh SGD at
    # lr 0.01; batch 128. MTI-Net official configs for the ResNet-50 (dilated, DeepLabv3 heads) models on
    # NYUD: Adam 1e-4, weight decay 1e-4, poly, 100 epochs, batch 8. MTAN-DeepLabv3 ships without a trainer;
    # it trains with this one.
    "resnet": dict(optimizer="adam", lr=1e-4, weight_decay=1e-4, schedule="poly", step_size=0, epochs=100,
                   batch_size=8, normal_loss="l1", drop_last=True),
    "wrn": dict(optimizer="sgd", lr=0.1, weight_decay=5e-5, schedule="step", step_size=50, epochs=300,
                finetune_epochs=100, finetune_lr=0.01, batch_size=128, normal_loss=None, drop_last=False,
                wrn_depth=28),
}


# The embedded synthetic scenes are a smoke test and a teaching aid, not a benchmark: on them the default is a
# quarter-width network at 96x128, a larger learning rate and a handful of epochs, so that a CPU run ends in
# minutes. The synthetic Decathlon domains are 64x64 with 800 training images each: a WRN-10-1 (width 0.25 of
# the widening factor 4) for 8 + 2 epochs of batch 16 (50 steps per domain and epoch) learns all four in
# minutes on a CPU (README, "Visual Decathlon"). Fewer steps (e.g. batch 50 on 400 images) leave the harder
# domains at chance; lr 0.02 learns faster early on than the recipe's 0.1 and ends as well. Every value can be
# overridden by a flag.
SYNTHETIC_PRESET = dict(width=0.25, resolution="96x128", epochs=12, batch_size=8, lr=1e-3, subset=320,
                        eval_every=2)
SYNTHETIC_DECATHLON_PRESET = dict(width=0.25, wrn_depth=10, epochs=8, finetune_epochs=2, batch_size=16,
                                  lr=0.02, step_size=4)
PRESETS = {"synthetic": SYNTHETIC_PRESET, "synthetic-decathlon": SYNTHETIC_DECATHLON_PRESET}
QUICKSTART = dict(weighting="dwa")  # `python train.py` with no argument: MTAN with DWA, the paper's method


@dataclass(frozen=True)
class ModelSpec:
    """Every fact of one `--model`: the recipe family that trains it, the class that builds it, its
    constructor's arguments as a function of the configuration, and how it takes tasks. The checkpoint records
    the class and the arguments (so eval.py rebuilds the model without this table), and the configuration
    records the family and whether the run is a single-task one (what `eval.py --compare` needs)."""
    family: str  # a key of RECIPES
    cls: type  # a class of mtan.py or mtinet.py
    kwargs: Callable[[dict], dict]  # cfg -> keyword arguments of cls (plain values: they go into last.pt)
    single_task: bool = False  # a single-task network: needs --task
    one_task: bool = False  # takes --task too: then a single-task network (wrn-mtan: one Decathlon domain)
    baseline: bool = False  # on one task, a plain single-task network: --compare's reference for Delta_m
    aux: bool = False  # deep supervision: takes --aux-tasks, and forward(return_aux=True) in training


def _segnet(variant):
    return lambda cfg: dict(tasks=dict(cfg["tasks"]), variant=variant, width=cfg["width"])


def _width(cfg):
    return dict(tasks=dict(cfg["tasks"]), width=cfg["width"])


def _hrnet(cfg, aux=True):
    kwargs = dict(tasks=dict(cfg["tasks"]), backbone=cfg["backbone"])
    if aux:
        kwargs["aux_tasks"] = dict(cfg["aux_tasks"]) or None
    return kwargs


MODELS = {
    # MTAN paper, Tables 2 and 3 (CityScapes, NYUv2): the SegNet family (mtan.py)
    "single": ModelSpec("segnet", mtan.SegNet, _segnet("standard"), single_task=True,  # One Task
                        baseline=True),
    "stan": ModelSpec("segnet", mtan.MTAN, _width, single_task=True),  # STAN: MTAN on one task
    "split": ModelSpec("segnet", mtan.SegNet, _segnet("standard")),
    "split-wide": ModelSpec("segnet", mtan.SegNet, _segnet("wide")),
    "split-deep": ModelSpec("segnet", mtan.SegNet, _segnet("deep")),
    "dense": ModelSpec("segnet", mtan.DenseSegNet, _width),
    "cross-stitch": ModelSpec("segnet", mtan.CrossStitchSegNet, _width),
    "mtan": ModelSpec("segnet", mtan.MTAN, _width),
    # MTI-Net paper: the HRNet family (mtinet.py)
    "mtinet": ModelSpec("hrnet", mtinet.MTINet, lambda cfg: dict(_hrnet(cfg), fpm_softmax=cfg["fpm_softmax"]),
                        aux=True),
    "padnet": ModelSpec("hrnet", mtinet.PADNet, _hrnet, aux=True),
    "hrnet-mtl": ModelSpec("hrnet", mtinet.HRNetMultiTask, lambda cfg: _hrnet(cfg, aux=False), one_task=True,
                           baseline=True),
    # The dilated ResNet-50 family (mtan.py): the official MTAN repository's MTAN-DeepLabv3, and the DeepLabv3
    # baselines of MTI-Net's ResNet-50 tables (one task: single-task; several: a shared backbone).
    "mtan-deeplab": ModelSpec("resnet", mtan.MTANDeepLabv3, _width),
    "deeplab": ModelSpec("resnet", mtan.DeepLabv3, _width, one_task=True, baseline=True),
    # MTAN paper, Table 4: Visual Decathlon, one classifier per domain; `tasks` maps domain -> classes.
    # `--width` scales the widening factor 4 of WRN-28-4.
    "wrn-mtan": ModelSpec("wrn", mtan.WideResNetMTAN, lambda cfg: dict(
        num_classes=list(cfg["tasks"].values()), domains=list(cfg["tasks"]), depth=cfg["wrn_depth"],
        widen_factor=max(1, round(4 * cfg["width"]))), one_task=True),
}


DENSE_DATASETS = ["synthetic", "nyuv2", "cityscapes", "nyud", "pascal"]
DECATHLON_DATASETS = list(evaluation.DECATHLON_DATASETS)


DEFAULTS = dict(
    # what to train
    model="mtan",  # a key of MODELS
    data="synthetic",  # a dataset of data.py
    data_root=None,  # the dataset folder; None: data/<name> under the working directory
    tasks=None, aux_tasks=None,  # {task: channels}, resolved from the dataset and --task/--tasks/--aux-tasks
    task_weights=None,  # {task: fixed loss weight}: the recipe's (MTI-Net's), then --task-weights on top
    family=None, single_task=False, baseline=False,  # recorded from MODELS for eval.py --compare
    weighting="equal",  # how the main task losses combine: equal, uncertainty or dwa
    temperature=2.0,  # DWA's temperature T (MTAN paper, Eq. 7)
    augment=False,  # MTAN's scale-crop-flip (NYUv2 and co.) or MTI-Net's PASCAL augmentation
    pretrained=None,  # ImageNet weights of the backbone (HRNet or ResNet-50)
    fpm_softmax="tasks",  # MTI-Net's FPM softmax grouping: "tasks" (the paper) or "official" (the code)
    backbone="w18-small-v2",  # the HRNet of mtinet, padnet, hrnet-mtl: w18-small-v2 (the paper's), w18, w32, w48
    width=1.0,  # SegNet / ResNet-50 channel multiplier (1.0 = the paper); wrn-mtan: scales the widening factor
    wrn_depth=28,  # wrn-mtan: depth of the wide ResNet, 6n + 4
    num_classes=7,  # CityScapes: 2, 7 or 19 classes
    # the recipe (set by RECIPES for each family; listed here so every key has a documented default)
    optimizer="adam", lr=1e-4, weight_decay=0.0,  # "adam" or "sgd" (momentum 0.9, Nesterov)
    schedule="step", step_size=100,  # "step": halve every step_size epochs; "poly": (1 - e/E)^0.9
    epochs=200, batch_size=2, drop_last=False,
    normal_loss="cosine",  # "cosine" (MTAN) or "l1" (MTI-Net)
    finetune_epochs=0, finetune_lr=None,  # wrn-mtan: the second, fine-tuning phase
    # the run
    out=None,  # the run folder; None: runs/<model>-<data>-<time>
    eval_every=1,  # evaluate every N epochs (and after the last)
    subset=None,  # use only the first N samples of each split
    resolution=None,  # HxW of the synthetic scenes
    seed=0,  # model init, batch order, augmentation
    deterministic=False,  # torch's deterministic algorithms
    # speed
    device=None,  # None: cuda when available, else cpu
    amp=None,  # None: bf16 (fp16 without bf16) on a GPU, off on a CPU
    channels_last=True,  # NHWC memory format: faster on CPU and GPU
    compile=False,  # torch.compile the model
    cuda_graph=None,  # None: the training step as one CUDA graph wherever it applies (CudaGraphStep)
    fused=True,  # fused optimiser step (off only for the benchmark's baseline)
    workers=0,  # DataLoader worker processes
    data_on_device=False,  # hold the training split on the device
    peak_tflops=None,  # the device's peak TFLOP/s for the MFU of --bench
    sync_bn=False,  # SyncBatchNorm across GPUs under torchrun
)


def model_facts(model, tasks):
    """What the configuration records of MODELS for eval.py --compare: the family, whether the run is a
    single-task one, and whether it is a plain single-task network (a baseline for Delta_m)."""
    spec = MODELS[model]
    single_task = len(tasks) == 1 and (spec.single_task or spec.one_task)
    return {"family": spec.family, "single_task": single_task, "baseline": single_task and spec.baseline}


def build_model(cfg):
    """The model of a resolved configuration, on the CPU."""
    spec = MODELS[cfg["model"]]
    return spec.cls(**spec.kwargs(cfg))


def model_args(cfg):
    """What the checkpoint records so that eval.py can rebuild the model: module, class and arguments."""
    spec = MODELS[cfg["model"]]
    return {"module": spec.cls.__module__, "class": spec.cls.__name__, "kwargs": spec.kwargs(cfg)}


def total_epochs(cfg):
    return cfg["epochs"] + (cfg.get("finetune_epochs") or 0)


def wrap_for_training(model, cfg, device):
    """The module the training step calls: DDP under torchrun (SyncBatchNorm with --sync-bn), then
    torch.compile with --compile. Evaluation and checkpoints use the plain model underneath."""
    if world_size() > 1:
        if cfg["sync_bn"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Only wrn-mtan has parameters without a gradient (each step trains one domain's chain and
        # classifier); telling DDP so costs a graph traversal per step, so no other model does
        # (tests/test_speed.py checks that every dense model trains every parameter).
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg["model"] == "wrn-mtan" and len(cfg["tasks"]) > 1)
    if cfg["compile"] and cfg["data"] in DECATHLON_DATASETS:
        # dynamo specialises on the domain index (it picks the chain and the classifier): one graph per
        # domain, and one more when a smaller last batch makes the batch size dynamic. Past its recompile
        # limit (8) it would run the remaining domains eagerly without a word, so the limit is raised to what
        # they need.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 2 * len(cfg["tasks"]))
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
        dataset, _ = data.build_dataset(cfg["data"], cfg["data_root"], split, **evaluation.dataset_options(cfg))
        if cfg["subset"]:
            dataset = torch.utils.data.Subset(dataset, range(min(cfg["subset"], len(dataset))))
        sets.append(dataset)
    if len(sets[0]) < 2:
        raise UsageError(f"the training split has {len(sets[0])} sample: BatchNorm needs batches of two or more "
                         f"(--subset 2 or more, or more data)")
    return sets


def load_pretrained(model, path):
    """ImageNet weights into the model's backbone, by their official key names: HRNet-Image-Classification's
    files for the HRNet models, torchvision's ResNet-50 file for the ResNet-50 ones."""
    resnet = isinstance(model.backbone, mtan.ResNetDilated)
    kind = "ResNet-50" if resnet else "HRNet"
    state = evaluation.read_weights(path, "--pretrained")
    try:
        if resnet:
            skipped = model.backbone.load_torchvision(state)
        else:
            skipped = mtinet.load_hrnet_imagenet(model.backbone, state)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:  # the loaders name the key
        raise evaluation.CheckpointError(f"--pretrained {path}: not the ImageNet weights of this model's {kind} "
                                         f"backbone ({evaluation.first_line(e)})") from None
    say(f"loaded ImageNet {kind} weights from {path}; skipped {len(skipped)} classifier keys")


# ============================================================================================================
# Appendix: the machinery. Sections 6-11 are not needed to understand the training of MTAN or MTI-Net.
# ============================================================================================================

# ------------------------------------------------------------------------------------------------------------
# 6. The Visual Decathlon (wrn-mtan, MTAN paper Sec. 4.3)
#
# Classification domains never share a batch: as in the official code, each epoch visits the domains in turn,
# each with a full pass over its own training data, its own attention chain and classifier, and plain cross
# entropy. No task weighting is involved. After `epochs` epochs comes the fine-tuning phase: a fresh SGD at
# `finetune_lr` for `finetune_epochs` more epochs over every domain but ImageNet.
# ------------------------------------------------------------------------------------------------------------

def run_decathlon(cfg, resume_from=None):
    """The Decathlon's counterpart of run_training: per-domain passes, accuracy, and each domain evaluated
    with its own BatchNorm statistics (eval.calibrate_batchnorm)."""
    run = setup_run(cfg, resume_from)
    open_run_folder(run)
    val_loaders = {d: make_loader(s, cfg, 0, train=False) for d, s in run.val_set.items()}
    for epoch in range(run.start_epoch, total_epochs(cfg)):
        start = time.time()
        torch.manual_seed(cfg["seed"] * 1000 + epoch)  # the random crops and flips: the same after a resume
        stats = train_decathlon_epoch(run, epoch)
        check_epoch(run, {d: v["loss"] for d, v in stats.items()}, epoch)
        record = {"epoch": epoch + 1, "lr": learning_rate(cfg, epoch),
                  "train_loss": {d: v["loss"] for d, v in stats.items()},
                  "train_accuracy": {d: v["accuracy"] for d, v in stats.items()}}
        if evaluation_due(cfg, epoch):
            broadcast_buffers(run.model)
            record["val"] = evaluation.evaluate_decathlon(run.model, val_loaders, cfg, run.device, run.train_set)
        record["seconds"] = round(time.time() - start, 2)
        save_epoch(run, record)
    return finish(run)


def decathlon_domains(cfg, epoch):
    in_finetuning = epoch >= cfg["epochs"]
    return [d for d in cfg["tasks"] if not (in_finetuning and d == "imagenet12")]


def train_decathlon_epoch(run, epoch):
    """Returns {domain: {"loss", "accuracy"}} of this epoch's training passes (accuracy as a fraction)."""
    cfg, device = run.cfg, run.device
    if epoch == cfg["epochs"]:  # the fine-tuning phase starts with a new optimiser (no momentum carried over)
        run.optimizer = build_optimizer(cfg, run.model.parameters(), device, cfg["finetune_lr"])
    run.model.train()
    set_learning_rate(run.optimizer, cfg, epoch)
    stats, domains = {}, decathlon_domains(cfg, epoch)
    for index, domain in enumerate(cfg["tasks"]):  # index: the domain's attention chain and classifier
        if domain not in domains:
            continue
        loader = make_loader(run.train_set[domain], cfg, epoch * 100 + index, train=True)
        totals = torch.zeros(3, device=device)  # loss sum, correct, count: on the device, no sync per step
        progress = Progress(epoch, total_epochs(cfg), len(loader), cfg["batch_size"], name=domain)
        for step, batch in enumerate(loader):
            image, label = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            with evaluation.autocast(cfg["amp"], device):
                logits = run.compiled(image, index)
            loss = F.cross_entropy(logits.float(), label)
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
            totals += evaluation.classification_totals(loss.detach() * len(label), logits, label)
            progress.maybe_print(step, totals[0] / totals[2] * (step + 1))  # the running sum Progress expects
        loss_sum, correct, count = all_reduce(totals).tolist()
        stats[domain] = {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}
    return stats


# ------------------------------------------------------------------------------------------------------------
# 7. --data-on-device: the training split held on the device
# ------------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------------
# 8. Joining and leaving the process group (torchrun)
# ------------------------------------------------------------------------------------------------------------

def init_distributed(cfg):
    """Join the process group when started by torchrun; returns the device of this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.device(cfg["device"])
    if cfg["device"] != "cuda":
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)  # first: NCCL binds each rank's communicator to the current GPU
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", device_id=device)
    return device


def leave_distributed():
    """The end of a torchrun run: release the process group (NCCL warns about a group left to the exit)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_initialized():
        if sys.exc_info()[0] is None:  # a normal end: no rank tears its communicator down while another still
            torch.distributed.barrier()  # talks to it (after an error the other ranks may never get here)
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------
# 9. The run folder: its lock, checkpoints, curves
#
# A run folder holds last.pt (written atomically after every epoch), log.jsonl (one line per epoch),
# curves.png and, at the end, metrics.json. Reading a checkpoint is eval.py's `load_checkpoint`. While a
# trainer writes it, the folder also holds `lock` (its process id): no second trainer writes the same folder.
# Nothing a run writes is ever replaced by a worse file: a new run refuses a folder that holds a run, a
# diverged epoch is not saved, a full disk leaves the previous last.pt, and the JSON files are strict JSON.
# ------------------------------------------------------------------------------------------------------------

def claim_run_folder(cfg, resuming, named):
    """Create (or, with --resume, reopen) the run folder and take its lock; returns the lock's path. A new run
    takes a folder that does not exist or is empty, so it never replaces a file it did not write (another
    tool's metrics.json, a finished run). A default name (`named` False: no --out) is created exclusively,
    with a counter when a run started in the same second has it."""
    if resuming or named:
        os.makedirs(cfg["out"], exist_ok=True)
    else:
        cfg["out"] = evaluation.new_folder(cfg["out"])  # of two runs started together, one gets "-2"
    out = cfg["out"]
    lock = take_lock(out)
    found = sorted(set(os.listdir(out)) - {"lock"})
    if found and not resuming:
        release_lock(lock)
        run = " (a run: pass --resume to continue it)" if "last.pt" in found else ""
        raise UsageError(f"--out {out} is not empty{run}: it holds {', '.join(found[:3])}"
                         f"{', ...' if len(found) > 3 else ''}; a new run takes a new or empty folder")
    return lock


def take_lock(folder):
    """Create folder/lock holding this process's id, exclusively (mode "x" is O_CREAT | O_EXCL: of two
    trainers, one wins). A lock whose process is gone (a killed run) is stale and taken over."""
    path = os.path.join(folder, "lock")
    for _ in range(3):  # of two trainers that take over a stale lock, one creates the new one first
        with contextlib.suppress(FileExistsError), open(path, "x") as f:
            f.write(f"{os.getpid()}\n")
            return path
        holder = lock_holder(path)
        if holder not in (None, os.getpid()):
            with contextlib.suppress(OSError):  # what the process runs, where /proc tells it (Linux)
                holder = f"{holder} ({open(f'/proc/{holder}/cmdline').read().replace(chr(0), ' ').strip()})"
            raise UsageError(f"{folder} is in use by process {holder}; wait for it to end, or choose another "
                             f"folder (if no trainer runs, delete {path})")
        evaluation.remove_quietly(path)  # stale: its process was killed
    raise UsageError(f"cannot take the lock {path}: " + ("it is not a file; remove it" if os.path.isdir(path)
                                                         else "other processes keep taking it"))


def lock_holder(path):
    """The id of the live process whose lock `path` is; None for no lock, an unreadable or a stale one."""
    with contextlib.suppress(OSError, ValueError, IndexError, TypeError, OverflowError):  # TypeError: path None
        with open(path) as f:
            pid = int(f.read().split()[0])
        if pid > 1:  # 1 is init, never a trainer; 0 and -1 would make os.kill signal whole process groups
            with contextlib.suppress(PermissionError):  # it exists, owned by another user
                os.kill(pid, 0)  # signal 0 only asks whether the process exists (else ProcessLookupError)
            return pid
    return None


def release_lock(path):
    if lock_holder(path) == os.getpid():  # the lock of take_lock, still this process's
        evaluation.remove_quietly(path)


def checkpoint_state(run):
    """Everything needed to continue exactly, in types `torch.load(weights_only=True)` accepts; `model_args`
    lets eval.py rebuild the model without train.py."""
    optimizer = run.optimizer.state_dict()
    for group in optimizer["param_groups"]:  # a CUDA graph's device tensor -> a plain number
        group["lr"] = float(group["lr"])
    return {"model": run.model.state_dict(), "optimizer": optimizer,
            "weighting": run.weighting.state_dict(), "epoch": len(run.history), "config": run.cfg,
            "model_args": model_args(run.cfg), "history": run.history, "rng": {"torch": torch.get_rng_state()},
            "scaler": run.scaler.state_dict(),  # and which samples the val split held, for eval.py --compare:
            "sample_ids": None if isinstance(run.val_set, dict) else evaluation.sample_ids(run.val_set)}


def save_atomic(obj, path):
    """torch.save through a temporary file and a rename (eval.write_atomic): a run killed at any moment leaves
    either the previous complete checkpoint or the new one, never a truncated one."""
    evaluation.write_atomic(path, lambda tmp: torch.save(obj, tmp))


# What --deterministic delivers, printed under the start line (README, "Determinism").
DETERMINISM = {
    "cpu": "deterministic: a resumed run ends with the bits of an uninterrupted one (same machine and threads; "
           "torch warns about max_unpool2d, whose CPU kernel is deterministic with SegNet's disjoint windows)",
    "cuda": "deterministic: torch's deterministic kernels, and stand-ins for the ops that have none on CUDA "
            "(max-unpooling, the backward of bilinear resizing and of global pooling, the 2-D cross entropy); a "
            "resumed run ends with the bits of an uninterrupted one on the same GPU model and software (under "
            "torchrun only as far as NCCL repeats its all-reduce order, which it does not promise)",
}


def draw_curves(history, path):
    """Three panels: per-task training loss (log scale), task weights, and one validation metric per task."""
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
    save_panels(panels, path)


def save_panels(panels, path, width=360, height=260):
    """Side-by-side line plots drawn with pillow. panels: [(title, {line name: values}, tick label of a y
    value)], one panel per entry."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, series, tick) in enumerate(panels):
        plot_panel(draw, (i * width, 0, (i + 1) * width, height), title, series, tick)
    image.save(path)


def rescaled(values):
    """Values mapped linearly onto [0, 1] (their own range), for lines on different scales in one panel."""
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
            x, y = points[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left + (k % 2) * 150, bottom + 5 + (k // 2) * 11), name, fill=colour)


# ------------------------------------------------------------------------------------------------------------
# 10. --bench: the speed of the training step
# ------------------------------------------------------------------------------------------------------------

# Dense peak throughput in TFLOP/s of common GPUs, for the MFU figure (vendor datasheets, without sparsity).
# Keys are whole words of torch.cuda.get_device_name() (peak_of_device); `--peak-tflops` overrides.
PEAK_TFLOPS = {  # name: (bf16/fp16 tensor cores, tf32 tensor cores)
    "H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
    "L40": (181.0, 90.5), "L4": (121.0, 60.0), "A10": (125.0, 62.5), "4090": (165.0, 82.6), "3090": (71.0, 35.6),
    "V100": (125.0, 15.7),
}


def forward_flops_per_image(run, batch):
    """FLOPs of one forward pass for one image, counted by torch.utils.flop_counter (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = run.model
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(run.normalise(batch["image"][:1]), **run.forward_kwargs)
    model.train()
    return counter.get_total_flops()


def peak_tflops(cfg, device):
    if cfg.get("peak_tflops"):
        return cfg["peak_tflops"]
    if device.type != "cuda":
        return None
    peaks = peak_of_device(torch.cuda.get_device_name(device))
    if peaks is None:
        return None
    return peaks[0] if cfg["amp"] in ("bf16", "fp16") else peaks[1]


def peak_of_device(name):
    """The PEAK_TFLOPS entry whose key is a whole word of the device name ("NVIDIA A100-SXM4-80GB": A100),
    else None. A substring test would read an "NVIDIA L40" as an L4 and an "NVIDIA A10G" as an A10."""
    words = name.replace("-", " ").split()
    return next((PEAK_TFLOPS[key] for key in PEAK_TFLOPS if key in words), None)


def benchmark(cfg, steps, warmup=None, sync_every_step=False):
    """Time `steps` training steps after `warmup` ones and return one JSON-able dict. The batches are taken
    from the training split and moved to the device beforehand: the figure is the model's training speed
    (forward, losses, backward, optimiser), not the data loader's.

    Warm-up: 5 steps on a GPU (cuDNN's autotuner and torch.compile settle there), 2 on a CPU. The timed steps
    run back to back as in training, with no synchronisation between them (eval.DeviceClock marks the device's
    timeline). `sync_every_step` (the hidden --sync-every-step) adds the official loops' per-step .item() on
    every loss, for the baseline."""
    run = setup_run(cfg)
    device = run.device
    warmup = warmup if warmup is not None else (5 if device.type == "cuda" else 2)
    loader = make_loader(run.train_set, cfg, 0, train=True)
    batches = [data.add_derived_targets(evaluation.to_device(b, device, cfg["channels_last"]), run.loss_tasks)
               for b, _ in zip(loader, range(4))]
    flops = forward_flops_per_image(run, batches[0])
    clock = evaluation.DeviceClock(device)
    step = run.graph or (lambda batch: training_step(run, batch))  # as train_one_epoch steps
    for i in range(warmup):
        step(batches[i % len(batches)])

    def timed_step(i):
        losses = step(batches[(warmup + i) % len(batches)])
        if sync_every_step:  # the official loops read every task loss with .item(), every step
            for value in losses:
                value.item()

    median = clock.median_seconds(timed_step, steps)
    batch_size = batches[0]["image"].shape[0]
    result = {"model": cfg["model"], "data": cfg["data"], "images_per_s": round(batch_size / median, 2),
              "ms_per_step": round(1000 * median, 2),
              **evaluation.speed_fields(cfg, device, batches[0]["image"]),
              "compile": cfg["compile"], "cuda_graph": run.graph is not None,
              "gflops_per_image": round(flops / 1e9, 3),
              "sync_every_step": sync_every_step, "fused_optimizer": cfg.get("fused", True),
              "world_size": world_size()}
    peak = peak_tflops(cfg, device)
    if peak:  # model FLOPs utilisation: forward + backward taken as 3x the forward FLOPs
        result["mfu"] = round(3 * flops * batch_size / median / (peak * 1e12), 4)
    return result


# ------------------------------------------------------------------------------------------------------------
# 11. Command line
# ------------------------------------------------------------------------------------------------------------

EPILOG = """the two papers:
  python train.py --model mtan --data nyuv2 --weighting dwa                       # MTAN, Table 3
  python train.py --model mtinet --data nyud --aux-tasks normal,edge \\
                  --pretrained hrnet_w18_small_model_v2.pth                        # MTI-Net, NYUD
datasets are read from data/<name> unless --data-root says otherwise (README, "Datasets")."""


# argparse `type`s: a bad number is a one-line error at parse time that names the flag and the allowed range.
positive_int, non_negative_int = evaluation.positive_int, evaluation.number_type(int, 0)
positive_float = evaluation.number_type(float, 0.0, low_inclusive=False)
non_negative_float = evaluation.number_type(float, 0.0)
text = evaluation.text  # every string flag: an empty value (an unset shell variable) is an error
seed_type = evaluation.number_type(int, 0, high=2 ** 53)  # seed * 1000 + epoch (section 3): within 64 bits

def name_list(value):
    """--tasks, --aux-tasks: comma-separated names, none empty, none twice."""
    names = text(value).split(",")
    if "" in names or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, each once, got {value!r}")
    return value

def wrn_depth(text):
    """--wrn-depth: 6n + 4 (n >= 1 blocks per group), the only depths a wide ResNet has."""
    depth = positive_int(text)
    if depth < 10 or (depth - 4) % 6:
        raise argparse.ArgumentTypeError(f"must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
    return depth


def resolution(text):
    """--resolution HxW: data.parse_resolution's checks (positive multiples of 32), at parse time."""
    try:
        data.parse_resolution(text, flag="--resolution")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def task_weight_pairs(pairs):
    """--task-weights "semantic=1,depth=2" -> {"semantic": 1.0, "depth": 2.0}: finite weights >= 0 (0 turns a
    task's loss off). Whether the names are tasks of the run is checked once the tasks are known."""
    weights = {}
    for item in name_list(pairs).split(","):
        name, _, value = item.partition("=")
        try:
            if name.strip() in weights:
                raise argparse.ArgumentTypeError(f"{name.strip()} given twice")
            weights[name.strip()] = non_negative_float(value)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"expected name=weight pairs with finite weights >= 0, got {item!r} "
                                             f"({e})") from None
    return weights


def build_parser():
    """Every flag defaults to "not given" (argparse.SUPPRESS): resolve_config fills in the rest from DEFAULTS,
    the model family's recipe and the synthetic preset, so a flag only appears in the namespace if typed."""
    p = evaluation.ArgumentParser(description="Train MTAN, MTI-Net and their baselines. With no argument: the "
                                "quickstart (MTAN + DWA on the embedded synthetic scenes).", epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   argument_default=argparse.SUPPRESS)
    what = p.add_argument_group("what to train")
    what.add_argument("--model", choices=list(MODELS), help="MTAN paper: single stan split split-wide split-deep "
                      "dense cross-stitch mtan (Table 3), wrn-mtan (Decathlon); MTI-Net paper: mtinet padnet "
                      "hrnet-mtl; dilated ResNet-50: mtan-deeplab deeplab (default: mtan)")
    what.add_argument("--data", choices=DENSE_DATASETS + DECATHLON_DATASETS, help="default: synthetic (embedded, "
                      "no download)")
    what.add_argument("--data-root", type=text, metavar="DIR", help="the dataset folder (default: "
                      "data/<name>)")
    what.add_argument("--task", type=text, metavar="TASK", help="the task of a single-task model (single, "
                      "stan, or hrnet-mtl and deeplab with one task); for wrn-mtan: train on one Decathlon "
                      "domain only (the single-domain baseline)")
    what.add_argument("--tasks", type=name_list, metavar="TASKS", help="the main tasks, comma separated, a "
                      "subset of the dataset's (default: its primary tasks), e.g. semantic,depth as in "
                      "MTI-Net's NYUD setting")
    what.add_argument("--aux-tasks", type=name_list, metavar="TASKS", help="MTI-Net/PAD-Net auxiliary "
                      "tasks, comma separated, e.g. normal,edge")
    what.add_argument("--task-weights", type=task_weight_pairs, metavar="T=W,...", help="fixed loss weights, e.g. "
                      "semantic=1,depth=1,normal=10,edge=50 (default: MTI-Net's for the HRNet family, else 1)")
    what.add_argument("--weighting", choices=["equal", "uncertainty", "dwa"], help="how the main task losses "
                      "combine (default: equal; dwa for the quickstart)")
    what.add_argument("--temperature", type=evaluation.number_type(float, 1e-3), metavar="T", help="DWA "
                      "temperature, at least 0.001 (default 2)")
    what.add_argument("--augment", action="store_true", help="the official augmentation (MTAN: scale-crop and "
                      "flip; PASCAL: MTI-Net's)")
    what.add_argument("--backbone", choices=list(mtinet.HRNET_CONFIGS), help="the HRNet of mtinet, padnet and "
                      "hrnet-mtl (default: w18-small-v2, the MTI-Net paper's HRNet-18; w48: its state of the art)")
    what.add_argument("--pretrained", type=text, metavar="PATH", help="ImageNet weights of the backbone: "
                      "HRNet-Image-Classification's file (hrnet_w18_small_model_v2.pth, "
                      "hrnetv2_w48_imagenet_pretrained.pth, ...) or torchvision's ResNet-50 file; switches "
                      "on ImageNet input normalisation")
    what.add_argument("--fpm-softmax", choices=["tasks", "official"], help="MTI-Net's FPM softmax: across tasks "
                      "per channel (the paper, default) or the official code's grouping of adjacent channels")
    what.add_argument("--width", type=positive_float, metavar="X", help="channel width multiplier of SegNet models "
                      "(1.0 = the paper; default 0.25 on synthetic data)")
    what.add_argument("--wrn-depth", type=wrn_depth, metavar="N", help="wrn-mtan: depth of the wide ResNet, 6n + 4 "
                      "(28 = the paper)")
    what.add_argument("--num-classes", type=int, choices=[2, 7, 19], metavar="N", help="CityScapes classes: 2, 7 "
                      "or 19 (default 7)")
    recipe = p.add_argument_group("recipe overrides (default: the model family's recipe, see README 'Training'; "
                                  "on synthetic data a smaller preset)")
    recipe.add_argument("--epochs", type=positive_int, metavar="N", help="epochs (resume: train for longer)")
    recipe.add_argument("--batch-size", type=positive_int, metavar="N", help="batch size (per GPU under torchrun)")
    recipe.add_argument("--lr", type=positive_float, metavar="X", help="initial learning rate")
    recipe.add_argument("--weight-decay", type=non_negative_float, metavar="X", help="L2 weight decay")
    recipe.add_argument("--finetune-epochs", type=non_negative_int, metavar="N", help="wrn-mtan: epochs of the second, "
                        "fine-tuning phase")
    run = p.add_argument_group("the run")
    run.add_argument("--out", type=text, metavar="DIR", help="run folder (default "
                     "runs/<model>-<data>-<time>)")
    run.add_argument("--resume", type=text, metavar="DIR", help="continue the run in DIR from its last.pt, "
                     "with its own settings (--epochs, --data-root, --device, --workers, --compile, "
                     "--cuda-graph, --eval-every may change)")
    run.add_argument("--eval-every", type=positive_int, metavar="N", help="evaluate every N epochs and after the last "
                     "(default 1; 2 on synthetic data)")
    run.add_argument("--subset", type=positive_int, metavar="N", help="use only the first N samples of each split")
    run.add_argument("--resolution", type=resolution, metavar="HxW", help="size of the synthetic scenes, "
                     "multiples of 32 (default 96x128)")
    run.add_argument("--seed", type=seed_type, metavar="N", help="model init, batch order, augmentation "
                     "(default 0)")
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    speed = p.add_argument_group("speed")
    speed.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    speed.add_argument("--amp", choices=["bf16", "fp16", "off"], help="mixed precision (default: bf16 on a GPU, "
                       "fp16 on GPUs without bf16, off on a CPU)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="channels_last memory "
                       "format (default on: it is faster on CPU and GPU)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model: the first step compiles, "
                       "and a smaller last batch of an epoch compiles once more; later steps and epochs reuse both")
    speed.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, help="replay the training step as one "
                       "CUDA graph (default: on a GPU unless --compile, fp16 or torchrun)")
    speed.add_argument("--workers", type=non_negative_int, metavar="N", help="DataLoader worker processes (default 0)")
    speed.add_argument("--data-on-device", action="store_true", help="hold the whole training split on the "
                       "device (no DataLoader during training; needs the memory: NYUv2 takes about 2.8 GB)")
    speed.add_argument("--bench", type=positive_int, metavar="N", help="time N training steps, print one JSON "
                       "line, exit")
    speed.add_argument("--peak-tflops", type=positive_float, metavar="X", help="the device's peak TFLOP/s for the "
                       "MFU of --bench (default: a table of common GPUs)")
    # The baseline of the benchmark, not a training option: read every loss and wait for the device after each
    # step, as the official training loops do (.item() per loss), to measure what removing those syncs gains.
    speed.add_argument("--sync-every-step", action="store_true", help=argparse.SUPPRESS)
    # Likewise: the optimiser's default per-parameter loop instead of the fused kernel, for the baseline.
    speed.add_argument("--no-fused", dest="fused", action="store_false", help=argparse.SUPPRESS)
    gpus = p.add_argument_group("multi-GPU (torchrun --nproc_per_node=N train.py ...)")
    gpus.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs")
    return p


def resolve_config(args, parser):
    """The configuration of a new run: DEFAULTS < the family's recipe < the synthetic preset < the typed
    flags. Returns a plain dict (stored in checkpoints)."""
    given = dict(vars(args))  # only the flags the user typed (build_parser's default is SUPPRESS)
    for key in ("resume", "bench", "sync_every_step"):  # what to do with the run, not part of it
        given.pop(key, None)
    task_flags = {key: given.pop(key, None) for key in ("task", "tasks", "aux_tasks", "task_weights")}
    model, dataset = given.get("model", DEFAULTS["model"]), given.get("data", DEFAULTS["data"])
    family = MODELS[model].family
    if (family == "wrn") != (dataset in DECATHLON_DATASETS):
        parser.error(f"--model wrn-mtan goes with --data {' or '.join(DECATHLON_DATASETS)}, and the dense models "
                     f"with {', '.join(DENSE_DATASETS)} (got --model {model} --data {dataset})")
    quickstart = QUICKSTART if (model, dataset) == ("mtan", "synthetic") else {}
    cfg = {**DEFAULTS, **RECIPES[family], **PRESETS.get(dataset, {}), **quickstart, **given}
    cfg["device"] = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg["amp"] is None:  # the fast path by default on a GPU (fp16 on GPUs without bf16); opt-in on a CPU
        cfg["amp"] = evaluation.default_amp(cfg["device"])
    # With --compile only when asked (--compile --cuda-graph): the compiled kernels recorded in the graph
    cfg["cuda_graph"] = graphable(cfg) and not cfg["compile"] if cfg["cuda_graph"] is None else cfg["cuda_graph"]
    check_flags(cfg, {**given, **task_flags, "bench": "bench" in vars(args)}, parser)
    cfg["tasks"], cfg["aux_tasks"] = resolve_tasks(cfg, task_flags, parser)
    tasks = list(cfg["tasks"]) + list(cfg["aux_tasks"])
    for name in task_flags["task_weights"] or {}:
        if name not in tasks:
            parser.error(f"--task-weights {name}: not a task of this run (its tasks: {', '.join(tasks)})")
    recipe = cfg["task_weights"] or {}  # the fixed weights of the family's recipe (MTI-Net's), then the flag
    cfg["task_weights"] = {**{t: recipe.get(t, 1.0) for t in tasks if recipe},
                           **(task_flags["task_weights"] or {})}
    # What the loss will see: the weights as the float32 tensor of training_step (1e-300 is 0 there)
    if not torch.tensor([cfg["task_weights"].get(t, 1.0) for t in cfg["tasks"]], dtype=torch.float32).any():
        parser.error("--task-weights: every main task has weight 0 (in float32, as the loss sees it): the run "
                     "would learn nothing")
    cfg.update(model_facts(model, cfg["tasks"]))
    cfg["out"] = cfg["out"] or os.path.join("runs", f"{model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def graphable(cfg):
    """Whether the training step can be one CUDA graph (CudaGraphStep): fp16's loss scale is read on the host,
    the Decathlon's step changes with the domain, and torchrun's collectives run outside the graph."""
    return (cfg["device"] == "cuda" and cfg["amp"] != "fp16" and MODELS[cfg["model"]].family != "wrn"
            and int(os.environ.get("WORLD_SIZE", "1")) == 1)


# Every flag applies or is refused: the flags below apply only where their test on the configuration holds
# (the rest apply to every run). check_flags refuses a typed flag outside its scope in one line, for a new run
# and a resume alike, instead of letting it do nothing.
FLAG_SCOPE = {  # flag: (the runs it applies to, a test on the model's ModelSpec and the configuration)
    "backbone": ("the HRNet models (mtinet, padnet, hrnet-mtl)", lambda spec, c: spec.family == "hrnet"),
    "width": ("the SegNet, ResNet-50 and wide ResNet models (an HRNet's width is its --backbone)",
              lambda spec, c: spec.family != "hrnet"),
    "pretrained": ("the HRNet and ResNet-50 models", lambda spec, c: spec.family in ("hrnet", "resnet")),
    "task": ("single-task models (single, stan, hrnet-mtl, deeplab, wrn-mtan)",
             lambda spec, c: spec.single_task or spec.one_task),
    "aux_tasks": ("--model mtinet and padnet", lambda spec, c: spec.aux),
    "fpm_softmax": ("--model mtinet", lambda spec, c: c["model"] == "mtinet"),
    "wrn_depth": ("--model wrn-mtan", lambda spec, c: c["model"] == "wrn-mtan"),
    "finetune_epochs": ("--model wrn-mtan (its fine-tuning phase)", lambda spec, c: c["model"] == "wrn-mtan"),
    "temperature": ("--weighting dwa", lambda spec, c: c["weighting"] == "dwa"),
    "num_classes": ("--data cityscapes", lambda spec, c: c["data"] == "cityscapes"),
    "resolution": ("--data synthetic (real datasets have a fixed size)", lambda spec, c: c["data"] == "synthetic"),
    "data_root": ("datasets read from files, not synthetic ones", lambda spec, c: "synthetic" not in c["data"]),
    "augment": ("the dense datasets (the Decathlon's domains augment their own way)",
                lambda spec, c: c["data"] in DENSE_DATASETS),
    "data_on_device": ("the dense datasets but pascal (its training samples are augmented one by one)",
                       lambda spec, c: c["data"] in DENSE_DATASETS and c["data"] != "pascal"),
    "cuda_graph": ("dense models on --device cuda in one process, without --amp fp16",
                   lambda spec, c: not c["cuda_graph"] or graphable(c)),
    "sync_bn": ("runs under torchrun", lambda spec, c: int(os.environ.get("WORLD_SIZE", "1")) > 1),
    "peak_tflops": ("--bench (its MFU)", lambda spec, c: c["bench"]),
}


def check_flags(cfg, typed, parser):
    """Refuse a typed flag outside its FLAG_SCOPE, and the values no flag's type can check alone."""
    scope = dict(cfg, bench=typed.get("bench"))
    for key in typed:
        if typed[key] is not None and key in FLAG_SCOPE and not FLAG_SCOPE[key][1](MODELS[cfg["model"]], scope):
            run = " ".join(f"--{k} {cfg[k]}" for k in ("model", "data", "weighting", "device", "amp"))
            parser.error(f"--{key.replace('_', '-')} applies only to {FLAG_SCOPE[key][0]} (this run: {run})")
    if typed.get("pretrained") and not os.path.isfile(typed["pretrained"]):
        parser.error(f"--pretrained {typed['pretrained']}: no such file")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")


def dataset_tasks(cfg):
    """(primary tasks, every target provided) of the configured dataset, or a one-line error."""
    if cfg["data"] == "synthetic-decathlon":  # known without rendering anything
        tasks = {domain: spec[0] for domain, spec in data.SYNTHETIC_DECATHLON.items()}
        return tasks, tasks
    if cfg["data"] == "decathlon":
        _, tasks = data.build_decathlon(cfg["data"], cfg["data_root"], "train")  # the domains under ROOT
        missing = [d for d in data.DECATHLON_DOMAINS if d not in tasks]
        if missing and not cfg.get("task"):
            print(f"note: no folder for {', '.join(missing)} in {cfg['data_root']}: training on the other "
                  f"{len(tasks)} domains")
        return tasks, tasks
    options = {"resolution": (64, 64)} if cfg["data"] == "synthetic" else {}
    dataset, tasks = data.build_dataset(cfg["data"], cfg["data_root"], "train", **options)  # or DatasetError
    return tasks, dataset.tasks


def resolve_tasks(cfg, flags, parser):
    """The main and auxiliary task dicts from the dataset and --task / --tasks / --aux-tasks."""
    model, dataset, spec = cfg["model"], cfg["data"], MODELS[cfg["model"]]
    primary, available = dataset_tasks(dict(cfg, task=flags["task"]))
    if "semantic" in available and "edge" not in available:
        available = dict(available, edge=1)  # derived from the semantic labels on the fly (data.semantic_edges)
    if flags["task"] and flags["tasks"]:
        parser.error("--task and --tasks: pass one (--task for a single-task model, --tasks for the others)")
    if spec.single_task and not flags["task"]:
        parser.error(f"--model {model} is a single-task model: choose --task from {', '.join(primary)}")
    if flags["task"]:
        if flags["task"] not in available:
            parser.error(f"--task {flags['task']}: the {dataset} dataset has tasks {', '.join(available)}")
        primary = {flags["task"]: available[flags["task"]]}
    elif flags["tasks"]:
        for name in flags["tasks"].split(","):
            if name not in available:
                parser.error(f"--tasks {name}: the {dataset} dataset has tasks {', '.join(available)}")
        primary = {name: available[name] for name in flags["tasks"].split(",")}
    aux = {}
    for name in filter(None, (flags["aux_tasks"] or "").split(",")):
        if name in primary:
            parser.error(f"--aux-tasks {name}: already a main task")
        if name not in available:
            parser.error(f"--aux-tasks {name}: the {dataset} dataset has tasks {', '.join(available)}")
        aux[name] = available[name]
    return dict(primary), aux


# What --resume may change: how long to train, and where and how fast it runs; never what a step computes.
RESUMABLE = ("epochs", "data_root", "device", "workers", "compile", "cuda_graph", "eval_every", "peak_tflops")

def resume_config(args, parser):
    """(configuration, checkpoint) of `--resume DIR`: the run's own configuration. The RESUMABLE flags are
    honoured and checked as for a new run; any other flag must agree with the checkpoint, else one line."""
    resume = evaluation.load_checkpoint(args.resume, resuming=True, model_facts=model_facts, config_keys=DEFAULTS)
    cfg = dict(resume["config"])  # complete: load_checkpoint migrated or refused a file of another version
    out = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume)
    given = {k: v for k, v in vars(args).items() if k not in ("resume", "bench", "sync_every_step")}
    for key, value in given.items():
        recorded, typed = compared_values(cfg, key, value, out)
        if key in RESUMABLE:
            cfg[key] = value
        elif typed != recorded:
            shown = ",".join(sorted(recorded)) if isinstance(recorded, set) else recorded
            flag, allowed = "--" + key.replace("_", "-"), ", ".join("--" + k.replace("_", "-") for k in RESUMABLE)
            raise UsageError(f"{flag} {value}: the run in {out} has {shown}, which cannot change when it resumes "
                             f"({allowed} can); start a new run with --out for another setting")
    cfg["out"] = out
    if total_epochs(cfg) < resume["epoch"]:
        raise UsageError(f"--epochs {cfg['epochs']}: the run in {out} has trained {resume['epoch']} epochs "
                         f"already; pass more to train longer")
    if cfg["device"] == "cuda" and not torch.cuda.is_available() and "device" not in given:
        print(f"note: {out} was trained on a GPU; no CUDA device here, so it continues on the CPU")
        cfg["device"] = "cpu"
    check_flags(cfg, {**given, "bench": "bench" in vars(args)}, parser)  # as for a new run
    return cfg, resume


def compared_values(cfg, key, value, out):
    """(the run's setting, the typed flag's) for --resume to compare as values, not as the strings typed: task
    sets, parsed resolutions, absolute folders, the weights of the tasks named."""
    if key in ("task", "tasks", "aux_tasks"):
        return set(cfg["tasks" if key == "task" else key] or {}), set(value.split(","))
    if key == "task_weights":
        return {name: cfg["task_weights"].get(name, 1.0) for name in value}, value
    if key == "resolution":
        return cfg[key] and data.parse_resolution(cfg[key]), data.parse_resolution(value)
    if key == "out":
        return os.path.abspath(out), os.path.abspath(value)
    return cfg.get(key), value


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    lock, cfg = None, {}
    try:
        if getattr(args, "resume", None):
            cfg, resume = resume_config(args, parser)
        else:
            cfg, resume = resolve_config(args, parser), None
            if cfg["data"] == "synthetic" and "width" not in vars(args):
                width = f"width {cfg['width']}, " if cfg["family"] != "hrnet" else ""  # HRNet: no width
                print(f"synthetic data preset: {width}{cfg['resolution']}, {cfg['epochs']} epochs, "
                      f"batch {cfg['batch_size']}, lr {cfg['lr']}, at most {cfg['subset']} samples per split "
                      f"(override any of them with flags)")
        evaluation.configure_torch(cfg)
        if getattr(args, "bench", None):
            result = benchmark(cfg, args.bench, sync_every_step=getattr(args, "sync_every_step", False))
            say(evaluation.strict_json(result))  # under torchrun: rank 0's figures (images/s per rank)
            return result
        # Only the first process writes the run folder (under torchrun: rank 0, before the process group exists).
        if int(os.environ.get("RANK", "0")) == 0:
            lock = claim_run_folder(cfg, resume is not None, "out" in vars(args))
        if cfg["data"] in DECATHLON_DATASETS:
            return run_decathlon(cfg, resume)
        return run_training(cfg, resume)
    except (KeyboardInterrupt, BrokenPipeError) as stop:  # Ctrl-C, `train.py ... | head -1`: one line
        saved = lock and os.path.isfile(os.path.join(cfg["out"], "last.pt"))
        evaluation.stop_quietly(stop, f"; pass --resume {cfg['out']} to continue the run" if saved else "")
    except (data.DatasetError, evaluation.CheckpointError, UsageError, FloatingPointError,
            OSError) as error:  # a user's mistake: one line (a bug keeps its traceback)
        out = cfg.get("out")
        hint = f" ({out} keeps its last good checkpoint: free some space, then pass --resume {out})"
        sys.exit(evaluation.error_line(error, hint if lock else ""))
    except (RuntimeError, MemoryError, ValueError) as error:  # out of memory, a batch of one: one line
        size = f"backbone {cfg['backbone']}" if cfg.get("family") == "hrnet" else f"width {cfg.get('width')}"
        sizes = (f"--model {cfg.get('model')} ({size}), --batch-size {cfg.get('batch_size')}, resolution "
                 f"{cfg.get('resolution') or 'of the dataset'}")
        sys.exit(evaluation.resource_error(error, sizes))
    finally:
        release_lock(lock)  # also after an error or Ctrl-C; a killed process leaves a stale lock (taken over)
        leave_distributed()


if __name__ == "__main__":
    main()
