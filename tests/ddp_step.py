"""A few DDP training steps of a tiny LookWhere on each rank (CPU, gloo); test_distributed.py launches it:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_step.py OUT_DIR

Every rank trains on its share of the same global batches and saves its weights to
OUT_DIR/<config>-rank<r>.pt. The test compares the ranks with each other and with `train` run in a
single process on the whole batches, using the functions defined here.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from timm.optim import create_optimizer_v2

from conftest import TINY, tiny_model  # the script's folder is on sys.path

NUM_CLASSES = 3
GLOBAL_BATCH = 4
STEPS = 3  # DDP reports unused parameters when the second step starts, so take more than one
CONFIGS = {
    'frozen_selector': dict(),  # the authors' fine-tuning
    'grad_checkpointing': dict(),
    'trainable_selector': dict(freeze_selector=False),  # the selector's ViT trains through its prefix tokens
}


def build_model(config: str, seed: int) -> torch.nn.Module:
    model = tiny_model(num_classes=NUM_CLASSES, seed=seed, **CONFIGS[config])
    model.set_grad_checkpointing(config == 'grad_checkpointing')
    return model.train()


def global_batches():
    g = torch.Generator().manual_seed(0)
    size = TINY['img_size']
    return [(torch.randn(GLOBAL_BATCH, 3, size, size, generator=g),
             torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def train(model: torch.nn.Module, optimized: torch.nn.Module, batches) -> None:
    """SGD, not Adam: Adam's first steps barely depend on the gradient's size, so they would hide a wrong one."""
    optimizer = create_optimizer_v2(model, opt='sgd', lr=0.1, momentum=0.9, weight_decay=0.05, layer_decay=0.75)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(optimized(x), y).backward()
        optimizer.step()


def main(out_dir: str) -> None:
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    local = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in global_batches()]
    for config in CONFIGS:
        # each rank starts from its own random init: DDP must broadcast rank 0's weights
        model = build_model(config, seed=rank)
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        train(model, ddp, local)
        torch.save(model.state_dict(), os.path.join(out_dir, f'{config}-rank{rank}.pt'))
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
