"""eval.py --compare: one paper-style table from finished run folders. Tiny synthetic runs (MTAN with DWA, Split,
and single-task SegNets for semantic, depth and normal) are trained once for the module; the tests check the
rows, the parameter counts, Delta_m worked by hand from each run's metrics.json, seeds of one configuration in
one row (mean and standard deviation worked by hand from metrics.json files the tests write into copies), the
epoch choice, the JSON document and the one-line errors for files that cannot be trusted."""
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


def copy_run(folder, tmp_path, name, edit=None, files=None):
    """A copy of a run folder; `edit(checkpoint)` changes its last.pt first, `files` {name: JSON value}
    replaces or adds JSON files."""
    copy = str(tmp_path / name)
    shutil.copytree(folder, copy)
    if edit is not None:
        path = os.path.join(copy, "last.pt")
        ckpt = torch.load(path, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, path)
    for file, blob in (files or {}).items():
        with open(os.path.join(copy, file), "w") as f:
            json.dump(blob, f)
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
    with open(os.path.join(folder, "eval.json"), "w") as f:  # what it evaluated, as eval.py --checkpoint records it
        json.dump({"split": "val", "epoch": 2, "evaluated_on": "synthetic 64x64 (first 4 samples)",
                   "metrics": measured}, f)
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


def test_eval_json_of_python_eval_py_checkpoint_is_taken(runs, tmp_path, capsys):
    folder = copy_run(runs["sem"], tmp_path, "sem")
    report = evaluation.main(["--checkpoint", folder, "--device", "cpu"])
    assert (report["epoch"], report["evaluated_on"]) == (2, "synthetic 64x64 (first 4 samples)")
    assert compare(folder, "--from-eval")["rows"][0]["metrics"] == report["metrics"]
    with open(os.path.join(folder, "eval.json")) as f:
        full = f.read()
    with pytest.raises(SystemExit, match=r"holds the val split on .*\(first 4 samples\), this evaluation the val "
                                         r"split on .*\(first 2 samples\): kept \(pass --replace-eval"):
        evaluation.main(["--checkpoint", folder, "--device", "cpu", "--subset", "2"])  # the full split's is kept
    with open(os.path.join(folder, "eval.json")) as f:
        assert f.read() == full
    evaluation.main(["--checkpoint", folder, "--device", "cpu", "--subset", "2", "--replace-eval"])
    assert "(first 2 samples), but last.pt holds epoch 2 on" in one_line_error(folder, "--from-eval")  # other data


# ---- seeds: one row per configuration ----------------------------------------------------------------------


def seeds(runs, tmp_path, name, mious):
    """Copies of runs[name] with seeds 0, 1, ..., whose metrics.json says these semantic mIoUs (protocol)."""
    folders = []
    for seed, miou in enumerate(mious):
        blob = metrics_json(runs[name])
        blob["mean_last_10"]["semantic"]["miou"] = miou
        folders.append(copy_run(runs[name], tmp_path, f"{name}-seed{seed}",
                                lambda ckpt: ckpt["config"].update(seed=seed), {"metrics.json": blob}))
    return folders


def row_line(printed, name):
    return next(line for line in printed.splitlines() if line.startswith(f"| {name} "))


