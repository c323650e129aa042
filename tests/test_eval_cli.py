"""eval.py's command line: rebuild a run from its checkpoint, print the table, write eval.json, draw pictures,
predict a single image, delta_m against a baseline run; PASCAL trained and evaluated end to end."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import train
from test_pascal import make_pascal_tree


@pytest.fixture
def mtan_run(tiny_run):
    """The session's finished TINY run of MTAN (conftest.py) and its metrics.json."""
    with open(os.path.join(tiny_run, "metrics.json")) as f:
        return tiny_run, json.load(f)


def test_eval_writes_the_table_and_json(mtan_run, capsys):
    out, result = mtan_run
    report = evaluation.main(["--checkpoint", os.path.join(out, "last.pt")])
    printed = capsys.readouterr().out
    for header in ("mIoU", "Pix Acc", "Abs", "Rel", "Mean", "Median", "11.25", "22.5", "30"):
        assert header in printed
    saved = json.load(open(os.path.join(out, "eval.json")))
    assert saved["metrics"] == report["metrics"]
    for task, metrics in result["final"].items():  # the run's last evaluation, up to channels_last rounding
        assert report["metrics"][task] == pytest.approx(metrics, rel=1e-4, abs=1e-4)


def test_delta_m_against_a_baseline_run(mtan_run, tmp_path):
    out, result = mtan_run
    baseline = {task: {k: v * 1.1 for k, v in metrics.items()} for task, metrics in result["final"].items()}
    json.dump({"metrics": baseline}, open(tmp_path / "eval.json", "w"))
    report = evaluation.main(["--checkpoint", out, "--baseline", str(tmp_path / "eval.json")])
    expected = evaluation.delta_m(report["metrics"], baseline, convention="mtinet")
    assert report["delta_m"] == pytest.approx(expected)


def test_save_vis_draws_predictions_and_attention(mtan_run, tmp_path):
    out, _ = mtan_run
    evaluation.main(["--checkpoint", out, "--save-vis", str(tmp_path), "--num-vis", "2"])
    # a 14-pixel strip of names above 64x64 tiles 2 pixels apart
    picture = np.asarray(Image.open(tmp_path / "000_gt_pred.png"))
    assert picture.shape == (14 + 64, 64 * 7 + 2 * 6, 3)  # input, then ground truth and prediction of 3 tasks
    attention = np.asarray(Image.open(tmp_path / "001_attention.png"))
    assert attention.shape == (14 + 64, 64 * 4 + 2 * 3, 3)  # input, then the first encoder mask of each task
    sample = data.SyntheticScenes("val", resolution=(64, 64))[0]
    assert (picture[14:, :64] == evaluation.image_picture(sample["image"])).all()  # the input tile, exactly
    semantic = evaluation.task_picture("semantic", sample["semantic"], 7)
    assert (picture[14:, 66:130] == semantic).all()  # then the semantic ground truth


def test_save_vis_replaces_no_picture(mtan_run, tmp_path):
    out, _ = mtan_run
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "000_gt_pred.png").write_bytes(b"the user's picture")
    evaluation.main(["--checkpoint", out, "--save-vis", str(tmp_path / "pictures"), "--num-vis", "1"])
    assert (tmp_path / "pictures" / "000_gt_pred.png").read_bytes() == b"the user's picture"
    assert sorted(os.listdir(tmp_path / "pictures-2")) == ["000_attention.png", "000_gt_pred.png"]  # a new folder


def test_single_image_of_any_size(mtan_run, tmp_path):
    out, _ = mtan_run
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(path)
    written = evaluation.main(["--checkpoint", out, "--image", str(path)])
    assert len(written) == 3
    for file in written:  # predictions come back at the image's own size
        assert Image.open(file).size == (70, 50)


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        evaluation.main(["--checkpoint", str(tmp_path / "missing.pt")])
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="corrupt"):
        evaluation.main(["--checkpoint", str(tmp_path / "last.pt")])


def test_pascal_trains_and_evaluates_at_the_original_size(tmp_path):
    root = str(make_pascal_tree(tmp_path))
    out = str(tmp_path / "run")
    result = train.main(["--model", "mtinet", "--data", "pascal", "--data-root", root, "--epochs", "1",
                         "--batch-size", "2", "--out", out])
    assert set(result["final"]) == {"semantic", "parts", "saliency", "normal", "edge"}
    assert set(result["final"]["saliency"]) == {"maxf", "miou"}
    cfg = torch.load(os.path.join(out, "last.pt"), weights_only=True)["config"]
    assert cfg["task_weights"] == {"semantic": 1.0, "parts": 2.0, "saliency": 5.0, "normal": 10.0, "edge": 50.0}


# Every flag applies or is refused (README, "Training", rule 3): one EVAL_FLAG_SCOPE table; a flag outside its
# modes is one line naming where it applies (the --checkpoint / --compare rows: test_compare.py)
@pytest.mark.parametrize("flags, message", [
    (["--image", "photo.png", "--split", "train"], "--split applies to --checkpoint and --bench, not --image"),
    (["--image", "photo.png", "--subset", "2"], "--subset applies to --checkpoint and --bench, not --image"),
    (["--image", "photo.png", "--data-root", "."], "--data-root applies to --checkpoint and --bench, not --image"),
    (["--image", "photo.png", "--batch-size", "2"], "--batch-size applies to --checkpoint and --bench, not"),
    (["--image", "photo.png", "--save-vis", "vis"], "--save-vis applies to --checkpoint, not --image"),
    (["--image", "photo.png", "--replace-eval"], "--replace-eval applies to --checkpoint, not --image"),
    (["--image", "photo.png", "--baseline", "b.json"], "--baseline applies to --checkpoint and --compare, not"),
    (["--image", "photo.png", "--convention", "libmtl"], "--convention applies to --checkpoint and --compare, not"),
    (["--image", "photo.png", "--bench", "2"], "--bench applies to --checkpoint, not --image"),
    (["--bench", "2", "--save-vis", "vis"], "--save-vis applies to --checkpoint, not --bench"),
    (["--bench", "2", "--baseline", "b.json"], "--baseline applies to --checkpoint and --compare, not --bench"),
    (["--bench", "2", "--replace-eval"], "--replace-eval applies to --checkpoint, not --bench"),
    (["--bench", "2", "--num-vis", "2"], "--num-vis applies to --checkpoint, not --bench"),
    (["--num-vis", "2"], "--num-vis applies to --save-vis"),
    (["--per-seed"], "--per-seed applies to --compare, not --checkpoint"),
])
def test_a_flag_outside_its_mode_is_refused(tiny_run, flags, message):
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        evaluation.main(["--checkpoint", tiny_run, "--device", "cpu"] + flags)


@pytest.mark.parametrize("flags", [["--device", "cpu"], ["--amp", "off"], ["--image", "photo.png"],
                                   ["--bench", "2"], ["--num-vis", "2"]])
def test_compare_refuses_the_flags_of_checkpoint(tiny_run, flags):
    with pytest.raises(SystemExit, match=f"^error: {flags[0]} applies to --checkpoint"):
        evaluation.main(["--compare", tiny_run] + flags)
