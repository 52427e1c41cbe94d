"""One thread against two for each stage of the demo, alone and beside a one-thread background
process: the figures behind run_pipeline.py's --threads and --jobs defaults.

    python benchmarks/threads.py                  # about 10 minutes on 2 cores; run it on a quiet machine
    python benchmarks/threads.py --out output/threads.json

Each stage runs as its script would in the demo (same widths, sizes and batch), for a shortened
schedule (--epochs), into a temporary folder; the wall time of the whole process is reported. The
background load is a one-thread process doing the same kind of work (a stage-0 epoch loop on the
same data), started before and stopped after each timed run.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import methods  # noqa: E402
from datasets import demo  # noqa: E402
from paper import TRIGGER  # noqa: E402
from pipeline.presets import DEMO  # noqa: E402


def env(threads):
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def stage_commands(work, data, epochs):
    """(name, argv) of every demo stage, shortened to `epochs`, each reading the previous one's output."""
    common = ["--data_dir", str(data), "--device", "cpu", "--seed", "100"]
    task = DEMO.tasks[0]
    clean, bad = work / "clean" / f"model_{epochs}.pth", work / "bad" / f"model_{epochs}.pth"
    return [
        ("stage 0", ["train_clean_encoder.py", "--pretraining_dataset", demo.PRETRAIN_NAME, *DEMO.clean,
                     "--epochs", str(epochs), "--batch_size", "128", "--results_dir", work / "clean"]),
        ("BadEncoder", ["train_badencoder.py", "--pretraining_dataset", demo.PRETRAIN_NAME, "--downstreamTask",
                        task.dataset, "--trigger_file", TRIGGER, "--reference_file", task.reference,
                        "--pretrained_encoder", clean, *methods.get("badencoder").presets["demo"], "--epochs", str(epochs),
                        "--batch_size", "64", "--results_dir", work / "bad"]),
        ("MIMIC", ["MIMIC.py", "--pretraining_dataset", demo.PRETRAIN_NAME, "--teacher", bad, *DEMO.mimic,
                   "--epochs", str(epochs), "--mi_epochs", "20", "--batch_size", "128", "--results_dir", work / "mimic"]),
        ("fine-tuning", ["defenses.py", "--defense", "finetune", "--suspect", bad, "--pretraining_dataset",
                         demo.PRETRAIN_NAME, *["--ratio", f"{DEMO.ratio:g}", *methods.get("finetune").presets["demo"]], "--epochs", str(epochs),
                         "--batch_size", "128", "--results_dir", work / "ft"]),
        ("evaluation", ["training_downstream_classifier.py", "--dataset", task.dataset, "--reference_label",
                        str(task.label), "--trigger_file", TRIGGER, "--encoder", bad, "--reference_file",
                        task.reference, *DEMO.downstream, "--nn_epochs", "50", "--results_dir", work / "eval"]),
    ], common


def timed(argv, common, threads, overwrite):
    cmd = [sys.executable, *map(str, argv), *common, *(["--overwrite"] if overwrite else [])]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.time() - t0


def background(data, work):
    """A one-thread stage-0 run long enough to outlast any timed run."""
    return subprocess.Popen([sys.executable, "train_clean_encoder.py", "--pretraining_dataset", demo.PRETRAIN_NAME,
                             *DEMO.clean, "--epochs", "1000", "--batch_size", "128", "--data_dir", str(data),
                             "--device", "cpu", "--results_dir", str(work / "background"), "--overwrite"],
                            cwd=ROOT, env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description="Seconds per demo stage on 1 and 2 threads, alone and beside a "
                                                 "one-thread process")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each training stage (default: 2)")
    parser.add_argument("--data_dir", default=None, help="demo data folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = Path(args.data_dir) if args.data_dir else work / "data"
        demo.make_demo_data(data, ROOT / "reference", **demo.DEFAULTS)
        commands, common = stage_commands(work, data, args.epochs)
        rows = {}
        for name, argv in commands:
            row = {}
            for load in ("alone", "beside 1 thread"):
                for threads in (1, 2):
                    other = background(data, work) if load != "alone" else None
                    try:
                        time.sleep(3 if other else 0)              # let the background process start working
                        row[f"{threads} thread(s), {load}"] = round(timed(argv, common, threads, True), 1)
                    finally:
                        if other:
                            other.kill()
                            other.wait()
            rows[name] = row
            print(f"{name:12s} " + "  ".join(f"{k}: {v:6.1f} s" for k, v in row.items()), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"epochs": args.epochs, "seconds": rows}, indent=2))


if __name__ == "__main__":
    main()
