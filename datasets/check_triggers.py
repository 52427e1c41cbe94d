"""Check the default trigger files under trigger/: python -m datasets.check_triggers

They are BadEncoder's released files, byte for byte (trigger/README.md): each must have the md5 in
paper.RELEASED_TRIGGERS and hold the white square it describes. Nothing is rewritten; an altered or
missing file is restored with git checkout trigger/.
"""
import hashlib
import sys
from pathlib import Path

import numpy as np

from paper import RELEASED_TRIGGERS

from .trigger import load_trigger, make_square_trigger


def problems(root):
    """One line per default trigger file under root that is missing, altered or not its square."""
    found = []
    for name, (image_size, start, side, md5) in RELEASED_TRIGGERS.items():
        path = Path(root) / name
        if not path.is_file():
            found.append(f"{name}: missing")
            continue
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != md5:
            found.append(f"{name}: md5 {digest}, the released file has {md5}")
            continue
        t, tm = make_square_trigger(image_size, start, side)
        loaded = load_trigger(path, (image_size, image_size))
        if not (np.array_equal(loaded[0], t[0]) and np.array_equal(loaded[1], tm[0])):
            found.append(f"{name}: not the white {side}x{side} square at {start}")
    return found


def main():
    root = Path(__file__).resolve().parent.parent
    found = problems(root)
    for line in found:
        print(f"error: {line}; restore it with git checkout trigger/", file=sys.stderr)
    if not found:
        print(f"{len(RELEASED_TRIGGERS)} trigger files: md5 ok")
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main())
