"""OKDDip (Online Knowledge Distillation with Diverse Peers): m - 1 auxiliary peers + 1 group leader.

    python train_GL.py --model resnet32 --dataset CIFAR100                 # branch-based (shared trunk)
    python train_GL.py --model resnet32 --dataset CIFAR100 --MulStu        # network-based (independent networks)
    python train_GL.py --model resnet32 --dataset CIFAR100 --ensemble      # Table "ensembles": m peers, no leader
    torchrun --nproc_per_node 8 train_GL.py --model resnet34 --dataset imagenet --data-root IMAGENET ...

L = sum_a CE(z_a) + CE(z_L) + alpha w(e) (sum_a KL_T(z_a; sum_b alpha_ab z_b) + KL_T(z_L; mean_a z_a)).
best.pth follows the leader's test top-1 (with --ensemble: the peers' mean-logit ensemble).
"""
from common.cli import run_main
from common.options import setup_run
from okddip.engine import (MAY_CHANGE, Method, base_parser, check_args, check_distillation_args, datasets,
                           default_run_dir, train)
from okddip.losses import okddip_loss, ramp_weight
from okddip.models import IndependentNets, OKDDipBranches

SCRIPT = "okddip/train_GL.py"


def get_args_parser():
    p = base_parser(__doc__)
    p.add_argument("--num_branches", type=int, default=4, help="students: num_branches - 1 peers + 1 leader")
    p.add_argument("--loss", default="KL", choices=["KL", "CE"])
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--start_consistency", type=float, default=0.0,
                   help="fraction of num_epochs with full distillation weight before the ramp starts")
    p.add_argument("--length", type=float, default=80, help="ramp-up length in epochs")
    p.add_argument("--MulStu", action="store_true", help="network-based OKDDip: independent networks")
    p.add_argument("--type", default="GL", help="only names the default output folder")
    p.add_argument("--ensemble", action="store_true",
                   help="all num_branches students are peers, no leader; best.pth follows the peer ensemble")
    p.add_argument("--branch_dropout", type=float, default=0.5,
                   help="dropout of the multi-branch VGG classifiers (released: 0.5, ignoring --dropout)")
    p.add_argument("--densenet_shared_block", type=int, default=1, choices=[0, 1],
                   help="1 (released): all DenseNet branches share one last dense block and the released forward "
                        "quirks; 0: independent blocks")
    return p


def build(args, num_classes):
    """The peers and the leader (branches, or networks with --MulStu) and the OKDDip loss at the epoch's ramp."""
    if args.MulStu:
        model = IndependentNets(args.model, num_classes, args.num_branches, dropout=args.dropout, attention=True,
                                ensemble=args.ensemble)
    else:
        model = OKDDipBranches(args.model, num_classes, args.num_branches, ensemble=args.ensemble,
                               branch_dropout=args.branch_dropout, shared_block=bool(args.densenet_shared_block))

    def ramp(epoch):
        return ramp_weight(epoch, args.num_epochs, args.start_consistency, args.length)

    def loss(out, y, epoch):
        return okddip_loss(out, y, ramp(epoch), args.alpha, args.temperature, args.loss)

    return Method(students="okddip", model=model, forward=lambda net, x: net(x), loss=loss, ramp=ramp,
                  select="test/ensemble/top1" if args.ensemble else "test/leader/top1",
                  milestones=tuple(args.schedule))


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    check_distillation_args(parser, args)
    if args.num_branches < (2 if args.ensemble else 3):
        parser.error(f"--num_branches {args.num_branches}: OKDDip needs at least two peers and a leader (3), "
                     f"or 2 peers with --ensemble")
    train_set, test_set, num_classes = datasets(args)
    tag = f"{args.model}{'M' if args.MulStu else 'B'}{args.num_branches}T{args.temperature}S{args.loss}" \
          f"{'E' if args.ensemble else ''}{args.version}"
    setup = setup_run(parser, args, SCRIPT, default_run_dir(args, f"{args.type}/{tag}"), seed=args.seed,
                      may_change=MAY_CHANGE + ("type",))
    return train(setup, args, build(args, num_classes), train_set, test_set)


if __name__ == "__main__":
    run_main(main)
