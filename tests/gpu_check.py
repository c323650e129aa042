"""The GPU session, prepared: `python tests/gpu_check.py --profile --out DIR` (one GPU, synthetic data, nothing to
download). pytest does not collect this file (its name does not start with test_).

1. The CUDA tests: `python -m pytest -m requires_cuda tests`, pytest's whole output kept in DIR/pytest.txt.
2. train.py --bench for the README's GPU rows: MTAN at 288x384 (NYUv2's size) with batch 2 (the paper's) and 16,
   MTI-Net at 480x640 (NYUD's size) with batch 8 and NYUD's tasks (semantic, depth), each with the defaults, in
   fp32 NCHW, without the CUDA graph (`--no-cuda-graph`) and as the official loops run (the baseline: fp32 NCHW,
   per-parameter Adam, every loss read every step, no graph); batch 2 also with --deterministic.
3. --profile: the defaults of each row under torch.profiler (a schedule: 2 steps skipped, 5 recorded), the GPU's
   busy time per step (the sum of its kernels) against the step's time, and the top kernels.
4. --official BENCH_DIR: the official models of the same rows, timed by BENCH_DIR/bench.py (REF_MTAN_DIR and
   REF_MTL_DIR name the official snapshots, see that folder's README).
5. eval.py --bench: the quickstart MTAN (one short epoch of training first) over 200 val scenes.
6. The evaluation at the size of NYUv2's val split (654 images at 288x384): MTAN at width 1 through `evaluate`
   with all the metrics of its three tasks, the scenes rendered on the device beforehand (as NYUv2's arrays
   would be held in memory), so that the time is the evaluation's alone.
`--all-tests` runs the README's whole test command in step 1 instead of the CUDA tests only; `--with-compile` adds
`--compile` rows (torch.compile, inductor; alone and inside the CUDA graph) to each model.
Every row goes to DIR/gpu_check.jsonl as soon as it is measured, so a cut run keeps what it had; the end prints
one markdown table. `python tests/gpu_check.py --device cpu --tiny` runs every step at tiny sizes on the CPU
(tests/test_devices.py does, so the script cannot rot between GPU sessions). The exit status is non-zero when
a step failed."""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import data  # noqa: E402
import eval as evaluation  # noqa: E402
import train  # noqa: E402

SETTINGS = {
    "default": [],
    "fp32": ["--amp", "off", "--no-channels-last"],  # the official precision and layout, with our step
    "eager": ["--no-cuda-graph"],  # what the CUDA graph of the step buys
    # the official training loops: fp32 in NCHW, the per-parameter optimiser loop, every loss read every step
    "baseline": ["--amp", "off", "--no-channels-last", "--sync-every-step", "--no-fused", "--no-cuda-graph"],
    # the price of --deterministic: deterministic kernels and the stand-ins of mtan.py, mtinet.py, eval.py
    "deterministic": ["--deterministic"],
    "compile": ["--compile"],  # torch.compile of the model (inductor) in place of the CUDA graph: --with-compile
    "compile+graph": ["--compile", "--cuda-graph"],  # and both: the compiled kernels replayed as one graph
}
MTAN = ["--model", "mtan", "--width", "1", "--weighting", "equal"]  # the official script's equal weighting
MTINET = ["--model", "mtinet", "--tasks", "semantic,depth"]  # NYUD's tasks, as the official NYUD config
ALL, FAST = ("default", "fp32", "eager", "baseline", "deterministic"), ("default", "fp32", "eager", "baseline")
# (name, flags, --bench steps, settings, the official bench.py case): the README's GPU rows, and tiny sizes
BENCHES = {
    "full": [("MTAN", MTAN + ["--resolution", "288x384", "--batch-size", "2"], 20, ALL, "mtan_b2_288x384_train"),
             ("MTAN", MTAN + ["--resolution", "288x384", "--batch-size", "16"], 20, FAST, "mtan_b16_288x384_train"),
             ("MTI-Net", MTINET + ["--resolution", "480x640", "--batch-size", "8"], 20, FAST,
              "mtinet_b8_480x640_train")],
    "tiny": [("MTAN", ["--model", "mtan", "--width", "0.0625", "--resolution", "64x64", "--batch-size", "2"], 2,
              ALL, None),
             ("MTI-Net", MTINET + ["--resolution", "64x64", "--batch-size", "2"], 2, FAST, None)],
}
# the quickstart (MTAN, width 0.25, 96x128, batch 8) trained for one short epoch, then its val split timed
EVALUATION = {"full": (["--subset", "16"], ["--subset", "200", "--bench", "3"]),
              "tiny": (["--subset", "4", "--resolution", "64x64", "--width", "0.0625", "--batch-size", "2"],
                       ["--subset", "4", "--bench", "2"])}
# step 6: (flags of MTAN at NYUv2's size, the number of val images); the evaluation's batch is the flag's
NYUV2_VAL = {"full": (["--width", "1", "--resolution", "288x384", "--batch-size", "8"], 654),
             "tiny": (["--width", "0.0625", "--resolution", "64x64", "--batch-size", "2"], 4)}