def test_seeds_share_a_row_with_mean_and_std_worked_by_hand(runs, tmp_path, capsys):
    split = seeds(runs, tmp_path, "split", [0.40, 0.44, 0.48])
    sem = seeds(runs, tmp_path, "sem", [0.36, 0.44])
    doc = compare(*split, runs["mtan"], *sem)
    printed = capsys.readouterr().out
    assert [(r["name"], r["n"], r["seeds"]) for r in doc["rows"]] == [
        ("split equal", 3, [0, 1, 2]), ("mtan dwa", 1, [0]), ("single semantic", 2, [0, 1])]
    assert doc["rows"][0]["runs"] == split and doc["baselines"] == {"semantic": ",".join(sem)}
    # mean (0.40 + 0.44 + 0.48) / 3 = 0.44; sample std sqrt((0.04^2 + 0 + 0.04^2) / (3 - 1)) = 0.04
    split_row = row_line(printed, "split equal")
    assert "| 3 |" in split_row and "44.00 ± 4.00" in split_row
    # the baseline: mean (0.36 + 0.44) / 2 = 0.40, std sqrt((0.04^2 + 0.04^2) / 1) = 0.0566
    assert "40.00 ± 5.66" in row_line(printed, "single semantic")
    # Delta_m of each split seed against the mean baseline 0.40 (semantic only: the one task with a baseline):
    # 100 (0.40 - 0.40) / 0.40 = 0, +10, +20: mean +10.00, std sqrt((10^2 + 0 + 10^2) / 2) = 10.00
    assert "+10.00 ± 10.00" in split_row
    assert "+0.00 ± 14.14 |" in row_line(printed, "single semantic")  # -10 and +10 against their mean
    mtan = metrics_json(runs["mtan"])["mean_last_10"]["semantic"]["miou"]
    assert doc["rows"][1]["delta_m"] == pytest.approx(100 * (mtan - 0.40) / 0.40)
    assert "±" not in row_line(printed, "mtan dwa") and "| 1 |" in row_line(printed, "mtan dwa")  # plain numbers
    assert "sample standard deviation (n - 1)" in printed

    compare(*split, runs["mtan"], *sem, "--json")
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["metrics"]["semantic"]["miou"] == pytest.approx(0.44)
    assert rows[0]["std"]["semantic"]["miou"] == pytest.approx(0.04)
    assert rows[0]["std"]["depth"]["rmse"] == 0  # copies: the other metrics agree
    assert (rows[0]["delta_m"], rows[0]["delta_m_std"]) == (pytest.approx(10), pytest.approx(10))
    assert rows[2]["std"]["semantic"]["miou"] == pytest.approx(0.08 / 2 ** 0.5)
    assert (rows[2]["delta_m"], rows[2]["delta_m_std"]) == (pytest.approx(0, abs=1e-12), pytest.approx(200 ** 0.5))
    assert rows[1]["std"] is None and rows[1]["delta_m_std"] is None and rows[1]["runs"] == [runs["mtan"]]


def test_per_seed_keeps_one_row_per_run(runs, tmp_path, capsys):
    split = seeds(runs, tmp_path, "split", [0.40, 0.44, 0.48])
    sem = seeds(runs, tmp_path, "sem", [0.36, 0.44])
    doc = compare(*split, *sem, "--per-seed")
    assert [r["name"] for r in doc["rows"]] == ["split", "split seed 1", "split seed 2", "single semantic",
                                                "single semantic seed 1"]
    assert all(r["n"] == 1 and r["std"] is None for r in doc["rows"])
    assert doc["rows"][0]["delta_m"] == pytest.approx(100 * (0.40 - 0.36) / 0.36)  # the first baseline run
    printed = capsys.readouterr().out
    assert "±" not in printed and "| n " not in printed


def test_json_is_strict(runs, tmp_path, capsys):
    blob = metrics_json(runs["mtan"])
    blob["mean_last_10"]["depth"]["rmse"] = float("nan")  # Python's json reads and writes NaN; strict JSON has none
    folder = copy_run(runs["mtan"], tmp_path, "nan", files={"metrics.json": blob})
    compare(folder, "--json")

    def refuse(constant):
        raise ValueError(constant)
    doc = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert doc["rows"][0]["metrics"]["depth"]["rmse"] is None


# ---- files --compare cannot trust: one line each -----------------------------------------------------------

EVALUATED_ON = "synthetic 64x64 (first 4 samples)"


def metrics_with(runs, **keys):
    return dict(metrics_json(runs["sem"]), **keys)


def eval_json(runs, **keys):
    return dict({"split": "val", "epoch": 2, "evaluated_on": EVALUATED_ON,
                 "metrics": metrics_json(runs["sem"])["final"]}, **keys)


def config_with(**keys):
    return lambda ckpt: ckpt["config"].update(keys)


