"""The first session on a GPU, prepared: `python tests/gpu_check.py` (a few minutes on one GPU; synthetic data,
nothing to download). pytest does not collect this file (its name does not start with test_).

1. The CUDA tests: `python -m pytest -m requires_cuda tests` (no host sync in the training step, CUDA metrics and
   augmentation equal the CPU's, --deterministic resumes to the bit, --bench's MFU).
2. train.py --bench for MTAN at 288x384 (NYUv2's size) with batch 2 (the paper's) and 16, and MTI-Net with edges
   as auxiliary task at 480x640 (NYUD's size) with batch 8: each with the defaults and against the plain eager
   fp32 baseline of the official loops (--amp off --no-channels-last --sync-every-step --no-fused), and for
   batch 2 and MTI-Net with --deterministic, to measure what the flag costs.
3. eval.py --bench: the quickstart MTAN (one short epoch of training first) over 200 val scenes.
4. One markdown table of it all, for the README's performance section, and gpu_check.json in --out.

`python tests/gpu_check.py --device cpu --tiny` runs every step at tiny sizes on the CPU (tests/test_devices.py
does, so the script cannot rot before a GPU arrives). The exit status is non-zero when a step failed."""
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

import eval as evaluation  # noqa: E402
import train  # noqa: E402

SETTINGS = {
    "default": [],
    # the official training loops: fp32 in NCHW, the per-parameter optimiser loop, every loss read every step
    "baseline": ["--amp", "off", "--no-channels-last", "--sync-every-step", "--no-fused"],
    # the price of --deterministic: deterministic kernels and the stand-ins of mtan.py, mtinet.py, eval.py
    "deterministic": ["--deterministic"],
}
MTAN = ["--model", "mtan", "--width", "1"]
MTINET = ["--model", "mtinet", "--aux-tasks", "edge"]
ALL, FAST = ("default", "baseline", "deterministic"), ("default", "baseline")
# (name, flags, --bench steps, settings): the sizes of the README's GPU rows, and the same steps at tiny sizes
BENCHES = {
    "full": [("MTAN", MTAN + ["--resolution", "288x384", "--batch-size", "2"], 20, ALL),
             ("MTAN", MTAN + ["--resolution", "288x384", "--batch-size", "16"], 10, FAST),
             ("MTI-Net + edge aux", MTINET + ["--resolution", "480x640", "--batch-size", "8"], 10, ALL)],
    "tiny": [("MTAN", ["--model", "mtan", "--width", "0.0625", "--resolution", "64x64", "--batch-size", "2"], 2, ALL),
             ("MTAN", ["--model", "mtan", "--width", "0.0625", "--resolution", "64x64", "--batch-size", "4"], 2, FAST),
             ("MTI-Net + edge aux", MTINET + ["--resolution", "64x64", "--batch-size", "2"], 2, ALL)],
}
# the quickstart (MTAN, width 0.25, 96x128, batch 8) trained for one short epoch, then its val split timed
EVALUATION = {"full": (["--subset", "16"], ["--subset", "200", "--bench", "3"]),
              "tiny": (["--subset", "4", "--resolution", "64x64", "--width", "0.0625", "--batch-size", "2"],
                       ["--subset", "4", "--bench", "2"])}


def cuda_tests(device):
    """Step 1 in a fresh process. On a CPU every selected test is skipped: what is checked is that the selection
    still finds them."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "requires_cuda", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    print(f"requires_cuda tests: {summary}", flush=True)
    if device == "cpu":
        ok = done.returncode == 0 and " skipped" in summary and "passed" not in summary
    else:
        ok = done.returncode == 0 and " passed" in summary
    if not ok:
        print(done.stdout[-5000:] + done.stderr[-2000:])
    return ok


def released(device):
    torch.use_deterministic_algorithms(False)  # a --deterministic row turned it on for the whole process
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_rows(device, size):
    rows, ok = [], True
    for name, flags, steps, settings_of_size in BENCHES[size]:
        for settings in settings_of_size:
            argv = ["--data", "synthetic", "--subset", "64", "--device", device, "--bench", str(steps)] + flags + \
                SETTINGS[settings]
            try:
                result = train.main(argv)
            except Exception as e:  # noqa: BLE001 (an out-of-memory batch must not hide the other rows)
                print(f"FAILED: train.py {' '.join(argv)}: {type(e).__name__}: {e}", flush=True)
                result, ok = {"error": f"{type(e).__name__}"}, False
            rows.append({"kind": "train", "name": name, "settings": settings, "argv": argv, **result})
            released(device)
    return rows, ok


def eval_row(device, size, out):
    train_flags, eval_flags = EVALUATION[size]
    run = os.path.join(out, "quickstart")
    try:
        train.main(["--data", "synthetic", "--epochs", "1", "--device", device, "--out", run] + train_flags)
        result = evaluation.main(["--checkpoint", run, "--device", device] + eval_flags)
        ok = True
    except Exception as e:  # noqa: BLE001
        print(f"FAILED: the evaluation benchmark: {type(e).__name__}: {e}", flush=True)
        result, ok = {"error": type(e).__name__}, False
    released(device)
    return {"kind": "eval", "name": "MTAN quickstart (eval)", "settings": "default", **result}, ok


def table(rows):
    lines = ["| model | settings | batch | resolution | images/s | ms/step | peak memory (MB) | MFU | vs baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    baseline = {}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['settings']} | | | failed: {row['error']} | | | | |")
            continue
        key = (row["name"], row["batch_size"], row["resolution"])
        if row["settings"] == "baseline":
            baseline[key] = row["images_per_s"]
        ms = row.get("ms_per_step", "-")  # the evaluation row times whole passes (images/s says it all)
        mfu = f"{100 * row['mfu']:.1f} %" if "mfu" in row else "-"
        lines.append(f"| {row['name']} | {row['settings']} | {row['batch_size']} | {row['resolution']} | "
                     f"{row['images_per_s']} | {ms} | {row['peak_mem_mb']} | {mfu} | |")
    for i, row in enumerate(rows):  # the defaults' speed-up, once both rows of a size are in
        key = (row["name"], row.get("batch_size"), row.get("resolution"))
        if row["settings"] != "baseline" and key in baseline and "error" not in row:
            lines[2 + i] = lines[2 + i][:-1] + f"{row['images_per_s'] / baseline[key]:.2f}x |"
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: check the steps, not the speed")
    parser.add_argument("--out", help="folder for the evaluation's run and gpu_check.json (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here (`--device cpu --tiny` checks the steps on the CPU)")
    out = args.out or tempfile.mkdtemp(prefix="gpu_check-")
    os.makedirs(out, exist_ok=True)
    size = "tiny" if args.tiny else "full"
    start = time.time()
    tests_ok = cuda_tests(args.device)
    rows, benches_ok = bench_rows(args.device, size)
    row, eval_ok = eval_row(args.device, size, out)
    rows.append(row)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(rows, f, indent=1)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, {time.time() - start:.0f} s (synthetic data; baseline: "
          f"{' '.join(SETTINGS['baseline'])}; the evaluation row: one pass over the split with its metrics)\n")
    print(table(rows))
    if not (tests_ok and benches_ok and eval_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
