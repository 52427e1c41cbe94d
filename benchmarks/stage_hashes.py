"""Hashes of what every stage computes at tiny size: the check that a refactor changed no number.

    python benchmarks/stage_hashes.py                  # prints one line per output, about 2 minutes
    python benchmarks/stage_hashes.py --out before.json
    python benchmarks/stage_hashes.py --compare before.json

Runs stage 0, BadEncoder, DRUPE, MIMIC, the three baseline defences, stage 3 and DECREE's search
on tiny seeded random data (width 4, one thread, CPU) as subprocesses, then hashes each trained
model's tensors (keys in sorted order; not the file, whose metadata may change), each
evaluation's ACC/ASR curve and each search's L1 and trigger. Two
runs of the same code give the same hashes; a refactor that keeps every number keeps them.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import methods  # noqa: E402  (the repository root is importable only now)
from paper import TRIGGER as TRIGGER_FILE  # noqa: E402

TRIGGER = str(ROOT / TRIGGER_FILE)


def make_data(root):
    """Seeded random splits in the npz layout: a pre-training set (96/32 images) and a downstream
    set (48/30, 5 classes), plus a one-image and a three-image reference of label 1."""
    rng = np.random.default_rng(0)
    for name, sizes, classes in (("tinypre", (96, 32), 10), ("tinydown", (48, 30), 5)):
        for split, n in zip(("train", "test"), sizes):
            folder = root / "data" / name
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(folder / f"{split}.npz", x=rng.integers(0, 200, (n, 32, 32, 3), dtype=np.uint8),
                     y=rng.integers(0, classes, (n, 1)))
    np.savez(root / "reference.npz", x=rng.integers(0, 200, (1, 32, 32, 3), dtype=np.uint8), y=np.array([1]))
    np.savez(root / "reference3.npz", x=rng.integers(0, 200, (3, 32, 32, 3), dtype=np.uint8), y=np.ones(3, int))


def run(args, env):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{proc.stderr[-2000:]}")


def tensor_hash(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def curve_hash(path):
    results = json.loads(Path(path).read_text())
    rows = [[r["epoch"], r["loss"], r["acc"], r["asr"], r["asr_excluding_target"]] for r in results["curve"]]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def detection_hash(folder):
    """The search's last mask and pattern parameters, its best L1 and the clean images' cosine."""
    results = json.loads((folder / "results.json").read_text())
    digest = hashlib.sha256(json.dumps([results["l1"], results["clean_cos"], results["epochs"]]).encode())
    digest.update(tensor_hash(folder / "checkpoint.pth").encode())
    return digest.hexdigest()[:16]


def stage_hashes(work):
    make_data(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["--data_dir", work / "data", "--device", "cpu", "--seed", "7"]
    out = work / "out"
    run(["train_clean_encoder.py", "--pretraining_dataset", "tinypre", "--width", "4", "--epochs", "2",
         "--batch_size", "16", "--knn_freq", "1", "--results_dir", out / "clean", *common], env)
    run(["train_badencoder.py", "--pretrained_encoder", out / "clean/model_2.pth", "--trigger_file", TRIGGER,
         "--reference_file", work / "reference.npz", "--epochs", "2", "--batch_size", "16", "--lr", "1e-2",
         "--results_dir", out / "bad", *common], env)
    run(["train_drupe.py", "--pretrained_encoder", out / "clean/model_2.pth", "--trigger_file", TRIGGER,
         "--reference_file", work / "reference3.npz", "--epochs", "3", "--batch_size", "16", "--lr", "1e-2",
         "--shadow_size", "64", "--reference_copies", "2", "--warm_up_end", "1", "--stage_1_end", "2",
         "--fix_end", "2", "--best_after", "2", "--results_dir", out / "drupe", *common], env)
    teacher = out / "bad/model_2.pth"
    run(["MIMIC.py", "--teacher", teacher, "--ratio", "0.5", "--batch_size", "16", "--epochs", "2",
         "--mi_epochs", "12", "--results_dir", out / "mimic", *common], env)
    baselines = [i for i, d in methods.defences().items() if d.script == "defenses.py"]   # the registry's
    for defense in baselines:
        run(["defenses.py", "--defense", defense, "--suspect", teacher, "--ratio", "0.5", "--batch_size", "16",
             "--epochs", "2", "--nad_teacher_epochs", "1", "--results_dir", out / defense, *common], env)
    models = {"clean": out / "clean/model_2.pth", "backdoored": teacher, "drupe": out / "drupe/model_3.pth",
              "mimic": out / "mimic/model_2.pth", **{d: out / d / "model_2.pth" for d in baselines}}
    hashes = {f"{name} weights": tensor_hash(path) for name, path in models.items()}
    mi = json.loads((out / "mimic/mi.json").read_text())
    hashes["mimic MI"] = hashlib.sha256(json.dumps([mi["mi"], mi["weights"]]).encode()).hexdigest()[:16]
    for name, path in models.items():
        run(["training_downstream_classifier.py", "--dataset", "tinydown", "--encoder", path,
             "--reference_file", work / "reference.npz", "--trigger_file", TRIGGER, "--nn_epochs", "3",
             "--results_dir", out / "eval" / name, *common], env)
        hashes[f"{name} evaluation"] = curve_hash(out / "eval" / name / "results.json")
    hashes["drupe best weights"] = tensor_hash(out / "drupe" / "model_best.pth")
    for name in ("clean", "backdoored"):
        run(["detect.py", "--encoder", models[name], "--pretraining_dataset", "tinypre", "--shadow_per_class", "3",
             "--batch_size", "16", "--epochs", "4", "--results_dir", out / "detect" / name, *common], env)
        hashes[f"{name} detection"] = detection_hash(out / "detect" / name)
    return hashes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the hashes to this JSON file")
    parser.add_argument("--compare", help="compare with the hashes of an earlier --out file; exit 1 if any differs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        hashes = stage_hashes(Path(work))
    before = json.loads(Path(args.compare).read_text()) if args.compare else {}
    for name, value in hashes.items():
        mark = "" if not before else ("  same" if before.get(name) == value else f"  DIFFERS (was {before.get(name)})")
        print(f"{name:24s} {value}{mark}")
    if args.out:
        Path(args.out).write_text(json.dumps(hashes, indent=2) + "\n")
    if before and any(before.get(k) != v for k, v in hashes.items()):
        sys.exit(1)


if __name__ == "__main__":
    main()
