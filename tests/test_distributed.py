"""Distributed data-parallel training of a LookWhere: two CPU processes (gloo) launched by torchrun.

DDP runs with find_unused_parameters=False, so a trainable parameter that a forward leaves unused
would stop the run; the replicas must stay identical and match one process on the whole batch.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_step

WORKER = Path(__file__).with_name('ddp_step.py')
pytestmark = pytest.mark.slow  # torchrun starts two processes


@pytest.fixture(scope='module')
def ranks_weights(tmp_path_factory):
    """Launch the worker on two processes; {config: [rank 0 state dict, rank 1 state dict]}."""
    out = tmp_path_factory.mktemp('ddp')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if Path('/sys/class/net/lo').exists():
        env.setdefault('GLOO_SOCKET_IFNAME', 'lo')  # a container's hostname may not resolve to a usable address
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(WORKER), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {config: [torch.load(out / f'{config}-rank{rank}.pt', weights_only=True) for rank in range(2)]
            for config in ddp_step.CONFIGS}


@pytest.mark.parametrize('config', list(ddp_step.CONFIGS))
def test_replicas_stay_identical_after_ddp_steps(ranks_weights, config):
    rank0, rank1 = ranks_weights[config]
    for name, value in rank0.items():
        assert torch.equal(rank1[name], value), name


@pytest.mark.parametrize('config', list(ddp_step.CONFIGS))
def test_ddp_steps_equal_one_process_on_the_concatenated_batch(ranks_weights, config):
    model = ddp_step.build_model(config, seed=0)  # rank 0's init, which DDP broadcast
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ddp_step.train(model, model, ddp_step.global_batches())
    distributed = ranks_weights[config][0]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # the comparison means something: the extractor moved, and the selector only where it is trainable
    assert not torch.allclose(distributed['blocks.0.attn.qkv.weight'], start['blocks.0.attn.qkv.weight'])
    selector_moved = not torch.equal(distributed['selector.backbone.blocks.0.attn.qkv.weight'],
                                     start['selector.backbone.blocks.0.attn.qkv.weight'])
    assert selector_moved == (config == 'trainable_selector')
