"""Write the default trigger files under trigger/: python -m datasets.make_triggers"""
from pathlib import Path

from .trigger import make_square_trigger, save_trigger

DEFAULT_TRIGGERS = {
    "trigger_pt_white_21_10_ap_replace.npz": (32, 21, 10),
    "trigger_pt_white_173_50_ap_replace.npz": (224, 173, 50),
}


def main():
    out_dir = Path(__file__).resolve().parent.parent / "trigger"
    for name, (image_size, start, size) in DEFAULT_TRIGGERS.items():
        t, tm = make_square_trigger(image_size, start, size)
        save_trigger(out_dir / name, t, tm,
                     info=f"white {size}x{size} square at rows/cols {start}..{start + size - 1} "
                          f"of a {image_size}x{image_size} image; triggered = x * tm + t")
        print(f"wrote {out_dir / name}")


if __name__ == "__main__":
    main()
