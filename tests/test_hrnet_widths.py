"""Tests for the HRNet backbones of mtinet.py: HRNetV2-W18/W32/W48 next to the
default HRNet-W18-small-v2. Parameter counts against the official numbers
(HRNet-Image-Classification backbones without the classification head; the
official MTI-Net code with the wider backbone swapped in), output shapes, and
loading a checkpoint saved under HRNet-Image-Classification's key names
(lib/models/cls_hrnet.py), whose key list this file rebuilds from that file's
naming rules rather than from mtinet.py.

The big models are built on the "meta" device: parameters with shapes but no
storage, so counting 212 M parameters costs neither memory nor init time. CPU
only, one thread, 64x64 inputs."""
import pytest
import torch

from mtinet import (HRNET_CONFIGS, HRNet, HRNetMultiTask, ImageNetNormalisation, MTINet, PADNet,
                    load_hrnet_imagenet)

NYUD = {"semantic": 40, "depth": 1}
NYUD_AUX = {"normal": 3, "edge": 1}
PASCAL = {"semantic": 21, "parts": 7, "saliency": 1, "normal": 3, "edge": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def count(model):
    return sum(p.numel() for p in model.parameters())


def on_meta(build):
    with torch.device("meta"):
        return build()


# ------------------------------------------------------------------------------------------------------------
# parameter counts

@pytest.mark.parametrize("build, expected", [
    (lambda: HRNet(), 3_860_720),
    (lambda: HRNet("w18-small-v2"), 3_860_720),
    (lambda: HRNet("w32"), 29_305_536),
    (lambda: HRNet("w48"), 65_325_120),
    (lambda: MTINet(NYUD, backbone="w32"), 44_170_373),
    (lambda: MTINet(NYUD, backbone="w48"), 98_727_553),
    (lambda: MTINet(NYUD, aux_tasks=NYUD_AUX, backbone="w48"), 143_207_429),
    (lambda: MTINet(PASCAL, backbone="w48"), 211_871_031),
    # not official numbers: the W18-small-v2 heads with the W48 widths (sum C_s = 720)
    (lambda: HRNetMultiTask(NYUD, backbone="w48"), 65_325_120 + (720 * 720 + 720 + 2 * 720) * 2 + 721 * 40 + 721),
], ids=["hrnet-default", "hrnet-w18-small-v2", "hrnet-w32", "hrnet-w48", "mtinet-nyud-w32", "mtinet-nyud-w48",
        "mtinet-nyud-aux-w48", "mtinet-pascal-w48", "mtl-nyud-w48"])
def test_parameter_count(build, expected):
    assert count(on_meta(build)) == expected


def test_heads_follow_the_backbone_channels():
    net = on_meta(lambda: MTINet(NYUD, aux_tasks=NYUD_AUX, backbone="w48"))
    assert net.backbone.channels == (48, 96, 192, 384)
    assert net.initial[3]["depth"].refine[0].conv1.in_channels == 384
    assert net.initial[0]["depth"].refine[0].conv1.in_channels == 48 + 96
    assert [f.reduce.conv2.out_channels for f in net.fpm] == [96, 192, 384]
    assert [d.attend["semantic"]["edge"].conv.in_channels for d in net.distill] == [48, 96, 192, 384]
    assert net.heads["semantic"].fuse.conv.in_channels == 720
    pad = on_meta(lambda: PADNet(NYUD, backbone="w32"))
    assert pad.fuse.conv.in_channels == 480 and pad.initial["depth"].refine[0].conv1.in_channels == 480


def test_default_is_w18_small_v2_and_names_are_checked():
    default, named = on_meta(HRNet), on_meta(lambda: HRNet("w18-small-v2"))
    assert default.name == "w18-small-v2" and default.channels == (18, 36, 72, 144)
    assert {k: v.shape for k, v in default.state_dict().items()} == {
        k: v.shape for k, v in named.state_dict().items()}
    assert len(default.stage3) == 3 and len(default.stage4) == 2 and len(default.layer1) == 2
    with pytest.raises(ValueError, match="w64"):
        HRNet("w64")


# ------------------------------------------------------------------------------------------------------------
# shapes

def test_hrnetv2_w18_shapes():
    with torch.no_grad():
        out = HRNet("w18").eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 18, 16, 16), (1, 36, 8, 8), (1, 72, 4, 4), (1, 144, 2, 2)]


