"""Tests for mtinet.py: parameter counts against the official code, shapes,
the two FPM softmax groupings, ImageNet checkpoint loading, gradients and
the torch-only import rule. CPU only; small inputs except one backbone
shape check at 288x384."""
import ast
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mtinet
from mtinet import HRNet, HRNetMultiTask, MTINet, PADNet, load_hrnet_imagenet, task_attention

NYUD = {"semantic": 40, "depth": 1}
NYUD_AUX = {"normal": 3, "edge": 1}
PASCAL = {"semantic": 21, "parts": 7, "saliency": 1, "normal": 3, "edge": 1}
PASCAL_SMALL = {"semantic": 21, "parts": 7, "saliency": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def count(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------
# parameter counts of the official code (SimonVandenhende/Multi-Task-Learning-PyTorch)

@pytest.mark.parametrize("build, expected", [
    (lambda: HRNet(), 3_860_720),
    (lambda: MTINet(NYUD), 8_578_179),
    (lambda: MTINet(NYUD, aux_tasks=NYUD_AUX), 14_838_121),
    (lambda: MTINet(PASCAL), 24_494_171),
    (lambda: MTINet(PASCAL_SMALL), 12_645_441),
    (lambda: HRNetMultiTask(NYUD), 4_019_251),
    (lambda: HRNetMultiTask({"semantic": 40}), 3_945_270),
    (lambda: HRNetMultiTask({"depth": 1}), 3_934_701),
    (lambda: HRNetMultiTask(PASCAL), 4_238_213),
    (lambda: HRNetMultiTask({"semantic": 21}), 3_940_121),
    (lambda: HRNetMultiTask({"parts": 7}), 3_936_327),
    (lambda: HRNetMultiTask({"normal": 3}), 3_935_243),
    (lambda: PADNet(NYUD), 7_019_056),
    (lambda: PADNet(NYUD, aux_tasks=NYUD_AUX), 12_161_332),
    (lambda: PADNet(PASCAL), 29_304_992),
], ids=["hrnet", "mtinet-nyud", "mtinet-nyud-aux", "mtinet-pascal", "mtinet-pascal-small",
        "mtl-nyud", "stl-semantic40", "stl-depth", "mtl-pascal", "stl-semantic21", "stl-parts",
        "stl-normal", "padnet-nyud", "padnet-nyud-aux", "padnet-pascal"])
def test_parameter_count(build, expected):
    assert count(build()) == expected


def test_parameter_breakdown_backbone():
    # per part of HRNet-W18-small-v2 (HRNet-Image-Classification's cls_hrnet.py structure)
    net = HRNet()
    parts = {"stem": 38_848, "layer1": 145_408, "transition1": 124_524, "stage2": 65_340,
             "transition2": 23_472, "stage3": 884_304, "transition3": 93_600, "stage4": 2_485_224}
    stem = sum(count(getattr(net, n)) for n in ("conv1", "bn1", "conv2", "bn2"))
    assert stem == parts.pop("stem")
    for name, expected in parts.items():
        assert count(getattr(net, name)) == expected, name
    modules = list(net.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in modules) == 144
    assert sum(isinstance(m, torch.nn.Conv2d) for m in modules) == 144
    assert all(m.momentum == 0.01 for m in modules if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.bias is None for m in modules if isinstance(m, torch.nn.Conv2d))


def test_parameter_breakdown_mtinet_nyud():
    # per module of MTI-Net NYUD (the official models/mti_net.py)
    net = MTINet(NYUD)
    assert [count(m) for m in net.initial] == [38_075, 149_981, 595_409, 1_501_241]
    assert [count(m) for m in net.fpm] == [61_420, 244_592, 976_770]
    assert [count(m) for m in net.distill] == [11_664, 46_656, 186_624, 746_496]
    assert count(net.heads["semantic"]) == 84_550 and count(net.heads["depth"]) == 73_981
    head_bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)][144:]
    assert head_bns and all(m.momentum == 0.1 for m in head_bns)


# ------------------------------------------------------------------------------------------------------------
# shapes

