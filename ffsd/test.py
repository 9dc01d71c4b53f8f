"""Evaluate a leader checkpoint on the test set (the authors' test.py):

    python test.py --dataroot DATA --model resnet32 --load_path modelleader_best.pth

Accepts the authors' files ({'weight', 'epoch', 'cfg', 'index'}), plain or `module.`-prefixed state dicts, and this
repository's full-state checkpoint.pt. Prints "Model[Leader]:\tAccuracy xx.xx%\tTime ...s".
"""
import os
import sys
import time

import torch

from common.checkpoint import CheckpointError, load_state_dict_checked
from common.cli import run_main
from common.data import CIFAR100_MEAN, CIFAR100_STD, cifar_datasets, cifar_test_transform, imagenet_datasets, \
    imagenet_val_transform, make_loader
from common.fast import Fast
from common.loop import evaluate
from common.meters import topk_accuracy
from common.options import detached_setup, resolve_device

from ffsd.models import create_model
from ffsd.options import check_args, device_of, get_args_parser


def leader_state_dict(path):
    """(the leader's weights without a `module.` prefix, the architecture the file records or None), from any of the
    accepted checkpoint layouts."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--load_path {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (any unreadable file gets the same message)
        raise CheckpointError(f"{path} is not a readable checkpoint: {e}") from e
    if isinstance(ckpt, dict) and "weight" in ckpt:
        if ckpt.get("index", "leader") != "leader":
            print(f"note: {path} holds network {ckpt['index']!r}, not the leader", file=sys.stderr)
        state = ckpt["weight"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("run"), dict) and "networks" in ckpt["run"]:
        state = {k[len("leader."):]: v for k, v in ckpt["run"]["networks"].items() if k.startswith("leader.")}
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        state = ckpt
    else:
        raise CheckpointError(f"{path} is neither an FFSD leader checkpoint nor a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}, ckpt.get("cfg") if isinstance(ckpt, dict) else None


def load_leader(args):
    """The leader of --model with the weights of --load_path (a plain classifier when the file has no TransFusion
    head)."""
    state, cfg = leader_state_dict(args.load_path)
    if cfg is not None and cfg != args.model:
        raise CheckpointError(f"{args.load_path} was trained with --model {cfg}, not --model {args.model}")
    has_head = any(k.startswith("trans_fusion_module.") for k in state)
    leader = create_model(args.model, args.dataset, leader=has_head, model_num=args.model_num)
    load_state_dict_checked(leader, state, what=f"{args.model} leader (--model_num {args.model_num})")
    return leader


def main(argv=None):
    parser = get_args_parser("cifar100", any_dataset=True)
    args = parser.parse_args(argv)
    if not args.load_path:
        parser.error("--load_path is required: the leader checkpoint (modelleader_best.pth) to evaluate")
    check_args(parser, args)
    setup = detached_setup(Fast.from_args(args, resolve_device(parser, device_of(args))), args.eval_batches)
    leader = load_leader(args).to(setup.device).eval()
    if args.dataset == "cifar100":
        _, test_set = cifar_datasets("cifar100", args.data_root, None,
                                     cifar_test_transform(CIFAR100_MEAN, CIFAR100_STD), flag="--dataroot/--data-root")
    else:
        _, test_set = imagenet_datasets(args.data_root, None, imagenet_val_transform(), flag="--dataroot/--data-root")
    loader = make_loader(test_set, args.test_batch_size, workers=args.workers)
    network = setup.fast.prepare(leader)
    start = time.perf_counter()

    def forward(x, y):
        with setup.fast.autocast():
            return topk_accuracy(network(x)[0], y, (1,))
    accuracy = evaluate(forward, loader, setup).per_sample()["top1"]
    print(f"Model[Leader]:\tAccuracy {accuracy:.2f}%\tTime {time.perf_counter() - start:.2f}s")
    return accuracy


if __name__ == "__main__":
    run_main(main)
