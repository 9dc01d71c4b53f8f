"""One CIFAR-100 network trained alone with cross-entropy (the baselines of the L-MCL tables), as the authors'
main_cifar_baseline.py: shuffled batches of 128, Nesterov SGD, wd 5e-4, epoch-wise cosine lr from 0.1, 300 epochs.

    cd mcl && python main_cifar_baseline.py --arch resnet32_cifar --run-dir runs/r32_baseline
"""
from functools import partial


from common.checkpoint import load_checkpoint, load_state_dict_checked
from common.cli import run_main
from common.data import cifar_datasets, cifar_test_transform, cifar_train_transform, make_loader
from common.fast import DeviceCifarLoader, Fast
from common.loop import fit
from common.options import detached_setup, resolve_device, setup_run
from mcl.models import CIFAR_BASELINES, build_cifar_baseline
from mcl.runs import BaselineRun
from mcl.train_utils import CIFAR_DEFAULTS, LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD, MAY_CHANGE, base_parser, \
    build_as_released, check_args, finish_parser, run_folder, test_heads

SCRIPT = "mcl/main_cifar_baseline.py"


def get_args_parser():
    return finish_parser(base_parser(__doc__, CIFAR_BASELINES, "resnet32_cifar", CIFAR_DEFAULTS))


def cifar_loaders(args, fast):
    """(train loader, test loader): the authors' PIL pipeline (shuffled, last batch kept, zero-pad crop then flip,
    their mean/std) with --num-workers processes, or with --data-on-device the same on the device."""
    train_set, test_set = cifar_datasets(
        "CIFAR100", args.data_root, cifar_train_transform(LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD, "constant", "crop_flip"),
        cifar_test_transform(LMCL_CIFAR100_MEAN, LMCL_CIFAR100_STD), flag="--data-root")
    if fast.data_on_device:
        cifar = dict(device=fast.device, mean=LMCL_CIFAR100_MEAN, std=LMCL_CIFAR100_STD, padding_mode="constant",
                     order="crop_flip")
        return (DeviceCifarLoader(train_set, args.batch_size, train=True, shuffle=True, seed=args.manual_seed,
                                  **cifar), DeviceCifarLoader(test_set, args.batch_size, train=False, **cifar))
    pin = fast.device.type == "cuda"
    return (make_loader(train_set, args.batch_size, shuffle=True, workers=args.num_workers, pin_memory=pin),
            make_loader(test_set, args.batch_size, workers=args.num_workers, pin_memory=pin))


def evaluate_checkpoint(parser, args):
    """--evaluate: test the weights of --evaluate-checkpoint (default <run-dir>/best.pt); writes nothing."""
    setup = detached_setup(Fast.from_args(args, resolve_device(parser, args.device)), args.eval_batches)
    model = build_cifar_baseline(args.arch, 100).to(setup.device)
    path = args.evaluate_checkpoint or f"{args.run_dir or default_run_dir(args)}/best.pt"
    load_state_dict_checked(model, load_checkpoint(path, expect_meta={"arch": args.arch})["net"])
    record = test_heads(setup.fast.prepare(model), cifar_loaders(args, setup.fast)[1], setup, single=True)
    print(" ".join(f"{k} {v:.4f}" for k, v in record.items()))
    return record


def default_run_dir(args):
    return run_folder(args, f"main_cifar_baseline_arch_{args.arch}_dataset_{args.dataset}_seed{args.manual_seed}")


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args, CIFAR_BASELINES)
    if args.evaluate:
        return evaluate_checkpoint(parser, args)
    setup = setup_run(parser, args, SCRIPT, default_run_dir(args), seed=args.manual_seed, streams=("numpy", "torch"),
                      may_change=MAY_CHANGE)
    # the authors' probe is drawn (so the augmentation draws follow theirs) but its output is not needed here
    model, _ = build_as_released(partial(build_cifar_baseline, args.arch, 100), (1, 3, 32, 32))
    train_loader, test_loader = cifar_loaders(args, setup.fast)
    run = BaselineRun(setup, args, model.to(setup.device), test_loader, nesterov=True)
    setup.logger.print(f"Arch: {args.arch}, Params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    return fit(run, train_loader, setup, args.epochs)


if __name__ == "__main__":
    run_main(main)
