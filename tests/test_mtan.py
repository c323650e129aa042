"""Tests for mtan.py: parameter counts equal the official ones, the output conventions every model shares, the MTAN
wiring against a per-task transcription of the official loop, and that the file works copied alone.

Full-size models are built on the meta device (no memory, no init time) for counting only; forward and backward
passes use width=0.25 and small inputs so the file runs in seconds on a CPU."""
import ast
import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mtan

NYU = {"semantic": 13, "depth": 1, "normal": 3}
CITY = {"semantic": 7, "depth": 1}
DECATHLON_CLASSES = [1000, 100, 100, 2, 47, 43, 1623, 10, 101, 102]
SMALL = 0.25                                            # width for forward/backward tests


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# The official counts minus the 3 logsigma scalars (they live in train.py here). Dense: the official dead
# decoder block (44,583 parameters) is left out, see DenseSegNet's docstring.
COUNTS = [
    ("one task semantic", lambda: mtan.SegNet({"semantic": 13}), 24_981_069),
    ("one task depth", lambda: mtan.SegNet({"depth": 1}), 24_980_289),
    ("one task normal", lambda: mtan.SegNet({"normal": 3}), 24_980_419),
    ("stan semantic", lambda: mtan.MTAN({"semantic": 13}), 38_185_805),
    ("split standard", lambda: mtan.SegNet(NYU, "standard"), 25_055_185),
    ("split wide", lambda: mtan.SegNet(NYU, "wide"), 43_934_161),
    ("split deep", lambda: mtan.SegNet(NYU, "deep"), 50_807_761),
    ("dense", lambda: mtan.DenseSegNet(NYU), 123_743_992 - 44_583),
    ("cross-stitch", lambda: mtan.CrossStitchSegNet(NYU), 74_941_804),
    ("mtan", lambda: mtan.MTAN(NYU), 44_229_073),
    ("mtan cityscapes 7-class", lambda: mtan.MTAN(CITY), 41_206_984),
    ("wrn-28-4 mtan decathlon", lambda: mtan.WideResNetMTAN(DECATHLON_CLASSES), 10_237_656),
]


@pytest.mark.parametrize("name, build, expected", COUNTS, ids=[c[0] for c in COUNTS])
def test_parameter_count(name, build, expected):
    with torch.device("meta"):
        model = build()
    assert num_params(model) == expected


def test_width_scales_every_channel():
    with torch.device("meta"):
        full, quarter = num_params(mtan.MTAN(NYU)), num_params(mtan.MTAN(NYU, width=0.25))
    assert 0.05 < quarter / full < 0.08                 # ~1/16: parameters scale with width squared


