"""
MTI-Net, PAD-Net and the HRNet multi-task baseline, in one plain-PyTorch file.

MTI-Net: "Multi-Scale Task Interaction Networks for Multi-Task Learning", Vandenhende, Georgoulis and
Van Gool, ECCV 2020 (arXiv 2001.06902). This file follows the official code
(SimonVandenhende/Multi-Task-Learning-PyTorch) layer for layer, so parameter counts match it exactly, but
every line is written anew. It imports torch and the standard library only: copy it into your project and
`from mtinet import MTINet`. It reads top to bottom: residual blocks, the HRNet backbone, ImageNet
pretraining, MTI-Net's building blocks in the order data flows through them, the three models, and last an
appendix of deterministic stand-ins for --deterministic on a GPU.

The idea
--------
Tasks interact differently at different receptive fields: a depth edge and a semantic edge agree locally,
while depth hints at semantics only over large regions. So MTI-Net distils information between tasks at
*every* scale of a multi-scale backbone, instead of once at the end (PAD-Net):

    image (B, 3, H, W)
      |
      |  HRNet backbone, shared by all tasks (channels here: W18 variants)
      v
    x0 (18, H/4)     x1 (36, H/8)     x2 (72, H/16)    x3 (144, H/32)
      |                |                |                |
      |                |                |          [initial preds]--> P3_t  deep supervision
      |                |                |                | F3_t
      |                |                |              FPM_3   task features of all tasks
      |                |                |   up x2  <-----+      -> shared -> per-task SE + residual
      |                |          [initial preds]----------------> P2_t
      |                |                | F2_t
      |                |              FPM_2
      |                |   up x2  <-----+
      |          [initial preds]---------------------------------> P1_t
      |                | F1_t
      |              FPM_1
      |   up x2  <-----+
    [initial preds]----------------------------------------------> P0_t
      | F0_t           | F1_t           | F2_t           | F3_t
      v                v                v                v
    distil          distil           distil           distil    D_t = F_t + sum_a SA_ta(F_a)
      | D0_t           | D1_t           | D2_t           | D3_t
      +----------------+-------+--------+----------------+
                               v
               feature aggregation: upsample to H/4, concat (sum C_s = 270),
               conv1x1 - BN - ReLU - conv1x1 -> K_t, upsample to H x W
                               v
                     final prediction P_t  (one per main task t)

1. Initial task predictions (`InitialTaskPrediction`): at each scale s and for each task t, two residual
   blocks turn the backbone map x_s (plus what the coarser scale propagated) into task features F^s_t, and a
   1x1 conv decodes them into an initial prediction P^s_t. These are supervised ("deep supervision") and serve
   as the tasks' intermediate representations.
2. Feature propagation (`FeaturePropagation`, FPM): the coarse scale's task features of all tasks are
   harmonised into one shared tensor, which each task reads back through its own squeeze-and-excitation gate
   (+ residual). The result is upsampled and concatenated to the next finer backbone map, so the
   high-resolution scales, with their small receptive fields, get context.
3. Multi-modal distillation (`MultiModalDistillation`): at each scale, task t adds spatially-attended features
   of every other task a.
4. Feature aggregation (`FeatureAggregation`): the four distilled maps of a task are upsampled to H/4,
   concatenated and decoded into the final prediction.

Backbones
---------
Every model takes `backbone=` (default "w18-small-v2"), the name of an HRNet (Wang et al., "Deep
High-Resolution Representation Learning", TPAMI 2020):

    name            HRNet                    C_s                  backbone params
    "w18-small-v2"  HRNet-W18-C-Small-v2     18, 36, 72, 144       3,860,720
    "w18"           HRNetV2-W18              18, 36, 72, 144       9,562,260
    "w32"           HRNetV2-W32              32, 64, 128, 256     29,305,536
    "w48"           HRNetV2-W48              48, 96, 192, 384     65,325,120

The paper's "HRNet-18" is "w18-small-v2": it is the only HRNet the official code wires in
(utils/common_config.py, get_backbone: "hrnet_w18", built by models/seg_hrnet.py from
hrnet_w18_small_model_v2.pth; its W32/W48 model_info files are unused), and the one behind the paper's
ablations and HRNet-18 rows. The paper's state-of-the-art rows use HRNet-48, i.e. "w48" here (MTI-Net NYUD:
98.7 M parameters instead of 8.6 M). The heads take their widths from the backbone's C_s, so every part of
MTI-Net grows with it. ImageNet weights for every name load with `load_hrnet_imagenet`, under
HRNet-Image-Classification's own key names.

Notation (used throughout the comments)
---------------------------------------
C_s: backbone channels at scale s = 0..3, strides 4, 8, 16, 32; (18, 36, 72, 144) for the default backbone,
whose numbers the comments quote.
T: the main tasks (they get final predictions). A: all tasks = T plus the auxiliary tasks (they get initial
predictions, deep supervision, take part in FPM and distillation). N = |A|. K_t: output channels of task t.

Conventions
-----------
* Tasks are ordered dicts name -> channels, e.g. {"semantic": 40, "depth": 1}. A is sorted in the official
  parse order (semantic, parts, saliency, normal, edge, depth; unknown names last, as given). The order only
  matters for the `fpm_softmax="official"` channel grouping, which it changes.
* Outputs carry no activation: semantic/parts/edge/saliency are logits, depth is raw. The one exception is the
  *final* "normal" prediction, which is L2-normalised (`F.normalize`, eps 1e-12) so that every model of this
  project returns unit normals. The official code normalises inside its loss instead
  (pred / (|pred| + 1e-12)); normalising twice is a no-op, so a loss that normalises its input gives the
  official maths either way. The deep-supervision normals are returned raw, because the loss upsamples them to
  the label size first and must normalise after that (as the official loss does).
* Input: the official recipe feeds ImageNet-normalised images (mean 0.485, 0.456, 0.406; std 0.229, 0.224,
  0.225; `ImageNetNormalisation`) when the backbone is pretrained. Sides divisible by 32 make every scale
  exactly half the next, as in the official code; other sizes also work, because every upsampling here targets
  the size of the map it is added to (with exact halving this is the same interpolation as the official
  `scale_factor=2`).
* Initialisation: PyTorch defaults everywhere. The official backbone is re-initialised with N(0, 0.001^2) only
  on the way to loading ImageNet weights, which overwrite every backbone conv, so the two agree wherever it
  matters.
* BatchNorm momentum: 0.01 in the backbone (the official models/seg_hrnet.py; the ImageNet code, cls_hrnet.py,
  uses 0.1), 0.1 (PyTorch's default) everywhere else, as in the official code.
"""

