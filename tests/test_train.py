"""train.py: losses, task weighting, the loop, checkpoints, resume and the command line's errors."""
import json
import math
import os

import pytest
import torch

import train
from conftest import TINY  # 4 synthetic samples per split at 64x64, a 1/16-width network, batch 2, one epoch


def run(tmp_path, *extra, name="run"):
    out = str(tmp_path / name)
    return train.main(TINY + ["--out", out] + list(extra)), out


# ---- losses ------------------------------------------------------------------------------------------------


def test_depth_loss_ignores_invalid_pixels():
    pred = torch.tensor([1.0, 5.0, 2.0, 9.0]).view(1, 1, 2, 2)
    target = torch.tensor([2.0, 0.0, 4.0, 0.0]).view(1, 1, 2, 2)  # two valid pixels, errors 1 and 2
    assert train.depth_l1_loss(pred, target).item() == pytest.approx(1.5)


def test_losses_are_zero_not_nan_without_valid_pixels():
    assert train.depth_l1_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 0
    assert train.cross_entropy_loss(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), -1)).item() == 0
    assert train.normal_cosine_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)).item() == 1
    assert train.normal_l1_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)).item() == 0


def test_normal_losses_known_values():
    target = torch.zeros(1, 3, 1, 2)
    target[0, 2] = 1.0  # both pixels point along +z
    same, opposite = target.clone(), -target
    assert train.normal_cosine_loss(same * 3, target).item() == pytest.approx(0)  # unnormalised is fine
    assert train.normal_cosine_loss(opposite, target).item() == pytest.approx(2)
    # L1 of (0, 0, -1) - (0, 0, 1) is 2 on one of 3 channels: 2/3 per element.
    assert train.normal_l1_loss(opposite, target).item() == pytest.approx(2 / 3)


def test_balanced_bce_by_hand():
    logits = torch.tensor([0.0, 0.0, 2.0, -1.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    bce = [math.log(2), math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))]
    expected = (0.95 * (bce[0] + bce[2]) + 0.05 * (bce[1] + bce[3])) / 4
    assert train.balanced_bce_loss(logits, target, 0.95).item() == pytest.approx(expected, rel=1e-6)
    # Saliency: the positive weight is the fraction of negatives in the batch (here 1/2).
    assert train.balanced_bce_loss(logits, target).item() == pytest.approx(sum(bce) / 2 / 4, rel=1e-6)


# ---- task weighting ----------------------------------------------------------------------------------------


def test_equal_weighting_is_a_sum():
    assert train.EqualWeighting(3)(torch.tensor([1.0, 2.0, 3.0])).item() == 6


def test_uncertainty_initial_weight():
    weighting = train.UncertaintyWeighting(3)
    assert weighting.weights().tolist() == pytest.approx([0.824361] * 3, abs=1e-6)
    # exp(0.5)/2 * (1 + 2 + 3) + 3 * (-0.5)/2
    assert weighting(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(0.824361 * 6 - 0.75, abs=1e-5)


def test_dwa_weights_from_a_loss_history_by_hand():
    dwa = train.DynamicWeightAverage(3, temperature=2.0)
    assert dwa.weights().tolist() == [1, 1, 1]  # epoch 0
    dwa.end_epoch([1.0, 2.0, 3.0])
    assert dwa.weights().tolist() == [1, 1, 1]  # epoch 1: no ratio yet
    dwa.end_epoch([0.5, 2.0, 6.0])  # ratios w = 0.5, 1, 2; exp(w/2) = 1.284025, 1.648721, 2.718282
    assert dwa.weights().tolist() == pytest.approx([0.681656, 0.875269, 1.443075], abs=1e-5)
    assert dwa.weights().sum().item() == pytest.approx(3)
    restored = train.DynamicWeightAverage(3)
    restored.load_state_dict(dwa.state_dict())
    assert restored.history == dwa.history and torch.equal(restored.weights(), dwa.weights())


def test_learning_rate_schedules():
    step = dict(schedule="step", lr=1e-4, step_size=100, epochs=200)
    assert [train.learning_rate(step, e) for e in (0, 99, 100, 199)] == [1e-4, 1e-4, 5e-5, 5e-5]
    poly = dict(schedule="poly", lr=1e-4, epochs=100)
    assert train.learning_rate(poly, 0) == 1e-4
    assert train.learning_rate(poly, 50) == pytest.approx(1e-4 * 0.5 ** 0.9)


# ---- the loop ----------------------------------------------------------------------------------------------

SEGNET_MODELS = [("single", ["--task", "depth"]), ("stan", ["--task", "semantic"]), ("split", []),
                 ("split-wide", []), ("split-deep", []), ("dense", []), ("cross-stitch", []), ("mtan", [])]


@pytest.mark.parametrize("weighting", ["equal", "uncertainty", "dwa"])
@pytest.mark.parametrize("model,extra", SEGNET_MODELS)
def test_two_steps_of_every_segnet_model(tmp_path, model, extra, weighting):
    result, out = run(tmp_path, "--model", model, "--weighting", weighting, *extra)
    assert set(result["final"]) == set(result["tasks"])
    record = json.loads(open(os.path.join(out, "log.jsonl")).read().splitlines()[0])
    assert all(math.isfinite(v) for v in record["train_loss"].values())


def test_loss_drops_when_overfitting_one_batch():
    torch.manual_seed(0)
    import data, mtan
    dataset = data.SyntheticScenes("train", resolution=(64, 64))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    model = mtan.MTAN({"semantic": dataset.tasks["semantic"], "depth": 1, "normal": 3}, width=0.25)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tasks = ["semantic", "depth", "normal"]
    first = None
    for _ in range(40):
        losses = train.multitask_losses(model(batch["image"]), batch, tasks, "cosine")
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
        first = losses.detach() if first is None else first
    assert (losses.detach() < 0.5 * first).all(), (first, losses)


def test_run_folder_contents(tmp_path):
    result, out = run(tmp_path, "--model", "mtan", "--weighting", "dwa", "--epochs", "2", "--eval-every", "1")
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r) >= {"epoch", "lr", "train_loss", "task_weights", "val", "seconds"}
        assert set(r["val"]["normal"]) == {"mean", "median", "rmse", "within_11.25", "within_22.5", "within_30"}
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"] == "mtan" and len(ckpt["weighting"]["lambdas"]) == 3
    assert len(ckpt["weighting"]["_extra_state"]["history"]) == 2
    assert os.path.isfile(os.path.join(out, "curves.png"))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["final"] == records[-1]["val"]
    # The paper's protocol: mean of the last (up to) 10 evaluated epochs.
    mean_miou = (records[0]["val"]["semantic"]["miou"] + records[1]["val"]["semantic"]["miou"]) / 2
    assert metrics["mean_last_10"]["semantic"]["miou"] == pytest.approx(mean_miou)