UNTRUSTED = [  # (case, the arguments of --compare from (runs, a copy(edit, files) of the sem run), the error)
    ("metrics.json-list", lambda r, copy: [copy(files={"metrics.json": [1, 2]})],
     "metrics.json holds a JSON list, not an object"),
    ("final-not-results", lambda r, copy: [copy(files={"metrics.json": metrics_with(r, final={"semantic": [0.5]})})],
     "is not the metrics.json of train.py: expected {task: {metric: number}} under 'final'"),
    ("metric-not-a-number", lambda r, copy: [copy(files={"metrics.json": metrics_with(
        r, mean_last_10={"semantic": {"miou": "high"}})})], "under 'mean_last_10'"),
    ("epochs-not-a-number", lambda r, copy: [copy(files={"metrics.json": metrics_with(r, epochs="2")})],
     "'epochs' is not a number"),
    ("checkpoint-without-config", lambda r, copy: [copy(edit=lambda ckpt: ckpt.pop("config"))],
     "is not a checkpoint of train.py"),
    ("checkpoint-model-not-weights", lambda r, copy: [copy(edit=lambda ckpt: ckpt.update(model=[1]))],
     "is not a checkpoint of train.py"),
    ("config-of-another-version", lambda r, copy: [copy(edit=lambda ckpt: ckpt["config"].pop("subset"))],
     "last.pt: its configuration lacks 'subset' (written by another version of train.py)"),
    ("history-not-its-epochs", lambda r, copy: [copy(edit=lambda ckpt: ckpt["history"].pop())],
     "its 'history' does not hold the records of epochs 1 to its 'epoch' 2"),
    ("last.pt-of-another-model", lambda r, copy: [copy(edit=config_with(model="stan"))],
     "metrics.json says model single but "),
    ("a-copy-is-not-a-second-seed", lambda r, copy: [r["sem"], copy()], "sem and "),

    ("eval.json-older-than-the-run", lambda r, copy: [copy(files={"eval.json": eval_json(r, epoch=1)}),
                                                       "--from-eval"],
     f"eval.json is of epoch 1 on {EVALUATED_ON}, but last.pt holds epoch 2 on {EVALUATED_ON}"),
    ("eval.json-on-other-data", lambda r, copy: [copy(files={"eval.json": eval_json(
        r, evaluated_on="synthetic 32x32 (first 4 samples)")}), "--from-eval"], "on synthetic 32x32"),
    ("eval.json-list", lambda r, copy: [copy(files={"eval.json": []}), "--from-eval"], "eval.json holds a JSON list"),
    ("eval.json-without-metrics", lambda r, copy: [copy(files={"eval.json": eval_json(r, metrics=None)}),
                                                    "--from-eval"],
     "is not the eval.json of python eval.py --checkpoint"),
    ("baseline-other-resolution", lambda r, copy: [r["mtan"], "--baseline", copy(edit=config_with(
        resolution="32x32"))], f"is a synthetic run (synthetic 32x32 (first 4 samples)), the compared runs are on "
                               f"{EVALUATED_ON}"),
    ("baseline-metrics.json-other-subset", lambda r, copy: [r["mtan"], "--baseline", os.path.join(copy(
        edit=config_with(subset=2)), "metrics.json")], "(synthetic 64x64 (first 2 samples))"),
    ("baseline-eval.json-other-data", lambda r, copy: [r["mtan"], "--baseline", os.path.join(copy(files={
        "eval.json": eval_json(r, evaluated_on="synthetic 32x32 (first 4 samples)")}), "eval.json")],
     "cannot share a table"),
    ("baseline-multi-task", lambda r, copy: [r["sem"], "--baseline", r["mtan"]],
     "mtan is a multi-task run (tasks semantic, depth, normal): a baseline is a single-task run"),
]


@pytest.mark.parametrize("make,words", [c[1:] for c in UNTRUSTED], ids=[c[0] for c in UNTRUSTED])
def test_untrusted_files_get_one_line(runs, tmp_path, make, words, capsys):
    argv = make(runs, lambda edit=None, files=None: copy_run(runs["sem"], tmp_path, "copy", edit, files))
    with pytest.raises(SystemExit) as e:
        compare(*argv)
    message = e.value.code  # a string: exit status 1, as every error of eval.py's main
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert words in message, message
    assert "Traceback" not in "".join(capsys.readouterr())


# ---- seed groups: distinct seeds under one evaluation protocol ---------------------------------------------