import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

HRNET_CHANNELS = (18, 36, 72, 144)  # C_s of the default HRNet-W18-small-v2, strides 4, 8, 16, 32
TASK_ORDER = ("semantic", "parts", "saliency", "normal", "edge", "depth")  # official parse order
BACKBONE_BN_MOMENTUM = 0.01
HEAD_BN_MOMENTUM = 0.1
FPM_SOFTMAX_MODES = ("tasks", "official")

# Keys of the ImageNet classification checkpoint that are not part of the backbone (the classifier on top of
# the 4 branches); `load_hrnet_imagenet` skips them.
CLASSIFIER_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


# ------------------------------------------------------------------------------------------------------------
# Residual blocks and upsampling, shared by the backbone and all heads


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def shortcut(in_channels, out_channels, bn_momentum):
    """1x1 conv + BN projection for a residual block whose width changes. Blocks of constant width use the
    identity. (Named `downsample` for the official names.)"""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels, momentum=bn_momentum),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU. Stride 1 throughout this file. The
    HRNet branches and all MTI-Net refinements use it."""

    def __init__(self, in_channels, out_channels, bn_momentum=HEAD_BN_MOMENTUM):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = shortcut(in_channels, out_channels, bn_momentum)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 squeeze to out/4, 3x3, 1x1 expand to out, + shortcut. Used by HRNet's first
    stage and by PAD-Net's heads. Taking (in, out) like BasicBlock, rather than ResNet's (inplanes, planes),
    lets both block types be swapped in `InitialTaskPrediction`."""

    def __init__(self, in_channels, out_channels, bn_momentum=HEAD_BN_MOMENTUM):
        super().__init__()
        width = out_channels // 4  # ResNet's expansion factor 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = shortcut(in_channels, out_channels, bn_momentum)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def residual_blocks(block, in_channels, out_channels, num_blocks, bn_momentum=HEAD_BN_MOMENTUM):
    """`num_blocks` residual blocks in a row, the first one changing the width (the official `_make_layer` /
    `_make_one_branch`)."""
    widths = [in_channels] + [out_channels] * num_blocks
    return nn.Sequential(*[block(widths[i], out_channels, bn_momentum) for i in range(num_blocks)])


def two_blocks(block, in_channels, out_channels, bn_momentum=HEAD_BN_MOMENTUM):
    """Two residual blocks, the first one changing the width. Every refinement in MTI-Net and PAD-Net is such
    a pair, and so is every branch of HRNet-W18-small-v2."""
    return residual_blocks(block, in_channels, out_channels, 2, bn_momentum)


def upsample_to(x, size):
    """Bilinear resize to `size` (align_corners=False, as in the official code); under --deterministic on a
    GPU with DeterministicBilinear's backward (appendix)."""
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return DeterministicBilinear.apply(x, tuple(size))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------------------
# Backbone: HRNet
#
# HRNet keeps a high-resolution branch for the whole depth of the network and adds a lower-resolution branch
# at each stage. After every module all branches exchange information ("fuse layers"), so each of the 4
# outputs mixes all resolutions. Module and parameter names below are exactly those of the official
# classification code (HRNet/HRNet-Image-Classification, lib/models/cls_hrnet.py, class HighResolutionNet), so
# its ImageNet checkpoints load as they are, for every width.
#
# Two details follow the official MTI-Net code (models/seg_hrnet.py of
# SimonVandenhende/Multi-Task-Learning-PyTorch) rather than cls_hrnet.py: BN momentum 0.01 instead of 0.1, and
# bilinear instead of nearest upsampling in the fuse layers. Neither has parameters, so the checkpoints load
# either way.


