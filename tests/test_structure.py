"""How the files fit together: eval.py rebuilds and evaluates a run without train.py beside it, the canonical
command finds its data in data/<name>, the training step never waits for the device (checked on the CPU by
making every host-sync entry point raise), and every new backbone trains for a step from the command line."""
import ast
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import eval as evaluation
import train
from conftest import ROOT, TINY, tiny
from test_data import write_nyuv2

pytestmark = pytest.mark.usefixtures("one_thread")


def imports_of(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    return names


def test_one_import_direction():
    """train.py -> eval.py -> {data.py, mtan.py, mtinet.py}; the models import torch only."""
    project = {"train", "eval", "data", "mtan", "mtinet"}
    graph = {name: imports_of(os.path.join(ROOT, f"{name}.py")) & project for name in project}
    assert graph == {"train": {"eval", "data", "mtan", "mtinet"}, "eval": {"data", "mtan", "mtinet"},
                     "data": set(), "mtan": set(), "mtinet": set()}


@pytest.fixture
def finished_run(tiny_run):
    return tiny_run  # conftest.py: the session's finished TINY run of MTAN


def test_eval_rebuilds_the_model_without_train_py(finished_run, tmp_path):
    """A folder with eval.py, data.py, mtan.py and mtinet.py but no train.py evaluates the checkpoint from the
    class and arguments it records, and reproduces the training's last evaluation."""
    for name in ("eval.py", "data.py", "mtan.py", "mtinet.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    result = subprocess.run([sys.executable, "eval.py", "--checkpoint", finished_run, "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "train.py").exists()
    report = json.load(open(os.path.join(finished_run, "eval.json")))
    final = json.load(open(os.path.join(finished_run, "metrics.json")))["final"]
    for task, values in final.items():
        for key, value in values.items():
            # the median comes from a histogram: a last-bit difference of one error can move it by a bin
            tolerance = dict(abs=0.01) if key == "median" else dict(rel=1e-5, abs=1e-7)
            assert report["metrics"][task][key] == pytest.approx(value, **tolerance), (task, key)
    ckpt = torch.load(os.path.join(finished_run, "last.pt"), weights_only=True)
    assert ckpt["model_args"] == {"module": "mtan", "class": "MTAN", "kwargs": {
        "tasks": {"semantic": 7, "depth": 1, "normal": 3}, "width": 0.0625}}


def test_the_canonical_command_reads_data_from_data_name(tmp_path, monkeypatch, capsys):
    """`python train.py --model mtinet --data nyuv2` with no --data-root: the data is in data/nyuv2."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as error:
        train.main(["--model", "mtinet", "--data", "nyuv2", "--device", "cpu"])
    assert os.path.join("data", "nyuv2") in str(error.value)  # the missing-data error names the folder
    write_nyuv2(os.path.join("data", "nyuv2"), counts=(("train", 2), ("val", 2)), size=(64, 64))
    result = train.main(["--model", "mtinet", "--data", "nyuv2", "--epochs", "1", "--batch-size", "2",
                         "--device", "cpu", "--out", "run"])
    assert set(result["final"]) == {"semantic", "depth", "normal"}
    assert json.load(open(os.path.join("run", "metrics.json")))["data"] == "nyuv2"


# ---- the step never waits for the device -------------------------------------------------------------------

HOST_SYNCS = {  # every way Python code can read a tensor's value on the host
    "item": None, "tolist": None, "cpu": None, "numpy": None, "nonzero": None, "masked_select": None,
    "__bool__": None, "__float__": None, "__int__": None,
}


class HostSyncError(AssertionError):
    pass


class SyncGuard:
    """While active, reading a tensor's value on the host raises: the methods above, and indexing with a
    boolean mask (which must count the selected elements first). On a GPU each of these would block the
    host until the device caught up; on the CPU they are free, so CI would never notice one creeping in."""

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in HOST_SYNCS}
        self.saved["__getitem__"] = torch.Tensor.__getitem__
        for name in HOST_SYNCS:
            setattr(torch.Tensor, name, self.raiser(name))
        original = self.saved["__getitem__"]

        def getitem(tensor, index):
            indices = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                raise HostSyncError("boolean-mask indexing in the training step (a host sync on a GPU)")
            return original(tensor, index)

        torch.Tensor.__getitem__ = getitem
        self.saved_functions = {"masked_select": torch.masked_select, "nonzero": torch.nonzero}
        torch.masked_select, torch.nonzero = self.raiser("torch.masked_select"), self.raiser("torch.nonzero")
        return self

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        torch.masked_select, torch.nonzero = self.saved_functions["masked_select"], self.saved_functions["nonzero"]

    @staticmethod
    def raiser(name):
        def method(*args, **kwargs):
            raise HostSyncError(f"{name} called inside the training step: it waits for the device on a GPU")
        return method


class GuardedBatches:
    """The batches of an epoch, with the SyncGuard active from the first batch to the end of the loop (the
    whole body of train_one_epoch's for loop: preparation, step, bookkeeping), and off for the epoch's one
    reduction after it."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        with SyncGuard():
            yield from self.batches


def test_the_guard_catches_each_kind_of_host_sync():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: float(x.sum()), lambda: bool(x.sum()),
                 lambda: x[x > 0], lambda: torch.nonzero(x), lambda: x.cpu(), lambda: x.numpy()):
        with SyncGuard(), pytest.raises(HostSyncError):
            read()
    assert x.sum().item() == 3.0  # and everything is restored afterwards


@pytest.mark.parametrize("model, weighting, extra", [
    ("mtan", "dwa", ["--augment"]),
    ("split", "uncertainty", ["--amp", "bf16"]),
    ("mtinet", "equal", ["--aux-tasks", "edge"]),
])
def test_an_epoch_of_training_steps_never_reads_the_device(model, weighting, extra, monkeypatch, tmp_path):
    parser = train.build_parser()
    args = ["--weighting", weighting, "--out", str(tmp_path)] + tiny(model) + ["--subset", "4"] + extra
    cfg = train.resolve_config(parser.parse_args(args), parser)
    run = train.setup_run(cfg)
    monkeypatch.setattr(train.Progress, "maybe_print", lambda self, step, loss: None)  # reads the loss on purpose
    train.train_one_epoch(run, 0)  # warm-up: optimiser state, lazily built buffers
    batches = list(train.epoch_batches(run, 1))  # the loader itself reads files with numpy: outside the guard
    monkeypatch.setattr(train, "epoch_batches", lambda run, epoch: GuardedBatches(batches))
    losses = train.train_one_epoch(run, 1)
    assert torch.isfinite(losses).all() and len(losses) == len(run.loss_tasks)


# ---- the backbones of the papers' headline results, from the command line ----------------------------------


@pytest.mark.parametrize("args, model, module, cls", [
    (["--width", "0.25"], "mtan-deeplab", "mtan", "MTANDeepLabv3"),
    (["--width", "0.25", "--task", "semantic"], "deeplab", "mtan", "DeepLabv3"),
    (["--backbone", "w48", "--tasks", "semantic,depth"], "mtinet", "mtinet", "MTINet"),
])
def test_each_new_backbone_trains_a_step_and_evaluates(args, model, module, cls, tmp_path):
    out = str(tmp_path / "run")
    result = train.main(tiny(model) + args + ["--out", out])
    assert all(torch.isfinite(torch.tensor(v)).all() for m in result["final"].values() for v in m.values())
    ckpt = evaluation.load_checkpoint(out)
    assert (ckpt["model_args"]["module"], ckpt["model_args"]["class"]) == (module, cls)
    model = evaluation.model_from_checkpoint(ckpt)
    model.load_state_dict(ckpt["model"])  # the recorded arguments rebuild exactly these weights
    if "--backbone" in args:
        assert ckpt["model_args"]["kwargs"]["backbone"] == "w48" and model.backbone.name == "w48"
