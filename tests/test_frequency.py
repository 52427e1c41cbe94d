"""The CTRL frequency trigger: the DCT and YUV pieces against hand formulas, and the trigger's coefficients."""
import math

import numpy as np
import pytest
import torch

from datasets.frequency import (CTRL_CHANNELS, CTRL_MAGNITUDE, CTRL_POSITIONS, CTRL_WINDOW, _trigger_float,
                                dct2_windows, dct_matrix, frequency_trigger, idct2_windows, rgb_to_yuv, yuv_to_rgb)


def hand_dct2(block):
    """2-D DCT-II of a square block (list of lists), written out as the double sum of its definition."""
    n = len(block)
    a = [math.sqrt(1 / n)] + [math.sqrt(2 / n)] * (n - 1)
    out = [[0.0] * n for _ in range(n)]
    for k in range(n):
        for l in range(n):
            total = 0.0
            for i in range(n):
                for j in range(n):
                    total += (block[i][j] * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
                              * math.cos(math.pi * (2 * j + 1) * l / (2 * n)))
            out[k][l] = a[k] * a[l] * total
    return torch.tensor(out, dtype=torch.float64)


def test_dct_matrix_matches_the_formula_and_is_orthonormal():
    d = dct_matrix(4)
    assert d.dtype == torch.float64 and d.shape == (4, 4)
    for k in range(4):
        a = math.sqrt(1 / 4) if k == 0 else math.sqrt(2 / 4)
        for i in range(4):
            assert abs(d[k, i].item() - a * math.cos(math.pi * (2 * i + 1) * k / 8)) < 1e-12
    assert d[0, 0].item() == pytest.approx(0.5) and d[1, 0].item() == pytest.approx(math.sqrt(0.5) * math.cos(math.pi / 8))
    assert (d @ d.T - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-12
    assert (dct_matrix(32) @ dct_matrix(32).T - torch.eye(32, dtype=torch.float64)).abs().max() < 1e-12


def test_windowed_dct_matches_the_double_sum_window_by_window():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64) * 255
    assert (dct2_windows(x, 4)[0, 0] - hand_dct2(x[0, 0].tolist())).abs().max() < 1e-10

    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 255
    coeffs = dct2_windows(x, 4)
    # Window (1, 0) of image 1, channel 2: rows 4..7, columns 0..3, transformed on its own.
    assert (coeffs[1, 2, 4:, :4] - hand_dct2(x[1, 2, 4:, :4].tolist())).abs().max() < 1e-10
    for r in (0, 4):
        for c in (0, 4):
            alone = dct2_windows(x[:, :, r:r + 4, c:c + 4].contiguous(), 4)
            assert (coeffs[:, :, r:r + 4, c:c + 4] - alone).abs().max() < 1e-10
    assert (idct2_windows(coeffs, 4) - x).abs().max() < 1e-10
    assert (idct2_windows(dct2_windows(x, 8), 8) - x).abs().max() < 1e-10


def test_yuv_round_trip_and_white():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 5, 7, dtype=torch.float64) * 255
    assert (yuv_to_rgb(rgb_to_yuv(x)) - x).abs().max() < 1e-9
    yuv = rgb_to_yuv(torch.full((1, 3, 2, 2), 255.0, dtype=torch.float64))
    assert (yuv[:, 0] - 255).abs().max() < 1e-9
    assert yuv[:, 1:].abs().max() < 1e-2        # the BT.601 U and V rows sum to 1e-5 and 0
    red = rgb_to_yuv(torch.tensor([255.0, 0, 0], dtype=torch.float64).view(1, 3, 1, 1)).flatten()
    assert torch.allclose(red, 255 * torch.tensor([0.299, -0.14713, 0.615], dtype=torch.float64))


def test_magnitude_zero_is_a_no_op():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    x[0] = 0
    x[1] = 255
    exact = _trigger_float(torch.from_numpy(x).permute(0, 3, 1, 2).double(), 0.0, 32, CTRL_POSITIONS, CTRL_CHANNELS)
    # Float error is ~1e-12 of a grey level, far from the 0.5 that rounding would need to move a pixel.
    assert (exact * 255 - torch.from_numpy(x).permute(0, 3, 1, 2)).abs().max() < 1e-9
    out = frequency_trigger(x, magnitude=0.0)
    assert np.abs(out.astype(int) - x).max() <= 1
    assert np.array_equal(out, x)


