"""Speed and scale: the fields of `--bench` and its FLOP count, the fast path's numerics (bf16,
channels_last, fp16 loss scaling), --data-on-device, torch.compile without a recompile per step, and torchrun:
2 gloo processes on the CPU that agree with each other and with a single-process evaluation. On a GPU: the
training step runs with no host-device synchronisation, and --bench reports the MFU.

No assertion depends on how fast anything runs: speed is measured and reported (README), never asserted."""
import copy
import json
import math
import os
import socket
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn

import data
import eval as evaluation
import mtan
import mtinet
import train
from conftest import ROOT, requires_cuda
from conftest import TINY, tiny

# Added to conftest's TINY: 8 synthetic samples per split (a 1/16-width MTAN, 4 channels in the first layer): a
# training step takes tens of milliseconds on a CPU.
EIGHT = ["--subset", "8"]
SYNTHETIC_TASKS = {"semantic": 7, "depth": 1, "normal": 3}
BENCH_FIELDS = {"images_per_s", "ms_per_step", "peak_mem_mb", "device", "amp", "channels_last", "compile",
                "batch_size", "resolution", "gflops_per_image"}


def conv_flops(model, image):
    """FLOPs of one forward pass counted by hand: every convolution call produces out.numel() values, each
    costing C_in/groups * k_h * k_w multiply-adds, i.e. 2x that many FLOPs (the convention of
    torch.utils.flop_counter). SegNet-MTAN computes nothing else that counts (no linear layer, no matmul)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.weight[0].numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(image)
    for handle in handles:
        handle.remove()
    return total


def last_json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-epoch tiny run (batch 3 over 8 samples: batches of 3, 3, 2), shared by the tests that need weights
    that have seen data. Returns its folder."""
    out = str(tmp_path_factory.mktemp("speed") / "run")
    train.main(TINY + EIGHT + ["--batch-size", "3", "--epochs", "2", "--out", out])
    return out


# ---- --bench -----------------------------------------------------------------------------------------------


def test_flop_count_is_the_hand_count_and_the_published_216_gmac_of_mtan():
    """At the paper's size (width 1, 288x384) on the meta device (shapes only, no arithmetic): the count of
    --bench equals the count by hand, and is 216 GMAC per image."""
    with torch.device("meta"):
        model = mtan.MTAN({"semantic": 13, "depth": 1, "normal": 3}, width=1.0)
    image = torch.empty(2, 3, 288, 384, device="meta")
    run = types.SimpleNamespace(model=model, normalise=nn.Identity(), forward_kwargs={})
    flops = train.forward_flops_per_image(run, {"image": image})  # counts image[:1]
    assert flops == conv_flops(model, image[:1])
    assert flops / 2 / 1e9 == pytest.approx(216.0, rel=0.001)


def test_bench_prints_one_json_line_with_every_field(capsys):
    result = train.main(TINY + EIGHT + ["--bench", "2"])
    assert last_json_line(capsys) == result
    assert BENCH_FIELDS <= set(result)
    assert "mfu" not in result  # a CPU has no entry in the table of peaks, and no --peak-tflops was given
    assert (result["device"], result["amp"], result["channels_last"], result["compile"]) == ("cpu", "off", True, False)
    assert (result["batch_size"], result["resolution"], result["sync_every_step"]) == (2, "64x64", False)
    assert result["images_per_s"] == pytest.approx(2 / (result["ms_per_step"] / 1000), rel=0.01)
    assert result["peak_mem_mb"] > 0
    tiny = mtan.MTAN(SYNTHETIC_TASKS, width=0.0625)
    assert result["gflops_per_image"] == round(conv_flops(tiny, torch.rand(1, 3, 64, 64)) / 1e9, 3)


