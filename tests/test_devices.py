"""Devices: what a GPU user gets, checked on the CPU by pretending a GPU exists; the deterministic
stand-ins of mtan.py, mtinet.py and train.py against torch's own ops; a checkpoint evaluated on another device;
the augmentation's memory format; tests/gpu_check.py at tiny sizes. On a GPU: --deterministic resumes to the bit.

conftest.py makes every test here see a machine without CUDA unless it is marked `requires_cuda`."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import data
import eval as evaluation
import mtan
import mtinet
import train
from conftest import ROOT, TINY, requires_cuda, tiny


def resolve(*argv, model="mtan"):
    parser = train.build_parser()
    return train.resolve_config(parser.parse_args(tiny(model) + list(argv)), parser)


@pytest.fixture
def torch_flags():
    """configure_torch sets process-wide flags: put them back after the test."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:3]
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


# ---- a GPU user's configuration, without a GPU -------------------------------------------------------------


def test_a_gpu_user_gets_the_documented_configuration(monkeypatch, torch_flags):
    """What resolve_config, configure_torch, build_optimizer, make_loader and peak_tflops consult about the GPU is
    torch.cuda's answers, so answering for an H100 shows what its user gets; nothing here touches a device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cfg = resolve()
    assert (cfg["device"], cfg["amp"], cfg["channels_last"], cfg["fused"], cfg["compile"], cfg["cuda_graph"]) == \
        ("cuda", "bf16", True, True, False, True)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    evaluation.configure_torch(cfg)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark  # no autotuner: its trial workspaces would raise the peak memory
    assert not torch.are_deterministic_algorithms_enabled()
    adam = train.build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], torch.device("cuda"))
    assert adam.defaults["fused"] is True and adam.defaults["capturable"] is True  # replayable by a CUDA graph
    assert not resolve("--compile")["cuda_graph"] and not resolve("--amp", "fp16")["cuda_graph"]
    assert resolve("--compile", "--cuda-graph")["cuda_graph"]  # asked for: the compiled model inside the graph
    assert train.make_loader(range(4), cfg, 0, train=True).pin_memory  # host-to-GPU copies that do not block
    assert train.peak_tflops(cfg, torch.device("cuda")) == 989.0  # bf16 tensor cores: the MFU of --bench
    assert train.peak_tflops(resolve("--amp", "off"), torch.device("cuda")) == 494.0  # TF32
    assert evaluation.default_amp("cuda") == "bf16" and evaluation.default_amp("cpu") == "off"

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    deterministic = resolve("--deterministic")
    evaluation.configure_torch(deterministic)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's condition for repeatable products

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # V100, T4
    assert resolve()["amp"] == "fp16" and evaluation.default_amp("cuda") == "fp16"
    assert resolve("--device", "cpu")["amp"] == "off"  # the CPU's default, GPU or not


def test_peak_tflops_reads_whole_words_of_the_device_name():
    peak = train.peak_of_device
    assert peak("NVIDIA H100 80GB HBM3") == train.PEAK_TFLOPS["H100"]
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100-PCIE-40GB") == train.PEAK_TFLOPS["A100"]
    assert peak("Tesla V100-SXM2-16GB") == train.PEAK_TFLOPS["V100"]
    assert peak("NVIDIA GeForce RTX 4090") == train.PEAK_TFLOPS["4090"]
    assert peak("NVIDIA L40S") == train.PEAK_TFLOPS["L40S"] and peak("NVIDIA L4") == train.PEAK_TFLOPS["L4"]
    assert peak("NVIDIA L40") == train.PEAK_TFLOPS["L40"]  # a substring test read it as an L4
    assert peak("NVIDIA A10") == train.PEAK_TFLOPS["A10"]
    assert peak("NVIDIA A10G") is None and peak("NVIDIA RTX A6000") is None  # not in the table: no MFU


# ---- a checkpoint on another device ------------------------------------------------------------------------


def save_untrained_run(cfg, folder):
    """A checkpoint as train.py writes it, without training (eval.py only needs the configuration and weights)."""
    os.makedirs(folder, exist_ok=True)
    torch.save({"config": cfg, "model": train.build_model(cfg).state_dict(), "model_args": train.model_args(cfg)},
               os.path.join(folder, "last.pt"))
    return folder


def test_eval_rederives_amp_for_the_device_it_runs_on(tmp_path, capsys):
    def evaluated(device, amp, *flags):
        run = save_untrained_run(dict(resolve(), device=device, amp=amp), str(tmp_path / "run"))
        return evaluation.load_run(evaluation.build_parser().parse_args(["--checkpoint", run, *flags]))[0]

    # A GPU run's bf16 on this machine (no CUDA: the CPU): off, as a CPU run's default, and said so.
    assert evaluated("cuda", "bf16")["amp"] == "off"
    assert "amp off on cpu (the run trained with amp bf16 on cuda; --amp chooses)" in capsys.readouterr().out
    assert evaluated("cuda", "bf16", "--amp", "bf16")["amp"] == "bf16"  # unless asked for
    assert evaluated("cpu", "bf16")["amp"] == "bf16"  # on the device it trained on: as trained
    assert capsys.readouterr().out == ""


def test_eval_applies_the_training_settings_of_torch(tmp_path, monkeypatch):
    """Standalone eval.py configures torch as train.py does (on a GPU: the cuDNN autotuner and TF32)."""
    run = save_untrained_run(resolve(), str(tmp_path / "run"))
    seen = []
    monkeypatch.setattr(evaluation, "configure_torch", seen.append)
    evaluation.main(["--checkpoint", run, "--bench", "1"])
    assert len(seen) == 1 and seen[0]["device"] == "cpu" and seen[0]["deterministic"] is False


# ---- deterministic stand-ins -------------------------------------------------------------------------------


def test_unpooling_stand_in_gives_torchs_values_and_gradients():
    """mtan.max_unpool's GPU stand-in (device-agnostic, so run here on the CPU) gathers instead of scattering: the
    same output and gradient bits as F.max_unpool2d, in either memory format."""
    torch.manual_seed(0)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 8, 12).contiguous(memory_format=memory_format).requires_grad_()
        pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
        weight = torch.randn(2, 3, 8, 12)
        reference = F.max_unpool2d(pooled, indices, 2, 2)
        (reference_grad,) = torch.autograd.grad((reference * weight).sum(), pooled)
        out = mtan.unpool_by_gather(pooled, indices)
        (grad,) = torch.autograd.grad((out * weight).sum(), pooled)
        assert torch.equal(out, reference) and torch.equal(grad, reference_grad)


@pytest.mark.parametrize("resize", [mtan.DeterministicBilinear.apply,
                                    lambda x, size, align_corners: mtinet.DeterministicBilinear.apply(x, size)])
def test_bilinear_stand_in_is_torchs_interpolation(resize):
    """The GPU stand-in of mtan.resize_bilinear and mtinet.upsample_to (device-agnostic, so run here on the CPU)
    against F.interpolate: the same forward bits, and the gradient up to float32 rounding (measured: 2e-6 of its
    largest value), for MTAN's x2 with align_corners, MTI-Net's and DeepLab's upsampling without it (up to x32,
    deep supervision's coarsest scale), odd sizes and a downsampling, in float32 and bfloat16."""
    torch.manual_seed(0)
    mtinet_only = resize is not mtan.DeterministicBilinear.apply
    for (h, w), size, align_corners in [((6, 8), (12, 16), True), ((9, 12), (18, 24), True), ((6, 8), (24, 32), False),
                                        ((7, 5), (15, 11), False), ((12, 16), (5, 7), False), ((1, 3), (4, 4), True),
                                        ((3, 4), (96, 128), False)]:
        if mtinet_only and align_corners:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 3, h, w, dtype=dtype, requires_grad=True)
            reference = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
            out = resize(x, size, align_corners)
            assert torch.equal(out, reference)
            weight = torch.randn_like(reference)
            (expected,) = torch.autograd.grad((reference * weight).sum(), x)
            (grad,) = torch.autograd.grad((out * weight).sum(), x)
            assert grad.dtype == dtype
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: torch's own sums round to bf16 too
            assert (grad.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()


def test_cross_entropy_stand_in_is_torchs():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, requires_grad=True)
    target = torch.randint(-1, 5, (2, 6, 7))
    reference = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum")
    out = train.deterministic_cross_entropy_sum(logits, target)
    assert out.item() == pytest.approx(reference.item(), rel=1e-6)
    grads = [torch.autograd.grad(value, logits)[0] for value in (reference, out)]
    assert torch.allclose(*grads, atol=1e-6)
    assert train.deterministic_cross_entropy_sum(logits, torch.full((2, 6, 7), -1)).item() == 0


