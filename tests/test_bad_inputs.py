"""Bad inputs to train.py and eval.py: each gets one `error: ...` line naming the flag, file or value and what
was expected (exit status 2 for a flag argparse rejects, 1 otherwise), never a traceback, and never changes a
run folder that exists. A data.py DatasetError is the one error that continues after its first line: the
expected layout of the dataset and where to download it (README, "Datasets").

Every case runs in this process on the session's tiny finished run (conftest.py): a few are command lines
argparse rejects, the others reach a run folder, a checkpoint or a small fake dataset made by their `setup`."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import mtinet
import train
from conftest import TINY, tiny
from test_data import write_nyud, write_nyuv2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def finished_run(tiny_run):
    return tiny_run  # conftest.py: the session's finished TINY run


def hashes(folder):
    """{relative path: sha256} of every file under `folder` ({} if it does not exist)."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


# ---- setups: what a case needs besides the finished run; each returns the placeholders of its command ------


def copy_of_run(tmp, run, monkeypatch):
    copy = str(tmp / "copy")
    shutil.copytree(run, copy)
    return {"copy": copy}


def edit_checkpoint(copy, change):
    path = os.path.join(copy, "last.pt")
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


def live_lock(tmp, run, monkeypatch):
    """A copy whose lock is held by a live process: this test's parent."""
    places = copy_of_run(tmp, run, monkeypatch)
    with open(os.path.join(places["copy"], "lock"), "w") as f:
        f.write(f"{os.getppid()}\n")
    return places


def corrupt_checkpoint(tmp, run, monkeypatch):
    (tmp / "last.pt").write_bytes(b"not a checkpoint")
    return {}


def wider_config(tmp, run, monkeypatch):
    """A checkpoint whose configuration (and model_args) say width 0.25 but whose weights are width 0.125."""
    places = copy_of_run(tmp, run, monkeypatch)

    def widen(ckpt):
        ckpt["config"]["width"] = 0.25
        ckpt["model_args"]["kwargs"]["width"] = 0.25
    edit_checkpoint(places["copy"], widen)
    return places


def nan_weights(tmp, run, monkeypatch):
    """A copy with a good eval.json and NaN weights: eval.py must not replace the good file."""
    places = copy_of_run(tmp, run, monkeypatch)
    (tmp / "copy" / "eval.json").write_text(json.dumps({"metrics": {"depth": {"abs_err": 1.0}}}))
    edit_checkpoint(places["copy"], lambda ckpt: [v.fill_(float("nan")) for v in ckpt["model"].values()
                                                  if v.is_floating_point()])
    return places