class HRNetConfig(NamedTuple):
    """The shape of one HRNet: the MODEL.EXTRA section of the HRNet-Image-Classification configs
    (experiments/cls_hrnet_*.yaml)."""

    stage1_blocks: int  # Bottlenecks in layer1 (64 planes: 64 -> 256 channels)
    modules: tuple  # HighResolutionModules in stages 2, 3, 4
    blocks: int  # BasicBlocks per branch in every module
    channels: tuple  # C_0..C_3, the widths of the 4 branches


HRNET_CONFIGS = {
    # The HRNet the official MTI-Net code builds (cls_hrnet_w18_small_v2_*.yaml).
    "w18-small-v2": HRNetConfig(2, (1, 3, 2), 2, HRNET_CHANNELS),
    # HRNetV2 (cls_hrnet_w18/w32/w48_*.yaml): twice the blocks and more modules.
    "w18": HRNetConfig(4, (1, 4, 3), 4, (18, 36, 72, 144)),
    "w32": HRNetConfig(4, (1, 4, 3), 4, (32, 64, 128, 256)),
    "w48": HRNetConfig(4, (1, 4, 3), 4, (48, 96, 192, 384)),
}


def conv_bn_relu(in_channels, out_channels, stride):
    return nn.Sequential(
        conv3x3(in_channels, out_channels, stride),
        nn.BatchNorm2d(out_channels, momentum=BACKBONE_BN_MOMENTUM),
        nn.ReLU(),
    )


def fuse_path(channels, j, i):
    """The path from input branch j to output branch i of a fuse layer.
    j > i (coarser input): 1x1 conv to C_i + BN; upsampled in forward.
    j = i: identity.
    j < i (finer input): i - j stride-2 3x3 convs. The intermediate ones keep C_j channels and have BN + ReLU;
    the last maps to C_i with BN only, because the ReLU comes after the sum of all paths."""
    if j > i:
        return nn.Sequential(
            nn.Conv2d(channels[j], channels[i], 1, bias=False),
            nn.BatchNorm2d(channels[i], momentum=BACKBONE_BN_MOMENTUM),
        )
    if j == i:
        return nn.Identity()  # the official code stores None here; same names, no params
    steps = [conv_bn_relu(channels[j], channels[j], stride=2) for _ in range(i - j - 1)]
    last = nn.Sequential(
        conv3x3(channels[j], channels[i], stride=2),
        nn.BatchNorm2d(channels[i], momentum=BACKBONE_BN_MOMENTUM),
    )
    return nn.Sequential(*steps, last)


class HighResolutionModule(nn.Module):
    """One HRNet module: `blocks` BasicBlocks per branch (2 in W18-small-v2, 4 in HRNetV2), then the fuse
    layers, where output branch i = ReLU(sum over input branches j of fuse_path(j -> i))."""

    def __init__(self, channels, blocks=2):
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList([residual_blocks(BasicBlock, c, c, blocks, BACKBONE_BN_MOMENTUM)
                                       for c in channels])
        self.fuse_layers = nn.ModuleList([nn.ModuleList([fuse_path(channels, j, i) for j in range(n)])
                                          for i in range(n)])

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, paths in enumerate(self.fuse_layers):
            y = xs[i]  # j = i: identity
            for j, (path, x) in enumerate(zip(paths, xs)):
                if j < i:  # finer branch: strided convs bring it down to branch i's size
                    y = y + path(x)
                elif j > i:  # coarser branch: 1x1 conv, then upsample to branch i's size
                    y = y + upsample_to(path(x), xs[i].shape[-2:])
            out.append(F.relu(y))
        return out


def transition(in_channels, out_channels):
    """Between stages: existing branches pass unchanged (a branch keeps its width in every HRNet here), and
    one new branch is made by a stride-2 3x3 conv from the coarsest existing branch. The extra Sequential
    around the new branch reproduces the official names (`transition2.2.0.0.weight`)."""
    layers = [nn.Identity() for _ in in_channels]
    layers.append(nn.Sequential(conv_bn_relu(in_channels[-1], out_channels[-1], stride=2)))
    return nn.ModuleList(layers)