def test_backbone_shapes():
    with torch.no_grad():
        out = HRNet().eval()(torch.randn(2, 3, 288, 384))
    assert [tuple(o.shape) for o in out] == [
        (2, 18, 72, 96), (2, 36, 36, 48), (2, 72, 18, 24), (2, 144, 9, 12)]


def test_mtinet_shapes():
    net = MTINet(NYUD, aux_tasks=NYUD_AUX)
    preds, aux = net(torch.randn(2, 3, 64, 96), return_aux=True)
    assert list(preds) == ["semantic", "depth"]
    assert preds["semantic"].shape == (2, 40, 64, 96) and preds["depth"].shape == (2, 1, 64, 96)
    assert len(aux) == 4
    channels = {"semantic": 40, "normal": 3, "edge": 1, "depth": 1}
    for s, (h, w) in enumerate([(16, 24), (8, 12), (4, 6), (2, 3)]):  # finest first
        assert list(aux[s]) == ["semantic", "normal", "edge", "depth"]  # official parse order
        for t, k in channels.items():
            assert aux[s][t].shape == (2, k, h, w), (s, t)
    assert set(net(torch.randn(2, 3, 64, 96))) == {"semantic", "depth"}  # default: preds only


def test_padnet_and_baseline_shapes():
    x = torch.randn(2, 3, 64, 96)
    preds, aux = PADNet(NYUD, aux_tasks=NYUD_AUX)(x, return_aux=True)
    assert {t: tuple(p.shape) for t, p in preds.items()} == {"semantic": (2, 40, 64, 96), "depth": (2, 1, 64, 96)}
    assert len(aux) == 1
    assert {t: tuple(p.shape) for t, p in aux[0].items()} == {
        "semantic": (2, 40, 16, 24), "normal": (2, 3, 16, 24), "edge": (2, 1, 16, 24), "depth": (2, 1, 16, 24)}
    preds, aux = HRNetMultiTask(NYUD)(x, return_aux=True)
    assert aux == [] and preds["semantic"].shape == (2, 40, 64, 96) and preds["depth"].shape == (2, 1, 64, 96)


def test_input_not_multiple_of_32():
    # every upsampling targets the size of the map it joins, so odd sizes work
    with torch.no_grad():
        preds, aux = MTINet(NYUD).eval()(torch.randn(1, 3, 50, 70), return_aux=True)
    assert preds["semantic"].shape == (1, 40, 50, 70)
    assert [tuple(a["depth"].shape[-2:]) for a in aux] == [(13, 18), (7, 9), (4, 5), (2, 3)]


def test_normals_are_unit_vectors():
    with torch.no_grad():
        preds = MTINet({"normal": 3, "depth": 1}).eval()(torch.randn(1, 3, 64, 64))
    assert torch.allclose(preds["normal"].norm(dim=1), torch.ones(1, 64, 64), atol=1e-5)


def test_task_order_and_conflicts():
    assert list(mtinet.all_tasks({"depth": 1, "semantic": 40}, {"edge": 1, "normal": 3, "foo": 2})) == [
        "semantic", "normal", "edge", "depth", "foo"]
    assert mtinet.all_tasks(NYUD, {"semantic": 40}) == {"semantic": 40, "depth": 1}
    with pytest.raises(ValueError, match="semantic"):
        mtinet.all_tasks(NYUD, {"semantic": 13})
    with pytest.raises(ValueError, match="fpm_softmax"):
        MTINet(NYUD, fpm_softmax="paper")


# ------------------------------------------------------------------------------------------------------------
# FPM softmax: paper text ("tasks") vs official code ("official")

def test_task_attention_modes_differ_on_constructed_case():
    # N = 2 tasks of C = 2 channels: X = [a0, a1 | b0, b1]; the scores favour task 0.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    s = torch.tensor([2.0, 2.0, 0.0, 0.0]).view(1, 4, 1, 1)
    paper = task_attention(s, x, 2, "tasks").flatten()
    official = task_attention(s, x, 2, "official").flatten()
    # across tasks per channel: task 0 wins every channel, task 1 is suppressed
    w0, w1 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-2.0))  # 0.88, 0.12
    assert torch.allclose(paper, torch.stack([w0 * 1, w0 * 2, w1 * 3, w1 * 4]))
    # adjacent channels (0,1) and (2,3) form the groups: equal scores within each, so 1/2 everywhere
    assert torch.allclose(official, torch.tensor([0.5, 1.0, 1.5, 2.0]))


