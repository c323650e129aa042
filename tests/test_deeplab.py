"""Tests for mtan.py's ResNet family: ResNetDilated, DeepLabHead, DeepLabv3, MTANDeepLabv3.

Parameter counts are the official ones (lorenmt/mtan MTANDeepLabv3; MTI-Net's DeepLab baselines on NYUD),
counted on the meta device. A torchvision ResNet-50 state dict, its key names written out here from
torchvision's naming rules (not taken from mtan.py), loads into ResNetDilated. Forward and backward passes
run the full-width models once each at 64x64 on one thread (a few seconds in all)."""
import pytest
import torch

import mtan

NYU = {"semantic": 13, "depth": 1, "normal": 3}
NYUD_SEG, NYUD_SEG_DEPTH = {"semantic": 40}, {"semantic": 40, "depth": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def num_params(model):
    return sum(p.numel() for p in model.parameters())


COUNTS = [
    ("mtan-deeplabv3 nyuv2", lambda: mtan.MTANDeepLabv3(NYU), 92_347_921),     # official, no logsigma in it
    ("deeplabv3 nyud semantic", lambda: mtan.DeepLabv3(NYUD_SEG), 39_643_752),
    ("deeplabv3 nyud semantic+depth", lambda: mtan.DeepLabv3(NYUD_SEG_DEPTH), 55_769_449),
    ("resnet-50 dilated", lambda: mtan.ResNetDilated(), 25_557_032 - (2048 * 1000 + 1000)),   # torchvision - fc
    ("deeplab head, 3 nyuv2 tasks", lambda: torch.nn.ModuleList(mtan.DeepLabHead(2048, c) for c in NYU.values()),
     48_380_689),
]


@pytest.mark.parametrize("name, build, expected", COUNTS, ids=[c[0] for c in COUNTS])
def test_parameter_count(name, build, expected):
    with torch.device("meta"):
        model = build()
    assert num_params(model) == expected


def torchvision_resnet50_shapes():
    """Key -> shape of torchvision's resnet50().state_dict(), in its order, from torchvision's naming rules."""
    shapes = {}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                       f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    cin = 64
    for layer, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for i in range(blocks):
            p = f"layer{layer}.{i}"
            shapes[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{p}.bn3", 4 * planes)
            if i == 0:                                  # every layer's first block changes the width
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, cin, 1, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            cin = 4 * planes
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048), (1000,)
    return shapes


def fake_torchvision_file(with_batch_counts=True):
    torch.manual_seed(0)
    state = {}
    for k, shape in torchvision_resnet50_shapes().items():
        if k.endswith("num_batches_tracked"):
            if with_batch_counts:
                state[k] = torch.tensor(7)
        else:
            state[k] = torch.randn(shape)
    return state


@pytest.fixture(scope="module")
def backbone():
    return mtan.ResNetDilated()


def test_key_names_and_shapes_are_torchvision(backbone):
    expected = {k: v for k, v in torchvision_resnet50_shapes().items() if not k.startswith("fc.")}
    assert list(backbone.state_dict()) == list(expected)           # same names, same order
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == expected


@pytest.mark.parametrize("with_batch_counts", [True, False], ids=["current", "pre-0.4.1-file"])
def test_torchvision_state_dict_loads(backbone, tmp_path, with_batch_counts):
    state = fake_torchvision_file(with_batch_counts)
    result = backbone.load_state_dict(state, strict=False)             # the plain PyTorch way
    assert result.missing_keys == [] and result.unexpected_keys == ["fc.weight", "fc.bias"]
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    backbone.load_state_dict({k: torch.zeros_like(v) for k, v in backbone.state_dict().items()})
    assert backbone.load_torchvision(path) == ["fc.weight", "fc.bias"]  # the helper: strict, skips fc
    loaded = backbone.state_dict()
    for k in ("conv1.weight", "layer3.0.downsample.0.weight", "layer4.2.bn3.running_var"):
        assert torch.equal(loaded[k], state[k]), k
    assert loaded["bn1.num_batches_tracked"] == (7 if with_batch_counts else 0)
    del state["layer4.2.conv3.weight"]
    with pytest.raises(RuntimeError, match="layer4.2.conv3.weight"):
        backbone.load_torchvision(state)


def test_dilation_follows_the_official_rule(backbone):
    """Strided 3x3 conv -> stride 1, dilation d/2; other 3x3 convs dilation d; downsample 1x1 stride 1."""
    for layer, d in ((backbone.layer3, 2), (backbone.layer4, 4)):
        first = layer[0]
        h = d // 2
        assert (first.conv2.stride, first.conv2.dilation, first.conv2.padding) == ((1, 1), (h, h), (h, h))
        assert first.downsample[0].stride == (1, 1)
        for block in layer[1:]:
            assert (block.conv2.stride, block.conv2.dilation, block.conv2.padding) == ((1, 1), (d, d), (d, d))
    assert backbone.layer2[0].conv2.stride == (2, 2) and backbone.layer2[0].downsample[0].stride == (2, 2)
    with torch.device("meta"):                          # output stride 16: only layer4 is dilated, by 2
        os16 = mtan.ResNetDilated(output_stride=16)
    assert os16.layer3[0].conv2.stride == (2, 2) and os16.layer3[1].conv2.dilation == (1, 1)
    assert os16.layer4[0].conv2.dilation == (1, 1) and os16.layer4[2].conv2.dilation == (2, 2)
    with torch.no_grad():
        stages = mtan.ResNetDilated(width=0.25).eval().forward_stages(torch.rand(1, 3, 64, 96))
    assert [tuple(t.shape) for _, t in stages] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 8, 12),
                                                   (1, 512, 8, 12)]          # width 0.25: 4x planes 16..128


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"mtan-deeplabv3": (mtan.MTANDeepLabv3(NYU), NYU),
            "deeplabv3": (mtan.DeepLabv3(NYUD_SEG_DEPTH), NYUD_SEG_DEPTH),
            "deeplabv3-single": (mtan.DeepLabv3({"normal": 3}), {"normal": 3})}


