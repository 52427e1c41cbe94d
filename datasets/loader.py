"""Batches from in-memory uint8 image arrays: shuffled index batches, SimCLR view pairs, features."""
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .augment import BatchAugment, normalize, torchvision_pipeline


def index_batches(n, batch_size, shuffle=True, drop_last=True):
    """Index tensors of one epoch over n items, shuffled with torch's global generator."""
    order = torch.randperm(n) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [order[s:s + batch_size] for s in range(0, stop, batch_size)]


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
    `num_workers` processes.
    """

    def __init__(self, images, batch_size, mean, std, device, augment="batched", num_workers=0):
        self.n, self.batch_size, self.device = len(images), batch_size, device
        self.augment = augment
        size = images.shape[1]
        if augment == "batched":
            self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
            self.transform = BatchAugment(size, mean, std)
        elif augment == "torchvision":
            self.dataset = _TwoViews(images, torchvision_pipeline(size, mean, std))
            self.num_workers = num_workers
        else:
            raise ValueError(f"unknown augmentation path {augment!r}")

    def __len__(self):
        return self.n // self.batch_size

    def __iter__(self):
        if self.augment == "batched":
            for idx in index_batches(self.n, self.batch_size):
                x = self.images[idx.to(self.images.device)]
                yield self.transform(x), self.transform(x)
        else:
            seed = int(torch.randint(0, 2 ** 62, ()).item())
            loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                num_workers=self.num_workers, generator=torch.Generator().manual_seed(seed),
                                pin_memory=self.device.type == "cuda")
            for v1, v2 in loader:
                yield v1.to(self.device, non_blocking=True), v2.to(self.device, non_blocking=True)


def to_input(images, mean, std, device):
    """uint8 BxHxWx3 (numpy or tensor) -> normalised float Bx3xHxW on device (the test transform)."""
    x = torch.as_tensor(images).to(device)
    return normalize(x.permute(0, 3, 1, 2).float().div_(255), mean, std)


@torch.no_grad()
def extract_features(model, images, mean, std, device, batch_size=512, desc="features"):
    """L2-normalised backbone features (NxD, on the CPU) of uint8 images under the test transform."""
    model.eval()
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, mininterval=1):
        feature, _ = model(to_input(images[s:s + batch_size], mean, std, device))
        out.append(feature.float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.feature_dim)