class HRNet(nn.Module):
    """The shared backbone. `name` picks one of HRNET_CONFIGS:

      "w18-small-v2" (default): HRNet-W18-C-Small-v2, the backbone the official MTI-Net code calls "hrnet_w18"
          (the paper's HRNet-18): 2 bottlenecks in stage 1, then 1/3/2 modules in stages 2-4, 2 blocks per
          branch, C_s = 18/36/72/144, 3,860,720 parameters.
      "w18", "w32", "w48": HRNetV2-W18/W32/W48: 4 bottlenecks in stage 1, then 1/4/3 modules, 4 blocks per
          branch, C_s = W, 2W, 4W, 8W; 9,562,260 / 29,305,536 / 65,325,120 parameters. W48 is the paper's
          HRNet-48.

    This is the feature extractor alone: the ImageNet classification head (incre_modules, downsamp_modules,
    final_layer, classifier) is left out. `self.channels` holds C_s, which the heads of every model read.

    forward(x) returns [x0, x1, x2, x3] at strides 4/8/16/32 with C_0..C_3 channels; for a (B, 3, 288, 384)
    input: 72x96, 36x48, 18x24, 9x12. Any input size works (sizes round up at each stride-2 conv)."""

    def __init__(self, name="w18-small-v2"):
        super().__init__()
        if name not in HRNET_CONFIGS:
            raise ValueError(f"unknown HRNet {name!r}; choose one of {list(HRNET_CONFIGS)}")
        cfg = HRNET_CONFIGS[name]
        self.name = name
        self.channels = c = cfg.channels
        # stem: two stride-2 convs, H -> H/4
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BACKBONE_BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BACKBONE_BN_MOMENTUM)
        # stage 1: one branch of bottlenecks, 64 -> 256 channels
        self.layer1 = residual_blocks(Bottleneck, 64, 256, cfg.stage1_blocks, BACKBONE_BN_MOMENTUM)
        # stage 2: 2 branches. Both come from the 256-channel map, so branch 0 also needs a conv (the only
        # transition of an existing branch).
        self.transition1 = nn.ModuleList([
            conv_bn_relu(256, c[0], stride=1),
            nn.Sequential(conv_bn_relu(256, c[1], stride=2)),
        ])
        m2, m3, m4 = cfg.modules
        self.stage2 = nn.Sequential(*[HighResolutionModule(c[:2], cfg.blocks) for _ in range(m2)])
        # stage 3: 3 branches; stage 4: all 4 branches
        self.transition2 = transition(c[:2], c[:3])
        self.stage3 = nn.Sequential(*[HighResolutionModule(c[:3], cfg.blocks) for _ in range(m3)])
        self.transition3 = transition(c[:3], c)
        self.stage4 = nn.Sequential(*[HighResolutionModule(c, cfg.blocks) for _ in range(m4)])

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = F.relu(self.bn2(self.conv2(x)))  # (B, 64, H/4, W/4)
        xs = [self.layer1(x)]  # [(B, 256, H/4, W/4)]
        for trans, stage in ((self.transition1, self.stage2),
                             (self.transition2, self.stage3),
                             (self.transition3, self.stage4)):
            # branch i reads branch i; the new, coarsest branch reads the coarsest one
            xs = [t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(trans)]
            xs = stage(xs)
        return xs  # [(B, C_0, H/4), (B, C_1, H/8), (B, C_2, H/16), (B, C_3, H/32)]


# ------------------------------------------------------------------------------------------------------------
# ImageNet pretraining: the checkpoint and the input normalisation it expects


def load_hrnet_imagenet(model, checkpoint):
    """Load an official HRNet ImageNet classification checkpoint into an HRNet, or into the `.backbone` of
    MTINet / PADNet / HRNetMultiTask. `checkpoint` is a path or an already loaded state dict:

        skipped = load_hrnet_imagenet(MTINet(tasks, backbone="w48"),
                                      "hrnetv2_w48_imagenet_pretrained.pth")

    The file must match the backbone (HRNet/HRNet-Image-Classification releases):

        "w18-small-v2"  hrnet_w18_small_model_v2.pth ("HRNet-W18-C-Small-v2")
        "w18"           hrnetv2_w18_imagenet_pretrained.pth
        "w32"           hrnetv2_w32_imagenet_pretrained.pth
        "w48"           hrnetv2_w48_imagenet_pretrained.pth

    Keys are used as they are, no renaming.

    Backbone keys are loaded strictly: a missing key or a shape mismatch raises a ValueError naming the key
    (and both shapes). `num_batches_tracked` buffers may be absent from the file (BN does not use them with a
    fixed momentum). The classification-only keys (incre_modules, downsamp_modules, final_layer, classifier)
    are skipped and their names returned; any other unknown key is an error, since it means the file is
    another HRNet than the backbone. Returns the sorted list of skipped keys."""
    backbone = getattr(model, "backbone", model)
    state_dict = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    name = getattr(backbone, "name", "?")
    own = backbone.state_dict()
    skipped = sorted(k for k in state_dict if k.startswith(CLASSIFIER_PREFIXES))
    unknown = sorted(k for k in state_dict if k not in own and k not in skipped)
    hint = _which_hrnet(state_dict)
    hint = f"; the checkpoint looks like backbone={hint!r}" if hint not in (None, name) else ""
    if unknown:
        raise ValueError(f"not an HRNet {name!r} checkpoint: unexpected keys {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all){hint}")
    for key, value in own.items():
        if key not in state_dict:
            if key.endswith("num_batches_tracked"):
                continue
            raise ValueError(f"checkpoint lacks HRNet {name!r} key '{key}' "
                             f"(shape {tuple(value.shape)}){hint}")
        if state_dict[key].shape != value.shape:
            raise ValueError(f"shape mismatch for '{key}': checkpoint {tuple(state_dict[key].shape)}, "
                             f"HRNet {name!r} {tuple(value.shape)}{hint}")
    backbone.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return skipped