def no_cuda(tmp, run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return {}


def full_disk(tmp, run, monkeypatch):
    """Every checkpoint write fails with ENOSPC, after the temporary file was begun."""
    def save(obj, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)
    return copy_of_run(tmp, run, monkeypatch)


def baseline(blob):
    def setup(tmp, run, monkeypatch):
        (tmp / "baseline.json").write_text(json.dumps(blob))
        return {}
    return setup


def nyuv2_tree(change=None, size=(32, 32), train=2):
    """A fake NYUv2 tree (`train` train, 2 val samples), `change(root)` applied to it."""
    def setup(tmp, run, monkeypatch):
        root = write_nyuv2(str(tmp / "nyuv2"), counts=(("train", train), ("val", 2)), size=size)
        if change:
            change(root)
        return {"nyu": root}
    return setup


def save_array(relative, make):
    def change(root):
        path = os.path.join(root, relative)
        np.save(path, make(np.load(path)))
    return change


def corrupt_npy(root):
    with open(os.path.join(root, "val", "image", "0.npy"), "wb") as f:
        f.write(b"\x93NUMPY garbage")


def nyuv2_checkpoint(change=None, size=(32, 32)):
    """A copy of the run whose checkpoint says it was trained on NYUv2, and a fake NYUv2 tree."""
    def setup(tmp, run, monkeypatch):
        places = {**copy_of_run(tmp, run, monkeypatch), **nyuv2_tree(change, size)(tmp, run, monkeypatch)}

        def to_nyuv2(ckpt):
            ckpt["config"].update(data="nyuv2", data_root=places["nyu"], resolution=None)
        edit_checkpoint(places["copy"], to_nyuv2)
        return places
    return setup


def another_size(root):
    """Training sample 1 at 64x32, sample 0 at 32x32: every file of the sample, so only the batch is wrong."""
    for folder in ("image", "label", "depth", "normal"):
        save_array(f"train/{folder}/1.npy", lambda a: np.concatenate([a, a]))(root)


def nyud_tree(change):
    def setup(tmp, run, monkeypatch):
        root = write_nyud(str(tmp / "nyud"), size=(32, 32))
        change(root)
        return {"nyud": root}
    return setup


def non_utf8_list(root):
    (open(os.path.join(root, "gt_sets", "train.txt"), "wb")).write("0001\n\xe9t\xe9\n".encode("latin-1"))


def without(key):
    def setup(tmp, run, monkeypatch):
        places = copy_of_run(tmp, run, monkeypatch)
        edit_checkpoint(places["copy"], lambda ckpt: ckpt.pop(key))
        return places
    setup.__name__ = f"no_{key}"
    return setup


no_model_args, no_history = without("model_args"), without("history")


def users_folder(tmp, run, monkeypatch):
    """A folder holding another tool's files: a new run must leave it alone."""
    (tmp / "theirs").mkdir()
    (tmp / "theirs" / "metrics.json").write_text('{"their": 1}')
    (tmp / "theirs" / "curves.png").write_bytes(b"their picture")
    return {"copy": str(tmp / "theirs")}


def metrics_of_another_shape(tmp, run, monkeypatch):
    """--compare: valid JSON that is not train.py's metrics.json."""
    places = copy_of_run(tmp, run, monkeypatch)
    (tmp / "copy" / "metrics.json").write_text("[1, 2]")
    return places


def stale_eval_json(tmp, run, monkeypatch):
    """--compare --from-eval: an eval.json of an earlier epoch than the run's last.pt."""
    places = copy_of_run(tmp, run, monkeypatch)
    blob = json.loads((tmp / "copy" / "metrics.json").read_text())
    (tmp / "copy" / "eval.json").write_text(json.dumps({"split": "val", "epoch": 0, "metrics": blob["final"]}))
    return places


def lock_folder(tmp, run, monkeypatch):
    places = copy_of_run(tmp, run, monkeypatch)
    os.mkdir(os.path.join(places["copy"], "lock"))
    return places


def nan_pretrained(tmp, run, monkeypatch):
    state = {k: v.float() for k, v in mtinet.HRNet().state_dict().items()}
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, tmp / "hrnet.pth")
    return {}


def raising(name, error):
    """train.`name` raises `error`: out of memory, Ctrl-C, BatchNorm's batch of one, where no test can afford
    the real cause."""
    def setup(tmp, run, monkeypatch):
        def raise_it(*args, **kwargs):
            raise error
        monkeypatch.setattr(train, name, raise_it)
        return copy_of_run(tmp, run, monkeypatch)
    setup.__name__ = f"{name}_raises_{type(error).__name__}"
    return setup