# Every SegNet-family class at width 0.25; one forward+backward each serves several tests.
MODELS = {
    "one-task": lambda: mtan.SegNet({"normal": 3}, width=SMALL),
    "split-standard": lambda: mtan.SegNet(NYU, width=SMALL),
    "split-wide": lambda: mtan.SegNet(NYU, "wide", width=SMALL),
    "split-deep": lambda: mtan.SegNet(NYU, "deep", width=SMALL),
    "stan": lambda: mtan.MTAN({"semantic": 13}, width=SMALL),
    "mtan": lambda: mtan.MTAN(NYU, width=SMALL),
    "mtan-other-tasks": lambda: mtan.MTAN({"semantic": 7, "depth": 1, "edge": 1}, width=SMALL),
    "dense": lambda: mtan.DenseSegNet(NYU, width=SMALL),
    "cross-stitch": lambda: mtan.CrossStitchSegNet(NYU, width=SMALL),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward(name):
    """Shapes, dtypes, unit normals, and a gradient for every parameter (Dense has no dead block here)."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    x = torch.rand(2, 3, 64, 96)
    preds = model(x)
    assert list(preds) == list(model.tasks)
    for task, channels in model.tasks.items():
        assert preds[task].shape == (2, channels, 64, 96)
        assert preds[task].dtype == torch.float32
    if "normal" in preds:
        assert torch.allclose(preds["normal"].norm(dim=1), torch.ones(2, 64, 96), atol=1e-5)
    loss = sum((p * torch.randn_like(p)).mean() for p in preds.values())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_full_width_mtan_shapes():
    """The paper's widths on the 2x3x64x96 input (eval mode, no grad: about a second)."""
    model = mtan.MTAN(NYU).eval()
    with torch.no_grad():
        preds = model(torch.rand(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in preds.items()} == {k: (2, c, 64, 96) for k, c in NYU.items()}


def test_attention_masks_for_visualisation():
    model = mtan.MTAN(NYU, width=SMALL).eval()
    with torch.no_grad():
        preds, attention = model(torch.rand(2, 3, 64, 96), return_attention=True)
    assert list(attention) == list(NYU) and list(preds) == list(NYU)
    masks = attention["semantic"]
    # encoder stages 0-4 (fine to coarse), then decoder stages 0-4 (coarse to fine), channels = stage width
    w = mtan.scaled_widths(SMALL)
    expected = [(w[j], 64 >> j, 96 >> j) for j in range(5)] + \
               [(w[max(3 - j, 0)], 64 >> (4 - j), 96 >> (4 - j)) for j in range(5)]
    assert [tuple(m.shape[1:]) for m in masks] == expected
    assert masks[0].shape == (2, 16, 64, 96)            # the mask of paper Fig. 5
    assert all(((m > 0) & (m < 1)).all() for m in masks)  # sigmoid outputs
    assert not torch.equal(attention["semantic"][0], attention["depth"][0])


def test_stan_is_mtan_with_one_task():
    """STAN has exactly MTAN's shared part plus one task's chain and head, parameter for parameter."""
    with torch.device("meta"):
        stan, full = mtan.MTAN({"depth": 1}), mtan.MTAN(NYU)
    others = ("attention.semantic.", "attention.normal.", "heads.semantic.", "heads.normal.")
    mtan_shapes = {k: v.shape for k, v in full.state_dict().items() if not k.startswith(others)}
    assert {k: v.shape for k, v in stan.state_dict().items()} == mtan_shapes
    per_task = num_params(full.attention["depth"])
    assert per_task == 2_984_576                        # cost of one more task, besides its head
    assert num_params(stan) == 38_185_025               # official STAN depth count


def per_task_reference(model, x):
    """MTAN's attention transcribed as the official per-task loop: f applied to one task at a time."""
    enc, dec = model.backbone(x)
    preds, masks = {}, {}
    for name, chain in model.attention.items():
        masks[name], h = [], None
        for j in range(5):
            u = enc.first[j]
            a = chain.encoder[j](u if h is None else torch.cat([u, h], dim=1))
            h = F.max_pool2d(model.enc_f[j](a * enc.last[j]), kernel_size=2, stride=2)
            masks[name].append(a)
        for j in range(5):
            y = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)
            y = model.dec_f[j](y)                                       # num_tasks=1: plain conv-BN-ReLU
            a = chain.decoder[j](torch.cat([dec.unpooled[j], y], dim=1))
            h = a * dec.last[j]
            masks[name].append(a)
        preds[name] = mtan.activate(name, model.heads[name](h))
    return preds, masks


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_stacked_attention_equals_per_task_loop(mode):
    """Running f once on the task-stacked batch gives the official per-task results. In train mode that holds
    because SharedConv normalises each task's chunk with its own BN batch statistics; a single BN call over
    the stack would differ there (statistics pooled over tasks, running stats updated once, not T times)."""
    torch.manual_seed(0)
    model = mtan.MTAN(NYU, width=SMALL).train(mode == "train")
    for m in model.modules():                           # non-trivial running statistics for eval mode
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    reference = copy.deepcopy(model)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        preds, masks = model(x, return_attention=True)
        ref_preds, ref_masks = per_task_reference(reference, x)
    for task in NYU:
        torch.testing.assert_close(preds[task], ref_preds[task], rtol=1e-4, atol=1e-5)
        for m, r in zip(masks[task], ref_masks[task]):
            torch.testing.assert_close(m, r, rtol=1e-4, atol=1e-5)
    for (name, b), (_, r) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, r, rtol=1e-4, atol=1e-6, msg=name)