def test_what_makes_a_seed_group(runs, tmp_path):
    miou = metrics_json(runs["sem"])["mean_last_10"]["semantic"]["miou"]
    # channels_last changes the speed, not the numbers: seed 1 without it is the second seed of the row
    layout = copy_run(runs["sem"], tmp_path, "layout", config_with(seed=1, channels_last=False))
    assert [(r["name"], r["n"]) for r in compare(runs["sem"], layout)["rows"]] == [("single semantic", 2)]
    # evaluated every second epoch: under the protocol another row, named by what differs; under --epoch last
    # (one evaluation either way) a seed of the same row
    sparse = copy_run(runs["sem"], tmp_path, "sparse", config_with(seed=1, eval_every=2))
    doc = compare(runs["sem"], sparse)
    assert [r["name"] for r in doc["rows"]] == ["single semantic [eval_every 1]", "single semantic seed 1 "
                                                                                   "[eval_every 2]"]
    assert [(r["name"], r["n"]) for r in compare(runs["sem"], sparse, "--epoch", "last")["rows"]] == [
        ("single semantic", 2)]
    # the samples evaluated, from the ids train.py records: another val list of the same dataset is other data
    ids = [copy_run(runs["sem"], tmp_path, f"ids{i}", lambda ckpt: ckpt.update(sample_ids=f"4 samples, ids {i}a"))
           for i in range(2)]
    assert f"({EVALUATED_ON}: 4 samples, ids 0a) and {ids[1]} ({EVALUATED_ON}: 4 samples, ids 1a) were " \
           "evaluated on different data" in one_line_error(*ids)
    # seeds 0, 1, 1: the copy of seed 1 is named with its original
    one = seeds(runs, tmp_path, "sem", [miou, 0.5])[1]
    again = shutil.copytree(one, str(tmp_path / "again"))
    assert f"{one} and {again} are both seed 1 of one configuration" in one_line_error(runs["sem"], one, again)
    assert compare(runs["sem"], one)["rows"][0]["metrics"]["semantic"]["miou"] == pytest.approx((miou + 0.5) / 2)


def test_a_seed_without_a_number_is_named(runs, tmp_path):
    nan = seeds(runs, tmp_path, "sem", [0.4, float("nan")])
    message = one_line_error(*nan)
    assert nan[1] + "/metrics.json: semantic miou under 'mean_last_10' is not a finite number" in message
    blob = metrics_json(runs["sem"])
    del blob["final"]["semantic"]["pixel_acc"]
    lacking = copy_run(nan[0], tmp_path, "lacking", config_with(seed=2), {"metrics.json": blob})
    assert f"{lacking}/metrics.json: no semantic pixel_acc under 'final', which {nan[0]}/metrics.json has" in \
        one_line_error(nan[0], lacking, "--epoch", "last")


def test_baseline_seeds_are_averaged(runs, tmp_path):
    sem = seeds(runs, tmp_path, "sem", [0.36, 0.44])
    mtan = metrics_json(runs["mtan"])["mean_last_10"]["semantic"]["miou"]
    doc = compare(runs["mtan"], "--baseline", ",".join(sem))
    assert doc["rows"][0]["delta_m"] == pytest.approx(100 * (mtan - 0.40) / 0.40)  # against their mean, 0.40
    assert doc["baselines"] == {"semantic": ",".join(sem)}


def test_a_run_of_an_older_version_is_migrated_or_refused(runs, tmp_path):
    # the model facts follow from the model and its tasks: train.py (its MODELS) recomputes them on --resume;
    # eval.py, which does not import train.py, refuses the file in one line
    older = copy_run(runs["sem"], tmp_path, "older",
                     lambda ckpt: [ckpt["config"].pop(k) for k in evaluation.MODEL_FACTS])
    assert "its configuration lacks 'family' (written by another version" in one_line_error(runs["mtan"], older)
    facts = evaluation.load_checkpoint(older, model_facts=train.model_facts)["config"]
    assert (facts["family"], facts["single_task"], facts["baseline"]) == ("segnet", True, True)
    # any other key: refused, never filled in from train.py's defaults (resuming needs every one of them)
    no_fused = copy_run(runs["sem"], tmp_path, "no-fused", lambda ckpt: ckpt["config"].pop("fused"))
    assert evaluation.load_checkpoint(no_fused)["config"]["model"] == "single"  # evaluating does not read it
    with pytest.raises(evaluation.CheckpointError, match=r"last.pt: its configuration lacks 'fused' \(written by"):
        evaluation.load_checkpoint(no_fused, resuming=True, config_keys=train.DEFAULTS)