def cuda_tests(device, out, every_test=False):
    """Step 1 in a fresh process, its whole output in out/pytest.txt. On a CPU every selected test is skipped:
    what is checked is that the selection still finds them. `every_test`: the whole suite, CUDA present."""
    selection = [] if every_test else ["-m", "requires_cuda"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *selection, "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    with open(os.path.join(out, "pytest.txt"), "w") as f:
        f.write(done.stdout + done.stderr)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    print(f"requires_cuda tests: {summary} (the whole output: {out}/pytest.txt)", flush=True)
    if device == "cpu" and not every_test:
        return done.returncode == 0 and " skipped" in summary and "passed" not in summary
    return done.returncode == 0 and " passed" in summary


def record(out, row):
    """Append one measured row to out/gpu_check.jsonl at once: a run cut short keeps every finished row."""
    with open(os.path.join(out, "gpu_check.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def released(device):
    torch.use_deterministic_algorithms(False)  # a --deterministic row turned it on for the whole process
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def attempt(what, measure):
    """measure() -> (its row, True), or ({"error": ...}, False) when it failed: an out-of-memory batch, or a user
    error that train.py or eval.py ends with SystemExit, marks its own row failed while the other rows go on."""
    try:
        return measure(), True
    except (Exception, SystemExit) as e:  # noqa: BLE001 (SystemExit is not an Exception)
        print(f"FAILED: {what}: {type(e).__name__}: {e}", flush=True)
        return {"error": type(e).__name__}, False


def bench_rows(device, size, out, profile, official, with_compile=False):
    rows, ok = [], True
    for name, flags, steps, settings_of_size, case in BENCHES[size]:
        settings_of_size += ("compile", "compile+graph") if with_compile else ()
        if official and case:
            rows.append(record(out, official_row(name, case, official)))
        for settings in settings_of_size:
            run_flags = ["--data", "synthetic", "--subset", "64", "--device", device] + flags + SETTINGS[settings]
            argv = run_flags + ["--bench", str(steps)]
            profiling = profile and settings == "default"
            result, row_ok = attempt(f"train.py {' '.join(argv)}", lambda: {
                **train.main(argv), **(profiled(run_flags) if profiling else {})})
            ok = ok and row_ok
            rows.append(record(out, {"kind": "train", "name": name, "settings": settings, "argv": argv, **result}))
            released(device)
    return rows, ok


def profiled(run_flags, skipped=2, recorded=5):
    """The GPU's busy time per step (the sum of its kernels' times) and the top kernels of `recorded` training
    steps, under torch.profiler with a schedule (a few steps only: key_averages over many steps is slow)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    parser = train.build_parser()
    cfg = train.resolve_config(parser.parse_args(run_flags + ["--out", tempfile.mkdtemp()]), parser)
    run = train.setup_run(cfg)
    loader = train.make_loader(run.train_set, cfg, 0, train=True)
    batches = [train.prepare_batch(run, batch, None) for batch, _ in zip(loader, range(4))]
    step = run.graph or (lambda batch: train.training_step(run, batch))  # as train.train_one_epoch steps
    for i in range(5):  # warm-up (and the CUDA graph's recording)
        step(batches[i % len(batches)])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=skipped, active=recorded)) as prof:
        for i in range(skipped + recorded):
            step(batches[i % len(batches)])
            prof.step()
    train.evaluation.synchronize(run.device)
    device_time = lambda e: getattr(e, "self_device_time_total", 0)  # noqa: E731
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and
               not e.key.startswith("ProfilerStep")]  # the step's own marker spans the whole step: not a kernel
    kernels.sort(key=device_time, reverse=True)
    return {"gpu_busy_ms_per_step": round(sum(map(device_time, kernels)) / 1000 / recorded, 2),
            "kernels_per_step": sum(e.count for e in kernels) // recorded,
            "top_kernels": [(e.key[:80], round(device_time(e) / 1000 / recorded, 2)) for e in kernels[:8]]}


def official_row(name, case, folder):
    """The official model of a row, timed by the official-code bench (BENCH_DEVICE=cuda, its RESULT line)."""
    folder = os.path.abspath(folder)  # bench.py runs inside it
    done = subprocess.run([sys.executable, os.path.join(folder, "bench.py"), case], cwd=folder, text=True,
                          capture_output=True, env=dict(os.environ, BENCH_DEVICE="cuda"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"kind": "official", "name": name, "settings": "official", "error": done.stderr[-300:]}
    result = json.loads(lines[-1][len("RESULT "):])
    return {"kind": "official", "name": name, "settings": "official", "batch_size": result["batch"],
            "resolution": "x".join(map(str, result["input"][1:])), "ms_per_step": result["ms_per_step_median"],
            "images_per_s": result["images_per_s"], "peak_mem_mb": result["peak_cuda_mb"]}


def eval_row(device, size, out):
    train_flags, eval_flags = EVALUATION[size]
    run = os.path.join(out, "quickstart")

    def train_then_time():
        train.main(["--data", "synthetic", "--epochs", "1", "--device", device, "--out", run] + train_flags)
        return evaluation.main(["--checkpoint", run, "--device", device] + eval_flags)

    result, ok = attempt("the evaluation benchmark", train_then_time)
    released(device)
    return {"kind": "eval", "name": "MTAN quickstart (eval)", "settings": "default", **result}, ok


def nyuv2_val_row(device, size):
    """Step 6: the median of 3 passes of `evaluate` over NYUv2's val size after a one-batch warm-up. The model is
    untrained (the time does not depend on the weights); the scenes are rendered on the device first."""
    flags, images = NYUV2_VAL[size]
    parser = train.build_parser()
    cfg = train.resolve_config(parser.parse_args(["--model", "mtan", "--device", device] + flags), parser)
    evaluation.configure_torch(cfg)
    device = torch.device(device)
    layout = torch.channels_last if cfg["channels_last"] else torch.preserve_format
    model = train.build_model(cfg).to(device, memory_format=layout).eval()
    scenes, batch = data.SyntheticScenes("val", images, cfg["resolution"]), cfg["batch_size"]
    split = [scenes.render_batch(range(i, min(i + batch, images)), device) for i in range(0, images, batch)]
    run = lambda batches: evaluation.evaluate(model, batches, cfg["tasks"], device, cfg["amp"],  # noqa: E731
                                              cfg["channels_last"])  # ends by reading the metrics
    run(split[:1])  # warm-up
    seconds = evaluation.DeviceClock(device).median_seconds(lambda _: run(split), 3)
    return {"kind": "eval", "name": "MTAN eval, NYUv2 val size", "settings": "default", "images": images,
            "seconds_per_pass": round(seconds, 3), "images_per_s": round(images / seconds, 2),
            **evaluation.speed_fields(cfg, device, split[0]["image"])}


def table(rows):
    """One markdown table; "speed-up" against the official code's row of the same size, else the baseline's."""
    lines = ["| model | settings | batch | resolution | images/s | ms/step | GPU busy | peak memory (MB) | MFU | "
             "speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    reference = {}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['settings']} | | | failed: {row['error']} | | | | | |")
            continue
        key = (row["name"], row["batch_size"], row["resolution"])
        if row["settings"] == "official" or (row["settings"] == "baseline" and key not in reference):
            reference[key] = row["images_per_s"]
        ms = row.get("ms_per_step") or f"{row['seconds_per_pass']} s a pass"  # the evaluation rows time passes
        mfu = f"{100 * row['mfu']:.1f} %" if "mfu" in row else "-"
        busy = f"{100 * row['gpu_busy_ms_per_step'] / ms:.0f} %" if row.get("gpu_busy_ms_per_step") else "-"
        speed_up = f"{row['images_per_s'] / reference[key]:.2f}x" if key in reference else ""
        lines.append(f"| {row['name']} | {row['settings']} | {row['batch_size']} | {row['resolution']} | "
                     f"{row['images_per_s']} | {ms} | {busy} | {row['peak_mem_mb']} | {mfu} | {speed_up} |")
    return "\n".join(lines)


def main(argv=None):
    parser = evaluation.ArgumentParser(description=__doc__.split("\n\n")[0])  # train.py's one-line errors
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: check the steps, not the speed")
    parser.add_argument("--out", type=evaluation.text, help="a new or empty folder for gpu_check.jsonl, pytest.txt "
                        "and the evaluation's run, as train.py --out (default: a new temporary one)")
    parser.add_argument("--profile", action="store_true", help="profile the defaults of each row (GPU busy time)")
    parser.add_argument("--with-compile", action="store_true", help="also --compile rows of each model, with and "
                        "without the CUDA graph (each compiles for a minute or so)")
    parser.add_argument("--all-tests", action="store_true", help="step 1 runs the whole suite, not the CUDA tests")
    parser.add_argument("--official", metavar="BENCH_DIR", type=evaluation.text,
                        help="also time the official models with BENCH_DIR/bench.py")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (`--device cpu --tiny` checks the steps on the CPU)")
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs the GPU rows' full sizes for many minutes and times nothing the README "
                     "reports: add --tiny to check the steps")
    out = args.out or tempfile.mkdtemp(prefix="gpu_check-")
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        parser.error(f"--out {out}: not a new or empty folder (a second check would mix its rows into "
                     f"{out}/gpu_check.jsonl); choose another")
    os.makedirs(out, exist_ok=True)
    size = "tiny" if args.tiny else "full"
    start = time.time()
    tests_ok = cuda_tests(args.device, out, args.all_tests)
    rows, benches_ok = bench_rows(args.device, size, out, args.profile, args.official,
                                    args.with_compile)
    row, eval_ok = eval_row(args.device, size, out)
    rows.append(record(out, row))
    row, nyuv2_ok = attempt("the evaluation at NYUv2's val size", lambda: nyuv2_val_row(args.device, size))
    rows.append(record(out, {"kind": "eval", "name": "MTAN eval, NYUv2 val size", "settings": "default", **row}))
    released(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, {time.time() - start:.0f} s (synthetic data; baseline: "
          f"{' '.join(SETTINGS['baseline'])}; the evaluation row: one pass over the split with its metrics)\n")
    print(table(rows))
    if not (tests_ok and benches_ok and eval_ok and nyuv2_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