def test_global_pool_is_adaptive_average_pooling():
    x = torch.randn(2, 4, 5, 7)
    assert torch.equal(mtan.GlobalAveragePool()(x), torch.nn.AdaptiveAvgPool2d(1)(x))
    assert torch.allclose(x.mean((2, 3), keepdim=True), torch.nn.AdaptiveAvgPool2d(1)(x), atol=1e-6)  # its GPU path


# ---- the augmentation's memory format ----------------------------------------------------------------------


def test_augmented_batches_stay_channels_last(tmp_path):
    """to_device makes the image channels_last; the augmentation's gathers return NCHW, so prepare_batch
    restores the layout (the values are those of augment_batch)."""
    cfg = resolve("--augment", "--out", str(tmp_path))
    run = train.setup_run(cfg)
    batch = next(iter(train.make_loader(run.train_set, cfg, 0, train=True)))
    prepared = train.prepare_batch(run, batch, torch.Generator().manual_seed(0))
    assert prepared["image"].is_contiguous(memory_format=torch.channels_last)
    plain = data.augment_batch(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prepared["image"], plain["image"]) and torch.equal(prepared["depth"], plain["depth"])


# ---- the prepared GPU check --------------------------------------------------------------------------------


def test_gpu_check_runs_at_tiny_sizes_on_the_cpu(tmp_path):
    """tests/gpu_check.py's every step (the CUDA tests' selection, the training and evaluation benchmarks, the
    profile, the table), at tiny sizes on the CPU, so that the script works when a GPU arrives."""
    done = subprocess.run([sys.executable, os.path.join("tests", "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--profile", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("| model | settings"))):]
    assert len(table) == 2 + 11  # header, rule, 9 training rows (MTAN: 5 settings, MTI-Net: 4), 2 evaluations
    assert "requires_cuda tests:" in done.stdout and "deselected" in open(tmp_path / "pytest.txt").read()
    rows = [json.loads(line) for line in open(tmp_path / "gpu_check.jsonl")]  # written row by row
    assert [r["settings"] for r in rows[:5]] == ["default", "fp32", "eager", "baseline", "deterministic"]
    assert [r["kind"] for r in rows[-2:]] == ["eval", "eval"] and all(r["images_per_s"] > 0 for r in rows)
    assert rows[-1]["images"] == 4 and rows[-1]["resolution"] == "64x64"  # the NYUv2-size row, at tiny size
    # profiled: the defaults only (on a CPU there are no GPU kernels to count)
    assert rows[0]["kernels_per_step"] == 0 and not rows[1].get("top_kernels")