def test_trigger_adds_the_magnitude_at_the_chosen_coefficients():
    assert (CTRL_MAGNITUDE, CTRL_WINDOW, CTRL_POSITIONS, CTRL_CHANNELS) == (100.0, 32, ((15, 15), (31, 31)), (1, 2))
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(64, 192, (3, 3, 32, 32))).double()   # mid-range: nothing clips
    triggered = _trigger_float(x, 100.0, 32, CTRL_POSITIONS, CTRL_CHANNELS)
    assert 0 < triggered.min() and triggered.max() < 1
    coeffs = dct2_windows(rgb_to_yuv(triggered * 255 - x), 32)
    expected = torch.zeros_like(coeffs)
    expected[:, 1:, [15, 31], [15, 31]] = 100
    assert (coeffs - expected).abs().max() < 1e-9

    # Window 16: each of the four windows gets its own +100.
    coeffs = dct2_windows(rgb_to_yuv(_trigger_float(x, 100.0, 16, ((15, 15),), CTRL_CHANNELS) * 255 - x), 16)
    expected = torch.zeros_like(coeffs)
    expected[:, 1:, 15::16, 15::16] = 100
    assert (coeffs - expected).abs().max() < 1e-9

    # After rounding to uint8 the four coefficients still stand out; rounding noise stays small.
    grey = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    diff = torch.from_numpy(frequency_trigger(grey).astype(np.float64) - grey).permute(0, 3, 1, 2)
    coeffs = dct2_windows(rgb_to_yuv(diff), 32)[0]
    top4 = sorted(np.unravel_index(i, coeffs.shape) for i in coeffs.abs().flatten().topk(4).indices.tolist())
    assert [tuple(map(int, t)) for t in top4] == [(1, 15, 15), (1, 31, 31), (2, 15, 15), (2, 31, 31)]
    for channel, row, col in top4:
        assert abs(coeffs[channel, row, col].item() - 100) < 5
    assert coeffs[0].abs().max() < 3


def test_batched_matches_one_by_one_and_numpy_matches_torch(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    batched = frequency_trigger(x)
    assert batched.dtype == np.uint8 and batched.shape == x.shape and not np.array_equal(batched, x)
    single = np.stack([frequency_trigger(image) for image in x])       # (H, W, 3) in, (H, W, 3) out
    assert np.array_equal(batched, single)
    from_torch = frequency_trigger(torch.from_numpy(x))
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.uint8
    assert np.array_equal(from_torch.numpy(), batched)
    # Chunks of two images (5 = 2 + 2 + 1) give the same bytes as one chunk.
    monkeypatch.setattr("datasets.frequency._CHUNK_VALUES", 2 * 32 * 32 * 3)
    assert np.array_equal(frequency_trigger(x), batched)


def test_bad_window_and_position_are_rejected():
    x = np.zeros((2, 30, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="window_size 32 must divide the image height and width, got 30x32"):
        frequency_trigger(x)
    with pytest.raises(ValueError, match="must divide"):
        dct2_windows(torch.zeros(1, 3, 8, 12, dtype=torch.float64), 8)
    x = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"position \(32, 0\) lies outside the 32x32 window"):
        frequency_trigger(x, positions=((32, 0),))
    with pytest.raises(ValueError, match=r"position \(31, 31\) lies outside the 16x16 window"):
        frequency_trigger(x, window_size=16)


def test_survival_benchmark_sees_flips_keep_the_trigger_and_crops_scatter_it():
    """benchmarks/ctrl_survival.py on mid-grey images with mild noise: the stored shift is the magnitude,
    a flip keeps it (it only negates odd frequencies), crops leave a small part at the trigger's spots."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ctrl_survival.py"
    spec = importlib.util.spec_from_file_location("ctrl_survival", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    x = (128 + rng.normal(0, 4, (64, 32, 32, 3))).round().clip(0, 255).astype(np.uint8)
    torch.manual_seed(0)
    rows = module.survival(x, magnitude=100.0)
    assert list(rows)[0] == "stored images" and len(rows) == 1 + len(module.VARIANTS)
    assert rows["stored images"][0] == pytest.approx(100, abs=1)      # rounding to uint8 costs < 1
    assert rows["stored images"][2] == 1.0
    assert rows["flip alone"][0] == pytest.approx(rows["stored images"][0], abs=1e-6)
    assert rows["flip alone"][2] == pytest.approx(1.0, abs=1e-6)
    assert rows["crop 0.08-1 alone"][0] < 25