def test_bench_mfu_with_a_given_peak_and_the_baseline_switches(capsys):
    # A tiny peak of 0.01 TFLOP/s makes the MFU of the tiny model large enough for its 4 decimals to matter.
    result = train.main(TINY + EIGHT + ["--bench", "2", "--peak-tflops", "0.01", "--no-channels-last", "--amp", "bf16",
                                "--sync-every-step", "--no-fused"])
    assert last_json_line(capsys) == result
    assert (result["amp"], result["channels_last"], result["sync_every_step"]) == ("bf16", False, True)
    assert result["fused_optimizer"] is False
    for fused in (True, False):  # what --no-fused switches: Adam's fused kernel against its per-parameter loop
        cfg = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, fused=fused)
        adam = train.build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], torch.device("cpu"))
        assert bool(adam.defaults["fused"]) is fused
    flops = conv_flops(mtan.MTAN(SYNTHETIC_TASKS, width=0.0625), torch.rand(1, 3, 64, 64))
    # forward + backward = 3 forwards, per second, over the peak
    expected = 3 * flops * result["batch_size"] / (result["ms_per_step"] / 1000) / 0.01e12
    assert result["mfu"] == pytest.approx(expected, rel=0.01)


def test_eval_bench_times_the_whole_split(trained_run, capsys):
    result = evaluation.main(["--checkpoint", trained_run, "--bench", "2", "--device", "cpu"])
    assert last_json_line(capsys) == result
    assert (result["images"], result["split"], result["batch_size"], result["resolution"]) == (8, "val", 3, "64x64")
    assert result["images_per_s"] == pytest.approx(8 / result["seconds_per_pass"], rel=0.02)
    assert result["device"] == "cpu" and result["amp"] == "off" and result["peak_mem_mb"] > 0
    assert not os.path.exists(os.path.join(trained_run, "eval.json"))  # a benchmark writes no report


# ---- the fast path's numerics ------------------------------------------------------------------------------


def test_bf16_and_channels_last_predictions_match_fp32(trained_run):
    """channels_last only changes the memory layout: the convolutions add the same products in another order,
    so the predictions agree to float32 rounding (measured: relative L2 difference below 3e-5; bound 1e-4).

    bf16 keeps 8 significant bits (a relative rounding of 2^-9 per value). Through the ~30 convolution layers of
    a 4-channel MTAN, where no wide sum averages the rounding out, the outputs move by a few percent (measured on
    these weights: 3 % semantic logits, 6 % depth, 4 % normals; 97 % of the pixels keep their class). Bounds:
    15 % relative L2 difference per task and 90 % class agreement, loose enough for other CPUs' bf16 kernels."""
    ckpt = evaluation.load_checkpoint(trained_run)
    cfg = dict(ckpt["config"])
    model = train.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    dataset, _ = data.build_dataset("synthetic", None, "val", resolution=(64, 64))
    image = torch.stack([dataset[i]["image"] for i in range(8)])
    with torch.no_grad():
        reference = model(image)
        with evaluation.autocast("bf16", torch.device("cpu")):
            bf16 = model(image)
        nhwc_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        nhwc = nhwc_model(image.contiguous(memory_format=torch.channels_last))
    for task, ref in reference.items():
        def difference(pred):
            return ((pred[task].float() - ref).norm() / ref.norm()).item()

        assert difference(nhwc) < 1e-4, task
        assert difference(bf16) < 0.15, task
    agreement = (bf16["semantic"].argmax(1) == reference["semantic"].argmax(1)).float().mean().item()
    assert agreement > 0.9


def test_channels_last_predictions_match_for_mtinet():
    torch.manual_seed(0)
    model = mtinet.MTINet(SYNTHETIC_TASKS).eval()
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(image)
        nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)(image.contiguous(
            memory_format=torch.channels_last))
    for task, ref in reference.items():
        assert ((nhwc[task] - ref).norm() / ref.norm()).item() < 1e-4, task


def test_amp_defaults_to_bf16_on_cuda_and_off_on_cpu(monkeypatch):
    def resolve(*extra):
        parser = train.build_parser()
        return train.resolve_config(parser.parse_args(TINY + EIGHT + list(extra)), parser)

    assert (resolve()["amp"], resolve()["channels_last"]) == ("off", True)
    assert resolve("--no-channels-last")["channels_last"] is False
    # Pretend to be on a GPU: resolve_config only asks torch.cuda, it touches no device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert (resolve()["device"], resolve()["amp"]) == ("cuda", "bf16")
    assert resolve("--amp", "off")["amp"] == "off"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # V100, T4
    assert resolve()["amp"] == "fp16"