def test_resume_is_exact(tmp_path):
    flags = ["--model", "mtan", "--weighting", "uncertainty", "--deterministic", "--augment", "--seed", "3"]
    _, straight = run(tmp_path, *flags, "--epochs", "2", name="straight")
    _, split = run(tmp_path, *flags, "--epochs", "1", name="split")
    train.main(["--resume", split, "--epochs", "2"])
    a = torch.load(os.path.join(straight, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["weighting"]["log_variance"], b["weighting"]["log_variance"])
    assert len(open(os.path.join(split, "log.jsonl")).read().splitlines()) == 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    train.save_atomic({"a": torch.ones(2)}, path)

    def killed(obj, f, *a, **k):  # the process dies while writing the new file
        open(f, "wb").write(b"trunc")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


# ---- bad input ---------------------------------------------------------------------------------------------


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    return str(info.value.code) + capsys.readouterr().err


def test_unknown_model_lists_valid_names(capsys):
    message = error_of(["--model", "resnet"], capsys)
    assert "mtan" in message and "cross-stitch" in message


def test_single_task_model_needs_task(capsys):
    assert "--task" in error_of(TINY + ["--model", "single"], capsys)


def test_task_not_in_dataset(capsys):
    assert "saliency" in error_of(TINY + ["--model", "single", "--task", "saliency"], capsys)


def test_missing_dataset_root(tmp_path, capsys):
    message = error_of(["--data", "nyuv2", "--data-root", str(tmp_path / "nowhere")], capsys)
    assert "nowhere" in message and "Traceback" not in message


def test_resume_errors(tmp_path, capsys):
    assert "no checkpoint" in error_of(["--resume", str(tmp_path)], capsys)
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in error_of(["--resume", str(tmp_path)], capsys)
    torch.save({"weights": torch.ones(1)}, tmp_path / "last.pt")
    assert "not a checkpoint of train.py" in error_of(["--resume", str(tmp_path)], capsys)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    _, out = run(tmp_path, "--model", "split")
    # Force a non-finite loss by resuming with an absurd learning rate stored in the config.
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    ckpt["config"]["lr"] = 1e30
    for group in ckpt["optimizer"]["param_groups"]:
        group["lr"] = 1e30
    train.save_atomic(ckpt, os.path.join(out, "last.pt"))
    before = open(os.path.join(out, "last.pt"), "rb").read()
    message = error_of(["--resume", out, "--epochs", "3"], capsys)
    assert "non-finite loss" in message and "epoch" in message
    assert open(os.path.join(out, "last.pt"), "rb").read() == before


def test_trivial_baseline_is_the_best_constant_by_hand():
    """The constant predictor of the final table: the majority training class and the mean training depth,
    scored on the val split, recomputed here with plain indexing."""
    args = train.build_parser().parse_args(["--model", "mtan"] + TINY + ["--subset", "6"])
    run = train.setup_run(train.resolve_config(args, train.build_parser()))
    result = train.trivial_baseline(run)
    train_set = [run.train_set[i] for i in range(len(run.train_set))]
    val_set = [run.val_set[i] for i in range(len(run.val_set))]
    labels = torch.cat([s["semantic"].flatten() for s in train_set])
    majority = torch.bincount(labels[labels >= 0]).argmax()
    val_labels = torch.cat([s["semantic"].flatten() for s in val_set])
    valid = val_labels >= 0
    assert result["semantic"]["pixel_acc"] == pytest.approx((val_labels[valid] == majority).double().mean().item())
    depths = torch.cat([s["depth"].flatten() for s in train_set])
    mean_depth = depths[depths > 0].double().mean()
    val_depths = torch.cat([s["depth"].flatten() for s in val_set])
    val_depths = val_depths[val_depths > 0].double()
    assert result["depth"]["abs_err"] == pytest.approx((val_depths - mean_depth).abs().mean().item(), rel=1e-5)
