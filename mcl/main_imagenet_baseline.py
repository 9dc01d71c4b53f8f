"""One ImageNet network trained alone with cross-entropy (the baselines of the L-MCL ImageNet table), as the authors'
main_imagenet_baseline.py: global batch 256, SGD momentum 0.9 (no Nesterov), wd 1e-4, lr 0.1 x0.1 at epochs 30/60/90,
100 epochs, RandomResizedCrop(224) + flip / Resize(256) + CenterCrop(224).

    cd mcl && torchrun --nproc_per_node 2 main_imagenet_baseline.py --arch resnet34_imagenet --data-root IMAGENET
    python main_imagenet_baseline.py ...        # one process (CPU or one GPU), same global batch

The global --batch-size is split over the processes; checkpoints and logs are written by rank 0 only; test numbers are
summed over the processes' disjoint parts of the val set.
"""

from common.checkpoint import load_checkpoint, load_state_dict_checked
from common.cli import run_main
from common.distributed import DistContext, cleanup
from common.fast import Fast
from common.loop import fit
from common.options import detached_setup, resolve_device, setup_run
from mcl.models import IMAGENET_BASELINES, build_imagenet_baseline
from mcl.runs import BaselineRun
from mcl.train_utils import IMAGENET_DEFAULTS, IMAGENET_MAY_CHANGE, add_imagenet_args, base_parser, \
    check_imagenet_args, finish_parser, imagenet_data, run_folder, test_heads

SCRIPT = "mcl/main_imagenet_baseline.py"


def get_args_parser():
    p = base_parser(__doc__, IMAGENET_BASELINES, "resnet34_imagenet", IMAGENET_DEFAULTS)
    add_imagenet_args(p)
    return finish_parser(p)


def default_run_dir(args):
    return run_folder(args, f"main_imagenet_baseline_arch_{args.arch}_dataset_{args.dataset}_seed{args.manual_seed}")


def evaluate_checkpoint(parser, args):
    """--evaluate (one process): test the weights of --evaluate-checkpoint (default <run-dir>/best.pt)."""
    setup = detached_setup(Fast.from_args(args, resolve_device(parser, args.device)), args.eval_batches)
    train_set, _, val_loader = imagenet_data(args, DistContext(device=setup.device))
    model = build_imagenet_baseline(args.arch, len(train_set.classes)).to(setup.device)
    path = args.evaluate_checkpoint or f"{args.run_dir or default_run_dir(args)}/best.pt"
    load_state_dict_checked(model, load_checkpoint(path, expect_meta={"arch": args.arch})["net"])
    record = test_heads(setup.fast.prepare(model), val_loader, setup, single=True)
    print(" ".join(f"{k} {v:.4f}" for k, v in record.items()))
    return record


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_imagenet_args(parser, args, IMAGENET_BASELINES)
    if args.evaluate:
        return evaluate_checkpoint(parser, args)
    # the same initial weights in every process
    setup = setup_run(parser, args, SCRIPT, default_run_dir(args), seed=args.manual_seed, streams=("torch",),
                      may_change=IMAGENET_MAY_CHANGE)
    train_set, train_loader, val_loader = imagenet_data(args, setup.ctx)
    model = build_imagenet_baseline(args.arch, len(train_set.classes)).to(setup.device)
    run = BaselineRun(setup, args, model, val_loader, nesterov=False, reseed_epochs=True)
    setup.logger.print(f"Arch: {args.arch}, Params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, "
                       f"{setup.ctx.world_size} process(es) x batch {args.batch_size // setup.ctx.world_size}")
    try:
        return fit(run, train_loader, setup, args.epochs)
    finally:
        cleanup(setup.ctx)


if __name__ == "__main__":
    run_main(main)
