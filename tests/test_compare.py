"""eval.py --compare: one paper-style table from finished run folders. Tiny synthetic runs (MTAN with DWA, Split,
and single-task SegNets for semantic, depth and normal) are trained once for the module; the tests check the
rows, the parameter counts, Delta_m worked by hand from each run's metrics.json, the epoch choice, the JSON
document and the one-line errors."""
import json
import os
import shutil

import pytest
import torch

import eval as evaluation
import train
from conftest import TINY

# Two epochs of one batch of 4, each evaluated (the protocol's mean is over 2 evaluations), at width 1/8: at
# 1/16 the tiny normal baseline leaves a metric of the nyuv2-9 convention at 0, where Delta_m is undefined.
TWO_EPOCHS = TINY + ["--epochs", "2", "--eval-every", "1", "--batch-size", "4", "--width", "0.125"]
RUNS = {  # folder name: train.py flags
    "mtan": ["--model", "mtan", "--weighting", "dwa"],
    "split": ["--model", "split"],
    "sem": ["--model", "single", "--task", "semantic"],
    "dep": ["--model", "single", "--task", "depth"],
    "nor": ["--model", "single", "--task", "normal"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: run folder} of the five tiny runs (2 epochs, each evaluated: 'mean_last_10' is over 2)."""
    root = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and does not stall on a busy CPU
    try:
        folders = {}
        for name, flags in RUNS.items():
            folders[name] = str(root / name)
            train.main(flags + TWO_EPOCHS + ["--out", folders[name]])
    finally:
        torch.set_num_threads(threads)
    return folders


def all_runs(runs):
    return [runs[name] for name in RUNS]


def metrics_json(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


def compare(*argv):
    return evaluation.main(["--compare", *argv])


def copy_run(folder, tmp_path, name, edit=None):
    """A copy of a run folder; `edit(checkpoint)` changes its last.pt first."""
    copy = str(tmp_path / name)
    shutil.copytree(folder, copy)
    if edit is not None:
        path = os.path.join(copy, "last.pt")
        ckpt = torch.load(path, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, path)
    return copy


# ---- the rows ----------------------------------------------------------------------------------------------


def test_rows_are_named_in_command_line_order_with_their_parameters(runs, capsys):
    doc = compare(*all_runs(runs))
    assert [r["name"] for r in doc["rows"]] == ["mtan dwa", "split equal", "single semantic", "single depth",
                                                "single normal"]
    assert [r["run"] for r in doc["rows"]] == all_runs(runs)
    for row in doc["rows"]:  # the parameters of the model the configuration builds, counted independently
        cfg = torch.load(os.path.join(row["run"], "last.pt"), weights_only=True)["config"]
        assert row["params"] == sum(p.numel() for p in train.build_model(cfg).parameters())
    printed = capsys.readouterr().out
    assert "the mean of the last 2 evaluations" in printed and "after 2 epochs" in printed
    header = next(line for line in printed.splitlines() if line.startswith("| method"))
    for column in ("mIoU", "Pix Acc", "Abs", "Rel", "Mean", "Median", "11.25", "22.5", "30", "Params", "Delta_m %"):
        assert column in header  # the MTAN paper's NYUv2 columns on the synthetic scenes
    assert "| single depth " in printed and doc["style"] == "mtan"


def test_delta_m_by_hand_against_the_single_task_runs(runs):
    numbers = {name: metrics_json(folder)["mean_last_10"] for name, folder in runs.items()}
    sem, dep, nor = numbers["sem"]["semantic"], numbers["dep"]["depth"], numbers["nor"]["normal"]
    doc = compare(*all_runs(runs))
    assert doc["baselines"] == {"semantic": runs["sem"], "depth": runs["dep"], "normal": runs["nor"]}
    for row, name in zip(doc["rows"], ["mtan", "split"]):
        m = numbers[name]
        # MTI-Net convention: Delta_m = 100/T sum_t (-1)^l_t (M_t - M_stl,t) / M_stl,t, l_t = 1 if lower is
        # better, one metric per task: semantic mIoU (higher), depth RMSE (lower), normal mean angle (lower).
        by_hand = 100 / 3 * ((m["semantic"]["miou"] - sem["miou"]) / sem["miou"]
                             - (m["depth"]["rmse"] - dep["rmse"]) / dep["rmse"]
                             - (m["normal"]["mean"] - nor["mean"]) / nor["mean"])
        assert row["delta_m"] == pytest.approx(by_hand, rel=1e-12)
        assert row["delta_m_tasks"] == ["semantic", "depth", "normal"]
    for row in doc["rows"][2:]:  # a single-task baseline against itself
        assert row["delta_m"] == 0

    # nyuv2-9: Delta_m = -100/9 sum_m (-1)^h_m (M_m - M_stl,m) / M_stl,m over the 9 NYUv2 metrics, h_m = 1 if
    # higher is better (lower Delta_m is better); single-task rows have no such number.
    doc = compare(*all_runs(runs), "--convention", "nyuv2-9")
    m = numbers["mtan"]
    higher = [("semantic", "miou", sem), ("semantic", "pixel_acc", sem), ("normal", "within_11.25", nor),
              ("normal", "within_22.5", nor), ("normal", "within_30", nor)]
    lower = [("depth", "abs_err", dep), ("depth", "rel_err", dep), ("normal", "mean", nor),
             ("normal", "median", nor)]
    by_hand = -100 / 9 * (sum((m[t][k] - b[k]) / b[k] for t, k, b in higher)
                          - sum((m[t][k] - b[k]) / b[k] for t, k, b in lower))
    assert doc["rows"][0]["delta_m"] == pytest.approx(by_hand, rel=1e-12)
    assert [r["delta_m"] for r in doc["rows"][2:]] == [None, None, None]


def test_explicit_baselines_and_tasks_without_one(runs, capsys):
    # --baseline replaces the single-task rows: here semantic (a metrics.json) and depth (a run folder) only
    doc = compare(runs["mtan"], runs["nor"], "--baseline",
                  os.path.join(runs["sem"], "metrics.json") + "," + runs["dep"])
    mtan = doc["rows"][0]
    m, sem, dep = (metrics_json(runs[n])["mean_last_10"] for n in ("mtan", "sem", "dep"))
    by_hand = 100 / 2 * ((m["semantic"]["miou"] - sem["semantic"]["miou"]) / sem["semantic"]["miou"]
                         - (m["depth"]["rmse"] - dep["depth"]["rmse"]) / dep["depth"]["rmse"])
    assert mtan["delta_m"] == pytest.approx(by_hand, rel=1e-12) and mtan["delta_m_tasks"] == ["semantic", "depth"]
    assert doc["rows"][1]["delta_m"] is None  # normal has no baseline now
    assert "mtan dwa: Delta_m without normal" in capsys.readouterr().out

    doc = compare(runs["mtan"], runs["split"])  # no single-task run at all
    assert [r["delta_m"] for r in doc["rows"]] == [None, None]
    assert "no single-task run of semantic, depth, normal" in capsys.readouterr().out


def test_epoch_last_or_the_protocol(runs, capsys):
    protocol = compare(runs["mtan"], runs["sem"])
    assert "mean of the last 2 evaluations" in capsys.readouterr().out
    last = compare(runs["mtan"], runs["sem"], "--epoch", "last")
    assert "the last evaluation of each run" in capsys.readouterr().out
    saved = metrics_json(runs["mtan"])
    assert protocol["rows"][0]["metrics"] == saved["mean_last_10"] and protocol["epoch"] == "protocol"
    assert last["rows"][0]["metrics"] == saved["final"] and last["epoch"] == "last"
    assert saved["final"] != saved["mean_last_10"]  # two evaluations that differ: the choice matters
    assert last["rows"][0]["evaluations"] == 1 and protocol["rows"][0]["evaluations"] == 2


def test_eval_json_only_with_from_eval(runs, tmp_path, capsys):
    folder = copy_run(runs["mtan"], tmp_path, "mtan")
    measured = {task: {k: v + 1 for k, v in metrics.items()} for task, metrics in metrics_json(folder)["final"].items()}
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump({"split": "val", "metrics": measured}, f)
    assert compare(folder)["rows"][0]["metrics"] == metrics_json(folder)["mean_last_10"]  # ignored by default
    doc = compare(folder, "--from-eval")
    assert doc["rows"][0]["metrics"] == measured and doc["epoch"] == "last"
    assert "the eval.json of each run (val split" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: --from-eval: .*sem has no eval.json"):
        compare(folder, runs["sem"], "--from-eval")


def test_json_document(runs, capsys):
    compare(*all_runs(runs), "--json")
    doc = json.loads(capsys.readouterr().out)
    assert (doc["epoch"], doc["convention"], doc["data"]) == ("protocol", "mtinet", "synthetic")
    row = doc["rows"][0]
    for key in ("name", "run", "params", "metrics", "delta_m", "delta_m_tasks", "baselines", "epochs", "numbers"):
        assert key in row
    assert row["baselines"] == {"semantic": runs["sem"], "depth": runs["dep"], "normal": runs["nor"]}
    assert row["metrics"] == metrics_json(runs["mtan"])["mean_last_10"]
    assert row["numbers"] == "metrics.json mean_last_10" and row["epochs"] == 2


# ---- names and baselines from configurations alone ---------------------------------------------------------


def config(model, tasks, **keys):
    """A configuration as train.py records it, with what MODELS says of the model (train.model_facts)."""
    return dict(keys, model=model, tasks=tasks, **train.model_facts(model, tasks))


def test_row_names():
    nyud = {"data": "nyud", "aux_tasks": {}, "weighting": "equal", "seed": 0, "backbone": "w18-small-v2"}
    both = {"semantic": 40, "depth": 1}
    assert evaluation.row_name(config("mtinet", both, **dict(nyud, aux_tasks={"normal": 3, "edge": 1}))) == \
        "mtinet equal +normal,edge"
    assert evaluation.row_name(config("mtinet", both, **dict(nyud, backbone="w48")), weighting=False) == "mtinet w48"
    assert evaluation.row_name(config("hrnet-mtl", {"depth": 1}, **nyud)) == "hrnet-mtl depth"
    split = config("split", {"semantic": 7, "depth": 1}, weighting="dwa", seed=1, backbone="w18-small-v2")
    assert evaluation.row_name(split) == "split dwa seed 1"
    assert evaluation.row_name(config("stan", {"normal": 3}, backbone="w18-small-v2")) == "stan normal"
    # equal weighting everywhere (MTI-Net's tables): not named; same names: told apart by the folder
    table = [{"folder": f"runs/{m}", "config": config(m, both, **nyud)} for m in ("hrnet-mtl", "padnet", "mtinet")]
    table.append({"folder": "runs/mtinet-2", "config": config("mtinet", both, **nyud)})
    assert evaluation.row_names(table) == ["hrnet-mtl", "padnet", "mtinet [mtinet]", "mtinet [mtinet-2]"]


def test_baselines_prefer_the_plain_single_task_model():
    def run(folder, model, task):
        return {"folder": folder, "config": config(model, {task: 1}), "numbers": {task: {}}}

    stan, single, mtan = run("stan", "stan", "semantic"), run("single", "single", "semantic"), run("m", "mtan", "depth")
    assert evaluation.find_baselines([stan, single, mtan]) == {"semantic": single}  # one task of MTAN: not single-task
    assert evaluation.find_baselines([stan, mtan]) == {"semantic": stan}  # STAN when there is nothing else
    later = run("single2", "single", "semantic")
    assert evaluation.find_baselines([stan, later, single]) == {"semantic": later}  # the first in order
    named = [{"folder": "b.json", "numbers": {"semantic": {}, "depth": {}}}]
    assert evaluation.find_baselines([single], named) == {"semantic": named[0], "depth": named[0]}


# ---- one-line errors ---------------------------------------------------------------------------------------


def one_line_error(*argv):
    with pytest.raises(SystemExit) as e:
        compare(*argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_errors_for_folders_that_are_not_finished_runs(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    message = one_line_error(runs["mtan"], str(tmp_path / "empty"))
    assert "empty is not a finished run: it has no metrics.json" in message
    no_checkpoint = copy_run(runs["sem"], tmp_path, "no-checkpoint")
    os.remove(os.path.join(no_checkpoint, "last.pt"))
    assert "no-checkpoint has metrics.json but no last.pt" in one_line_error(no_checkpoint)
    broken = copy_run(runs["sem"], tmp_path, "broken")
    with open(os.path.join(broken, "metrics.json"), "w") as f:
        f.write("{")
    assert "cannot read " + os.path.join(broken, "metrics.json") in one_line_error(broken)
    assert "is not a run folder" in one_line_error(str(tmp_path / "missing"))
    assert "at least one run folder" in one_line_error()


def test_errors_for_runs_that_cannot_share_a_table(runs, tmp_path):
    def on_nyuv2(ckpt):
        ckpt["config"]["data"] = "nyuv2"

    def more_classes(ckpt):
        ckpt["config"]["tasks"] = {"semantic": 13}

    nyuv2 = copy_run(runs["sem"], tmp_path, "nyuv2", on_nyuv2)
    message = one_line_error(runs["mtan"], nyuv2)
    assert "(synthetic 64x64 (first 4 samples))" in message and "(nyuv2 (first 4 samples))" in message
    assert "evaluated on different data" in message
    classes = copy_run(runs["sem"], tmp_path, "classes", more_classes)
    assert "task semantic has 7 outputs" in one_line_error(runs["mtan"], classes)
    assert "given twice" in one_line_error(runs["mtan"], runs["mtan"] + os.sep)
    assert "is a nyuv2 run" in one_line_error(runs["mtan"], "--baseline", nyuv2)


def test_checkpoint_and_compare_exclude_each_other(runs):
    with pytest.raises(SystemExit):
        evaluation.main(["--checkpoint", runs["mtan"], "--compare", runs["sem"]])
    with pytest.raises(SystemExit, match="^error: --json applies to --compare"):
        evaluation.main(["--checkpoint", runs["mtan"], "--json"])
    with pytest.raises(SystemExit, match="^error: --save-vis applies to --checkpoint"):
        compare(runs["mtan"], "--save-vis", "pictures")
