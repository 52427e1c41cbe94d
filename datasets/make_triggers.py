"""Write the default trigger files under trigger/: python -m datasets.make_triggers"""
from pathlib import Path

from paper import TRIGGER_SQUARES

from .trigger import make_square_trigger, save_trigger


def main():
    root = Path(__file__).resolve().parent.parent
    for name, (image_size, start, size) in TRIGGER_SQUARES.items():
        t, tm = make_square_trigger(image_size, start, size)
        save_trigger(root / name, t, tm,
                     info=f"white {size}x{size} square at rows/cols {start}..{start + size - 1} "
                          f"of a {image_size}x{image_size} image; triggered = x * tm + t")
        print(f"wrote {root / name}")


if __name__ == "__main__":
    main()
