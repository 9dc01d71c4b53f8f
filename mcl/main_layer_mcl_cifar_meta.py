"""L-MCL on CIFAR-100: two networks with auxiliary branches, layer-wise mutual contrastive learning weighted by a
meta-learned loss-weight network (Yang et al., TPAMI 2023), as the authors' main_layer_mcl_cifar_meta.py.

    cd mcl && python main_layer_mcl_cifar_meta.py --arch lmcl_resnet32_cifar --run-dir runs/r32
    python -m mcl.main_layer_mcl_cifar_meta --arch lmcl_res32_res110_cifar ...

Every iteration: one SGD step on L = L_cls + L_kd + L_MCL; every --meta-freq iterations, on the same batch, the
meta step (two virtual steps on the weighted L_MCL, one on the head CEs, second-order hypergradient into the
loss-weight network, networks left as they were). Epoch-wise cosine lr shared by all optimizers.
"""
from dataclasses import dataclass
from functools import partial

import torch

from common.checkpoint import load_checkpoint, load_state_dict_checked
from common.cli import run_main
from common.data import ClassBalancedSampler, cifar_datasets, cifar_test_transform, cifar_train_transform, make_loader
from common.fast import DeviceCifarLoader, Fast
from common.loop import fit
from common.options import detached_setup, resolve_device, setup_run
from mcl.models import CIFAR_PAIRS, Aggregator, EmbedHeads, LossWeightNetwork, build_cifar_pair
from mcl.runs import LMCLRun
from mcl.train_utils import CIFAR_DEFAULTS, LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD, MAY_CHANGE, base_parser, \
    build_as_released, check_args, finish_parser, run_folder, test_heads

SCRIPT = "mcl/main_layer_mcl_cifar_meta.py"


def add_lmcl_args(p, tau, alpha, beta, meta_freq):
    """The L-MCL flags of both L-MCL scripts (the authors' per-script defaults: TAU, ALPHA, BETA, META_FREQ)."""
    p.add_argument("--times", type=int, default=2, help="virtual steps on the weighted MCL loss per meta update")
    p.add_argument("--meta-freq", type=int, default=meta_freq, help="meta update when batch index %% meta-freq == 0")
    p.add_argument("--number-net", type=int, default=2, help="networks of a homogeneous pair")
    p.add_argument("--kd_T", type=float, default=3.0, help="temperature of every KL term")
    p.add_argument("--tau", type=float, default=tau, help="contrast temperature")
    p.add_argument("--alpha", type=float, default=alpha, help="weight of VCL")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of soft VCL")
    p.add_argument("--beta", type=float, default=beta, help="weight of ICL")
    p.add_argument("--lam", type=float, default=1.0, help="weight of soft ICL")
    p.add_argument("--feat-dim", type=int, default=128, help="embed-head output width")
    p.add_argument("--fixed-meta-grad", action="store_true",
                   help="exact hypergradient (wd * alpha1 in the adjoint recursion) instead of the authors' "
                        "coefficient 1 (spec 3.7)")
    p.add_argument("--meta-recompute", action="store_true",
                   help="rebuild each virtual step's graph in the meta step's reverse sweep, as the authors' code "
                        "does, instead of keeping it: same values, about one graph in memory at a time, a slower meta "
                        "step (for GPUs short of memory)")
    return p


LMCL_POSITIVE = ["times", "meta_freq", "number_net", "feat_dim", "kd_T", "tau"]


def get_args_parser():
    p = base_parser(__doc__, CIFAR_PAIRS, "lmcl_resnet32_cifar", CIFAR_DEFAULTS)
    add_lmcl_args(p, tau=0.1, alpha=0.1, beta=0.1, meta_freq=50)
    p.add_argument("--number-stage", type=int, default=3, help="accepted for compatibility; the pair's number of "
                                                                "heads is used")
    return finish_parser(p)


@dataclass(frozen=True)
class PairShape:
    """What the authors derive from their width probe: heads per network, each network's head width (every head
    of a network is as wide as its first, spec 5.2-7) and every head's feature width."""
    number_stage: int
    rep_dim: list
    feat_dims: list


def probe_shape(pair, probe):
    with torch.no_grad():
        features, _ = pair.eval()(probe)
    return PairShape(len(features[0]), [f[0].size(1) for f in features], [[h.size(1) for h in f] for f in features])