def test_mtinet_w32_shapes():
    net = MTINet(NYUD, backbone="w32").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = net.backbone(x)
        preds, aux = net(x, return_aux=True)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4), (1, 256, 2, 2)]
    assert {t: tuple(p.shape) for t, p in preds.items()} == {"semantic": (1, 40, 64, 64), "depth": (1, 1, 64, 64)}
    assert [tuple(a["semantic"].shape) for a in aux] == [(1, 40, 16, 16), (1, 40, 8, 8), (1, 40, 4, 4), (1, 40, 2, 2)]


# ------------------------------------------------------------------------------------------------------------
# the official key names (HRNet-Image-Classification, lib/models/cls_hrnet.py)

def _conv(keys, prefix, cin, cout, k, bias=False):
    keys[f"{prefix}.weight"] = (cout, cin, k, k)
    if bias:
        keys[f"{prefix}.bias"] = (cout,)


def _bn(keys, prefix, c):
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.{name}"] = (c,)
    keys[f"{prefix}.num_batches_tracked"] = ()


def _bottleneck(keys, prefix, inplanes, planes):
    """cls_hrnet Bottleneck (expansion 4), with the downsample whenever the width changes."""
    _conv(keys, f"{prefix}.conv1", inplanes, planes, 1)
    _bn(keys, f"{prefix}.bn1", planes)
    _conv(keys, f"{prefix}.conv2", planes, planes, 3)
    _bn(keys, f"{prefix}.bn2", planes)
    _conv(keys, f"{prefix}.conv3", planes, 4 * planes, 1)
    _bn(keys, f"{prefix}.bn3", 4 * planes)
    if inplanes != 4 * planes:
        _conv(keys, f"{prefix}.downsample.0", inplanes, 4 * planes, 1)
        _bn(keys, f"{prefix}.downsample.1", 4 * planes)


def cls_hrnet_keys(stage1_blocks, modules, blocks, c):
    """(backbone, classification head): key -> shape of a HighResolutionNet
    state dict, written from cls_hrnet.py's construction rules."""
    keys = {}
    _conv(keys, "conv1", 3, 64, 3)
    _bn(keys, "bn1", 64)
    _conv(keys, "conv2", 64, 64, 3)
    _bn(keys, "bn2", 64)
    for b in range(stage1_blocks):  # _make_layer(Bottleneck, 64, 64, blocks)
        _bottleneck(keys, f"layer1.{b}", 64 if b == 0 else 256, 64)
    # _make_transition_layer: branch 0 from 256 channels (width changes: conv-BN-ReLU),
    # then one new branch per stage, a Sequential of one conv-BN-ReLU Sequential
    _conv(keys, "transition1.0.0", 256, c[0], 3)
    _bn(keys, "transition1.0.1", c[0])
    for t, cin in ((1, 256), (2, c[1]), (3, c[2])):
        _conv(keys, f"transition{t}.{t}.0.0", cin, c[t], 3)
        _bn(keys, f"transition{t}.{t}.0.1", c[t])
    for stage, num_modules in zip((2, 3, 4), modules):
        n = stage  # branches
        for m in range(num_modules):
            p = f"stage{stage}.{m}"
            for i in range(n):
                for b in range(blocks):  # BasicBlock, no downsample inside a branch
                    _conv(keys, f"{p}.branches.{i}.{b}.conv1", c[i], c[i], 3)
                    _bn(keys, f"{p}.branches.{i}.{b}.bn1", c[i])
                    _conv(keys, f"{p}.branches.{i}.{b}.conv2", c[i], c[i], 3)
                    _bn(keys, f"{p}.branches.{i}.{b}.bn2", c[i])
            for i in range(n):
                for j in range(n):
                    f = f"{p}.fuse_layers.{i}.{j}"
                    if j > i:  # conv1x1, BN, Upsample
                        _conv(keys, f"{f}.0", c[j], c[i], 1)
                        _bn(keys, f"{f}.1", c[i])
                    elif j < i:  # i - j stride-2 convs, each in its own Sequential
                        for k in range(i - j):
                            out = c[i] if k == i - j - 1 else c[j]
                            _conv(keys, f"{f}.{k}.0", c[j], out, 3)
                            _bn(keys, f"{f}.{k}.1", out)
    head = {}  # _make_head: head_channels 32, 64, 128, 256 (x4 by the Bottleneck)
    hc = (32, 64, 128, 256)
    for i in range(4):
        _bottleneck(head, f"incre_modules.{i}.0", c[i], hc[i])
    for i in range(3):
        _conv(head, f"downsamp_modules.{i}.0", 4 * hc[i], 4 * hc[i + 1], 3, bias=True)
        _bn(head, f"downsamp_modules.{i}.1", 4 * hc[i + 1])
    _conv(head, "final_layer.0", 1024, 2048, 1, bias=True)
    _bn(head, "final_layer.1", 2048)
    head["classifier.weight"] = (1000, 2048)
    head["classifier.bias"] = (1000,)
    return keys, head