# ---- CUDA --------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("model,extra", [("split", ["--amp", "off"]), ("mtan", ["--amp", "fp16", "--augment"]),
                                         ("mtinet", ["--aux-tasks", "edge", "--data-on-device"])])
def test_deterministic_resume_is_exact_on_cuda(model, extra, tmp_path):
    """--deterministic on a GPU: 2 epochs straight against 1 + a resumed 1 give the same weights, loss scale and
    log to the last bit. This holds only if every kernel of the run is deterministic, so the test also fails when
    torch warns that an op has no deterministic implementation (the stand-ins of max-unpooling, bilinear resizing
    and the 2-D cross entropy exist to avoid exactly that). It compares two runs on the same GPU, nothing else."""
    # --eval-every 1: the straight run evaluates epoch 1 as the 1-epoch run does, so the two logs can be compared
    flags = tiny(model) + ["--device", "cuda", "--deterministic", "--seed", "3", "--eval-every",
                    "1"] + extra
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(flags + ["--epochs", "2", "--out", straight])
        train.main(flags + ["--epochs", "1", "--out", split])
        train.main(["--resume", split, "--epochs", "2"])
    flagged = [str(w.message) for w in caught if "deterministic" in str(w.message)]
    assert not flagged, flagged
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (straight, split))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["scaler"] == b["scaler"]

    def untimed(folder):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(f"{folder}/log.jsonl")]

    assert untimed(straight) == untimed(split)


@requires_cuda
@pytest.mark.parametrize("model,extra", [("mtan", ["--weighting", "dwa"]),
                                         ("mtinet", ["--aux-tasks", "edge", "--weighting", "uncertainty"])])
def test_cuda_graph_step_equals_the_eager_step(model, extra, torch_flags):
    """train.CudaGraphStep replays the recorded step: the same batches through it and through eager steps, with a
    learning-rate change and a smaller batch between the replays, give the same losses and weights to the bit
    (deterministic kernels, so both sides run the same arithmetic in the same order)."""
    outcomes = []
    for graph in ("--cuda-graph", "--no-cuda-graph"):
        cfg = resolve("--device", "cuda", "--deterministic", "--amp", "off", "--subset", "8",
                      graph, *extra, model=model)
        evaluation.configure_torch(cfg)
        run = train.setup_run(cfg)
        batches = [train.prepare_batch(run, b, None) for b in train.make_loader(run.train_set, cfg, 0, train=True)]
        losses, step = [], run.graph or (lambda batch: train.training_step(run, batch))
        for i in range(9):
            if i == 6:
                train.set_learning_rate(run.optimizer, dict(cfg, lr=3e-3), 0)
            batch = {k: v[:1] for k, v in batches[0].items()} if i == 7 else batches[i % len(batches)]
            losses.append(step(batch).clone())
        outcomes.append((torch.stack(losses), run.model.state_dict(), run.graph is not None))
    (graph_losses, graph_weights, graphed), (eager_losses, eager_weights, eager_graphed) = outcomes
    assert graphed and not eager_graphed
    assert torch.equal(graph_losses, eager_losses)
    for key in eager_weights:
        assert torch.equal(graph_weights[key], eager_weights[key]), key
