"""Draw the figures of a results folder: one written by run_pipeline.py, or by one stage script.

    python plot_results.py output/demo
    python plot_results.py output/cifar10/mimic        # the folder of MIMIC.py --results_dir

Reads the folder's summary.json (or those of its seed_*/ subfolders for a multi-seed run), the
log.jsonl and mi.json of the folder itself and of each stage folder in it, and the eval/ curves;
writes PNGs to <results_dir>/figures/ and prints their paths. Whatever is absent (a stage not yet
run, no mi.json) is skipped.
"""
import argparse
import sys
from pathlib import Path

from report.figures import plot_results


def get_parser():
    parser = argparse.ArgumentParser(description="Figures of a results folder")
    parser.add_argument("results_dir", help="folder written by run_pipeline.py (e.g. output/demo, or one "
                                            "holding seed_* subfolders), or the --results_dir of one stage")
    return parser


def main(args):
    if not Path(args.results_dir).is_dir():
        print(f"error: no results folder at {args.results_dir}", file=sys.stderr)
        return 2
    written = plot_results(args.results_dir)
    for path in written:
        print(path)
    if not written:
        print(f"nothing to plot in {args.results_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_parser().parse_args()))