YAML = {  # MODEL.EXTRA of experiments/cls_hrnet_*.yaml: stage-1 blocks, modules 2-4, blocks, channels
    "w18-small-v2": (2, (1, 3, 2), 2, (18, 36, 72, 144)),
    "w18": (4, (1, 4, 3), 4, (18, 36, 72, 144)),
    "w32": (4, (1, 4, 3), 4, (32, 64, 128, 256)),
    "w48": (4, (1, 4, 3), 4, (48, 96, 192, 384)),
}


@pytest.mark.parametrize("name", list(YAML))
def test_state_dict_is_cls_hrnet_without_head(name):
    assert set(HRNET_CONFIGS) == set(YAML)
    backbone, _ = cls_hrnet_keys(*YAML[name])
    net = on_meta(lambda: HRNet(name))
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == backbone


def _checkpoint(keys):
    """A fake checkpoint: every tensor filled with its own index, so a value that
    lands under the wrong key is caught."""
    return {k: torch.full(shape, i, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float)
            for i, (k, shape) in enumerate(keys.items())}


def test_load_w48_checkpoint_under_official_names():
    backbone, head = cls_hrnet_keys(*YAML["w48"])
    sd = _checkpoint({**backbone, **head})
    net = on_meta(lambda: HRNet("w48")).to_empty(device="cpu")
    skipped = load_hrnet_imagenet(net, sd)
    assert skipped == sorted(head)
    own = net.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in backbone)
    result = net.load_state_dict({k: sd[k] for k in backbone}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_load_from_path_into_a_model(tmp_path):
    backbone, head = cls_hrnet_keys(*YAML["w18"])
    sd = _checkpoint({**backbone, **head})
    path = tmp_path / "hrnetv2_w18_imagenet_pretrained.pth"
    torch.save(sd, path)
    model = on_meta(lambda: HRNetMultiTask({"depth": 1}, backbone="w18")).to_empty(device="cpu")
    assert load_hrnet_imagenet(model, path) == sorted(head)
    assert torch.equal(model.backbone.stage4[2].fuse_layers[3][0][2][0].weight,
                       sd["stage4.2.fuse_layers.3.0.2.0.weight"])


def test_wrong_width_is_a_clear_error():
    backbone, _ = cls_hrnet_keys(*YAML["w18"])
    sd = _checkpoint(backbone)
    with pytest.raises(ValueError, match=r"'transition1\.0\.0\.weight'.*\(18, 256, 3, 3\).*'w32'.*"
                                         r"\(32, 256, 3, 3\).*backbone='w18'"):
        load_hrnet_imagenet(on_meta(lambda: HRNet("w32")).to_empty(device="cpu"), sd)
    with pytest.raises(ValueError, match=r"unexpected keys \['layer1\.2\..*backbone='w18'"):
        load_hrnet_imagenet(on_meta(HRNet).to_empty(device="cpu"), sd)  # HRNetV2 has 4 stage-1 blocks


# ------------------------------------------------------------------------------------------------------------
# input normalisation

def test_imagenet_normalisation():
    norm = ImageNetNormalisation()
    assert list(norm.state_dict()) == ["mean", "std"]
    assert norm.mean.shape == norm.std.shape == (1, 3, 1, 1)
    assert norm.mean.flatten().tolist() == torch.tensor([0.485, 0.456, 0.406]).tolist()
    assert norm.std.flatten().tolist() == torch.tensor([0.229, 0.224, 0.225]).tolist()
    image = torch.rand(2, 3, 8, 8)
    expected = (image - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.equal(norm(image), expected)