def test_task_attention_matches_both_readings():
    b, n, c, h, w = 2, 3, 5, 4, 6
    x, s = torch.randn(b, n * c, h, w), torch.randn(b, n * c, h, w)
    # paper: for channel k of task t, softmax over t of s[t*C + k]
    chunks_s, chunks_x = s.view(b, n, c, h, w), x.view(b, n, c, h, w)
    paper = (torch.softmax(chunks_s, dim=1) * chunks_x).view(b, n * c, h, w)
    assert torch.allclose(task_attention(s, x, n, "tasks"), paper, atol=1e-6)
    # official: groups {g*N, ..., g*N + N - 1} of the concatenation
    official = torch.empty_like(x)
    for g in range(c):
        idx = slice(g * n, g * n + n)
        official[:, idx] = torch.softmax(s[:, idx], dim=1) * x[:, idx]
    assert torch.allclose(task_attention(s, x, n, "official"), official, atol=1e-6)
    assert not torch.allclose(paper, official, atol=1e-3)


@pytest.mark.parametrize("n, c, constant", [(1, 6, False), (4, 1, False), (3, 5, True)],
                         ids=["one-task", "one-channel", "constant-scores"])
def test_task_attention_modes_agree(n, c, constant):
    x, s = torch.randn(2, n * c, 3, 3), torch.randn(2, n * c, 3, 3)
    if constant:
        s = torch.full_like(s, 0.7)  # uniform mask 1/N in both groupings
    assert torch.allclose(task_attention(s, x, n, "tasks"), task_attention(s, x, n, "official"))


def _both_modes(tasks):
    torch.manual_seed(0)
    a = MTINet(tasks, fpm_softmax="tasks").eval()
    b = MTINet(tasks, fpm_softmax="official").eval()
    b.load_state_dict(a.state_dict())  # same parameter names in both modes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        return a(x), b(x)


def test_fpm_modes_agree_for_single_task_model():
    pa, pb = _both_modes({"depth": 1})  # N = 1: the softmax mask is 1
    assert torch.equal(pa["depth"], pb["depth"])


