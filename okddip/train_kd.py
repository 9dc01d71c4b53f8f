"""Hinton KD from a frozen teacher written by train.py (its best.pth, or checkpoint.pt).

    python train.py --model resnet110 --dataset CIFAR100 --run-dir runs/teacher
    python train_kd.py --model resnet32 --T_model resnet110 --T_model_path runs/teacher --dataset CIFAR100

L = CE(z_s, y) + alpha KL_T(z_s; z_t), the teacher in eval mode under no_grad. No ramp. Milestones at 50 % / 75 %
of the epochs, as released (no --schedule flag).
"""
import os

import torch

from common.checkpoint import CheckpointError, load_state_dict_checked
from common.cli import run_main
from common.options import setup_run
from okddip.engine import MAY_CHANGE, Method, base_parser, check_args, check_distillation_args, datasets, train
from okddip.losses import kd_loss
from okddip.models import check_arch, plain_network

SCRIPT = "okddip/train_kd.py"


def teacher_weights(parser, arch, path, num_classes):
    """A plain network of ARCH (on the CPU, in eval mode) with the weights of PATH (a folder holding best.pth, or a
    .pth file); parser.error when they are missing or belong to another network."""
    file = os.path.join(path, "best.pth") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        parser.error(f"--T_model_path: no teacher weights at {file}; train one with "
                     f"`python train.py --model {arch} --run-dir DIR` and pass DIR")
    state = torch.load(file, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    teacher = plain_network(arch, num_classes)
    try:
        load_state_dict_checked(teacher, state, what=f"teacher {arch}")
    except CheckpointError as e:
        parser.error(f"--T_model_path {file}: {e}")
    return teacher.eval()


def get_args_parser():
    p = base_parser(__doc__, schedule=False)
    p.add_argument("--T_model", default="resnet110", help="teacher architecture")
    p.add_argument("--T_model_path", default="", help="folder with the teacher's best.pth (default "
                                                      "./<dataset>/<num_epochs>/<T_model>V0, where train.py writes)")
    p.add_argument("--loss", default="KL", choices=["KL", "CE"])
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--teacher_untrained", action="store_true",
                   help="use a freshly initialised teacher instead of --T_model_path (smoke runs only)")
    return p


def build(args, num_classes, teacher):
    """The student, the forward of student and frozen TEACHER (eval mode, no_grad) and L = CE + alpha KL_T."""
    def forward(net, x):
        z = net(x)
        with torch.no_grad():
            return {"pro": z, "teacher": teacher(x)}

    return Method(students=None, model=plain_network(args.model, num_classes, dropout=args.dropout), forward=forward,
                  loss=lambda out, y, epoch: kd_loss(out["pro"], out["teacher"], y, args.alpha, args.temperature,
                                                     args.loss),
                  select="test/net/top1", milestones=(args.num_epochs * 0.5, args.num_epochs * 0.75))


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    check_distillation_args(parser, args)
    try:
        check_arch(args.T_model, args.dataset)
    except ValueError as e:
        parser.error(f"--T_model: {e}")
    train_set, test_set, num_classes = datasets(args)
    path = args.T_model_path or os.path.join(args.dataset, str(args.num_epochs), f"{args.T_model}V0")
    # a trained teacher is read before the run folder is made, so a wrong path or architecture leaves nothing behind
    teacher = None if args.teacher_untrained else teacher_weights(parser, args.T_model, path, num_classes)
    run_dir = os.path.join(args.dataset, str(args.num_epochs), "kd",
                           f"{args.T_model}{args.model}{args.loss}{args.version}")
    setup = setup_run(parser, args, SCRIPT, run_dir, seed=args.seed, may_change=MAY_CHANGE)
    if teacher is None:  # built after the seeding: a resumed smoke run gets the same teacher
        teacher = plain_network(args.T_model, num_classes).eval()
    teacher = setup.fast.prepare(teacher.to(setup.device))
    return train(setup, args, build(args, num_classes, teacher), train_set, test_set)


if __name__ == "__main__":
    run_main(main)
