"""Batches from in-memory uint8 image arrays: shuffled index batches, SimCLR view pairs, features.

Batches are cut from torch's DistributedSampler, whose permutation depends only on the seed and
the epoch. Under torchrun each of N processes takes every N-th index of it, so batch k of all
processes together holds the same images as batch k of one process with N times the batch size.
"""
import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from utils.distributed import get_rank, get_world_size, global_batch
from utils.errors import UserError
from utils.logs import progress

from .augment import BatchAugment, normalize, torchvision_pipeline


def sampler(n, seed, epoch, shuffle=True, drop_last=True):
    """This process's DistributedSampler over n items with its epoch set (all items with one process)."""
    s = DistributedSampler(range(n), num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle,
                           seed=seed, drop_last=drop_last)
    s.set_epoch(epoch)
    return s


def index_batches(n, batch_size, seed, epoch, shuffle=True, drop_last=True):
    """This process's index tensors of one epoch over n items, batch_size per process.

    drop_last=False keeps a short last batch; under torchrun the sampler then repeats a few
    items so that every process has as many batches as the others.
    """
    batches = BatchSampler(sampler(n, seed, epoch, shuffle, drop_last), batch_size, drop_last)
    return [torch.tensor(batch, dtype=torch.long) for batch in batches]


class _TwoViews(Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return self.transform(img), self.transform(img)


class ViewLoader:
    """Yields (view1, view2), two augmented views of each image of a shuffled batch, on `device`.

    augment='batched' (default) augments whole batches on the device, so no worker processes are
    needed; augment='torchvision' runs the per-image torchvision pipeline in a DataLoader with
    `num_workers` processes. batch_size is per process; call set_epoch(epoch) before each epoch.

    Under torchrun the batched path draws the augmentation parameters of the whole global batch
    in every process (identical generators) and applies this process's rows, so N processes
    see exactly the views one process with batch N*batch_size would.
    """

    def __init__(self, images, batch_size, mean, std, device, augment="batched", num_workers=0, seed=0):
        self.n, self.batch_size, self.device = len(images), batch_size, device
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.size = images.shape[1:3]
        if augment == "batched":
            self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
            self.transform = BatchAugment(images.shape[1], mean, std)
        elif augment == "torchvision":
            if get_world_size() > 1 and num_workers == 0:
                raise UserError("--augment torchvision under torchrun needs --num_workers >= 1, so that "
                                "each process's workers draw their own augmentations")
            self.dataset = _TwoViews(images, torchvision_pipeline(images.shape[1], mean, std))
            self.num_workers = num_workers
        else:
            raise ValueError(f"unknown augmentation path {augment!r}")

    def set_epoch(self, epoch):
        """Choose the epoch's shuffle (the same in every process), as DistributedSampler.set_epoch."""
        self.epoch = epoch

    def __len__(self):
        return self.n // (self.batch_size * get_world_size())

    def __iter__(self):
        if self.augment == "batched":
            for idx in index_batches(self.n, self.batch_size, self.seed, self.epoch):
                x = self.images[idx.to(self.images.device)]
                yield self._augment(x), self._augment(x)
        else:
            seed = int(torch.randint(0, 2 ** 62, ()).item()) + get_rank()
            loader = DataLoader(self.dataset, batch_size=self.batch_size,
                                sampler=sampler(self.n, self.seed, self.epoch), drop_last=True,
                                num_workers=self.num_workers, generator=torch.Generator().manual_seed(seed),
                                pin_memory=self.device.type == "cuda")
            for v1, v2 in loader:
                yield v1.to(self.device, non_blocking=True), v2.to(self.device, non_blocking=True)

    def _augment(self, x):
        """Draw the global batch's parameters and apply this process's rows (every N-th, as the
        sampler interleaves)."""
        world = get_world_size()
        params = self.transform.sample(len(x) * world, *self.size)
        if world > 1:
            params = {k: v[get_rank()::world] for k, v in params.items()}
        return self.transform(x, params)


def augment_copies(augment, images, copies):
    """`copies` independently augmented views of each image, grouped by image (R*copies rows).

    Under torchrun the parameters of every process's copies are drawn in each process (identical
    generators) and each process applies its own share, so N processes together see the views one
    process with N x copies would.
    """
    world, rank = get_world_size(), get_rank()
    params = augment.sample(len(images) * world * copies, *images.shape[1:3])
    if world > 1:
        rows = torch.arange(len(images) * world * copies).view(len(images), world, copies)[:, rank].reshape(-1)
        params = {k: v[rows] for k, v in params.items()}
    return augment(images.repeat_interleave(copies, dim=0), params)


def clean_subset(images, ratio, batch_size):
    """The defender's clean data (MIMIC and the baseline defences): the first int(ratio * N) images.

    Incomplete batches are dropped, so the subset must hold at least one global batch
    (batch_size images per process)."""
    subset = images[:int(ratio * len(images))]
    images_per_step, batch_text = global_batch(batch_size)
    if len(subset) < images_per_step:
        raise UserError(f"the clean subset ({len(subset)} images = {ratio} x {len(images)}) is smaller "
                        f"than one batch of {batch_text}, and incomplete batches are dropped: "
                        f"raise --ratio or lower --batch_size")
    return subset


def to_input(images, mean, std, device):
    """uint8 BxHxWx3 (numpy or tensor) -> normalised float Bx3xHxW on device (the test transform)."""
    x = torch.as_tensor(images).to(device)
    return normalize(x.permute(0, 3, 1, 2).float().div_(255), mean, std)


@torch.no_grad()
def extract_features(model, images, mean, std, device, batch_size=512, desc="features", normalized=True):
    """L2-normalised backbone features (NxD, on the CPU) of uint8 images under the test transform.

    normalized=False gives them before the normalisation: layer4's output averaged over positions,
    i.e. each image's mean activation per layer4 channel."""
    model.eval()
    out = []
    for s in progress(range(0, len(images), batch_size), desc=desc):
        x = to_input(images[s:s + batch_size], mean, std, device)
        feature = model(x)[0] if normalized else model.f(x)
        out.append(feature.float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.feature_dim)