def test_fp16_scales_the_loss_and_resume_restores_the_scale(tmp_path, trained_run):
    """fp16 trains with a GradScaler (here on the CPU, where fp16 autocast also works); a resumed run continues
    with the saved loss scale and equals an uninterrupted one. Without --amp fp16 the scaler is off."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.main(TINY + EIGHT + ["--amp", "fp16", "--epochs", "2", "--out", straight])
    train.main(TINY + EIGHT + ["--amp", "fp16", "--epochs", "1", "--out", resumed])
    train.main(["--resume", resumed, "--epochs", "2"])
    states = [torch.load(os.path.join(d, "last.pt"), weights_only=True)["scaler"] for d in (straight, resumed)]
    assert states[0] == states[1]
    # 8 steps from a scale of 2^16: every overflow halves the scale and restarts the count of good steps
    halvings = round(math.log2(65536 / states[0]["scale"]))
    assert 2 ** halvings * states[0]["scale"] == 65536 and halvings + states[0]["_growth_tracker"] <= 8
    assert [r["train_loss"] for r in read_log(straight)] == [r["train_loss"] for r in read_log(resumed)]
    assert torch.load(os.path.join(trained_run, "last.pt"), weights_only=True)["scaler"] == {}  # amp off


# ---- --data-on-device and --compile ------------------------------------------------------------------------


def test_data_on_device_draws_the_same_batches_as_the_loader(tmp_path, trained_run):
    """The same 2 epochs as `trained_run` with the split held in (CPU) device memory: the same batches in the
    same order, so the same losses and metrics to the last bit (only the epoch times differ)."""
    out = str(tmp_path / "on-device")
    train.main(TINY + EIGHT + ["--batch-size", "3", "--epochs", "2", "--out", out, "--data-on-device"])

    def untimed(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert len(read_log(out)) == 2
    assert untimed(read_log(out)) == untimed(read_log(trained_run))


def test_data_on_device_refuses_per_sample_augmented_data(capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", "pascal", "--data-on-device"])
    assert "--data-on-device" in capsys.readouterr().err


def count_graphs_per_epoch(monkeypatch, epoch_function):
    """Compile with dynamo's counting backend and return a list that receives, after each call of
    train.<epoch_function>, the number of graphs compiled so far."""
    from torch._dynamo.testing import CompileCounter

    counter, real_compile, real_epoch, frames = CompileCounter(), torch.compile, getattr(train, epoch_function), []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter, **kw))

    def epoch_then_count(run, epoch):
        result = real_epoch(run, epoch)
        frames.append(counter.frame_count)
        return result

    monkeypatch.setattr(train, epoch_function, epoch_then_count)
    return frames


def test_compile_compiles_once_per_batch_shape_not_per_step(tmp_path, monkeypatch):
    """torch.compile with a counting backend (eager execution, so no C++ compiler is needed): 5 samples in
    batches of 3, 2 compile one graph for batch 3 and one more when the smaller last batch arrives; the
    second epoch compiles nothing new. The loop is what matters here, so the model is the plain multi-task
    SegNet ("split"), which dynamo traces in half the time of MTAN (same result: 2 graphs, then none)."""
    frames = count_graphs_per_epoch(monkeypatch, "train_one_epoch")
    torch._dynamo.reset()
    try:
        train.main(TINY + EIGHT + ["--model", "split", "--subset", "5", "--batch-size", "3", "--epochs", "2", "--compile",
                           "--out", str(tmp_path / "run")])
    finally:
        torch._dynamo.reset()
    assert frames == [2, 2]


def test_compile_keeps_every_decathlon_domain_compiled(tmp_path, monkeypatch, one_thread):
    """wrn-mtan's domain index picks a chain and a classifier, so dynamo compiles a graph per domain, plus one when
    the first smaller last batch makes the batch size dynamic: 3 for 2 synthetic domains of 20 images in batches
    of 8, 8, 4, and 11 for the 10 official domains, past dynamo's default limit of 8, beyond which it runs the
    model eagerly without a word. The limit is lowered to 1 here to stand for that; wrap_for_training raises it
    to what the domains need, so all 3 graphs compile in the first epoch and the second compiles nothing new."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    frames = count_graphs_per_epoch(monkeypatch, "train_decathlon_epoch")
    torch._dynamo.reset()
    try:
        train.main(["--model", "wrn-mtan", "--data", "synthetic-decathlon", "--tasks", "floor,walls", "--subset",
                    "20", "--batch-size", "8", "--epochs", "2", "--finetune-epochs", "0", "--eval-every", "2",
                    "--compile", "--out", str(tmp_path / "run")])
    finally:
        torch._dynamo.reset()
    assert frames == [3, 3]