def bomb_limit(tmp, run, monkeypatch):
    """PIL's decompression-bomb limit lowered below a small picture: the 30000x30000 case at no cost."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp / "bomb.png")
    return {}


NYU = ["--data", "nyuv2", "--data-root", "{nyu}", "--model", "split", "--width", "0.125", "--batch-size", "2",
       "--epochs", "1", "--device", "cpu", "--out", "{tmp}/new"]
EVAL = ["--checkpoint", "{run}", "--device", "cpu"]

# (tool, command, exit status, a word the error line must contain, setup)
CASES = [
    # numeric flags, rejected by argparse before anything runs
    ("train", TINY + ["--batch-size", "0"], 2, "--batch-size", None),
    ("train", TINY + ["--batch-size", "two"], 2, "--batch-size", None),
    ("train", TINY + ["--epochs", "0"], 2, "--epochs", None),
    ("train", TINY + ["--lr", "0"], 2, "--lr", None),
    ("train", TINY + ["--lr", "nan"], 2, "--lr", None),
    ("train", TINY + ["--lr", "-0.001"], 2, "--lr", None),
    ("train", TINY + ["--weight-decay", "-1"], 2, "--weight-decay", None),
    ("train", TINY + ["--eval-every", "0"], 2, "--eval-every", None),
    ("train", TINY + ["--workers", "-1"], 2, "--workers", None),
    ("train", TINY + ["--subset", "0"], 2, "--subset", None),
    ("train", TINY + ["--subset", "-1"], 2, "--subset", None),
    ("train", TINY + ["--width", "0"], 2, "--width", None),
    ("train", ["--model", "wrn-mtan", "--data", "synthetic-decathlon", "--wrn-depth", "12"], 2, "6n + 4", None),
    ("train", TINY + ["--temperature", "0"], 2, "--temperature", None),
    ("train", TINY + ["--temperature", "inf"], 2, "--temperature", None),
    ("train", TINY + ["--bench", "0"], 2, "--bench", None),
    ("train", ["--model", "wrn-mtan", "--data", "synthetic-decathlon", "--finetune-epochs", "-1"], 2,
     "--finetune-epochs", None),
    ("train", TINY + ["--task-weights", "depth=nan"], 2, "--task-weights", None),
    ("train", TINY + ["--task-weights", "depth"], 2, "--task-weights", None),
    ("train", TINY + ["--task-weights", "dept=1"], 2, "dept", None),
    ("train", ["--data", "cityscapes", "--num-classes", "5"], 2, "--num-classes", None),
    ("train", TINY + ["--seed", "-1"], 2, "--seed", None),
    ("train", TINY + ["--peak-tflops", "0"], 2, "--peak-tflops", None),
    ("train", TINY + ["--device", "cuda"], 2, "CUDA", no_cuda),
    ("train", TINY + ["--pretrained", "{run}/last.pt"], 2, "--pretrained", None),  # mtan has no backbone
    ("train", tiny("mtinet") + ["--pretrained", "{tmp}/missing.pth"], 2, "no such file", None),
    ("train", tiny("mtinet") + ["--pretrained", "{run}/log.jsonl", "--out", "{tmp}/new"], 1,
     "--pretrained", None),
    ("train", tiny("mtinet") + ["--pretrained", "{run}/last.pt", "--out", "{tmp}/new"], 1,
     "not the ImageNet weights", None),
    # run folders: never overwritten, never shared
    ("train", TINY + ["--out", "{run}"], 1, "--resume", None),
    ("train", TINY + ["--out", "/dev/null/run"], 1, "not a folder", None),
    ("train", ["--resume", "{copy}"], 1, "in use by process", live_lock),
    # --resume: what cannot change mid-run is refused, what can is checked
    ("train", ["--resume", "{run}", "--batch-size", "4"], 1, "cannot change", None),
    ("train", ["--resume", "{run}", "--model", "split"], 1, "cannot change", None),
    ("train", ["--resume", "{run}", "--tasks", "semantic"], 1, "cannot change", None),
    ("train", ["--resume", "{run}", "--resolution", "96x128"], 1, "cannot change", None),
    ("train", ["--resume", "{run}", "--augment"], 1, "cannot change", None),
    ("train", ["--resume", "{run}", "--out", "{tmp}/elsewhere"], 1, "cannot change", None),
    ("train", ["--resume", "{run}", "--epochs", "0"], 2, "--epochs", None),
    ("train", ["--resume", "{run}", "--device", "cuda"], 2, "CUDA", no_cuda),
    ("train", ["--resume", "{tmp}"], 1, "no checkpoint", None),
    ("train", ["--resume", "{tmp}"], 1, "corrupt", corrupt_checkpoint),
    ("train", ["--resume", "{copy}", "--epochs", "2"], 1, "do not fit", wider_config),
    ("train", ["--resume", "{copy}", "--epochs", "2"], 1, "no space left on device", full_disk),
    # divergence
    ("train", TINY + ["--lr", "1e6", "--epochs", "2", "--out", "{tmp}/new"], 1, "--lr", None),
    # data: missing, damaged, out of range, the wrong size, no label at all
    ("train", [a.replace("{nyu}", "{tmp}/nowhere") for a in NYU], 1, "dataset folder not found", None),
    ("train", NYU, 1, "label value 40", nyuv2_tree(save_array("train/label/1.npy", lambda a: a * 0 + 40))),
    ("train", NYU, 1, "expected floats in [0, 1]", nyuv2_tree(save_array("val/image/1.npy", lambda a: a * 255))),
    ("train", NYU, 1, "nan", nyuv2_tree(save_array("train/image/0.npy", lambda a: a * np.nan))),
    ("train", NYU, 1, "multiples of 32", nyuv2_tree(size=(32, 48 + 8))),
    ("train", NYU, 1, "cannot read this .npy", nyuv2_tree(corrupt_npy)),
    ("train", NYU, 1, "no valid depth", nyuv2_tree(lambda root: [
        save_array(f"train/depth/{i}.npy", lambda a: a * 0)(root) for i in range(2)])),
    # eval.py
    ("eval", EVAL + ["--subset", "0"], 2, "--subset", None),
    ("eval", EVAL + ["--subset", "-1"], 2, "--subset", None),
    ("eval", EVAL + ["--batch-size", "0"], 2, "--batch-size", None),
    ("eval", EVAL + ["--num-vis", "0"], 2, "--num-vis", None),
    ("eval", EVAL + ["--bench", "-2"], 2, "--bench", None),
    ("eval", ["--checkpoint", "{run}", "--device", "cuda"], 1, "CUDA", no_cuda),
    ("eval", EVAL + ["--baseline", "{tmp}/missing.json"], 1, "--baseline", None),
    ("eval", EVAL + ["--baseline", "{tmp}/baseline.json"], 1, "--baseline", baseline(3)),
    ("eval", EVAL + ["--baseline", "{tmp}/baseline.json"], 1, "--baseline", baseline("metrics")),
    ("eval", EVAL + ["--baseline", "{tmp}/baseline.json"], 1, "--baseline",
     baseline({"metrics": {"semantic": {"miou": "high"}}})),
    ("eval", EVAL + ["--baseline", "{tmp}/baseline.json"], 1, "depth", baseline({"metrics": {"semantic": {
        "miou": 0.5}}})),
    ("eval", EVAL + ["--baseline", "{tmp}/baseline.json"], 1, "is 0", baseline({"metrics": {
        "semantic": {"miou": 0.0}, "depth": {"rmse": 1.0}, "normal": {"mean": 30.0}}})),
    ("eval", EVAL + ["--save-vis", "/dev/null/vis"], 1, "not a folder", None),
    ("eval", EVAL + ["--image", "{run}/log.jsonl"], 1, "--image", None),
    ("eval", ["--checkpoint", "{copy}", "--device", "cpu"], 1, "non-finite weights", nan_weights),
    ("eval", ["--checkpoint", "{copy}", "--device", "cpu"], 1, "do not fit", wider_config),
    ("eval", ["--checkpoint", "{copy}", "--device", "cpu"], 1, "cannot read this .npy", nyuv2_checkpoint(corrupt_npy)),
    ("eval", ["--checkpoint", "{copy}", "--device", "cpu"], 1, "multiples of 32", nyuv2_checkpoint(size=(40, 32))),
    # second sweep. 1: no file of the user's is replaced (--image: test_image_never_replaces_a_file)
    ("train", TINY + ["--out", "{copy}"], 1, "not empty", users_folder),
    # 2: an empty string is not "not given"
    ("train", ["--resume", ""], 2, "--resume", None),
    ("train", TINY + ["--out", " "], 2, "--out", None),
    ("train", TINY + ["--tasks", ""], 2, "--tasks", None),
    ("train", TINY + ["--data-root", ""], 2, "--data-root", None),
    ("train", TINY + ["--task-weights", ""], 2, "--task-weights", None),
    ("eval", EVAL + ["--image", ""], 2, "--image", None),
    ("eval", EVAL + ["--baseline", ""], 2, "--baseline", None),
    ("eval", ["--checkpoint", ""], 2, "--checkpoint", None),
    # 3: --compare trusts only what it checked (more cases: tests/test_compare.py, UNTRUSTED)
    ("eval", ["--compare", "{run}", "--baseline", "{run}"], 1, "a baseline is a single-task run", None),
    ("eval", ["--compare", "{copy}"], 1, "metrics.json holds a JSON list", metrics_of_another_shape),
    ("eval", ["--compare", "{copy}", "--from-eval"], 1, "eval.json is of epoch 0", stale_eval_json),
    # 4: data the first checks did not see
    ("train", NYU, 1, "expected metres", nyuv2_tree(save_array("val/depth/1.npy", lambda a: a * 1000))),
    ("train", NYU, 1, "sample 1 is 64x32", nyuv2_tree(another_size)),
    ("train", NYU + ["--workers", "1"], 1, "label value 40",  # sample 3: read by a worker
     nyuv2_tree(save_array("train/label/3.npy", lambda a: a * 0 + 40), train=4)),
    ("train", ["--model", "split", "--data", "nyud", "--data-root", "{nyud}", "--width", "0.125", "--out",
               "{tmp}/new"], 1, "train.txt", nyud_tree(non_utf8_list)),
    ("eval", ["--checkpoint", "{copy}", "--device", "cpu"], 1, "'model_args' entry", no_model_args),
    ("train", ["--resume", "{copy}"], 1, "'history' entry", no_history),
    # 5: batches of one
    ("train", TINY + ["--subset", "1", "--out", "{tmp}/new"], 1, "BatchNorm", None),
    ("train", ["--resume", "{copy}", "--epochs", "2"], 1, "batch of one", raising(
        "training_step", ValueError("Expected more than 1 value per channel when training, got input size "
                                    "torch.Size([1, 8, 1, 1])"))),
    # 6: the right cause named
    ("train", TINY + ["--temperature", "1e-300"], 2, "--temperature", None),
    ("train", tiny("mtinet") + ["--pretrained", "{tmp}/hrnet.pth", "--out", "{tmp}/new"], 1,
     "non-finite weights", nan_pretrained),
    ("train", ["--resume", "{copy}"], 1, "non-finite weights", nan_weights),
    # 7: flags that would learn nothing or be dropped
    ("train", TINY + ["--task-weights", "semantic=0,depth=0,normal=0"], 2, "weight 0", None),
    ("train", ["--model", "single", "--task", "depth", "--tasks", "semantic"] + TINY, 2, "--task and --tasks",
     None),
    ("train", TINY + ["--task-weights", "depth=1,depth=2"], 2, "twice", None),
    ("train", TINY + ["--tasks", "depth,depth"], 2, "--tasks", None),
    ("train", tiny("mtinet") + ["--aux-tasks", "normal,edge"], 2, "already a main task", None),
    # 8: resources and signals (a closed pipe: test_a_closed_stdout_ends_quietly)
    ("train", ["--resume", "{copy}", "--epochs", "2"], 1, "out of memory", raising(
        "training_step", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))),
    ("train", ["--resume", "{copy}", "--epochs", "2"], 1, "out of memory", raising(
        "training_step", RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"))),
    ("train", ["--resume", "{copy}", "--epochs", "2"], 130, "--resume", raising(
        "train_one_epoch", KeyboardInterrupt())),
    ("eval", EVAL + ["--image", "{tmp}/bomb.png"], 1, "--image", bomb_limit),
    ("train", ["--resume", "{copy}"], 1, "not a file", lock_folder),
    ("train", TINY + ["--seed", str(2 ** 64)], 2, "--seed", None),
    # 9: every flag applies or is refused (train.FLAG_SCOPE), for a new run and a resume alike
    ("train", TINY + ["--finetune-epochs", "5"], 2, "--finetune-epochs", None),
    ("train", TINY + ["--num-classes", "19"], 2, "--num-classes", None),
    ("train", TINY + ["--weighting", "equal", "--temperature", "3"], 2, "--temperature", None),
    ("train", TINY + ["--data-root", "{tmp}"], 2, "--data-root", None),
    ("train", TINY + ["--fpm-softmax", "official"], 2, "--fpm-softmax", None),
    ("train", TINY + ["--wrn-depth", "16"], 2, "--wrn-depth", None),
    ("train", tiny("mtinet") + ["--width", "0.5"], 2, "--width", None),
    ("train", TINY + ["--peak-tflops", "100"], 2, "--peak-tflops", None),  # no --bench: no MFU to compute
    ("train", ["--resume", "{run}", "--cuda-graph"], 2, "--cuda-graph", None),  # a CPU, as for a new run
    # 10: checks on what the computation will see
    ("train", TINY + ["--task-weights", "semantic=1e-300,depth=0,normal=0"], 2, "float32", None),
    ("train", NYU, 1, "100.0001", nyuv2_tree(save_array("val/depth/1.npy", lambda a: a * 0 + 100.0001))),
]
MAINS = {"train": train.main, "eval": evaluation.main}


def case_id(case):
    tool, argv, _, word, setup = case
    return f"{tool}-{word}-{getattr(setup, '__name__', '')}"


@pytest.mark.parametrize("tool,argv,status,word,setup", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_gets_one_line(tool, argv, status, word, setup, finished_run, tmp_path, monkeypatch, capsys):
    places = {"run": finished_run, "tmp": str(tmp_path)}
    places.update(setup(tmp_path, finished_run, monkeypatch) if setup else {})
    folders = [finished_run] + [places[k] for k in ("copy",) if k in places]
    before = [hashes(folder) for folder in folders]
    with pytest.raises(SystemExit) as info:
        MAINS[tool]([arg.format(**places) for arg in argv])
    code, printed = info.value.code, capsys.readouterr()
    message = code if isinstance(code, str) else printed.err
    lines = message.strip().splitlines()
    assert (1 if isinstance(code, str) else code) == status, message
    assert lines[0].startswith("error: ") and word in lines[0], message
    if "Expected layout" not in message:  # data.py's errors add the layout and the download below the line
        assert len(lines) == 1, message
    assert "Traceback" not in printed.out + printed.err + message
    assert [hashes(folder) for folder in folders] == before  # nothing written, replaced or left behind
    assert not os.path.exists(os.path.join(str(tmp_path), "new", "last.pt"))
    locked = setup in (live_lock, lock_folder)
    assert not any(name == "lock" for folder in folders for name in os.listdir(folder)) or locked


# ---- the right behaviour -----------------------------------------------------------------------------------


def test_a_stale_lock_does_not_block_resume_and_the_lock_is_removed(finished_run, tmp_path, capsys):
    copy = copy_of_run(tmp_path, finished_run, None)["copy"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid belongs to no process now
    with open(os.path.join(copy, "lock"), "w") as f:
        f.write(f"{dead.pid}\n")
    train.main(["--resume", copy])  # already finished: rebuilds the table only
    assert not os.path.exists(os.path.join(copy, "lock"))


def test_a_gpu_run_resumes_on_the_cpu_of_a_machine_without_cuda(finished_run, tmp_path, monkeypatch, capsys):
    copy = copy_of_run(tmp_path, finished_run, monkeypatch)["copy"]
    edit_checkpoint(copy, lambda ckpt: ckpt["config"].update(device="cuda"))
    no_cuda(tmp_path, finished_run, monkeypatch)
    train.main(["--resume", copy])
    printed = capsys.readouterr().out
    assert "no CUDA device here, so it continues on the CPU" in printed and "device cpu" in printed


def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {"out": os.path.join("runs", "mtan-synthetic-20260101-120000")}
    first, second = dict(cfg), dict(cfg)
    locks = [train.claim_run_folder(c, resuming=False, named=False) for c in (first, second)]
    assert first["out"] != second["out"] and second["out"].endswith("-2")
    assert all(os.path.isfile(lock) for lock in locks)
    for lock in locks:
        train.release_lock(lock)
    assert not any(os.path.exists(lock) for lock in locks)


def test_the_divergence_rule(finished_run):
    """Non-finite, or above 1e4 times the reference: the first epoch's mean, or in the first epoch the first
    step's loss. The message says what was kept and, the data being finite, to lower --lr."""
    args = train.build_parser().parse_args(TINY + ["--out", finished_run])
    run = train.setup_run(train.resolve_config(args, train.build_parser()))
    train.check_epoch(run, {"depth": 5e4}, 0, {"depth": 10.0})  # 5e3 times the first step: fine
    with pytest.raises(FloatingPointError, match=r"exploded in epoch 1 .*depth 2e\+05 against 10.*--lr"):
        train.check_epoch(run, {"depth": 2e5}, 0, {"depth": 10.0})
    run.history = [{"train_loss": {"depth": 1.0}}]
    with pytest.raises(FloatingPointError, match=r"first epoch.*without overwriting .*last.pt \(epoch 1"):
        train.check_epoch(run, {"depth": 2e4}, 1)
    with pytest.raises(FloatingPointError, match=r"non-finite loss for depth.*training samples are finite"):
        train.check_epoch(run, {"depth": float("nan")}, 1)


