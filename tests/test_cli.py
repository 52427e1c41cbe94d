"""Flag types: bad values are refused at parse time with one line and exit 2."""
import argparse
from pathlib import Path

import pytest

from utils import cli

ROOT = Path(__file__).resolve().parent.parent


def flag_parser():
    parser = argparse.ArgumentParser(prog="stage")
    parser.add_argument("--lr", type=cli.positive_float)
    parser.add_argument("--weight_decay", type=cli.nonnegative_float)
    parser.add_argument("--shift", type=cli.finite_float)
    parser.add_argument("--batch_size", type=cli.positive_int)
    parser.add_argument("--knn_freq", type=cli.nonnegative_int)
    parser.add_argument("--width", type=cli.positive_int)
    parser.add_argument("--seed", type=cli.seed_int)
    parser.add_argument("--ratio", type=cli.fraction)
    parser.add_argument("--momentum", type=cli.unit_interval)
    parser.add_argument("--knn_k", type=cli.int_at_least(2))
    parser.add_argument("--scale", type=cli.float_in(0, 10, hi_open=True))
    return parser


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (["--lr", "-0.1"], "argument --lr: must be a finite number > 0, got -0.1"),
    (["--lr", "fast"], "argument --lr: must be a finite number > 0, got fast"),
    (["--weight_decay=-1e-6"], "argument --weight_decay: must be a finite number >= 0, got -1e-6"),
    (["--shift", "1e400"], "argument --shift: must be a finite number, got 1e400"),
    (["--shift=-inf"], "argument --shift: must be a finite number, got -inf"),
    (["--batch_size", "0"], "argument --batch_size: must be a positive integer, got 0"),
    (["--batch_size", "1e38"], "argument --batch_size: must be a positive integer, got 1e38"),
    (["--knn_freq", "-1"], "argument --knn_freq: must be a non-negative integer, got -1"),
    (["--width", "8.5"], "argument --width: must be a positive integer, got 8.5"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got -1"),
    (["--seed", "4294967296"], "argument --seed: must be an integer from 0 to 4294967295, got 4294967296"),
    (["--ratio", "0"], "argument --ratio: must be a finite number in (0, 1], got 0"),
    (["--ratio", "1.5"], "argument --ratio: must be a finite number in (0, 1], got 1.5"),
    (["--momentum", "1"], "argument --momentum: must be a finite number in [0, 1), got 1"),
    (["--momentum", "nan"], "argument --momentum: must be a finite number in [0, 1), got nan"),
    (["--knn_k", "1"], "argument --knn_k: must be an integer >= 2, got 1"),
    (["--scale", "10"], "argument --scale: must be a finite number in [0, 10), got 10"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flag_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: stage")
    assert err[-1] == f"stage: error: {message}"


def test_good_flags_parse_to_numbers():
    args = flag_parser().parse_args(["--lr", "1e-3", "--weight_decay", "0", "--shift", "-2.5", "--batch_size", "1",
                                     "--knn_freq", "0", "--seed", "4294967295", "--ratio", "1", "--momentum", "0",
                                     "--knn_k", "2", "--scale", "0", "--width", " 8"])
    assert (args.lr, args.weight_decay, args.shift, args.batch_size, args.knn_freq, args.seed) == \
           (1e-3, 0.0, -2.5, 1, 0, 2 ** 32 - 1)
    assert (args.ratio, args.momentum, args.knn_k, args.scale, args.width) == (1.0, 0.0, 2, 0.0, 8)
    assert isinstance(args.batch_size, int) and isinstance(args.lr, float)
