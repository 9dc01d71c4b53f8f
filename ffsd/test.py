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
from common.data import CIFAR100_MEAN, CIFAR100_STD, cifar_datasets, cifar_test_transform, imagenet_datasets, \
    imagenet_val_transform, make_loader

from ffsd.models import create_model
from ffsd.options import build_parser


def leader_state_dict(path):
    """The leader's weights from any of the accepted checkpoint layouts, without a `module.` prefix."""
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
    elif isinstance(ckpt, dict) and "networks" in ckpt:
        state = {k[len("leader."):]: v for k, v in ckpt["networks"].items() if k.startswith("leader.")}
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        state = ckpt
    else:
        raise CheckpointError(f"{path} is neither an FFSD leader checkpoint nor a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}, ckpt.get("cfg") if isinstance(ckpt, dict) else None


def main(argv=None):
    parser = build_parser("cifar100")
    parser.set_defaults(dataset="cifar100")
    parser._option_string_actions["--dataset"].choices = ["cifar100", "imagenet"]
    args = parser.parse_args(argv)
    if not args.load_path:
        parser.error("--load_path is required: the leader checkpoint (modelleader_best.pth) to evaluate")
    from ffsd.models import MODELS
    if args.model not in MODELS[args.dataset]:
        parser.error(f"unknown --model {args.model!r} for {args.dataset}; valid: {', '.join(MODELS[args.dataset])}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and args.gpu_ids != "-1" else "cpu"))
    try:
        state, cfg = leader_state_dict(args.load_path)
        if cfg is not None and cfg != args.model:
            raise CheckpointError(f"{args.load_path} was trained with --model {cfg}, not --model {args.model}")
        leader = create_model(args.model, args.dataset, leader=True, model_num=args.model_num)
        if not any(k.startswith("trans_fusion_module.") for k in state):  # a plain classifier: no TransFusion head
            leader = create_model(args.model, args.dataset, leader=False, model_num=args.model_num)
        load_state_dict_checked(leader, state, what=f"{args.model} leader (--model_num {args.model_num})")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dataset == "cifar100":
        _, test_set = cifar_datasets("cifar100", args.data_root, None, cifar_test_transform(CIFAR100_MEAN, CIFAR100_STD),
                                     flag="--dataroot/--data-root")
    else:
        _, test_set = imagenet_datasets(args.data_root, None, imagenet_val_transform(), flag="--dataroot/--data-root")
    loader = make_loader(test_set, args.test_batch_size, workers=args.workers if args.workers else 0)
    leader.to(device).eval()
    start, correct, count = time.perf_counter(), 0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if args.eval_batches and i >= args.eval_batches:
                break
            logits = leader(x.to(device))[0]
            correct += logits.argmax(1).eq(y.to(device)).sum().item()
            count += y.size(0)
    print(f"Model[Leader]:\tAccuracy {100.0 * correct / max(count, 1):.2f}%\tTime {time.perf_counter() - start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
