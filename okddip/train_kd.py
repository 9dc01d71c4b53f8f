"""Hinton KD from a frozen teacher written by train.py (its best.pth, or checkpoint.pt).

    python train.py --model resnet110 --dataset CIFAR100 --run-dir runs/teacher
    python train_kd.py --model resnet32 --T_model resnet110 --T_model_path runs/teacher --dataset CIFAR100

L = CE(z_s, y) + alpha KL_T(z_s; z_t), the teacher in eval mode under no_grad. No ramp. Milestones at 50 % / 75 %
of the epochs, as released (no --schedule flag).
"""
import os

import torch

from common.checkpoint import CheckpointError, load_state_dict_checked
from common.fast import autocast
from okddip.engine import base_parser, check_args, count_classes, train
from okddip.losses import kd_loss
from okddip.models import check_arch, plain_network

SCRIPT = "okddip/train_kd.py"


def load_teacher(arch, path, num_classes, device):
    """A plain network of ARCH with the weights of PATH (a folder holding best.pth, or a .pth file)."""
    file = os.path.join(path, "best.pth") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SystemExit(f"--T_model_path: no teacher weights at {file}; train one with "
                         f"`python train.py --model {arch} --run-dir DIR` and pass DIR")
    state = torch.load(file, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    teacher = plain_network(arch, num_classes)
    try:
        load_state_dict_checked(teacher, state, what=f"teacher {arch}")
    except CheckpointError as e:
        raise SystemExit(f"--T_model_path {file}: {e}")
    return teacher.to(device).eval()


def parser():
    p = base_parser(__doc__)
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
    """The student and step(net, x, y, epoch) -> (loss, terms, out): both forwards (autocast when --amp), the loss."""
    model = plain_network(args.model, num_classes, dropout=args.dropout)

    def step(net, x, y, epoch):
        with autocast(args, x.device):
            z = net(x)
            with torch.no_grad():
                z_t = teacher(x)
        loss, terms = kd_loss(z, z_t, y, args.alpha, args.temperature, args.loss)
        return loss, terms, {"pro": z}

    return model, step


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    check_args(args)
    try:
        check_arch(args.T_model, args.dataset)
    except ValueError as e:
        p.error(f"--T_model: {e}")
    args.schedule = [args.num_epochs * 0.5, args.num_epochs * 0.75]  # released milestones, not a flag here
    num_classes = count_classes(args)
    path = args.T_model_path or os.path.join(args.dataset, str(args.num_epochs), f"{args.T_model}V0")
    device = torch.device(args.device if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    if "LOCAL_RANK" in os.environ and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if args.teacher_untrained:
        teacher = plain_network(args.T_model, num_classes).to(device).eval()
    else:
        teacher = load_teacher(args.T_model, path, num_classes, device)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    model, step = build(args, num_classes, teacher)

    run_dir = os.path.join(args.dataset, str(args.num_epochs), "kd",
                           f"{args.T_model}{args.model}{args.loss}{args.version}")
    train(args, SCRIPT, None, model, step, {"method": "kd", "T_model": args.T_model}, "test/net/top1", run_dir)


if __name__ == "__main__":
    main()