def _which_hrnet(state_dict):
    """The HRNET_CONFIGS name whose shape a checkpoint has (branch-0 width, stage-1 and stage-3 depth), or
    None: only to make a mismatch error say what to pass."""
    if "transition1.0.0.weight" not in state_dict:
        return None
    width = state_dict["transition1.0.0.weight"].shape[0]
    stage1 = len({k.split(".")[1] for k in state_dict if k.startswith("layer1.")})
    stage3 = len({k.split(".")[1] for k in state_dict if k.startswith("stage3.")})
    for name, cfg in HRNET_CONFIGS.items():
        if (cfg.channels[0], cfg.stage1_blocks, cfg.modules[1]) == (width, stage1, stage3):
            return name
    return None


class ImageNetNormalisation(nn.Module):
    """(image - mean) / std with the ImageNet statistics, for a (B, 3, H, W) batch in [0, 1]: what an
    ImageNet-pretrained HRNet expects (the official code normalises the same way: utils/common_config.py,
    get_transformations). Only for pretrained backbones; a model trained from scratch can take the image as it
    is. The statistics are buffers of shape (1, 3, 1, 1), so they follow the model to its device and live in
    its state dict (as `mean` and `std`)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, image):
        return (image - self.mean) / self.std


# ------------------------------------------------------------------------------------------------------------
# MTI-Net building blocks, in the order data flows through them


class InitialTaskPrediction(nn.Module):
    """Front-end head of one task at one scale (paper Fig. 3, "initial task predictions"). Scale 3 reads the
    backbone map x3 alone; finer scales read [x_s, upsampled FPM output of the coarser scale for this task],
    backbone channels first. Two residual blocks refine this into the task features F^s_t (C_s channels), and
    a 1x1 conv (with bias) decodes them into the initial prediction P^s_t (K_t channels), which is
    deep-supervised. PAD-Net uses the same module with Bottleneck blocks at 256 channels."""

    def __init__(self, in_channels, channels, out_channels, block=BasicBlock):
        super().__init__()
        self.refine = two_blocks(block, in_channels, channels)
        self.decode = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, propagated=None):
        if propagated is not None:  # (B, C_{s+1}, H_{s+1}, W_{s+1}) from FPM_{s+1}
            x = torch.cat([x, upsample_to(propagated, x.shape[-2:])], dim=1)
        features = self.refine(x)  # F^s_t: (B, C_s, H_s, W_s)
        return features, self.decode(features)  # P^s_t: (B, K_t, H_s, W_s)


def task_attention(scores, features, num_tasks, mode="tasks"):
    """The FPM's softmax attention ("feature harmonisation"): X~ = M * X, with the mask M = softmax of the
    scores S over groups of N channels.

    `features` X and `scores` S are (B, N*C, H, W), task-major: channels [k*C, (k+1)*C) belong to task k.

    mode="tasks" (what the paper text describes for the FPM): the N chunks of C channels are the tasks, and
      for every channel c the softmax runs across tasks, over channels {c, C + c, ..., (N-1)*C + c}. The
      tasks compete for each feature channel.
    mode="official" (what the official code computes): the tensor is *viewed* as (B, C, N, H, W) and the
      softmax runs over the N axis, so each group is N *adjacent* channels {g*N, ..., g*N + N - 1} of the
      concatenation, which mostly belong to one task. With NYUD (N = 2, or N = 4 with C divisible by 4) no
      group ever mixes two tasks: the "task attention" is a softmax between neighbouring channels of the same
      task. With PASCAL (N = 5, C = 36) 4 of 36 groups straddle a task boundary. (The concatenation is
      task-major, but the view reads it as channel-major; a view as (B, N, C, H, W) would have given the
      paper's version.) Choose "official" to reproduce the released code.

    Both modes agree when N = 1 (the mask is all ones), when C = 1 (the groups coincide) and when the scores
    are constant (the mask is 1/N everywhere)."""
    b, nc, h, w = features.shape
    c = nc // num_tasks
    if mode == "tasks":
        shape, dim = (b, num_tasks, c, h, w), 1
    elif mode == "official":
        shape, dim = (b, c, num_tasks, h, w), 2
    else:
        raise ValueError(f"fpm_softmax must be one of {FPM_SOFTMAX_MODES}, got {mode!r}")
    mask = torch.softmax(scores.reshape(shape), dim=dim)
    return (mask * features.reshape(shape)).reshape(b, nc, h, w)


class SqueezeExcitation(nn.Module):
    """Channel gating (Hu et al.): x * sigmoid(W2 ReLU(W1 GAP(x))), reduction 16 (squeeze width 2, 4, 9 for
    C = 36, 72, 144). In the FPM each task has its own gate, so it picks from the shared representation only
    the channels it needs; this protects a task from unrelated tasks."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x):
        weights = self.gate(x.mean(dim=(2, 3)))  # (B, C): one gate per channel
        return x * weights[:, :, None, None]


class FeaturePropagation(nn.Module):
    """Feature Propagation Module, FPM_s (paper Fig. 3, "feature propagation"), for s = 3, 2, 1. It takes the
    task features F^s_t of all N tasks at scale s and returns, per task, what is propagated to scale s-1:

      X   = concat_t F^s_t                          (B, N*C, H, W), task-major
      S   = f(X): BasicBlock(NC -> NC/4), BasicBlock(NC/4), conv1x1(NC/4 -> NC)
      X~  = softmax-masked X (see `task_attention`)  "feature harmonisation"
      R   = BasicBlock(NC -> C)(X~)                 (B, C, H, W), shared by all tasks
      out_t = SE_t(R) + F^s_t                       per-task refinement + residual"""

    def __init__(self, channels, tasks, softmax="tasks"):
        super().__init__()
        if softmax not in FPM_SOFTMAX_MODES:
            raise ValueError(f"fpm_softmax must be one of {FPM_SOFTMAX_MODES}, got {softmax!r}")
        self.tasks = list(tasks)
        self.softmax = softmax
        nc = len(self.tasks) * channels
        self.non_linear = nn.Sequential(  # f, the "learnable non-linear function"
            BasicBlock(nc, nc // 4),
            BasicBlock(nc // 4, nc // 4),
            nn.Conv2d(nc // 4, nc, 1),
        )
        self.reduce = BasicBlock(nc, channels)  # N*C -> C: the shared representation
        self.se = nn.ModuleDict({t: SqueezeExcitation(channels) for t in self.tasks})

    def forward(self, features):
        x = torch.cat([features[t] for t in self.tasks], dim=1)  # X: (B, N*C, H, W)
        x = task_attention(self.non_linear(x), x, len(self.tasks), self.softmax)
        shared = self.reduce(x)  # R: (B, C, H, W)
        return {t: self.se[t](shared) + features[t] for t in self.tasks}


class SABlock(nn.Module):
    """Spatial attention from task a to task t (paper Eq. 1): conv(F_a) * sigmoid(attention(F_a)), two 3x3
    convs without bias, C -> C. The sigmoid mask lets t take from a only where a's features are useful."""

    def __init__(self, channels):
        super().__init__()
        self.attention = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x) * torch.sigmoid(self.attention(x))


class MultiModalDistillation(nn.Module):
    """Multi-modal distillation at one scale (paper Eq. 1):

        D^s_t = F^s_t + sum over a in A, a != t, of SA_{t,a}(F^s_a)

    for every main task t. One SABlock per (t, a) pair: |T| * (N - 1) per scale. MTI-Net runs it at each of
    the 4 scales on the initial-prediction features (not on the FPM outputs); PAD-Net once, at 256 channels.
    No BN, no ReLU."""

    def __init__(self, channels, tasks, all_tasks):
        super().__init__()
        self.attend = nn.ModuleDict({
            t: nn.ModuleDict({a: SABlock(channels) for a in all_tasks if a != t})
            for t in tasks
        })

    def forward(self, features):
        distilled = {}
        for t, from_others in self.attend.items():
            d = features[t]  # (B, C, H, W)
            for a, sa in from_others.items():
                d = d + sa(features[a])
            distilled[t] = d
        return distilled


class ScaleFusion(nn.Module):
    """Upsample the 4 scale maps to the finest one (H/4), concatenate them (sum C_s channels:
    18 + 36 + 72 + 144 = 270 for W18, 720 for W48) and mix them with conv1x1 (bias) - BN - ReLU. It is
    PAD-Net's fused backbone output and the body of the HRNet head."""

    def __init__(self, channels=HRNET_CHANNELS):
        super().__init__()
        c = sum(channels)
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c, momentum=HEAD_BN_MOMENTUM)

    def forward(self, xs):
        size = xs[0].shape[-2:]
        x = torch.cat([xs[0]] + [upsample_to(x, size) for x in xs[1:]], dim=1)  # (B, sum C_s, H/4, W/4)
        return F.relu(self.bn(self.conv(x)))


class FeatureAggregation(nn.Module):
    """Final head of one task (paper Fig. 3, "feature aggregation"; the official HighResolutionHead):
    ScaleFusion of the 4 distilled maps D^0_t..D^3_t, then a 1x1 conv to K_t channels at H/4. The HRNet
    baselines put the same head on the 4 backbone maps. `channels` are the backbone's C_s."""

    def __init__(self, out_channels, channels=HRNET_CHANNELS):
        super().__init__()
        self.fuse = ScaleFusion(channels)
        self.predict = nn.Conv2d(sum(channels), out_channels, 1)

    def forward(self, xs):
        return self.predict(self.fuse(xs))  # (B, K_t, H/4, W/4)


# ------------------------------------------------------------------------------------------------------------
# Helpers shared by the three models


def all_tasks(tasks, aux_tasks=None):
    """A = main tasks + auxiliary tasks, in the official parse order (semantic, parts, saliency, normal, edge,
    depth; other names after these, as given). An auxiliary task may repeat a main task with the same channel
    count."""
    if not tasks:
        raise ValueError("need at least one main task")
    merged = dict(tasks)
    for name, k in (aux_tasks or {}).items():
        if merged.setdefault(name, k) != k:
            raise ValueError(f"task {name!r} has {tasks[name]} channels as a main task "
                             f"but {k} as an auxiliary task")
    rank = {name: i for i, name in enumerate(TASK_ORDER)}
    return dict(sorted(merged.items(), key=lambda item: rank.get(item[0], len(TASK_ORDER))))


def final_prediction(pred, size, task):
    """Upsample a head's output to the input size; unit-normalise normals (the project's prediction
    convention, see the module docstring)."""
    pred = upsample_to(pred, size)
    if task == "normal":
        pred = F.normalize(pred, dim=1, eps=1e-12)
    return pred


# ------------------------------------------------------------------------------------------------------------
# The models


class MTINet(nn.Module):
    """MTI-Net on an HRNet backbone (paper Fig. 3).

    tasks:       main tasks, name -> channels; they get final predictions.
    aux_tasks:   extra tasks predicted only at the front end (initial predictions with deep supervision) to
                 help the main tasks through FPM and distillation, e.g. {"normal": 3, "edge": 1} on NYUD.
    fpm_softmax: "tasks" (the paper text's softmax across tasks) or "official" (the released code's grouping
                 of adjacent channels; use it to reproduce the released numbers). See `task_attention`. Same
                 parameters, and state-dict names, either way.
    backbone:    HRNet name (see HRNET_CONFIGS): "w18-small-v2" (default, the paper's HRNet-18) or "w18",
                 "w32", "w48" (HRNet-48). Every head is sized from the backbone's C_s.

    forward(x) -> {t: (B, K_t, H, W)} for t in tasks.
    forward(x, return_aux=True) -> (preds, aux), aux[s] = {a: (B, K_a, H_s, W_s)} for s = 0..3 (finest first,
    H_s = H / 2^(s+2)) and every a in A: the initial predictions, raw (normals too), to be upsampled to the
    label size and supervised with the same weight as the task's final loss."""

    def __init__(self, tasks, aux_tasks=None, fpm_softmax="tasks", backbone="w18-small-v2"):
        super().__init__()
        self.tasks = dict(tasks)
        self.all_tasks = all_tasks(tasks, aux_tasks)
        self.backbone = HRNet(backbone)
        c = self.backbone.channels  # C_s
        # initial[s][t]: scale 3 reads x3 (C_3 ch); scale s < 3 reads x_s + FPM_{s+1} output
        self.initial = nn.ModuleList([
            nn.ModuleDict({
                t: InitialTaskPrediction(c[s] + (c[s + 1] if s < 3 else 0), c[s], k)
                for t, k in self.all_tasks.items()
            })
            for s in range(4)
        ])
        # fpm[s - 1] = FPM_s for s = 1, 2, 3; scale 0 has nothing finer to feed
        self.fpm = nn.ModuleList([FeaturePropagation(c[s], self.all_tasks, fpm_softmax) for s in (1, 2, 3)])
        self.distill = nn.ModuleList(
            [MultiModalDistillation(c[s], self.tasks, self.all_tasks) for s in range(4)])
        self.heads = nn.ModuleDict({t: FeatureAggregation(k, c) for t, k in self.tasks.items()})

    def forward(self, x, return_aux=False):
        size = x.shape[-2:]
        xs = self.backbone(x)  # x_s: (B, C_s, H/2^(s+2), W/2^(s+2))
        features, aux = [None] * 4, [None] * 4
        propagated = {t: None for t in self.all_tasks}
        for s in (3, 2, 1, 0):  # coarse to fine
            out = {t: head(xs[s], propagated[t]) for t, head in self.initial[s].items()}
            features[s] = {t: f for t, (f, _) in out.items()}  # F^s_t: (B, C_s, H_s, W_s)
            aux[s] = {t: p for t, (_, p) in out.items()}  # P^s_t: (B, K_t, H_s, W_s)
            if s > 0:
                propagated = self.fpm[s - 1](features[s])  # (B, C_s, H_s, W_s) per task
        distilled = [self.distill[s](features[s]) for s in range(4)]  # D^s_t
        preds = {t: final_prediction(head([d[t] for d in distilled]), size, t)
                 for t, head in self.heads.items()}
        return (preds, aux) if return_aux else preds


class PADNet(nn.Module):
    """PAD-Net (Xu et al., CVPR 2018) on an HRNet backbone (`backbone=` as in MTINet), the official
    repository's single-scale counterpart of MTI-Net: the 4 backbone maps are fused into one map of sum C_s
    channels (270 for W18) at H/4; every task in A gets an initial prediction (two Bottlenecks to 256
    channels + 1x1 conv); distillation runs once, at 256 channels; each main task decodes its distilled
    features with two Bottlenecks + 1x1 conv, upsampled to the input size.

    forward(x, return_aux=True) -> (preds, [ {a: (B, K_a, H/4, W/4)} ]): a single entry holding the initial
    predictions, deep-supervised like MTI-Net's."""

    width = 256

    def __init__(self, tasks, aux_tasks=None, backbone="w18-small-v2"):
        super().__init__()
        self.tasks = dict(tasks)
        self.all_tasks = all_tasks(tasks, aux_tasks)
        self.backbone = HRNet(backbone)
        c = self.backbone.channels  # C_s
        self.fuse = ScaleFusion(c)
        self.initial = nn.ModuleDict({
            t: InitialTaskPrediction(sum(c), self.width, k, block=Bottleneck)
            for t, k in self.all_tasks.items()
        })
        self.distill = MultiModalDistillation(self.width, self.tasks, self.all_tasks)
        self.heads = nn.ModuleDict({
            t: nn.Sequential(two_blocks(Bottleneck, self.width, self.width), nn.Conv2d(self.width, k, 1))
            for t, k in self.tasks.items()
        })

    def forward(self, x, return_aux=False):
        size = x.shape[-2:]
        fused = self.fuse(self.backbone(x))  # (B, sum C_s, H/4, W/4)
        out = {t: head(fused) for t, head in self.initial.items()}
        features = {t: f for t, (f, _) in out.items()}  # (B, 256, H/4, W/4)
        aux = [{t: p for t, (_, p) in out.items()}]  # (B, K_t, H/4, W/4)
        distilled = self.distill(features)
        preds = {t: final_prediction(head(distilled[t]), size, t) for t, head in self.heads.items()}
        return (preds, aux) if return_aux else preds


class HRNetMultiTask(nn.Module):
    """The multi-task baseline: a shared HRNet (`backbone=` as in MTINet) and one FeatureAggregation head per
    task on the 4 backbone maps. With one task this is the single-task baseline that Delta_m compares against.

    forward(x) -> {t: (B, K_t, H, W)}; forward(x, return_aux=True) -> (preds, []) so that a training loop can
    treat all models of this file alike."""

    def __init__(self, tasks, backbone="w18-small-v2"):
        super().__init__()
        if not tasks:
            raise ValueError("need at least one task")
        self.tasks = dict(tasks)
        self.backbone = HRNet(backbone)
        c = self.backbone.channels  # C_s
        self.heads = nn.ModuleDict({t: FeatureAggregation(k, c) for t, k in self.tasks.items()})

    def forward(self, x, return_aux=False):
        size = x.shape[-2:]
        xs = self.backbone(x)
        preds = {t: final_prediction(head(xs), size, t) for t, head in self.heads.items()}
        return (preds, []) if return_aux else preds


# ------------------------------------------------------------------------------------------------------------
# Appendix: deterministic stand-ins for --deterministic on a GPU
#
# torch's CUDA backward of bilinear interpolation adds into the input gradient atomically, in an order that
# changes from run to run; torch.use_deterministic_algorithms can only warn about it. Under that mode on a GPU
# (train.py --deterministic), upsample_to calls DeterministicBilinear instead, whose backward sums in a fixed
# order; otherwise (every normal run, and every CPU run, whose kernels are deterministic) torch's own kernel.


class DeterministicBilinear(torch.autograd.Function):
    """torch's bilinear forward (the same values), and a backward in which each input row, then column,
    gathers the output rows that read it, weighted as they read it, and sums them in a fixed order (mtan.py's
    DeterministicBilinear for align_corners=False, repeated so that this file stays usable on its own)."""

    @staticmethod
    def forward(ctx, x, size):
        ctx.resize = (x.shape[-2:], size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad):
        (h, w), (out_h, out_w) = ctx.resize
        rows = transposed_interpolation(grad.float(), 2, h, out_h)  # (B, C, h, W_out)
        return transposed_interpolation(rows, 3, w, out_w).to(grad.dtype), None


def transposed_interpolation(grad, dim, n_in, n_out):
    """sum_j A[j, i] * grad[j] along `dim` (n_out -> n_in) for the interpolation weights A of that axis,
    reading for each i only the K output rows j of its band (A is zero outside it)."""
    rows, weights = interpolation_band(n_in, n_out, grad.device)  # (n_in, K) each
    picked = grad.index_select(dim, rows.flatten()).unflatten(dim, rows.shape)  # (..., n_in, K, ...)
    return (picked * weights.view(rows.shape + (1,) * (grad.dim() - dim - 1))).sum(dim + 1)


_BANDS = {}


def interpolation_band(n_in, n_out, device):
    """For every input index i, the K output indices that read it and their weights (0 past its band), built
    on the CPU once per size and device. The weights: source position (i + 0.5) * n_in / n_out - 0.5 clamped
    at 0, as torch computes it (align_corners=False), two neighbours each."""
    key = (n_in, n_out, str(device))
    if key not in _BANDS:
        source = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
        low = source.floor().clamp(max=n_in - 1)
        share = (source - low)[:, None]  # the second neighbour's share
        j = torch.arange(n_in, dtype=torch.float32)
        # a: (n_out, n_in), the interpolation weights
        a = (j == low[:, None]) * (1 - share) + (j == (low + 1).clamp(max=n_in - 1)[:, None]) * share
        reads, out = a.T != 0, torch.arange(n_out)
        first = torch.where(reads, out, n_out).min(1).values.clamp(max=n_out - 1)
        last = torch.where(reads, out, -1).max(1).values
        k = torch.arange(max(int((last - first).max()) + 1, 1))
        rows = (first[:, None] + k).clamp(max=n_out - 1)  # (n_in, K)
        weights = a.T.gather(1, rows) * (first[:, None] + k <= last[:, None])
        _BANDS[key] = rows.to(device), weights.to(device)
    return _BANDS[key]
