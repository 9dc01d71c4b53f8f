"""ONE (gated on-the-fly native ensemble, default), CL-ILR (--avg --bpscale) and individual branches (--ind).

    python train_one.py --model resnet32 --dataset CIFAR100                  # ONE
    python train_one.py --model resnet32 --dataset CIFAR100 --avg --bpscale  # CL-ILR
    python train_one.py --model resnet32 --dataset CIFAR100 --ind            # individual branches (CE only)

ONE:    L = sum_i CE(z_i) + CE(x_m) + alpha w(e) sum_i KL_T(z_i; x_m), x_m = sum_i g_i z_i (gate).
CL-ILR: L = sum_i CE(z_i) + alpha w(e) sum_i KL_T(z_i; mean_{j != i} z_j), trunk gradient / m.
best.pth follows the mean of the branches' test top-1.
"""
from common.cli import run_main
from common.options import setup_run
from okddip.engine import (MAY_CHANGE, Method, base_parser, check_args, check_distillation_args, datasets,
                           default_run_dir, train)
from okddip.losses import one_loss, ramp_weight
from okddip.models import ONEBranches

SCRIPT = "okddip/train_one.py"


def get_args_parser():
    p = base_parser(__doc__)
    p.add_argument("--num_branches", type=int, default=4)
    p.add_argument("--loss", default="KL", choices=["KL", "CE"])
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--start_consistency", type=float, default=0.0)
    p.add_argument("--length", type=float, default=80)
    p.add_argument("--ind", action="store_true", help="train each branch with CE only")
    p.add_argument("--avg", action="store_true", help="CL-ILR targets: mean of the other branches' logits")
    p.add_argument("--bpscale", action="store_true", help="CL-ILR backprop rescaling: trunk gradient x 1/m")
    p.add_argument("--branch_dropout", type=float, default=0.5, help="multi-branch VGG classifier dropout (released 0.5)")
    p.add_argument("--densenet_shared_block", type=int, default=1, choices=[0, 1],
                   help="1 (released): the DenseNet branches share one last dense block; 0: independent blocks")
    p.add_argument("--gate_bn_init", default="uniform", choices=["uniform", "ones"],
                   help="ONE gate BatchNorm1d weight: U(0,1) as in the authors' torch 1.0.1, or 1 (torch >= 1.2)")
    p.add_argument("--vgg_double_pass", type=int, default=1, choices=[0, 1],
                   help="1 (released): VGG ONE runs every branch twice per forward; 0: once")
    p.add_argument("--MulStu", action="store_true",
                   help="released flag without a working method here (refused): network-based OKDDip is "
                        "train_GL.py --MulStu")
    return p


def build(args, num_classes):
    """The branches (and ONE's gate) and the ONE / CL-ILR / individual loss at the epoch's ramp."""
    model = ONEBranches(args.model, num_classes, args.num_branches, ind=args.ind, avg=args.avg,
                        bpscale=args.bpscale, branch_dropout=args.branch_dropout,
                        shared_block=bool(args.densenet_shared_block), gate_bn_init=args.gate_bn_init,
                        vgg_double_pass=bool(args.vgg_double_pass))

    def ramp(epoch):
        return ramp_weight(epoch, args.num_epochs, args.start_consistency, args.length)

    def loss(out, y, epoch):
        return one_loss(out, y, ramp(epoch), args.alpha, args.temperature, args.loss)

    # the released --ind still builds the gate (unless --avg) and leaves it without gradient
    return Method(students="one", model=model, forward=lambda net, x: net(x), loss=loss, ramp=ramp,
                  select="test/mean/top1", milestones=tuple(args.schedule),
                  unused_parameters=args.ind and not args.avg)


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    check_distillation_args(parser, args)
    if args.MulStu:  # the released train_one.py builds MultiNet.StuNet and then crashes unpacking its 3 outputs
        parser.error("--MulStu: the released train_one.py has no working network-based ONE (it crashes); for "
                     "network-based OKDDip use train_GL.py --MulStu")
    if args.num_branches < 2:
        parser.error(f"--num_branches {args.num_branches}: ONE/CL-ILR need at least 2 branches")
    train_set, test_set, num_classes = datasets(args)
    tag = f"{args.model}B{args.num_branches}T{args.temperature}I{args.ind}avg{args.avg}bpscale{args.bpscale}" \
          f"{args.version}"
    setup = setup_run(parser, args, SCRIPT, default_run_dir(args, f"one/{tag}"), seed=args.seed,
                      may_change=MAY_CHANGE)
    return train(setup, args, build(args, num_classes), train_set, test_set)


if __name__ == "__main__":
    run_main(main)