def test_json_files_are_strict():
    text = evaluation.strict_json({"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": 2})
    assert json.loads(text) == {"a": [1.0, None], "b": {"c": None}, "d": 2}


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_image_of_16_bits_or_floats_is_rescaled(finished_run, tmp_path, mode, capsys):
    values = np.linspace(0, 1, 48 * 40).reshape(40, 48)
    path = str(tmp_path / ("photo.png" if mode == "I;16" else "photo.tiff"))
    if mode == "I;16":
        Image.fromarray((values * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray((values * 300).astype(np.float32)).save(path)
    array = evaluation.read_image(path)
    assert array.shape == (40, 48, 3) and array.min() == 0 and abs(array.max() - 1) < 1e-6
    assert "rescaled" in capsys.readouterr().out or mode == "I;16"
    written = evaluation.main(["--checkpoint", finished_run, "--device", "cpu", "--image", path])
    assert len(written) == 3 and "to [0, 1]" in capsys.readouterr().out


def test_image_never_replaces_a_file_and_is_resized_for_the_model(finished_run, tmp_path, capsys):
    """--image writes into a new folder beside the picture, never over a file; a large picture is resized to
    the run's resolution for the model, and its predictions come back at its own size."""
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((2500, 2000, 3)) * 255).astype(np.uint8)).save(path)
    (tmp_path / "photo_semantic.png").write_bytes(b"the user's file")
    (tmp_path / "photo_predictions").mkdir()
    before = hashes(str(tmp_path))
    written = evaluation.main(["--checkpoint", finished_run, "--device", "cpu", "--image", str(path)])
    assert {os.path.dirname(p) for p in written} == {str(tmp_path / "photo_predictions-2")}
    assert str(tmp_path / "photo_predictions-2") in capsys.readouterr().out
    assert all(Image.open(p).size == (2000, 2500) for p in written)
    after = hashes(str(tmp_path))
    assert {k: v for k, v in after.items() if not k.startswith("photo_predictions-2")} == before