def test_stacked_bn_would_differ_in_train_mode():
    """Why SharedConv splits BN per task in train mode: pooled statistics are not the per-task ones."""
    torch.manual_seed(0)
    f = mtan.SharedConv(4, 4).train()
    x = torch.cat([torch.randn(2, 4, 8, 8), 3 + 2 * torch.randn(2, 4, 8, 8)])   # two tasks, different stats
    per_task = torch.cat([f(chunk) for chunk in x.chunk(2)])
    assert torch.allclose(f(x, num_tasks=2), per_task, atol=1e-6)
    assert not torch.allclose(f(x, num_tasks=1), per_task, atol=1e-3)        # one BN over the stack


def test_official_initialisation():
    torch.manual_seed(0)
    for model, uniform in [(mtan.MTAN(NYU, width=SMALL), False), (mtan.DenseSegNet(NYU, width=SMALL), True),
                           (mtan.CrossStitchSegNet(NYU, width=SMALL), True)]:
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                assert (m.bias == 0).all()
            if isinstance(m, torch.nn.BatchNorm2d):
                assert (m.weight == 1).all() and (m.bias == 0).all()
        conv = model.heads["semantic"][0]               # 3x3, 16 -> 16: 2304 weights
        bound = math.sqrt(6 / (2 * 16 * 9))             # xavier_uniform_'s limit
        assert (conv.weight.abs().max() <= bound) == uniform
    cross = mtan.CrossStitchSegNet(NYU, width=SMALL)
    assert (cross.alpha == 1).all() and (cross.beta == 1).all()
    assert cross.alpha.shape == (4, 3) and cross.beta.shape == (5, 3)


def test_wide_resnet_mtan_every_domain():
    torch.manual_seed(0)
    model = mtan.WideResNetMTAN(DECATHLON_CLASSES, domains=list(mtan.DECATHLON)).eval()
    assert list(mtan.DECATHLON.values()) == DECATHLON_CLASSES
    x = torch.rand(1, 3, 72, 72)
    with torch.no_grad():
        for k, classes in enumerate(DECATHLON_CLASSES):
            assert model(x, k).shape == (1, classes)
        assert model(x, "svhn").shape == (1, 10)
    with pytest.raises(ValueError, match="65"):
        model(torch.rand(1, 3, 65, 72), 0)


def test_wide_resnet_mtan_trains_only_the_chosen_domain():
    torch.manual_seed(0)
    model = mtan.WideResNetMTAN([5, 7, 3], depth=10, widen_factor=1)   # small WRN, same code path
    F.cross_entropy(model(torch.rand(2, 3, 72, 72), 1), torch.tensor([0, 6])).backward()
    for name, p in model.named_parameters():
        chosen = not name.startswith(("attention.", "classifiers.")) or name.split(".")[1] == "1"
        assert (p.grad is not None) == chosen, name


@pytest.mark.parametrize("shape", [(1, 3, 60, 96), (1, 3, 64, 100)])
def test_input_not_divisible_by_32_raises(shape):
    model = mtan.SegNet({"depth": 1}, width=SMALL)
    with pytest.raises(ValueError, match="divisible by 32") as excinfo:
        model(torch.rand(*shape))
    assert str(shape) in str(excinfo.value)
    with pytest.raises(ValueError, match="divisible by 32"):
        mtan.MTAN(NYU, width=SMALL)(torch.rand(*shape))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="variant"):
        mtan.SegNet(NYU, variant="narrow")
    with pytest.raises(ValueError, match="tasks"):
        mtan.MTAN({})
    with pytest.raises(ValueError, match="tasks"):
        mtan.SegNet({"semantic": 0})
    with pytest.raises(ValueError, match="tasks"):
        mtan.SegNet({"semantic": 2.5})


def test_imports_only_torch_and_stdlib():
    tree = ast.parse(Path(mtan.__file__).read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert all(r == "torch" or r in sys.stdlib_module_names for r in roots), roots


def test_mtan_py_works_copied_alone(tmp_path):
    shutil.copy(mtan.__file__, tmp_path / "mtan.py")
    code = ("import mtan, torch; m = mtan.MTAN({'semantic': 7, 'depth': 1}, width=0.125); "
            "out = m(torch.rand(1, 3, 32, 64)); print(mtan.__file__, sorted(out))")
    env = dict(os.environ, OMP_NUM_THREADS="1")         # tiny model; see one_thread()
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    path, tasks = result.stdout.strip().split(" ", 1)
    assert Path(path).parent == tmp_path and tasks == "['depth', 'semantic']"
