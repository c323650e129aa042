"""
MTAN: "End-to-End Multi-Task Learning with Attention" (Liu, Johns, Davison, CVPR 2019), in plain PyTorch.

Every network of the paper's experiments, in the order a reader needs them, then an appendix:

    1. building blocks   ConvLayer, Stage, PredictionHead, TaskHeads, AttentionMask, SharedConv
    2. SegNetBackbone    VGG-16 encoder + mirrored decoder, max-pool with indices / max-unpool
    3. SegNet            One Task (one task) and Split standard / wide / deep (several tasks)
    4. MTAN              shared SegNet + one soft-attention chain per task; one task = STAN
    5. DenseSegNet, CrossStitchSegNet      the remaining baselines of the paper's Tables 2 and 3
    6. WideResNetMTAN    WRN-28-4 + attention for the Visual Decathlon (Table 4)
    7. ResNetDilated, DeepLabHead, MTANDeepLabv3, DeepLabv3      dilated ResNet-50 + DeepLabv3 heads
    Appendix             unpool_by_gather, DeterministicBilinear: stand-ins for --deterministic on a GPU

Every model is `Model(tasks, ...)`, `tasks` an ordered dict name -> output channels, e.g. {"semantic": 13,
"depth": 1, "normal": 3}, and `forward(x)` returns a dict name -> (B, C, H, W) prediction at the input
resolution: "semantic" gives logits, "normal" unit vectors, anything else raw values. `width` multiplies every
channel count: 1.0 is the paper (and its parameter counts), 0.25 a quick CPU toy.

The idea (paper Fig. 2). A shared network learns features useful to all tasks. Each task i owns a chain of
small attention modules that, at every stage j, softly selects the shared features it wants:

    â_i^j = a_i^j ⊙ p^j                                 Eq. (1)   attended features
    a_i^j = h_i^j( g_i^j( [u^j ; f^j(â_i^(j-1))] ) )    Eq. (2)   attention mask, values in (0, 1)

u^j is the output of the first conv of shared stage j, p^j the output of its last conv, g and h are
task-specific 1x1 convs (the mask module), f^j is a 3x3 conv shared by all tasks. Eq. (2) summarises the
official code only loosely; the exact wiring, which this file follows, is asymmetric:

    ENCODER stage j (fine to coarse)

    shared   in ─► conv ─┬─► conv.. ─┬─► maxpool ─► stage j+1  (indices kept)
                         │ u_j       │ p_j
                         ▼           ▼
    task i   x_(j-1) ─► g,h ─► a ──► ⊙ ─► f ─► maxpool ─► x_j

    DECODER stage j (coarse to fine)

    shared   z ─► unpool ───────┬─► conv.. ─┬─► stage j+1
                                │ up_j      │ p_j
                                ▼           ▼
    task i   x ─► up×2 ─► f ─► g,h ─► a ──► ⊙ ─► x   (last x: head i)

    Two arrows into g,h mean concatenation, shared feature first: [u_j; x_(j-1)] and [up_j; f(...)].
    Encoder: mask, then f, then a plain 2x2 max-pool (no indices); stage 0's mask sees u_0 alone.
    Decoder: bilinear x2 upsampling (align_corners=True) and f come *first*, and the mask reads the unpooled
    tensor up_j entering the shared stage, not a conv output. Both multiply the stage's last conv output p_j.

Section 7 is not in the paper. The official repository also holds MTAN on a dilated ResNet-50 with DeepLabv3
heads (lorenmt/mtan, im2im_pred/model_resnet_mtan/resnet_mtan.py, class MTANDeepLabv3), and MTI-Net's code
(SimonVandenhende/Multi-Task-Learning-PyTorch, models/models.py) uses the same backbone and head for its
single-task and multi-task baselines (DeepLabv3 here). The ResNet-50 is written out with torchvision's module
names, so a torchvision ImageNet state dict loads unchanged (ResNetDilated.load_torchvision); its last two
stages trade stride for dilation (output stride 8: 1/8 resolution features, same receptive field), and each
task reads them through its own DeepLabv3 head (atrous spatial pyramid pooling, Chen et al. 2017).

Deviations from the official code (lorenmt/mtan), each repeated where it happens:
  * heads return logits for "semantic" (official: log_softmax; here the loss does it) and normalise normals
    with an epsilon (official: none);
  * no `logsigma` uncertainty parameters: they belong to the loss weighting (train.py), so parameter counts
    are the official ones minus 3;
  * any task names and channel counts instead of three hard-coded tasks, and a `width` multiplier;
  * MTAN runs the shared convs f once on the task-stacked batch (same maths, see SharedConv);
  * DenseSegNet drops a decoder block whose output the official code never uses;
  * WideResNetMTAN returns logits (official: softmax probabilities, then log(p + 1e-20) in the loss);
  * the ResNet models start from random weights (official: ImageNet weights downloaded in the constructor);
    load them with `model.backbone.load_torchvision(path)`. The official MTANDeepLabv3 has no logsigma, so its
    count, 92,347,921 for the three NYUv2 tasks, is matched exactly.
"""
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# The five stage widths of VGG-16 ("filter" in the official code) and its convs per stage (2, 2, 3, 3, 3).
WIDTHS = (64, 128, 256, 512, 512)
NUM_CONVS = (2, 2, 3, 3, 3)


def scaled_widths(width: float = 1.0, wide: bool = False) -> List[int]:
    """Stage widths times `width` (1.0 = the paper). Split Wide widens only the deepest stage to 1024."""
    base = WIDTHS[:4] + (1024,) if wide else WIDTHS
    return [max(1, round(c * width)) for c in base]


def check_tasks(tasks: Dict[str, int]) -> Dict[str, int]:
    """A copy of `tasks`, insertion order kept: it fixes the order of heads, outputs and attention chains."""
    if not tasks or any(int(c) != c or c < 1 for c in tasks.values()):
        raise ValueError(f"tasks must be a non-empty dict name -> output channels (> 0), got {tasks!r}")
    return {name: int(c) for name, c in tasks.items()}


def check_input(x: torch.Tensor, multiple: int = 32, why: str = "five 2x2 poolings") -> None:
    """SegNet pools five times by 2 and unpools back: H and W must be multiples of 32 (MTAN-DeepLabv3: 8)."""
    if x.dim() != 4 or x.shape[-2] % multiple or x.shape[-1] % multiple:
        raise ValueError(f"expected a (B, 3, H, W) input with H and W divisible by {multiple} ({why}), "
                         f"got shape {tuple(x.shape)}")


