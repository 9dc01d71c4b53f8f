"""L-MCL on ImageNet (Yang et al., TPAMI 2023), as the authors' main_layer_mcl_imagenet_meta.py: two networks with
three auxiliary branches each (4 heads), contrast against per-network memory banks (mcl/memory_bank.py), the
aggregator with logit KD, and the meta-learned loss-weight network (every --meta-freq iterations).

    cd mcl && torchrun --nproc_per_node 2 main_layer_mcl_imagenet_meta.py --arch lmcl_resnet34_imagenet \
        --data-root IMAGENET --run-dir runs/r34_lmcl       # the authors' command: 2 processes x 128
    python main_layer_mcl_imagenet_meta.py ...            # one process, same global batch

The pair, the embed heads and the aggregator are DDP-wrapped (the released code left the last two unwrapped, so
their copies drifted apart between GPUs); the hypergradient of the weight network is averaged over processes; the
memory is updated with the embeddings of every process, so all copies stay identical.
"""
import torch

from common.checkpoint import load_checkpoint, load_state_dict_checked
from common.cli import run_main
from common.distributed import DistContext, cleanup
from common.fast import Fast
from common.loop import fit
from common.options import detached_setup, resolve_device, setup_run
from mcl.main_layer_mcl_cifar_meta import LMCL_POSITIVE, add_lmcl_args, probe_shape
from mcl.memory_bank import ContrastiveIndices, MemoryBank
from mcl.models import IMAGENET_PAIRS, Aggregator, EmbedHeads, LossWeightNetwork, build_imagenet_pair
from mcl.runs import MemoryBankRun
from mcl.train_utils import IMAGENET_DEFAULTS, IMAGENET_MAY_CHANGE, add_imagenet_args, base_parser, \
    check_imagenet_args, finish_parser, imagenet_data, run_folder, test_heads

SCRIPT = "mcl/main_layer_mcl_imagenet_meta.py"


def get_args_parser():
    p = base_parser(__doc__, IMAGENET_PAIRS, "lmcl_resnet18_imagenet", IMAGENET_DEFAULTS)
    add_lmcl_args(p, tau=0.07, alpha=0.01, beta=0.01, meta_freq=500)
    p.add_argument("--rep-dim", type=int, default=1024, help="accepted for compatibility; the pair's head width is "
                                                             "used")
    p.add_argument("--pos_k", type=int, default=1, help="same-class memory slots per anchor")
    p.add_argument("--neg_k", type=int, default=8192, help="other-class memory slots per anchor")
    p.add_argument("--nce_m", type=float, default=0.5, help="memory momentum (weight of the old slot)")
    p.add_argument("--vcl-own-memory", action="store_true",
                   help="the second VCL term reads the other network's memory (the released code reads the first "
                        "network's memory for both)")
    add_imagenet_args(p)
    return finish_parser(p)


def build_modules(args, device, num_classes, num_samples):
    """The pair, its loss-side modules and the memory banks, from the seeded RNG (the same in every process); the
    head widths from a zero probe in eval mode, as the authors derive them."""
    pair = build_imagenet_pair(args.arch, num_classes, args.number_net).to(device)
    shape = probe_shape(pair, torch.zeros(2, 3, args.image_size, args.image_size, device=device))
    weight_net = LossWeightNetwork(shape.feat_dims).to(device)
    embed_heads = EmbedHeads(shape.rep_dim, shape.number_stage, args.feat_dim).to(device)
    aggregator = Aggregator(shape.rep_dim, shape.number_stage).to(device)
    memory = MemoryBank(len(shape.rep_dim), num_samples, args.feat_dim, args.nce_m).to(device)
    return (pair, embed_heads, aggregator, weight_net), memory


def default_run_dir(args):
    return run_folder(args, f"main_layer_mcl_imagenet_meta_{args.arch}_{args.manual_seed}")


def evaluate_checkpoint(parser, args):
    """--evaluate (one process): test every head of the pair in --evaluate-checkpoint (default <run-dir>/best.pt)."""
    setup = detached_setup(Fast.from_args(args, resolve_device(parser, args.device)), args.eval_batches)
    train_set, _, val_loader = imagenet_data(args, DistContext(device=setup.device))
    pair = build_imagenet_pair(args.arch, len(train_set.classes), args.number_net).to(setup.device)
    path = args.evaluate_checkpoint or f"{args.run_dir or default_run_dir(args)}/best.pt"
    load_state_dict_checked(pair, load_checkpoint(path, expect_meta={"arch": args.arch})["net"], "pair")
    record = test_heads(setup.fast.prepare(pair), val_loader, setup)
    print(" ".join(f"{k} {v:.4f}" for k, v in record.items()))
    return record


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_imagenet_args(parser, args, IMAGENET_PAIRS, LMCL_POSITIVE + ["pos_k", "neg_k"])
    if not 0 <= args.nce_m < 1:
        parser.error(f"--nce_m {args.nce_m} must be in [0, 1)")
    if args.evaluate:
        return evaluate_checkpoint(parser, args)
    setup = setup_run(parser, args, SCRIPT, default_run_dir(args), seed=args.manual_seed, streams=("torch",),
                      may_change=IMAGENET_MAY_CHANGE)
    train_set, train_loader, val_loader = imagenet_data(
        args, setup.ctx, wrap_train=lambda ds: ContrastiveIndices(ds, args.pos_k, args.neg_k))
    modules, memory = build_modules(args, setup.device, len(train_set.classes), len(train_set))
    run = MemoryBankRun(setup, args, modules, memory, val_loader)
    setup.logger.print(f"Arch: {args.arch}, Params: {sum(p.numel() for p in modules[0].parameters()) / 1e6:.2f}M "
                       f"(pair with auxiliary branches), {setup.ctx.world_size} process(es) x batch "
                       f"{args.batch_size // setup.ctx.world_size}")
    try:
        return fit(run, train_loader, setup, args.epochs)
    finally:
        cleanup(setup.ctx)


if __name__ == "__main__":
    run_main(main)
