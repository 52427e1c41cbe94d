"""The demo's shipped clean encoder: stage 0 of the demo preset (seed 100), trained once and kept in
pretrained/ so that `python run_pipeline.py` starts at stage 1. run_pipeline.py --train_clean
trains stage 0 in the run instead, as any other preset does.

Rebuild it (about 10 minutes on one CPU thread; the bytes depend on the torch build):

    python -m pipeline.pretrained

This runs train_clean_encoder.py with the demo preset's stage-0 flags on the demo data, keeps the
final checkpoint without its optimizer state (which nothing downstream reads) and writes its
sha256 next to it in demo_clean.json, which every run checks before using the file.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from datasets import demo
from utils.cli import run_cli
from utils.errors import UserError
from utils.files import atomic_write
from utils.fingerprint import file_hash

ROOT = Path(__file__).resolve().parent.parent
DEMO_CLEAN = ROOT / "pretrained" / "demo_clean.pth"
RECORD_SUFFIX = ".json"                  # demo_clean.json: its sha256, the command that made it
SEED = 100
KEEP_OUT = ("optimizer",)                # checkpoint entries the shipped file leaves out
REBUILD = "python -m pipeline.pretrained"


def record_path(path):
    return Path(path).with_suffix(RECORD_SUFFIX)


def verified(path=DEMO_CLEAN):
    """The shipped encoder's path once its bytes match the sha256 of its record; a UserError saying
    how to rebuild it (or to train stage 0 in the run) otherwise."""
    path, record = Path(path), record_path(path)
    fix = f"rebuild it with `{REBUILD}`, or pass --train_clean to train stage 0 in this run"
    if not path.is_file() or not record.is_file():
        missing = path if not path.is_file() else record
        raise UserError(f"the demo's shipped clean encoder is incomplete: {missing} is missing; {fix}")
    try:
        expected = json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        expected = None
    if not (isinstance(expected, str) and re.fullmatch(r"[0-9a-f]{64}", expected)):
        raise UserError(f"{record} is unreadable or holds no sha256 (64 hex digits); {fix}")
    found = file_hash(path)
    if found != expected:
        raise UserError(f"{path} does not match its checksum in {record} (sha256 {found[:12]}..., expected "
                        f"{expected[:12]}...; a git LFS pointer or a damaged copy?); {fix}")
    return str(path)


def shipped_clean(preset, pretraining, train_clean):
    """The preset's shipped clean encoder, checked against its checksum, when the run pre-trains on
    the preset's own dataset and --train_clean is not given; None (stage 0 runs) otherwise."""
    if train_clean or preset.shipped_clean is None or pretraining != preset.pretraining:
        return None
    return verified(preset.shipped_clean)


def ship(checkpoint, path, command):
    """Write `checkpoint` (a stage-0 model file) to `path` without KEEP_OUT, and its record."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in KEEP_OUT:
        state.pop(key, None)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    record = {"sha256": file_hash(path), "command": command, "seed": SEED, "torch": torch.__version__,
              "left_out": list(KEEP_OUT)}
    atomic_write(record_path(path), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return record


def rebuild_command(data_dir, results_dir):
    """The stage-0 command of the demo preset that makes the shipped encoder."""
    from pipeline.presets import DEMO          # the preset names this module's file
    from pipeline.plan import CLEAN_SCRIPT
    return [CLEAN_SCRIPT, "--pretraining_dataset", demo.PRETRAIN_NAME, *DEMO.clean,
            "--batch_size", str(DEMO.global_batch["clean"]), "--seed", str(SEED), "--data_dir", str(data_dir),
            "--results_dir", str(results_dir)]


def get_parser():
    parser = argparse.ArgumentParser(description="Rebuild the demo's shipped clean encoder (pretrained/).")
    parser.add_argument("--data_dir", default="data", help="where the demo data is, made if missing (default: data)")
    parser.add_argument("--out", default=str(DEMO_CLEAN), help=f"file to write (default: {DEMO_CLEAN})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of stage 0 (default: 1)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(args):
    data_dir = Path(args.data_dir).resolve()
    demo.make_demo_data(data_dir, ROOT / "reference", **demo.DEFAULTS)
    with tempfile.TemporaryDirectory() as tmp:
        command = rebuild_command(data_dir, tmp)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        print("$ " + " ".join(command), flush=True)
        if subprocess.run([sys.executable, *command], cwd=ROOT, env=env).returncode:
            raise UserError("stage 0 failed (output above); the shipped encoder is unchanged")
        model = sorted(Path(tmp).glob("model_*.pth"), key=lambda p: int(p.stem.split("_")[1]))[-1]
        shown = [c if not c.startswith(str(data_dir)) and c != tmp else "<dir>" for c in command]
        record = ship(model, args.out, shown)
    print(f"wrote {args.out} (sha256 {record['sha256']}) and {record_path(args.out)}")


if __name__ == "__main__":
    run_cli(main, get_parser())