def init_official(model: nn.Module, uniform: bool = False) -> None:
    """Official init: xavier_normal_ convs (Dense and Cross-stitch: xavier_uniform_), zero biases, BN 1/0."""
    xavier = nn.init.xavier_uniform_ if uniform else nn.init.xavier_normal_
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            xavier(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------------------
# 1. Building blocks


class ConvLayer(nn.Module):
    """conv 3x3 -> BN -> ReLU, the brick every SegNet here is made of (official `conv_layer`).

    The conv keeps its bias although BN follows: redundant, but part of the official parameter counts."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def conv_layers(channels: Sequence[int], deep: bool = False) -> nn.Sequential:
    """ConvLayers through `channels`, [3, 64, 64]: 3->64, 64->64. `deep` doubles each one (Split Deep)."""
    layers = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        layers.append(ConvLayer(cin, cout))
        if deep:
            layers.append(ConvLayer(cout, cout))
    return nn.Sequential(*layers)


class Stage(nn.Module):
    """One SegNet stage, e.g. channels [128, 256, 256, 256]: three ConvLayers at one resolution.

    Returns the first layer's output u (MTAN's mask input in the encoder) and the last one's p (the feature
    the mask multiplies). With `deep` (Split Deep) every layer is doubled, `first` included."""

    def __init__(self, channels: Sequence[int], deep: bool = False):
        super().__init__()
        self.first = conv_layers(channels[:2], deep)
        self.rest = conv_layers(channels[1:], deep)

    def forward(self, x):
        u = self.first(x)
        return u, self.rest(u)


class PredictionHead(nn.Sequential):
    """conv 3x3 -> conv 1x1 with *no* BN or ReLU between: the official head is purely linear."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, cout, 1))


def activate(task: str, y: torch.Tensor) -> torch.Tensor:
    """Output convention by task name. "semantic" stays logits: the official code returns log_softmax, the
    loss does it here (cross_entropy = log_softmax + nll, identical maths). "normal" becomes unit vectors; the
    official code divides by the norm with no epsilon (NaN on a zero vector), F.normalize clamps it."""
    if task == "normal":
        return F.normalize(y, p=2, dim=1, eps=1e-12)
    return y


class TaskHeads(nn.ModuleDict):
    """One PredictionHead per task. Takes one feature map shared by all heads, or a dict task -> feature."""

    def __init__(self, tasks: Dict[str, int], cin: int):
        super().__init__({name: PredictionHead(cin, cout) for name, cout in tasks.items()})

    def forward(self, features):
        return {name: activate(name, head(features[name] if isinstance(features, dict) else features))
                for name, head in self.items()}


class AttentionMask(nn.Sequential):
    """The task-specific mask a = h(g(.)) of Eq. (2) (official `att_layer`, one per task and stage):
    g = 1x1 conv -> BN -> ReLU, h = 1x1 conv -> BN -> sigmoid. Cheap (1x1) and full resolution: one weight in
    (0, 1) per channel and pixel of the shared feature it gates. g's width `mid` is `cout` in every SegNet
    model; MTAN-DeepLabv3 (section 7) squeezes it to cout/4, like a ResNet bottleneck."""

    def __init__(self, cin: int, cout: int, mid: Optional[int] = None):
        mid = cout if mid is None else mid
        super().__init__(nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid())


class SharedConv(ConvLayer):
    """The shared 3x3 feature extractor f of Eq. (2): one set of weights applied to every task's tensor.

    Deviation (speed only): the official code calls f once per task. Here the T task tensors are stacked along
    the batch dimension, (T*B, C, H, W), and the conv runs once for all of them: a conv treats each sample
    independently, so this is the same maths with T times fewer kernel launches. BatchNorm is the catch: in
    train mode it normalises with the statistics of its batch, and the stacked batch would mix the tasks'
    statistics and update the running averages once instead of T times. So in train mode BN runs per task
    chunk, exactly as the official loop does (same batch statistics, same sequential running-stat updates); in
    eval mode BN is a fixed per-channel affine map and runs on the whole stack."""

    def forward(self, x, num_tasks: int = 1):
        y = self.conv(x)                                                # (T*B, C_out, H, W)
        if self.training and num_tasks > 1:
            y = torch.cat([self.bn(chunk) for chunk in y.chunk(num_tasks)])
        else:
            y = self.bn(y)
        return F.relu(y, inplace=True)


# ------------------------------------------------------------------------------------------------------------
# 2. SegNet: the shared encoder-decoder (paper Sec. 3.1; Badrinarayanan et al. 2017)


def encoder_plan(widths: Sequence[int], cin: int = 3) -> List[List[int]]:
    """Conv widths of the five encoder stages: [3, 64, 64], [64, 128, 128], [128, 256, 256, 256],
    [256, 512, 512, 512], [512, 512, 512, 512] (the 13 convs of VGG-16)."""
    ins = [cin] + list(widths[:-1])
    return [[i] + [c] * n for i, c, n in zip(ins, widths, NUM_CONVS)]


def decoder_plan(widths: Sequence[int]) -> List[List[int]]:
    """The mirror image, deepest stage first: [512, 512, 512, 512], [512, 256, 256, 256],
    [256, 128, 128, 128], [128, 64, 64], [64, 64, 64]. Each stage's first conv does the narrowing."""
    outs = [widths[0]] + list(widths[:-1])
    return [[i] + [c] * n for i, c, n in reversed(list(zip(widths, outs, NUM_CONVS)))]


class Encoded(NamedTuple):
    first: List[torch.Tensor]    # u_j: output of stage j's first conv       (B, C_j, H/2^j, W/2^j)
    last: List[torch.Tensor]     # p_j: output of its last conv, before pool  (B, C_j, H/2^j, W/2^j)
    pooled: List[torch.Tensor]   # maxpool(p_j)                               (B, C_j, H/2^(j+1), W/2^(j+1))
    indices: List[torch.Tensor]  # where each maximum came from, for unpooling


class Decoded(NamedTuple):
    unpooled: List[torch.Tensor]  # up_j: unpooled tensor entering stage j   (B, C_in, H/2^(4-j), W/2^(4-j))
    last: List[torch.Tensor]      # p_j: output of its last conv             (B, C_out, H/2^(4-j), W/2^(4-j))