def check_outputs(preds, tasks, batch):
    assert list(preds) == list(tasks)
    for task, channels in tasks.items():
        assert preds[task].shape == (batch, channels, 64, 64) and preds[task].dtype == torch.float32
        assert torch.isfinite(preds[task]).all()
    if "normal" in preds:
        assert torch.allclose(preds["normal"].norm(dim=1), torch.ones(batch, 64, 64), atol=1e-5)
    if "semantic" in preds:                             # logits, not log-probabilities (the file's convention)
        assert not torch.allclose(preds["semantic"].exp().sum(dim=1), torch.ones(batch, 64, 64), atol=1e-3)


@pytest.mark.parametrize("name", ["mtan-deeplabv3", "deeplabv3", "deeplabv3-single"])
def test_forward_outputs(models, name):
    model, tasks = models[name]
    with torch.no_grad():
        check_outputs(model.eval()(torch.rand(1, 3, 64, 64)), tasks, 1)


def test_mtan_deeplab_attention_masks(models):
    model, _ = models["mtan-deeplabv3"]
    with torch.no_grad():
        _, masks = model.eval()(torch.rand(1, 3, 64, 64), return_attention=True)
    assert [tuple(m.shape) for m in masks["depth"]] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 8, 8),
                                                        (1, 2048, 8, 8)]
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 3, 60, 64))


@pytest.mark.parametrize("name", ["mtan-deeplabv3", "deeplabv3"])
def test_backward_reaches_the_backbone(models, name):
    """Train mode, batch 2 (ASPP's image-pooling BN needs two values per channel): every parameter gets a
    finite, non-zero gradient, the backbone's first conv included."""
    model, tasks = models[name]
    model.train().zero_grad()
    preds = model(torch.rand(2, 3, 64, 64))
    check_outputs(preds, tasks, 2)
    sum((p * torch.randn_like(p)).mean() for p in preds.values()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
