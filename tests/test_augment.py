"""The batched SimCLR augmentation follows torchvision's definitions, image by image."""
import numpy as np
import torch
import torchvision.transforms.functional as TF

from datasets.augment import (BatchAugment, adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
                              crop_boxes, hsv_to_rgb, resized_crop, rgb_to_hsv)
from datasets.loader import ViewLoader, index_batches


def test_colour_operations_match_torchvision():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    for ours, theirs, low, high in ((adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
                                    (adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
                                    (adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
                                    (adjust_hue, TF.adjust_hue, -0.1, 0.1)):
        f = torch.rand(6) * (high - low) + low
        expected = torch.stack([theirs(x[i], f[i].item()) for i in range(6)])
        assert (ours(x.clone(), f) - expected).abs().max() < 1e-5, ours.__name__
    assert (hsv_to_rgb(rgb_to_hsv(x)) - x).abs().max() < 1e-5


def test_whole_image_crop_is_identity_and_flip_mirrors():
    x = torch.rand(4, 3, 32, 32)
    zeros, full = torch.zeros(4, dtype=torch.long), torch.full((4,), 32)
    assert torch.equal(resized_crop(x, zeros, zeros, full, full, torch.zeros(4, dtype=torch.bool), 32), x)
    assert torch.allclose(resized_crop(x, zeros, zeros, full, full, torch.ones(4, dtype=torch.bool), 32),
                          x.flip(-1), atol=1e-6)


def test_crop_boxes_lie_inside_and_respect_scale():
    torch.manual_seed(0)
    top, left, h, w = crop_boxes(2000, 32, 32, scale=(0.08, 1.0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / 1024
    assert area.min() >= 0.06 and area.max() <= 1.0       # rounding of h, w moves the 0.08 bound a little
    assert 0.45 < area.mean() < 0.6                        # uniform area share on [0.08, 1] has mean 0.54


def test_batch_augment_is_seeded_and_normalised():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    aug = BatchAugment(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.manual_seed(1)
    a = aug(x)
    torch.manual_seed(1)
    assert torch.equal(a, aug(x)) and a.shape == (64, 3, 32, 32)
    assert a.min() >= -2.0 - 1e-6 and a.max() <= 2.0 + 1e-6   # [0, 1] normalised by mean 0.5, std 0.25


def test_view_loaders_yield_pairs_of_full_batches():
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    for augment in ("batched", "torchvision"):
        loader = ViewLoader(images, 8, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), augment=augment)
        pairs = list(loader)
        assert len(loader) == len(pairs) == 2                 # 20 // 8, the incomplete batch dropped
        assert all(v1.shape == v2.shape == (8, 3, 32, 32) and not torch.equal(v1, v2) for v1, v2 in pairs)
    batches = index_batches(20, 8, seed=0, epoch=1, drop_last=False)
    assert [len(b) for b in batches] == [8, 8, 4]
    assert sorted(torch.cat(batches).tolist()) == list(range(20))
    again = index_batches(20, 8, seed=0, epoch=1, drop_last=False)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))        # the shuffle is (seed, epoch)
    assert not torch.equal(torch.cat(batches), torch.cat(index_batches(20, 8, seed=0, epoch=2, drop_last=False)))