class SegNetEncoder(nn.Module):
    """Five stages, each followed by a 2x2 max-pool that remembers where its maxima were.

    `side` (DenseSegNet only): extra tensors concatenated to the input of stages 1-4 (channels: own first)."""

    def __init__(self, plan: List[List[int]], deep: bool = False):
        super().__init__()
        self.stages = nn.ModuleList(Stage(channels, deep) for channels in plan)

    def forward(self, x, side: Optional[List[torch.Tensor]] = None) -> Encoded:
        out = Encoded([], [], [], [])
        for j, stage in enumerate(self.stages):
            if j > 0 and side is not None:
                x = torch.cat([x, side[j - 1]], dim=1)
            u, p = stage(x)                                             # (B, C_j, H/2^j, W/2^j)
            x, idx = F.max_pool2d(p, 2, 2, return_indices=True)         # (B, C_j, H/2^(j+1), W/2^(j+1))
            for lst, t in zip(out, (u, p, x, idx)):                     # out.first.append(u), ...
                lst.append(t)
        return out


def max_unpool(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """F.max_unpool2d(x, indices, 2, 2); on a GPU in deterministic mode unpool_by_gather (appendix), the same
    values. (torch flags its CPU kernel too, but there each value is written by one thread: with windows that
    never collide, the result cannot depend on their order.)"""
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return unpool_by_gather(x, indices)
    return F.max_unpool2d(x, indices, 2, 2)


class SegNetDecoder(nn.Module):
    """Stages deepest first, each preceded by a max-unpool that puts every value back where the matching
    encoder pool found it (zeros elsewhere): SegNet's memory-cheap alternative to skip connections.

    `side` (DenseSegNet only): extra tensors concatenated to each unpooled input (channels: own first)."""

    def __init__(self, plan: List[List[int]], deep: bool = False):
        super().__init__()
        self.stages = nn.ModuleList(Stage(channels, deep) for channels in plan)

    def forward(self, z, indices: List[torch.Tensor], side: Optional[List[torch.Tensor]] = None) -> Decoded:
        out = Decoded([], [])
        for j, (stage, idx) in enumerate(zip(self.stages, reversed(indices))):
            up = max_unpool(z, idx)                                     # (B, C, 2h, 2w)
            _, z = stage(up if side is None else torch.cat([up, side[j]], dim=1))
            out.unpooled.append(up)
            out.last.append(z)
        return out


class SegNetBackbone(nn.Module):
    """Encoder + decoder. For a (B, 3, H, W) input the bottleneck is (B, 512, H/32, W/32) and the last decoder
    output (B, 64, H, W). Returns every intermediate tensor: MTAN's attention reads them."""

    def __init__(self, enc_plan: List[List[int]], dec_plan: List[List[int]], deep: bool = False):
        super().__init__()
        self.encoder = SegNetEncoder(enc_plan, deep)
        self.decoder = SegNetDecoder(dec_plan, deep)

    def forward(self, x, enc_side=None, dec_side=None):
        enc = self.encoder(x, enc_side)
        return enc, self.decoder(enc.pooled[-1], enc.indices, dec_side)


# ------------------------------------------------------------------------------------------------------------
# 3. One Task and Split (paper Sec. 4.1, baselines)


class SegNet(nn.Module):
    """One task: the paper's "One Task" baseline (vanilla SegNet, 24,981,069 parameters for 13 classes).
    Several tasks: "Split", hard parameter sharing, every head on the same last decoder feature.
      variant="standard"  the plain shared SegNet
      variant="wide"      the deepest stage widened to 1024 channels (paper #P 1.75)
      variant="deep"      every ConvLayer doubled, 52 body convs instead of 26 (paper #P 2)"""

    def __init__(self, tasks: Dict[str, int], variant: str = "standard", width: float = 1.0):
        super().__init__()
        if variant not in ("standard", "wide", "deep"):
            raise ValueError(f"variant must be 'standard', 'wide' or 'deep', got {variant!r}")
        self.tasks = check_tasks(tasks)
        w = scaled_widths(width, wide=variant == "wide")
        self.backbone = SegNetBackbone(encoder_plan(w), decoder_plan(w), deep=variant == "deep")
        self.heads = TaskHeads(self.tasks, w[0])
        init_official(self)

    def forward(self, x) -> Dict[str, torch.Tensor]:
        check_input(x)
        _, dec = self.backbone(x)
        return self.heads(dec.last[-1])                                 # heads read (B, 64, H, W)


# ------------------------------------------------------------------------------------------------------------
# 4. MTAN (paper Sec. 3, Fig. 2)


def resize_bilinear(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """F.interpolate(x, size, mode="bilinear", align_corners=align_corners); on a GPU in deterministic mode
    with a backward without atomic adds (DeterministicBilinear, appendix)."""
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return DeterministicBilinear.apply(x, tuple(size), align_corners)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class TaskAttention(nn.Module):
    """The task-specific half of one attention chain: five encoder and five decoder masks (the shared convs f
    live in MTAN). Mask sizes [in -> out] at width 1.0:
      encoder: 64->64 (from u_0 alone), 256->128, 512->256, 1024->512, 1024->512   ([u_j; x_(j-1)] -> C_j)
      decoder: 1024->512, 768->256, 384->128, 192->64, 128->64                     ([up_j; f(x)] -> C_out)"""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        enc_in = [widths[0]] + [2 * c for c in widths[1:]]
        self.encoder = nn.ModuleList(AttentionMask(i, c) for i, c in zip(enc_in, widths))
        self.decoder = nn.ModuleList(AttentionMask(p[0] + p[-1], p[-1]) for p in decoder_plan(widths))


class MTAN(nn.Module):
    """Multi-Task Attention Network on SegNet: 44,229,073 parameters for the three NYUv2 tasks (official
    44,229,076 with logsigma). One task gives STAN, the paper's single-task attention baseline.

    forward(x, return_attention=True) also returns dict task -> its ten masks in order encoder stages 0-4
    (full resolution first), then decoder stages 0-4 (coarsest first); attention[task][0] is the (B, 64, H, W)
    first encoder mask shown in the paper's Fig. 5."""

    def __init__(self, tasks: Dict[str, int], width: float = 1.0):
        super().__init__()
        self.tasks = check_tasks(tasks)
        w = scaled_widths(width)
        self.backbone = SegNetBackbone(encoder_plan(w), decoder_plan(w))
        # encoder f_j: width of stage j -> width of stage j+1 (64->128, ..., 512->512), as x_j joins stage j+1
        self.enc_f = nn.ModuleList(SharedConv(a, b) for a, b in zip(w, w[1:] + w[-1:]))
        # decoder f_j (deepest first): into the width of decoder stage j's output (512->512, ..., 64->64)
        self.dec_f = nn.ModuleList(SharedConv(p[0], p[-1]) for p in decoder_plan(w))
        self.attention = nn.ModuleDict({name: TaskAttention(w) for name in self.tasks})
        self.heads = TaskHeads(self.tasks, w[0])
        init_official(self)

    def forward(self, x, return_attention: bool = False):
        check_input(x)
        enc, dec = self.backbone(x)                 # the shared network runs once, whatever the task count
        chains, T = list(self.attention.values()), len(self.tasks)
        masks = {name: [] for name in self.tasks}

        # Encoder: mask from u_j (and the previous output), gate p_j (Eq. 1), shared f, plain max-pool.
        prev = [None] * T                           # x_(j-1) per task; stage 0's mask sees u_0 alone
        for j in range(5):
            u, p = enc.first[j], enc.last[j]        # (B, C_j, H/2^j, W/2^j)
            a = [chain.encoder[j](u if x_ is None else torch.cat([u, x_], dim=1))
                 for chain, x_ in zip(chains, prev)]    # Eq. (2), per task: T x (B, C_j, H/2^j, W/2^j)
            h = torch.cat([a_t * p for a_t in a])   # Eq. (1), task-stacked batch: (T*B, C_j, H/2^j, W/2^j)
            h = F.max_pool2d(self.enc_f[j](h, T), 2, 2)                 # (T*B, C_(j+1), H/2^(j+1), W/2^(j+1))
            prev = h.chunk(T)
            self._record(masks, a)

        # Decoder: upsample and f first, then the mask from [up_j; f output], gating p_j.
        for j in range(5):
            up, p = dec.unpooled[j], dec.last[j]    # (B, C_in, H_j, W_j), (B, C_out, ...); H_j = H/2^(4-j)
            y = resize_bilinear(h, up.shape[-2:], align_corners=True)   # x2: (T*B, C_in, H_j, W_j)
            y = self.dec_f[j](y, T)                 # (T*B, C_out, H_j, W_j)
            a = [chain.decoder[j](torch.cat([up, y_t], dim=1))                   # T x (B, C_out, H_j, W_j)
                 for chain, y_t in zip(chains, y.chunk(T))]
            h = torch.cat([a_t * p for a_t in a])   # (T*B, C_out, H_j, W_j)
            self._record(masks, a)

        preds = self.heads(dict(zip(self.tasks, h.chunk(T))))           # each head reads (B, 64, H, W)
        return (preds, masks) if return_attention else preds

    def _record(self, masks, a):
        for name, a_t in zip(self.tasks, a):
            masks[name].append(a_t)


# ------------------------------------------------------------------------------------------------------------
# 5. Dense and Cross-stitch (paper Sec. 4.1, baselines)


class DenseSegNet(nn.Module):
    """"Dense": a shared SegNet plus one full SegNet per task that, at every stage, also reads the shared
    network's features (concatenated, own first): the encoder the shared pooled output of the stage before,
    the decoder the shared unpooled input of the same stage. Every network pools with its own indices.

    Deviation: the official shared decoder ends in a block (64->64, 64->13 convs) whose output is never used,
    44,583 parameters that get no gradient. We leave it out: it cannot change any prediction, it only costs
    compute, and it would show as unused parameters (DDP's find_unused_parameters). Hence 123,699,409
    parameters for the NYUv2 tasks, against 123,743,992 (official 123,743,995 with logsigma); the paper's
    #P 4.95 holds either way."""

    def __init__(self, tasks: Dict[str, int], width: float = 1.0):
        super().__init__()
        self.tasks = check_tasks(tasks)
        w = scaled_widths(width)
        self.shared = SegNetBackbone(encoder_plan(w), decoder_plan(w)[:-1])   # without the dead last block
        # task networks: every stage input is doubled by the shared features, except the image input
        enc = [p if j == 0 else [2 * p[0]] + p[1:] for j, p in enumerate(encoder_plan(w))]
        dec = [[2 * p[0]] + p[1:] for p in decoder_plan(w)[:-1]]
        dec += [[2 * w[0], 2 * w[0], w[0]]]                             # the last stage: 128->128->64
        self.task_nets = nn.ModuleDict({name: SegNetBackbone(enc, dec) for name in self.tasks})
        self.heads = TaskHeads(self.tasks, w[0])
        init_official(self, uniform=True)

    def forward(self, x) -> Dict[str, torch.Tensor]:
        check_input(x)
        enc, dec = self.shared(x)
        # the shared input of the last decoder stage (the official dead block's input), unpooled as usual
        unpooled = dec.unpooled + [max_unpool(dec.last[-1], enc.indices[0])]   # 5 x (B, C, H_j, W_j)
        feats = {}
        for name, net in self.task_nets.items():
            _, own = net(x, enc_side=enc.pooled, dec_side=unpooled)
            feats[name] = own.last[-1]                                  # (B, 64, H, W)
        return self.heads(feats)


def stitch(weights: torch.Tensor, tensors: List[torch.Tensor]) -> torch.Tensor:
    """Cross-stitch unit as coded officially: sum_t w_t * x_t, one tensor for every receiving task."""
    return sum(w * t for w, t in zip(weights, tensors))


class CrossStitchSegNet(nn.Module):
    """Cross-stitch network (Misra et al. 2016) on SegNet: one full SegNet per task, mixed between stages.

    As the official code (cs_unit_encoder/decoder; not the original paper): one weight vector per layer,
    shared by all receiving tasks, so every task receives the *same* mix sum_t w_t * x_t; weights start at 1
    (a sum, not an average) and are unconstrained. alpha (4, T) mixes the pooled outputs of encoder stages
    0-3, beta (5, T) the inputs of decoder stages 0-4, which each task unpools with its *own* indices."""

    def __init__(self, tasks: Dict[str, int], width: float = 1.0):
        super().__init__()
        self.tasks = check_tasks(tasks)
        w = scaled_widths(width)
        self.nets = nn.ModuleDict({name: SegNetBackbone(encoder_plan(w), decoder_plan(w))
                                   for name in self.tasks})
        self.alpha = nn.Parameter(torch.ones(4, len(self.tasks)))
        self.beta = nn.Parameter(torch.ones(5, len(self.tasks)))
        self.heads = TaskHeads(self.tasks, w[0])
        init_official(self, uniform=True)                               # alpha and beta stay at 1

    def forward(self, x) -> Dict[str, torch.Tensor]:
        check_input(x)
        nets = list(self.nets.values())
        indices = [[] for _ in nets]
        mixed = x                                                       # all networks' stage 0 sees the image
        for j in range(5):
            pooled = []
            for net, idx in zip(nets, indices):
                _, p = net.encoder.stages[j](mixed)
                z, i = F.max_pool2d(p, 2, 2, return_indices=True)       # (B, C_j, H/2^(j+1), W/2^(j+1))
                pooled.append(z)
                idx.append(i)
            mixed = stitch(self.alpha[j] if j < 4 else self.beta[0], pooled)
        for j in range(5):
            outs = [net.decoder.stages[j](max_unpool(mixed, idx[4 - j]))[1]
                    for net, idx in zip(nets, indices)]                 # T x (B, C_out, H/2^(4-j), W/2^(4-j))
            if j < 4:
                mixed = stitch(self.beta[j + 1], outs)
        return self.heads(dict(zip(self.tasks, outs)))


# ------------------------------------------------------------------------------------------------------------
# 6. Visual Decathlon: WRN-28-4 with MTAN (paper Sec. 4.2, Table 4)

# Domains and class counts, official order: `WideResNetMTAN(list(DECATHLON.values()), list(DECATHLON))`.
DECATHLON = {"imagenet12": 1000, "aircraft": 100, "cifar100": 100, "daimlerpedcls": 2, "dtd": 47, "gtsrb": 43,
             "omniglot": 1623, "svhn": 10, "ucf101": 101, "vgg-flowers": 102}


class WideBasic(nn.Module):
    """Pre-activation wide residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus a 1x1 conv shortcut when the
    shape changes. As in the official code the stride sits on the *second* conv and every conv has a bias."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, stride, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


def wide_group(cin: int, cout: int, num_blocks: int) -> nn.Sequential:
    """num_blocks WideBasic blocks; the first changes the width and (in all three groups) halves the size."""
    blocks = [WideBasic(cin, cout, stride=2)]
    blocks += [WideBasic(cout, cout, stride=1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class WideResNetMTAN(nn.Module):
    """WRN-28-4 shared by the ten Decathlon domains, one attention chain and linear classifier per domain:
    10,237,656 parameters. forward(x, domain) runs the backbone and *only* that domain's chain.

    Attention as in the SegNet encoder with one difference: the mask input and the gated feature are the same
    tensor (a group's output). Official quirks kept: stride 2 in all three groups (layer1 too), so 72x72
    images give 36, 18, 9 pixel maps; the final BN has momentum 0.9; the classifier averages an 8x8 window of
    the 9x9 map (only its top-left corner); default init (the official one is never called), no dropout.
    Deviation: returns logits; the official code returns softmax probabilities and takes log(p + 1e-20) in its
    loss, which is cross-entropy on the logits up to that clamp."""

    def __init__(self, num_classes: Sequence[int], domains: Optional[Sequence[str]] = None,
                 depth: int = 28, widen_factor: int = 4):
        super().__init__()
        n, k = (depth - 4) // 6, widen_factor
        w = [16, 16 * k, 32 * k, 64 * k]                                # 16, 64, 128, 256
        self.domains = list(domains) if domains is not None else [str(i) for i in range(len(num_classes))]
        if len(self.domains) != len(num_classes):
            raise ValueError(f"{len(num_classes)} class counts but {len(self.domains)} domain names")
        self.conv1 = nn.Conv2d(3, w[0], 3, padding=1)
        self.groups = nn.ModuleList(wide_group(w[g], w[g + 1], n) for g in range(3))
        self.bn = nn.BatchNorm2d(w[3], momentum=0.9)
        # f_j: 16->64, 64->128, 128->256, 256->256
        self.shared_f = nn.ModuleList(ConvLayer(a, b) for a, b in zip(w, w[1:] + w[-1:]))
        enc_in = [w[0]] + [2 * c for c in w[1:]]
        self.attention = nn.ModuleList(
            nn.ModuleList(AttentionMask(i, c) for i, c in zip(enc_in, w)) for _ in num_classes)
        self.classifiers = nn.ModuleList(nn.Linear(w[3], c) for c in num_classes)

    def forward(self, x, domain: Union[int, str]) -> torch.Tensor:
        k = self.domains.index(domain) if isinstance(domain, str) else domain
        if x.dim() != 4 or any(s % 8 or not 64 <= s < 128 for s in x.shape[-2:]):
            raise ValueError(f"expected a (B, 3, H, W) input with H and W multiples of 8 in 64..120 (72 in "
                             f"the paper: three stride-2 stages and an 8x8 average pool), "
                             f"got shape {tuple(x.shape)}")
        g = [self.conv1(x)]                                             # (B, 16, 72, 72)
        for group in self.groups:                                       # (B, 64, 36, 36), (B, 128, 18, 18),
            g.append(group(g[-1]))                                      # (B, 256, 9, 9)
        g[-1] = F.relu(self.bn(g[-1]))                                  # pre-activation nets end in BN-ReLU
        h = None                                                        # the chain's output so far
        for j, (mask, f) in enumerate(zip(self.attention[k], self.shared_f)):
            a = mask(g[j] if h is None else torch.cat([g[j], h], dim=1))   # (B, C_j, ...) like g[j]
            h = f(a * g[j])                                             # (B, C_(j+1), ...)
            if j < 3:
                h = F.max_pool2d(h, 2, 2)                               # to the next group's resolution
        h = F.avg_pool2d(h, 8).flatten(1)                               # (B, 256): official 8x8 window on 9x9
        return self.classifiers[k](h)                                   # (B, classes_k) logits


# ------------------------------------------------------------------------------------------------------------
# 7. Dilated ResNet-50 and DeepLabv3 heads (not in the paper; official lorenmt/mtan
#    im2im_pred/model_resnet_mtan/ and SimonVandenhende/Multi-Task-Learning-PyTorch models/)
#
#    image (B, 3, H, W)
#      conv1 7x7/2, bn1, relu, maxpool 3x3/2      (B, 64, H/4, W/4)      "stem"
#      layer1   3 Bottlenecks                      (B, 256, H/4, W/4)
#      layer2   4 Bottlenecks, first stride 2      (B, 512, H/8, W/8)
#      layer3   6 Bottlenecks, dilation 2          (B, 1024, H/8, W/8)    torchvision: stride 2, H/16
#      layer4   3 Bottlenecks, dilation 4          (B, 2048, H/8, W/8)    torchvision: stride 2, H/32
#      DeepLabHead per task                        (B, C, H/8, W/8)  -> bilinear to (B, C, H, W)

# ResNet-50's blocks per layer and bottleneck widths ("planes") of layer1..layer4; a block outputs 4x planes.
RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET50_PLANES = (64, 128, 256, 512)


class Bottleneck(nn.Module):
    """ResNet-50's residual block (He et al. 2016, Fig. 5 right), as torchvision builds it: 1x1 conv narrows
    to `planes`, 3x3 conv works there, 1x1 conv widens to 4 * planes; the input is added back, through
    `downsample` (1x1 conv + BN) when the shape changes. The stride sits on the 3x3 conv (torchvision's
    "ResNet v1.5"), convs have no bias (BN follows), and the attribute names are torchvision's, so its weights
    load: conv1, bn1, conv2, bn2, conv3, bn3, downsample.0 (conv), downsample.1 (BN)."""

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # padding = dilation keeps the size: a dilated 3x3 kernel spans 2 * dilation + 1 pixels
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))                        # (B, planes, h, w)
        out = self.relu(self.bn2(self.conv2(out)))                      # (B, planes, h/stride, w/stride)
        out = self.bn3(self.conv3(out))                                 # (B, 4*planes, h/stride, w/stride)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def projection(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """The shortcut of a block that changes shape: 1x1 conv (with the block's stride) + BN."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def resnet_layer(cin: int, planes: int, num_blocks: int, stride: int, dilation: int = 1) -> nn.Sequential:
    """One ResNet stage ("layer"): torchvision's `ResNet._make_layer`, then, for dilation > 1, the official
    conversion `ResnetDilated._nostride_dilate` (lorenmt/mtan im2im_pred/model_resnet_mtan/resnet_dilated.py,
    the same in SimonVandenhende/Multi-Task-Learning-PyTorch models/resnet_dilated.py):
      * the strided 3x3 conv gets stride 1 and dilation (and padding) dilation // 2;
      * every other 3x3 conv gets dilation (and padding) `dilation`;
      * the strided 1x1 downsample conv gets stride 1.
    The resolution is kept, and the dilation grows the kernels' reach by what the stride would have given:
    the receptive field stays that of the pretrained network, so its weights still make sense. (torchvision's
    own replace_stride_with_dilation gives the same convs for ResNet-50 at output stride 8.)"""
    first_dilation = 1
    if dilation > 1:
        stride, first_dilation = 1, dilation // 2
    downsample = projection(cin, 4 * planes, stride) if stride != 1 or cin != 4 * planes else None
    blocks = [Bottleneck(cin, planes, stride, first_dilation, downsample)]
    blocks += [Bottleneck(4 * planes, planes, dilation=dilation) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def init_torchvision(model: nn.Module) -> None:
    """torchvision's ResNet init: kaiming_normal_ (fan_out, ReLU gain) convs, BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetDilated(nn.Module):
    """ResNet-50 without its classifier (avgpool + fc), layer3 and layer4 dilated instead of strided: official
    `ResnetDilated(resnet50(), dilate_scale=8)`. 23,508,032 parameters, torchvision's ResNet-50 minus fc.

    Module and key names are torchvision's (conv1, bn1, relu, maxpool, layer1..layer4; the official wrapper
    renames relu to relu1, which holds no weights), so `load_torchvision(path)` reads the ImageNet file as is.
    output_stride 8 (the default, dilations 2 and 4), 16 (layer4 only, dilation 2) or 32 (plain ResNet-50).
    width != 1.0 scales every channel count, a CPU toy that no pretrained file fits."""

    DILATIONS = {8: (2, 4), 16: (1, 2), 32: (1, 1)}                     # layer3, layer4

    def __init__(self, output_stride: int = 8, width: float = 1.0):
        super().__init__()
        if output_stride not in self.DILATIONS:
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        planes = [max(1, round(p * width)) for p in RESNET50_PLANES]   # 64, 128, 256, 512
        self.channels = [4 * p for p in planes]                         # 256, 512, 1024, 2048: layer outputs
        self.conv1 = nn.Conv2d(3, planes[0], 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        d3, d4 = self.DILATIONS[output_stride]
        ins = [planes[0]] + self.channels[:-1]
        self.layer1 = resnet_layer(ins[0], planes[0], RESNET50_BLOCKS[0], stride=1)
        self.layer2 = resnet_layer(ins[1], planes[1], RESNET50_BLOCKS[1], stride=2)
        self.layer3 = resnet_layer(ins[2], planes[2], RESNET50_BLOCKS[2], stride=2, dilation=d3)
        self.layer4 = resnet_layer(ins[3], planes[3], RESNET50_BLOCKS[3], stride=2, dilation=d4)
        init_torchvision(self)

    def layers(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))         # (B, 64, H/4, W/4)

    def forward(self, x):
        x = self.stem(x)                                                # (B, 64, H/4, W/4)
        for layer in self.layers():
            x = layer(x)                        # (B, 256, H/4, W/4), then (B, 512 / 1024 / 2048, H/8, W/8)
        return x

    def forward_stages(self, x) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """For each layer k: (output of all its blocks but the last, output of the last block), the u_k^b and
        u_k^t of the official MTANDeepLabv3.forward, which attends over every layer's last block."""
        x, out = self.stem(x), []
        for layer in self.layers():
            for block in layer[:-1]:
                x = block(x)
            out.append((x, layer[-1](x)))                               # both (B, C_k, H/4 or H/8, ...)
            x = out[-1][1]
        return out

    def load_torchvision(self, source: Union[str, os.PathLike, Dict[str, torch.Tensor]]) -> List[str]:
        """Load a torchvision ResNet-50 state dict (a dict, or the path of a file such as
        resnet50-0676ba61.pth or resnet50-11ad3fa6.pth). Every backbone tensor must be there (strict); the
        classifier fc.weight and fc.bias have no place in a backbone and are skipped. Returns the skipped
        keys. (A file whose BN layers lack num_batches_tracked loads too: BatchNorm fills it in.)"""
        if isinstance(source, (str, os.PathLike)):
            source = torch.load(source, map_location="cpu", weights_only=True)
        skipped = [k for k in source if k.startswith("fc.")]
        self.load_state_dict({k: v for k, v in source.items() if not k.startswith("fc.")}, strict=True)
        return skipped


def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    """conv (no bias) -> BN -> ReLU, padding chosen to keep the size: one ASPP branch."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class GlobalAveragePool(nn.Module):
    """nn.AdaptiveAvgPool2d(1); on a GPU in deterministic mode a mean, whose backward has no atomic adds."""

    def forward(self, x):
        if x.is_cuda and torch.are_deterministic_algorithms_enabled():
            return x.mean((2, 3), keepdim=True)
        return F.adaptive_avg_pool2d(x, 1)


class ASPPPooling(nn.Sequential):
    """ASPP's image-level branch: global average -> 1x1 conv -> BN -> ReLU, one vector per image, spread back
    over the map. Official: bilinear upsampling from 1x1, which is a copy to every pixel; `expand` does it.
    Its BN sees one value per channel and image, so training needs batches of 2 or more (official too)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(GlobalAveragePool(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())

    def forward(self, x):
        return super().forward(x).expand(-1, -1, *x.shape[-2:])        # (B, C, 1, 1) -> (B, C, h, w)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3, Chen et al. 2017, Sec. 3.3): five parallel branches on the
    same feature map, each 256 channels: a 1x1 conv, three 3x3 convs at dilations 12, 24, 36 (context at three
    scales without losing resolution) and the image-level branch; concatenated (1280) and projected to 256 by
    a 1x1 conv + BN + ReLU + Dropout(0.5). Official `ASPP` (both repositories' aspp.py), same key names."""

    def __init__(self, cin: int, rates: Sequence[int] = (12, 24, 36), cout: int = 256):
        super().__init__()
        branches = [conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates]
        self.convs = nn.ModuleList(branches + [ASPPPooling(cin, cout)])
        n = len(self.convs)
        self.project = nn.Sequential(nn.Conv2d(n * cout, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x):
        y = torch.cat([branch(x) for branch in self.convs], dim=1)     # (B, 5*256, h, w)
        return self.project(y)                                          # (B, 256, h, w)


class DeepLabHead(nn.Sequential):
    """The DeepLabv3 decoder of one task (official `DeepLabHead`, aspp.py): ASPP -> 3x3 conv 256->256 + BN +
    ReLU -> 1x1 conv to the task's channels (with bias). On 2048 input channels: 16,125,440 + 257 * C
    parameters. Output at the input's resolution (1/8 of the image); the models upsample it."""

    def __init__(self, cin: int, num_classes: int, width: float = 1.0):
        c = max(1, round(256 * width))
        super().__init__(ASPP(cin, cout=c), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                         nn.ReLU(), nn.Conv2d(c, num_classes, 1))


def upsample(task: str, y: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """A head's stride-8 output to the image size, bilinear, then the task's output convention (activate)."""
    return activate(task, resize_bilinear(y, size, align_corners))


class DeepLabv3(nn.Module):
    """The ResNet baseline of MTI-Net's code (models/models.py): one shared dilated ResNet-50 and one
    DeepLabHead per task. One task is its `SingleTaskModel`, several its `MultiTaskModel` (hard parameter
    sharing). NYUD: 39,643,752 parameters for semantic (40 classes) alone, 55,769,449 with depth. Upsampling
    as there: bilinear with align_corners=False; any H and W work. Outputs follow this file's convention:
    MTI-Net's model returns raw normals and normalises them in its loss, here they are unit vectors."""

    ALIGN_CORNERS = False

    def __init__(self, tasks: Dict[str, int], width: float = 1.0):
        super().__init__()
        self.tasks = check_tasks(tasks)
        self.backbone = ResNetDilated(width=width)
        self.heads = nn.ModuleDict({name: DeepLabHead(self.backbone.channels[-1], c, width)
                                    for name, c in self.tasks.items()})

    def forward(self, x) -> Dict[str, torch.Tensor]:
        features = self.backbone(x)                                     # (B, 2048, H/8, W/8), once for all
        return {name: upsample(name, head(features), x.shape[-2:], self.ALIGN_CORNERS)   # (B, C, H, W)
                for name, head in self.heads.items()}


class MTANDeepLabv3(nn.Module):
    """MTAN on the dilated ResNet-50 (official `MTANDeepLabv3`, lorenmt/mtan resnet_mtan.py): the attention of
    Eqs. (1)-(2) over the encoder only, one DeepLabHead per task instead of a decoder. 92,347,921 parameters
    for the three NYUv2 tasks: backbone 23,508,032, shared f 7,931,392, and per task attention 4,175,936 plus
    a head of 16,125,440 + 257 * C (the three heads: 48,380,689).

    Each ResNet layer k plays a SegNet stage: its blocks but the last give the mask input u_k^b, its last
    block's output u_k^t is the gated feature (the official code attends over the last bottleneck):

    shared   ─► layer_k[:-1] ─┬─► layer_k[-1] ─┬─► layer_(k+1)
                              │ u_k^b          │ u_k^t
                              ▼                ▼
    task i   a_(k-1) ─────► g,h ─► mask ─────► ⊙ ─► f_k ─► (maxpool, k = 1 only) ─► a_k   (a_4: head i)

    As in SegNet-MTAN the mask input is [u_k^b; a_(k-1)] (layer 1: u_1^b alone), and the mask's middle width
    is C_k / 4. The shared f_k is a Bottleneck to layer k+1's width (with a 1x1 projection shortcut); layer
    1's is followed by a 2x2 max-pool, as layer 2 halves the resolution (1/4 -> 1/8) and the dilated layers
    3-4 do not. Layer 4 has no f: the gated u_4^t goes straight to the head. Hence H and W must be multiples
    of 8 (the pooled a_1 must meet layer 2's output). f runs once per task, as officially (its BNs see each
    task alone). Upsampling as in the official forward: bilinear with align_corners=True.

    forward(x, return_attention=True) also returns dict task -> its four masks, layer 1 (B, 256, H/4, W/4) to
    layer 4 (B, 2048, H/8, W/8)."""

    ALIGN_CORNERS = True

    def __init__(self, tasks: Dict[str, int], width: float = 1.0):
        super().__init__()
        self.tasks = check_tasks(tasks)
        self.backbone = ResNetDilated(width=width)
        ch = self.backbone.channels                                     # 256, 512, 1024, 2048
        ins = [ch[0]] + [2 * c for c in ch[1:]]                         # [u_k^b; a_(k-1)]: 256/1024/2048/4096
        self.attention = nn.ModuleDict({name: nn.ModuleList(AttentionMask(i, c, c // 4)
                                                            for i, c in zip(ins, ch)) for name in self.tasks})
        # f_k: 256->512->1024->2048 (official `conv_layer`: Bottleneck(ch_k, ch_(k+1) / 4) + projection)
        self.shared_f = nn.ModuleList(Bottleneck(a, b // 4, downsample=projection(a, b))
                                      for a, b in zip(ch, ch[1:]))
        self.heads = nn.ModuleDict({name: DeepLabHead(ch[-1], c, width) for name, c in self.tasks.items()})

    def forward(self, x, return_attention: bool = False):
        check_input(x, 8, "output stride 8, and MTAN-DeepLabv3's pooled layer-1 attention must meet layer 2")
        stages = self.backbone.forward_stages(x)    # the shared network runs once: 4 x (u_k^b, u_k^t)
        preds, masks = {}, {}
        for name, chain in self.attention.items():
            a, masks[name] = None, []
            for k, ((u_b, u_t), mask_k) in enumerate(zip(stages, chain)):
                mask = mask_k(u_b if a is None else torch.cat([u_b, a], dim=1))  # Eq. (2): (B, C_k, h_k, w_k)
                a = mask * u_t                                                     # Eq. (1)
                if k < 3:
                    a = self.shared_f[k](a)                                        # (B, C_(k+1), h_k, w_k)
                if k == 0:
                    a = F.max_pool2d(a, 2, 2)                                      # (B, 512, H/8, W/8)
                masks[name].append(mask)
            y = self.heads[name](a)                                                # (B, C, H/8, W/8)
            preds[name] = upsample(name, y, x.shape[-2:], self.ALIGN_CORNERS)      # (B, C, H, W)
        return (preds, masks) if return_attention else preds


# ------------------------------------------------------------------------------------------------------------
# Appendix: deterministic stand-ins for --deterministic on a GPU
#
# torch has no deterministic CUDA kernel for three ops these models use: max_unpool2d (a scatter), and the
# backward of bilinear interpolation and of adaptive average pooling (atomic adds, whose order changes from
# run to run); torch.use_deterministic_algorithms can only warn about them. When that mode is on (train.py
# --deterministic) and the tensor is on a GPU, max_unpool, resize_bilinear and GlobalAveragePool call
# equivalents made of gathers and sums in a fixed order: the two below, and a mean. Otherwise (every normal
# run, and every CPU run, whose kernels are deterministic) they call torch's own kernels.


def unpool_by_gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """max_unpool2d without a scatter: a 2x2 pool with stride 2 sends each value back into its own 2x2 window,
    so every output position either holds the one value whose index names it or is zero."""
    B, C, h, w = x.shape

    def spread(t):  # (B, C, h, w) -> (B, C, 2h, 2w): each value copied to its 2x2 window
        return t[:, :, :, None, :, None].expand(B, C, h, 2, w, 2).reshape(B, C, 2 * h, 2 * w)

    position = torch.arange(4 * h * w, device=x.device).view(2 * h, 2 * w)  # the flat index max_pool2d stores
    return torch.where(spread(indices) == position, spread(x), 0)


class DeterministicBilinear(torch.autograd.Function):
    """torch's bilinear forward (the same values), and a backward in which each input row, then column,
    gathers the output rows that read it, weighted as they read it, and sums them in a fixed order. Per axis
    that reads about twice the output's size: the cost of torch's own backward, without its atomic adds."""

    @staticmethod
    def forward(ctx, x, size, align_corners):
        ctx.resize = (x.shape[-2:], size, align_corners)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)

    @staticmethod
    def backward(ctx, grad):
        (h, w), (out_h, out_w), align_corners = ctx.resize
        rows = transposed_interpolation(grad.float(), 2, h, out_h, align_corners)     # (B, C, h, W_out)
        return transposed_interpolation(rows, 3, w, out_w, align_corners).to(grad.dtype), None, None


def transposed_interpolation(grad: torch.Tensor, dim: int, n_in: int, n_out: int,
                             align_corners: bool) -> torch.Tensor:
    """sum_j A[j, i] * grad[j] along `dim` (n_out -> n_in) for the interpolation weights A of that axis,
    reading for each i only the K output rows j of its band (A is zero outside it)."""
    rows, weights = interpolation_band(n_in, n_out, align_corners, grad.device)   # (n_in, K) each
    picked = grad.index_select(dim, rows.flatten()).unflatten(dim, rows.shape)    # (..., n_in, K, ...)
    return (picked * weights.view(rows.shape + (1,) * (grad.dim() - dim - 1))).sum(dim + 1)


_BANDS: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def interpolation_band(n_in: int, n_out: int, align_corners: bool,
                       device) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every input index i, the K output indices that read it and their weights (0 past its band): built
    on the CPU from interpolation_weights, once per size and device (no copy, so no wait, in later steps)."""
    key = (n_in, n_out, align_corners, str(device))
    if key not in _BANDS:
        a = interpolation_weights(n_in, n_out, align_corners)                     # (n_out, n_in)
        reads = a.T != 0                                                          # (n_in, n_out)
        j = torch.arange(n_out)
        first = torch.where(reads, j, n_out).min(1).values.clamp(max=n_out - 1)
        last = torch.where(reads, j, -1).max(1).values
        k = torch.arange(max(int((last - first).max()) + 1, 1))
        rows = (first[:, None] + k).clamp(max=n_out - 1)                          # (n_in, K)
        weights = a.T.gather(1, rows) * (first[:, None] + k <= last[:, None])
        _BANDS[key] = rows.to(device), weights.to(device)
    return _BANDS[key]


def interpolation_weights(n_in: int, n_out: int, align_corners: bool) -> torch.Tensor:
    """(n_out, n_in) weights of linear interpolation along one axis, two neighbours each, at torch's source
    positions: i * (n_in - 1) / (n_out - 1) if align_corners, else max(0, (i + 0.5) * n_in / n_out - 0.5)."""
    i = torch.arange(n_out, dtype=torch.float32)
    if align_corners:
        source = i * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        source = ((i + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    first = source.floor().clamp(max=n_in - 1)
    weight = (source - first)[:, None]                                  # the second neighbour's share
    j = torch.arange(n_in, dtype=torch.float32)
    return (j == first[:, None]) * (1 - weight) + (j == (first + 1).clamp(max=n_in - 1)[:, None]) * weight
