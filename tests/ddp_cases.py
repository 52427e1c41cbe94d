"""One step of each training stage on a fixed global batch, for tests/test_distributed.py.

Under torchrun every process takes its share of the batch (every N-th image, as the
DistributedSampler deals them), takes one step and saves what it computed to <out>/rank<r>.pt:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_cases.py <out>
Imported in a single process, the same functions give the reference at the whole global batch.
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.distill import distill_step  # noqa: E402
from datasets.loader import ViewLoader  # noqa: E402
from models import SimCLR, nt_xent  # noqa: E402
from utils.distributed import distribute, get_rank, get_world_size, init_distributed, mean_over_ranks  # noqa: E402
from utils.errors import UserError  # noqa: E402

GLOBAL_BATCH = 8
LR = 0.5                      # plain SGD, so a weight difference is lr times a gradient difference
CPU = torch.device("cpu")


def fixed_views():
    g = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)


def share(x, rank=None, world=None):
    """This process's rows of a global batch: every world-th, starting at rank."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return x[rank::world]


def simclr(seed, train):
    torch.manual_seed(seed)
    model = SimCLR(width=4)
    return model.train(train)


def simclr_step(train, per_process_reference=False):
    """One SGD step of stage 0. Returns (loss of the global batch, weights after the step).

    per_process_reference (one process only): run the model on each of two shares separately,
    which is what plain BatchNorm under two processes computes."""
    model = simclr(1, train)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    net = distribute(model, CPU)
    v1, v2 = fixed_views()
    if per_process_reference:
        z1 = torch.cat([net(share(v1, r, 2))[1] for r in range(2)])
        z2 = torch.cat([net(share(v2, r, 2))[1] for r in range(2)])
    else:
        _, z1 = net(share(v1))
        _, z2 = net(share(v2))
    loss = nt_xent(z1, z2, 0.5)
    value = mean_over_ranks(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return value.item(), model.state_dict()


def mimic_step():
    """One step of stage 2 (student with BatchNorm in eval mode). Returns (terms, student weights)."""
    student, teacher = simclr(2, train=False), simclr(3, train=False).requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)
    v1, v2 = fixed_views()
    terms = distill_step(distribute(student, CPU), teacher, share(v1), share(v2), optimizer,
                               [1500.0, 2000.0, 3000.0, 3500.0], 1.0, 0.5)
    return {k: v.item() for k, v in terms.items()}, student.state_dict()


def loader_views(batch_size):
    """All (view1, view2) batches of epoch 1 of the batched loader over 16 fixed images."""
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    torch.manual_seed(7)
    loader = ViewLoader(images, batch_size, (0.5,) * 3, (0.25,) * 3, CPU, seed=5)
    loader.set_epoch(1)
    return list(loader)


def main(out):
    init_distributed("cpu")
    result = {
        "simclr_eval": simclr_step(train=False),
        "simclr_train": simclr_step(train=True),
        "mimic": mimic_step(),
        "views": loader_views(GLOBAL_BATCH // get_world_size()),
    }
    try:
        distribute(SimCLR(width=4), CPU, sync_bn=True)
    except UserError as err:
        result["sync_bn_error"] = str(err)
    torch.save(result, Path(out) / f"rank{get_rank()}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