def test_fpm_modes_differ_for_multi_task_model():
    pa, pb = _both_modes(NYUD)
    assert not torch.allclose(pa["depth"], pb["depth"], atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# ImageNet checkpoint loading under the official names

def test_official_key_names():
    sd = HRNet().state_dict()
    expected = {
        "conv1.weight": (64, 3, 3, 3),
        "bn2.running_var": (64,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.1.conv3.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (18, 256, 3, 3),
        "transition1.1.0.0.weight": (36, 256, 3, 3),
        "transition2.2.0.0.weight": (72, 36, 3, 3),
        "transition3.3.0.1.bias": (144,),
        "stage2.0.branches.1.1.conv2.weight": (36, 36, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (18, 36, 1, 1),
        "stage3.2.fuse_layers.2.0.1.0.weight": (72, 18, 3, 3),
        "stage4.1.fuse_layers.3.0.0.0.weight": (18, 18, 3, 3),
        "stage4.1.fuse_layers.3.0.2.1.weight": (144,),
        "stage4.1.branches.3.1.bn2.running_mean": (144,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("transition1.2", "stage4.2", "incre", "final_layer")) for k in sd)


def _fake_imagenet_checkpoint():
    """What `torch.load("hrnet_w18_small_model_v2.pth")` gives: backbone keys under the
    official names, plus the classification head, and (like old checkpoints) no
    num_batches_tracked."""
    torch.manual_seed(1)
    source = HRNet()
    for p in source.parameters():
        torch.nn.init.normal_(p)
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["incre_modules.0.0.conv1.weight"] = torch.randn(32, 18, 1, 1)
    sd["downsamp_modules.0.0.weight"] = torch.randn(256, 128, 3, 3)
    sd["final_layer.0.weight"] = torch.randn(2048, 1024, 1, 1)
    sd["classifier.weight"] = torch.randn(1000, 2048)
    sd["classifier.bias"] = torch.randn(1000)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_load_imagenet_checkpoint_round_trip():
    sd = _fake_imagenet_checkpoint()
    model = MTINet(NYUD)
    skipped = load_hrnet_imagenet(model, sd)  # a model with .backbone, or an HRNet
    assert skipped == sorted(["incre_modules.0.0.conv1.weight", "downsamp_modules.0.0.weight",
                              "final_layer.0.weight", "classifier.weight", "classifier.bias"])
    for key, value in model.backbone.state_dict().items():
        if key in sd:
            assert torch.equal(value, sd[key]), key
    net = HRNet()
    assert load_hrnet_imagenet(net, sd) == skipped
    assert torch.equal(net.stage4[1].fuse_layers[3][0][2][0].weight, sd["stage4.1.fuse_layers.3.0.2.0.weight"])


def test_load_imagenet_wrong_shape_is_a_clear_error():
    sd = _fake_imagenet_checkpoint()
    sd["stage3.0.branches.2.0.conv1.weight"] = torch.randn(64, 64, 3, 3)
    with pytest.raises(ValueError) as err:
        load_hrnet_imagenet(HRNet(), sd)
    msg = str(err.value)
    assert "stage3.0.branches.2.0.conv1.weight" in msg and "(64, 64, 3, 3)" in msg and "(72, 72, 3, 3)" in msg


def test_load_imagenet_missing_or_unknown_key_is_a_clear_error():
    sd = _fake_imagenet_checkpoint()
    del sd["layer1.0.bn3.running_var"]
    with pytest.raises(ValueError, match=r"layer1\.0\.bn3\.running_var"):
        load_hrnet_imagenet(HRNet(), sd)
    sd = _fake_imagenet_checkpoint()
    sd["stage4.2.branches.0.0.conv1.weight"] = torch.randn(18, 18, 3, 3)  # e.g. HRNetV2-W18, not small-v2
    with pytest.raises(ValueError, match=r"stage4\.2\.branches"):
        load_hrnet_imagenet(HRNet(), sd)


# ------------------------------------------------------------------------------------------------------------
# gradients

def _backward(model, x):
    out = model(x, return_aux=True)
    preds, aux = out
    tensors = list(preds.values()) + [p for scale in aux for p in scale.values()]
    torch.manual_seed(0)
    loss = sum((t * torch.randn_like(t)).mean() for t in tensors)
    loss.backward()


@pytest.mark.parametrize("build", [
    lambda: MTINet(NYUD, aux_tasks=NYUD_AUX),
    lambda: MTINet(NYUD, aux_tasks=NYUD_AUX, fpm_softmax="official"),
    lambda: PADNet(NYUD, aux_tasks=NYUD_AUX),
    lambda: HRNetMultiTask(NYUD),
], ids=["mtinet", "mtinet-official", "padnet", "hrnet-mtl"])
def test_gradients_reach_every_parameter(build):
    model = build()
    _backward(model, torch.randn(2, 3, 64, 96))
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # Conv weights must see signal. (Not every tensor can: a bias right before a
        # BatchNorm gets ~0 gradient by design, and the 2-unit squeeze of an SE gate
        # can be dead for a whole small batch at random init.)
        if p.dim() == 4:
            assert p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------------------
# mtinet.py depends on torch and the standard library only

def test_imports_only_torch_and_stdlib():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mtinet.py")
    tree = ast.parse(open(path).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            roots.add(node.module.split(".")[0])
    assert roots - {"torch"} <= set(sys.stdlib_module_names), roots


def test_works_copied_alone(tmp_path):
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mtinet.py")
    shutil.copy(src, tmp_path / "mtinet.py")
    code = ("import sys, mtinet, torch; "
            "assert not {'data', 'eval', 'train', 'mtan', 'PIL'} & set(sys.modules); "
            "out = mtinet.MTINet({'semantic': 3, 'depth': 1}).eval()(torch.randn(1, 3, 32, 32)); "
            "print(sorted(out))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "['depth', 'semantic']" in result.stdout
