"""Converters between our modules' state_dicts and the released code's layouts, and a checkpoint exporter.

The released WRN is a flat, ordered dict (`model.pt7`'s `params`): conv weights are stored under the conv's name
(`group0.block0.conv0`, no `.weight`), BN and fc keys are as in nn.Modules, and there is no `num_batches_tracked`.
The released MobileNet is an nn.Module inside DataParallel, so its keys carry a `module.` prefix.

    python -m dcm.convert RUN_DIR/checkpoint.pt model.pt7      # export in the released model.pt7 layout

The exported file holds `params` (net 1's flat dict, as released), `params_2` (net 2: flat dict for a WRN, the
`module.`-prefixed state_dict for MobileNet; the released code never saved net 2), `epoch` and `optimizer`.
"""
import argparse
from collections import OrderedDict

import torch

CONV_NAMES = ("conv0", "conv1", "convdim")


def wrn_to_flat(state_dict):
    """WRN module state_dict -> the released flat parameter dict (same order)."""
    flat = OrderedDict()
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in CONV_NAMES:
            key = ".".join(parts[:-1])
        flat[key] = value
    return flat


def flat_to_wrn(flat, num_batches_tracked=0):
    """The released flat parameter dict -> WRN module state_dict (num_batches_tracked, absent there, is filled)."""
    state = OrderedDict()
    for key, value in flat.items():
        parts = key.split(".")
        if parts[-1] in CONV_NAMES:
            key += ".weight"
        state[key] = value
        if parts[-1] == "running_var":
            state[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(num_batches_tracked)
    return state


def mobilenet_to_released(state_dict):
    """MobileNet state_dict -> the released keys (inside DataParallel: `module.` prefix)."""
    return OrderedDict((f"module.{k}", v) for k, v in state_dict.items())


def released_to_mobilenet(state_dict):
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state_dict.items())


def to_released(state_dict, arch):
    return wrn_to_flat(state_dict) if arch == "wrn" else mobilenet_to_released(state_dict)


def from_released(params, arch):
    return flat_to_wrn(params) if arch == "wrn" else released_to_mobilenet(params)


def export_checkpoint(checkpoint_path, out_path):
    """Write a checkpoint.pt of dcm/main.py in the released model.pt7 layout."""
    from common.checkpoint import load_checkpoint
    ckpt = load_checkpoint(checkpoint_path)
    run = ckpt["run"]  # DCMRun.state_dict()
    nets, archs = run["nets"], run["archs"]
    out = {"params": to_released(nets[0], archs[0]), "epoch": ckpt["epochs_done"], "optimizer": run["optimizer"]}
    if len(nets) > 1:
        out["params_2"] = to_released(nets[1], archs[1])
    torch.save(out, out_path)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pt (or epoch_end.pt) written by dcm/main.py")
    parser.add_argument("out", help="file to write (model.pt7 layout)")
    args = parser.parse_args(argv)
    print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")


if __name__ == "__main__":
    from common.cli import run_main
    run_main(main)