@pytest.mark.parametrize("pid", ["99999999999999999999999", "0", "-1", "1", "not-a-pid", ""])
def test_a_lock_of_an_odd_pid_is_stale(finished_run, tmp_path, pid, capsys):
    copy = copy_of_run(tmp_path, finished_run, None)["copy"]
    with open(os.path.join(copy, "lock"), "w") as f:
        f.write(pid)
    train.main(["--resume", copy])  # already finished: rebuilds the table only
    assert not os.path.exists(os.path.join(copy, "lock"))


def test_a_live_lock_names_its_process(finished_run, tmp_path, capsys):
    copy = copy_of_run(tmp_path, finished_run, None)["copy"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(copy, "lock"), "w") as f:
            f.write(f"{holder.pid}\n")
        with pytest.raises(SystemExit) as info:
            train.main(["--resume", copy])
    finally:
        holder.kill()
    error = str(info.value.code)
    assert f"in use by process {holder.pid}" in error
    assert "time.sleep(60)" in error or not os.path.isdir("/proc")  # its command line, where /proc tells it


def test_resume_compares_values_not_strings(finished_run, tmp_path, capsys):
    """The run's tasks in another order and its resolution written otherwise are the run's own settings."""
    copy = copy_of_run(tmp_path, finished_run, None)["copy"]
    train.main(["--resume", copy, "--tasks", "normal,depth,semantic", "--resolution", "064x064"])
    assert "final evaluation" in capsys.readouterr().out  # already finished: the table rebuilt, nothing refused


