"""Run under `torchrun --nproc_per_node 2`: checks common.distributed on gloo/CPU and prints 'DDP OK' on rank 0."""
import sys

import torch
import torch.nn as nn

from common.distributed import all_reduce_sum, cleanup, init_distributed, per_process_batch, train_sampler, unwrap, \
    wrap_ddp
from common.logging import RunLogger


def main():
    run_dir = sys.argv[1]
    ctx = init_distributed("cpu")
    assert ctx.distributed and ctx.world_size == 2, ctx
    assert all_reduce_sum(torch.tensor([float(ctx.rank)]), ctx).item() == 1.0
    assert per_process_batch(256, ctx) == 128

    # The two ranks see disjoint halves of the data, and a new order each epoch.
    data = list(range(10))
    sampler = train_sampler(data, ctx, shuffle=True, seed=3)
    sampler.set_epoch(0)
    mine = torch.tensor(list(sampler))
    both = [torch.zeros_like(mine) for _ in range(2)]
    torch.distributed.all_gather(both, mine)
    assert sorted(torch.cat(both).tolist()) == data
    sampler.set_epoch(1)
    assert torch.tensor(list(sampler)).tolist() != mine.tolist() or len(mine) < 2

    # DDP averages gradients: each rank's half-batch step equals a full-batch step on one process.
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    reference = nn.Linear(5, 1)
    model = wrap_ddp(nn.Linear(5, 1), ctx, sync_bn=True)
    unwrap(model).load_state_dict(reference.state_dict())
    nn.functional.mse_loss(reference(x), y).backward()
    half = slice(4 * ctx.rank, 4 * ctx.rank + 4)
    nn.functional.mse_loss(model(x[half]), y[half]).backward()
    assert torch.allclose(unwrap(model).weight.grad, reference.weight.grad, atol=1e-6)

    # Only rank 0 writes the run directory.
    logger = RunLogger(run_dir, {"script": "tests/ddp_check.py"}, enabled=ctx.is_main, quiet=True)
    logger.log_epoch({"epoch": 1, "rank": ctx.rank})
    cleanup(ctx)
    if ctx.is_main:
        print("DDP OK")


if __name__ == "__main__":
    main()