def test_every_dense_model_trains_every_parameter(one_thread):
    """DDP is told find_unused_parameters for wrn-mtan only (a step trains one domain's chain): every dense model
    gives every parameter a gradient (Dense too: its official dead decoder block is left out), so DDP needs no
    search for unused parameters, which would cost a graph traversal per step."""
    for model, spec in train.MODELS.items():
        if spec.family == "wrn":
            continue
        task = ["--task", "semantic"] if spec.single_task else []
        aux = ["--aux-tasks", "edge"] if model in ("mtinet", "padnet") else []
        parser = train.build_parser()
        cfg = train.resolve_config(parser.parse_args(tiny(model) + EIGHT + task + aux), parser)
        net = train.build_model(cfg)
        outputs = net(torch.rand(2, 3, 64, 64), **({"return_aux": True} if aux else {}))  # + deep supervision
        preds, scales = outputs if aux else (outputs, [])
        (sum(p.float().sum() for p in preds.values()) + sum(p.sum() for s in scales for p in s.values())).backward()
        assert [name for name, p in net.named_parameters() if p.grad is None] == [], model


# ---- torchrun: 2 gloo processes on the CPU -----------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_rank(rank, world_size, port, argv, results):
    """One rank as torchrun starts it (its environment variables, then train.py's main), writing the result
    that main returns on this rank: rank 1 writes no file of the run, so this is how the test sees it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train.main(argv)
    assert not torch.distributed.is_initialized()  # main released the process group it joined
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_ddp_ranks_agree_and_match_a_single_process_evaluation(tmp_path):
    out, results = tmp_path / "run", tmp_path / "ranks"
    results.mkdir()
    argv = TINY + EIGHT + ["--weighting", "dwa", "--epochs", "2", "--device", "cpu", "--out", str(out)]
    torch.multiprocessing.spawn(ddp_rank, args=(2, free_port(), argv, str(results)), nprocs=2)
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]

    # Each rank trained on its own half of the data, but the DWA epoch losses are all-reduced: both ranks
    # computed the same weights for epoch 3, and they are Eq. 7 of the mean losses over all ranks (the log).
    weights = ranks[0]["next_task_weights"]
    assert ranks[1]["next_task_weights"] == weights
    log = read_log(out)
    ratio = torch.tensor([log[1]["train_loss"][t] / log[0]["train_loss"][t] for t in SYNTHETIC_TASKS])
    assert weights == pytest.approx((3 * torch.softmax(ratio / 2, dim=0)).tolist(), rel=1e-6)
    assert max(abs(w - 1) for w in weights) > 1e-4  # the ratios differ, so the weights are not all 1
    assert ranks[1]["final"] == ranks[0]["final"]  # the metric accumulators are all-reduced too

    # torchrun itself, resuming the run under DDP for a third epoch that uses those weights.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "train.py", "--resume", str(out), "--epochs", "3"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert list(log[2]["task_weights"].values()) == pytest.approx(weights, rel=1e-6)

    # The numbers the DDP run evaluated (each rank half of the val split, summed) equal eval.py in one process.
    metrics = json.loads((out / "metrics.json").read_text())["final"]
    report = evaluation.main(["--checkpoint", str(out / "last.pt"), "--device", "cpu"])["metrics"]
    for task, values in metrics.items():
        for key, value in values.items():
            assert report[task][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, key)


def test_ddp_decathlon_evaluation_equals_eval_py(tmp_path):
    """wrn-mtan under 2 gloo processes (DDP with find_unused_parameters: a step trains one domain's chain). Before
    each domain is evaluated, every rank re-estimates the shared BatchNorm statistics from the same seed-only
    batches (eval.calibrate_batchnorm: a plain DataLoader, no DistributedSampler), so the all-reduced accuracy of
    the two halves of the val split equals eval.py's in one process. Calibrating on each rank's own shard would
    evaluate each half with other statistics."""
    out, results = tmp_path / "run", tmp_path / "ranks"
    results.mkdir()
    argv = ["--model", "wrn-mtan", "--data", "synthetic-decathlon", "--tasks", "floor,walls", "--subset", "16",
            "--batch-size", "8", "--epochs", "1", "--finetune-epochs", "0", "--device", "cpu", "--out", str(out)]
    torch.multiprocessing.spawn(ddp_rank, args=(2, free_port(), argv, str(results)), nprocs=2)
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["final"] == ranks[0]["final"]
    report = evaluation.main(["--checkpoint", str(out), "--device", "cpu"])["metrics"]
    for domain, values in ranks[0]["final"].items():
        assert report[domain]["accuracy"] == values["accuracy"], domain  # counts of right answers: exact
        assert report[domain]["loss"] == pytest.approx(values["loss"], rel=1e-5), domain


# ---- CUDA only ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("model,amp,weighting", [("mtan", "bf16", "dwa"), ("mtan", "fp16", "uncertainty"),
                                                 ("mtinet", "bf16", "equal")])
def test_training_epoch_does_not_synchronise_on_cuda(model, amp, weighting, tmp_path, monkeypatch):
    """A whole epoch of train_one_epoch (batches drawn on the device, augmentation, forward, losses, backward,
    loss scaling, fused optimiser, on-device bookkeeping) under set_sync_debug_mode("error"): any blocking
    host-device call raises. The progress line reads the loss on purpose (every 5 s and at the end of the
    epoch), so it is silenced; the epoch-end reduction runs after the batches, outside the checked region."""
    if amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16 units (its default is fp16, tested by the fp16 case)")
    parser = train.build_parser()
    cfg = train.resolve_config(parser.parse_args(TINY + EIGHT + [
        "--model", model, "--amp", amp, "--weighting", weighting, "--device", "cuda", "--augment",
        "--data-on-device", "--out", str(tmp_path)]), parser)
    evaluation.configure_torch(cfg)
    run = train.setup_run(cfg)
    monkeypatch.setattr(train.Progress, "maybe_print", lambda self, step, loss: None)
    train.train_one_epoch(run, 0)  # warm-up: cuDNN autotuning, optimiser state, the scaler's first scale

    class SyncChecked(train.DeviceBatches):
        def __iter__(self):
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield from super().__iter__()
            finally:
                torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(train, "DeviceBatches", SyncChecked)
    try:
        losses = train.train_one_epoch(run, 1)  # raises on a non-finite loss
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(losses).all()


@requires_cuda
def test_bench_on_cuda_reports_mfu(capsys):
    """The same fields as on the CPU, with the GPU's defaults (bf16, or fp16 on GPUs without bf16; channels_last),
    its name, and the MFU from a given peak, or from PEAK_TFLOPS for a GPU of the table. Figures only: no speed
    is asserted."""
    result = train.main(TINY + EIGHT + ["--device", "cuda", "--bench", "3", "--peak-tflops", "0.001"])
    assert last_json_line(capsys) == result and BENCH_FIELDS <= set(result)
    assert (result["amp"], result["channels_last"]) == (evaluation.default_amp("cuda"), True)
    assert result["device"] == torch.cuda.get_device_name()
    flops = conv_flops(mtan.MTAN(SYNTHETIC_TASKS, width=0.0625), torch.rand(1, 3, 64, 64))
    expected = 3 * flops * result["batch_size"] / (result["ms_per_step"] / 1000) / 0.001e12
    assert result["mfu"] == pytest.approx(expected, rel=0.01)
    if train.peak_of_device(result["device"]):  # a GPU of the table needs no flag
        assert "mfu" in train.main(TINY + EIGHT + ["--device", "cuda", "--bench", "2"])
