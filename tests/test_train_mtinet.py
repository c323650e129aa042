"""MTI-Net, PAD-Net and the HRNet baselines trained through train.py: deep supervision, auxiliary tasks,
edges derived from semantic labels, the MTI-Net recipe, ImageNet weights and the NYUv2 tree end to end."""
import json
import os

import pytest
import torch

import data
import eval as evaluation
import mtinet
import train
from conftest import tiny  # TINY without --width, which the HRNet models do not take
from test_data import write_nyud, write_nyuv2


def test_semantic_edges_by_hand():
    labels = torch.tensor([[0, 0, 1],
                           [0, -1, 1],
                           [2, 2, 2]])
    # Edges where a label differs from its right or lower neighbour, both valid; -1 makes no edge.
    expected = torch.tensor([[0, 1, 0],
                             [1, 0, 1],
                             [0, 0, 0]]).float()
    assert torch.equal(data.semantic_edges(labels)[0], expected)
    assert data.semantic_edges(labels[None]).shape == (1, 1, 3, 3)


def test_deep_supervision_loss_adds_every_scale():
    """The MTI-Net loss: final losses + the same loss on every scale's initial prediction, upsampled."""
    target = {"depth": torch.full((1, 1, 8, 8), 2.0)}
    final = {"depth": torch.full((1, 1, 8, 8), 1.0)}  # L1 = 1
    aux = [{"depth": torch.full((1, 1, 4, 4), 0.5)}, {"depth": torch.full((1, 1, 2, 2), 3.0)}]  # 1.5 and 1
    losses = train.multitask_losses((final, aux), target, ["depth"], "l1")
    assert losses.tolist() == pytest.approx([1 + 1.5 + 1])


def test_mtinet_recipe_and_task_weights_are_the_defaults(tmp_path):
    cfg = train.resolve_config(train.build_parser().parse_args(
        tiny("mtinet") + ["--aux-tasks", "edge", "--out", str(tmp_path)]), train.build_parser())
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["schedule"]) == ("adam", 1e-3, 1e-4, "poly")
    assert cfg["task_weights"] == {"semantic": 1.0, "depth": 1.0, "normal": 10.0, "edge": 50.0}
    real = train.resolve_config(train.build_parser().parse_args(
        ["--model", "mtinet", "--data", "synthetic", "--lr", "1e-4", "--epochs", "100"]), train.build_parser())
    assert train.learning_rate(real, 0) == 1e-4 and train.learning_rate(real, 99) == pytest.approx(1e-4 * 0.01 ** 0.9)


@pytest.mark.parametrize("model", ["mtinet", "padnet", "hrnet-mtl"])
def test_short_training_of_every_hrnet_model(tmp_path, model):
    extra = ["--aux-tasks", "edge"] if model != "hrnet-mtl" else []
    result = train.main(tiny(model) + ["--out", str(tmp_path)] + extra)
    assert set(result["final"]) == {"semantic", "depth", "normal"}
    record = json.loads(open(tmp_path / "log.jsonl").readline())
    assert all(v == v for v in record["train_loss"].values())  # finite, not NaN
    if model != "hrnet-mtl":
        assert set(record["train_loss"]) == {"semantic", "depth", "normal", "edge"}


def test_mtinet_on_a_fake_nyuv2_tree_with_derived_edges(tmp_path):
    root = write_nyuv2(str(tmp_path / "nyuv2"), size=(64, 64))
    result = train.main(["--model", "mtinet", "--data", "nyuv2", "--data-root", root, "--aux-tasks", "edge",
                         "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "run")])
    assert set(result["tasks"]) == {"semantic", "depth", "normal"}
    report = evaluation.main(["--checkpoint", str(tmp_path / "run" / "last.pt")])
    for task, metrics in result["final"].items():  # eval.py runs without channels_last: rounding differs
        assert report["metrics"][task] == pytest.approx(metrics, rel=1e-4, abs=1e-4)


def test_mtinet_on_a_fake_nyud_tree(tmp_path):
    root = write_nyud(str(tmp_path / "NYUD_MT"), size=(64, 64))
    result = train.main(["--model", "mtinet", "--data", "nyud", "--data-root", root, "--aux-tasks", "normal,edge",
                         "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "run")])
    assert set(result["final"]) == {"semantic", "depth"}


def test_pretrained_imagenet_weights_load_and_switch_on_normalisation(tmp_path):
    backbone = mtinet.HRNet()
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in backbone.state_dict().items()}
    state["classifier.weight"] = torch.zeros(1000, 2048)  # the classification head is reported and skipped
    torch.save(state, tmp_path / "hrnet_w18_small_model_v2.pth")
    cfg = train.resolve_config(train.build_parser().parse_args(
        tiny("hrnet-mtl") + ["--pretrained", str(tmp_path / "hrnet_w18_small_model_v2.pth"),
                "--out", str(tmp_path / "run")]), train.build_parser())
    run = train.setup_run(cfg)
    loaded = run.model.backbone.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert isinstance(run.normalise, mtinet.ImageNetNormalisation)


def test_fpm_softmax_flag_reaches_the_model(tmp_path):
    cfg = train.resolve_config(train.build_parser().parse_args(
        tiny("mtinet") + ["--fpm-softmax", "official", "--out", str(tmp_path)]), train.build_parser())
    model = train.build_model(cfg)
    assert {m.softmax for m in model.modules() if hasattr(m, "softmax") and isinstance(m.softmax, str)} == {"official"}