def test_gpu_check_follows_the_scripts_rules(tmp_path, capsys):
    """tests/gpu_check.py: one-line errors for an --out that is a file and for full sizes on a CPU, and a failed
    row (a user error's SystemExit too) marked failed instead of ending the check."""
    import gpu_check

    (tmp_path / "file").write_text("")
    for argv, word in ([["--device", "cpu", "--tiny", "--out", str(tmp_path / "file")], "--out"],
                       [["--device", "cpu"], "--tiny"]):
        with pytest.raises(SystemExit) as info:
            gpu_check.main(argv)
        error = capsys.readouterr().err.strip()
        assert info.value.code == 2 and error.startswith("error: ") and word in error and "\n" not in error
    row, ok = gpu_check.attempt("a bad flag", lambda: train.main(TINY + ["--batch-size", "0"]))
    assert (row, ok) == ({"error": "SystemExit"}, False)


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`train.py ... | head -1`: the reader goes, the trainer stops with one line on stderr."""
    process = subprocess.Popen([sys.executable, "train.py"] + TINY + ["--out", str(tmp_path / "r")],
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    process.stdout.close()  # as `head` does after its line
    err = process.stderr.read().decode()
    assert process.wait() == 1 and err.startswith("error: stdout was closed"), err
    assert len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "r" / "lock")


def test_a_last_batch_of_one_is_dropped():
    cfg = {"seed": 0, "batch_size": 2, "drop_last": False, "workers": 0, "device": "cpu"}
    def sizes(n, **change):
        return [len(batch) for batch in train.make_loader(range(n), dict(cfg, **change), 0, train=True)]
    assert sizes(5) == [2, 2] and sizes(4) == [2, 2] and sizes(7, batch_size=4) == [4, 3]
    assert sizes(3, batch_size=1) == [1, 1, 1]  # batch 1 by choice: BatchNorm's own error says so


def test_non_positive_depth_is_invalid(capsys):
    """A release that marks invalid depth with -1 instead of 0: the loss and the metrics skip it (both read
    `target > 0`), and the loader says so once."""
    target = torch.tensor([2.0, -1.0, 0.0, 4.0]).view(1, 1, 2, 2)
    pred = torch.tensor([1.0, 5.0, 5.0, 4.0]).view(1, 1, 2, 2)
    assert float(train.depth_l1_loss(pred, target)) == 0.5
    metric = evaluation.DepthMetrics()
    metric.update(pred, target)
    assert metric.compute()["abs_err"] == 0.5 and metric.compute()["rel_err"] == 0.25
    data._negative_depth_noted.clear()
    data._to_tensor("depth", target[0].permute(1, 2, 0).numpy(), "d.npy")
    data._to_tensor("depth", target[0].permute(1, 2, 0).numpy(), "e.npy")
    assert capsys.readouterr().out.count("negative depth") == 1


def test_resume_does_not_need_the_pretrained_file(finished_run, tmp_path, capsys):
    """The checkpoint holds every weight: a run trained from ImageNet weights resumes after the file moved."""
    copy = copy_of_run(tmp_path, finished_run, None)["copy"]
    edit_checkpoint(copy, lambda ckpt: ckpt["config"].update(pretrained=str(tmp_path / "moved.pth")))
    result = train.main(["--resume", copy, "--epochs", "2"])
    assert result["epochs"] == 2