def build_modules(args, device):
    """The pair and its loss-side modules from the seeded RNG in the authors' order: the pair (build_as_released),
    their width probe through it in eval mode, then the loss-weight network, the embed heads and the aggregator.
    Returns ((pair, embed_heads, aggregator, weight_net), PairShape)."""
    pair, probe = build_as_released(partial(build_cifar_pair, args.arch, 100, args.number_net), (1, 3, 32, 32))
    pair = pair.to(device)
    shape = probe_shape(pair, probe.to(device))
    weight_net = LossWeightNetwork(shape.feat_dims).to(device)
    embed_heads = EmbedHeads(shape.rep_dim, shape.number_stage, args.feat_dim).to(device)
    aggregator = Aggregator(shape.rep_dim, shape.number_stage).to(device)
    return (pair, embed_heads, aggregator, weight_net), shape


def cifar_loaders(args, fast):
    """(train loader, test loader, class-balanced sampler): the authors' PIL pipeline (zero-pad crop then flip, their
    mean/std) with --num-workers processes, or with --data-on-device the same sampler and augmentation on the device."""
    train_set, test_set = cifar_datasets(
        "CIFAR100", args.data_root, cifar_train_transform(LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD, "constant", "crop_flip"),
        cifar_test_transform(LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD), flag="--data-root")
    sampler = ClassBalancedSampler(train_set.targets, m=2, batch_size=args.batch_size)
    if fast.data_on_device:
        cifar = dict(device=fast.device, mean=LMCL_CIFAR100_MEAN, std=LMCL_CIFAR100_STD, padding_mode="constant",
                     order="crop_flip")
        return (DeviceCifarLoader(train_set, args.batch_size, train=True, sampler=sampler, seed=args.manual_seed,
                                  **cifar), DeviceCifarLoader(test_set, args.batch_size, train=False, **cifar), sampler)
    pin = fast.device.type == "cuda"
    return (make_loader(train_set, args.batch_size, sampler=sampler, workers=args.num_workers, pin_memory=pin),
            make_loader(test_set, args.batch_size, workers=args.num_workers, pin_memory=pin), sampler)


def default_run_dir(args):
    return run_folder(args, f"main_layer_mcl_cifar_meta_arch_{args.arch}_dataset_{args.dataset}_seed"
                            f"{args.manual_seed}")


def evaluate_checkpoint(parser, args):
    """--evaluate: test every head of the pair in --evaluate-checkpoint (default <run-dir>/best.pt); writes
    nothing."""
    setup = detached_setup(Fast.from_args(args, resolve_device(parser, args.device)), args.eval_batches)
    pair = build_cifar_pair(args.arch, 100, args.number_net).to(setup.device)
    path = args.evaluate_checkpoint or f"{args.run_dir or default_run_dir(args)}/best.pt"
    load_state_dict_checked(pair, load_checkpoint(path, expect_meta={"arch": args.arch})["net"], "pair")
    record = test_heads(setup.fast.prepare(pair), cifar_loaders(args, setup.fast)[1], setup)
    print(" ".join(f"{k} {v:.4f}" for k, v in record.items()))
    return record


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args, CIFAR_PAIRS, LMCL_POSITIVE)
    if args.batch_size % 2 or args.batch_size // 2 > 100:
        parser.error(f"--batch-size {args.batch_size}: the sampler takes 2 images of batch/2 distinct classes, so it "
                     f"must be even and at most 200 for CIFAR-100")
    if args.evaluate:
        return evaluate_checkpoint(parser, args)
    setup = setup_run(parser, args, SCRIPT, default_run_dir(args), seed=args.manual_seed, streams=("numpy", "torch"),
                      may_change=MAY_CHANGE)
    modules, _ = build_modules(args, setup.device)
    train_loader, test_loader, sampler = cifar_loaders(args, setup.fast)
    run = LMCLRun(setup, args, modules, test_loader, sampler)
    setup.logger.print(f"Arch: {args.arch}, Params: {sum(p.numel() for p in modules[0].parameters()) / 1e6:.2f}M "
                       f"(pair with auxiliary branches)")
    return fit(run, train_loader, setup, args.epochs)


if __name__ == "__main__":
    run_main(main)
