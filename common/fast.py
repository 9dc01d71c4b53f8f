"""The fast path: CIFAR kept on the device, augmentation on the device, bf16 autocast, channels_last, compile.

All of it is off by default (the defaults are the released math); `--fast` turns it all on on a GPU, and on the
CPU only channels_last, the one option measured faster there (FAST_ON_CPU below). The device-side
augmentation draws the same distribution as the paper's torchvision transform (crop offsets uniform in 0..8 on each
axis, flips with probability 0.5, the paper's padding mode, pad/flip/crop order and normalisation), and for the same
offsets and flips it produces exactly the same pixels (tests/test_common_fast.py). It draws from its own generator,
so fast runs are repeatable but not RNG-identical to the PIL pipeline.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def add_fast_args(parser):
    g = parser.add_argument_group("fast path (off by default: the defaults are the released math)")
    g.add_argument("--fast", action="store_true",
                   help="all of the below on a GPU; on the CPU only --channels-last (the one measured faster there)")
    g.add_argument("--data-on-device", action="store_true", help="CIFAR on the device as uint8, augmented there")
    g.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast dtype (fp32 master weights)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    return g


# What --fast turns on where. On a GPU all of it. On the CPU only what measured faster there (python -m common.bench,
# five ResNet-32 cases, 2-core CPU, torch 2.14.1; README "Performance"): channels_last 1.1-1.4x the faithful step;
# bf16 autocast about 16x slower (slow bf16 kernels there), device-side augmentation 0.6-0.96x end to end (it runs on
# the cores the step needs, where loader workers overlap with it), torch.compile 0.8-1.1x (nothing consistent to
# keep). Each stays available by name.
FAST_ON_GPU = {"data_on_device": True, "amp": "bf16", "channels_last": True, "compile": True}
FAST_ON_CPU = {"channels_last": True}


@dataclass(frozen=True)
class Fast:
    """The fast path of one run, decided once (nanoGPT's `ctx`): built from the flags by `Fast.from_args`, or
    directly (`Fast(device, amp="bf16")`) by the benches. Steps, evaluations and loaders take it as a value.

    autocast()    the forward's autocast context (bf16 when amp == "bf16", else a no-op)
    inputs(x, y)  a batch moved to the device (non_blocking), images in channels_last when asked
    prepare(m)    the module to call: channels_last and/or torch.compile'd (m itself keeps the state to save)
    Losses take `at_least_fp32(logits)`: fp32 softmax/CE/KL under autocast, float64 left alone.
    """
    device: torch.device = torch.device("cpu")
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    data_on_device: bool = False

    @classmethod
    def from_args(cls, args, device):
        """The options of ARGS on DEVICE: --fast switches on what helps there (FAST_ON_GPU / FAST_ON_CPU), on top
        of whatever was asked by name (`--fast --compile` on the CPU adds compile)."""
        device = torch.device(device)
        chosen = {name: getattr(args, name, default) for name, default in
                  (("amp", "none"), ("channels_last", False), ("compile", False), ("data_on_device", False))}
        if getattr(args, "fast", False):
            chosen.update(FAST_ON_GPU if device.type == "cuda" else FAST_ON_CPU)
        return cls(device, **chosen)

    @property
    def enabled(self):
        return self.amp != "none" or self.channels_last or self.compile or self.data_on_device

    def autocast(self):
        if self.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, x, y):
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def prepare(self, module):
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return torch.compile(module) if self.compile else module

    def describe(self):
        on = [n for n, v in (("data on device", self.data_on_device), (f"autocast {self.amp}", self.amp != "none"),
                             ("channels_last", self.channels_last), ("compile", self.compile)) if v]
        return ", ".join(on) or "off (the released math)"


def at_least_fp32(t):
    """T in at least float32: bf16/fp16 autocast outputs go to float32 (softmax, CE, KL stay fp32 under --amp),
    float32 is returned as is and float64 stays float64 (the parity checkers run every model and loss in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def device_augment(images, offsets, flips, padding_mode="constant", order="crop_flip"):
    """Pad 4, crop 32x32 at per-sample offsets (i, j), and flip, on uint8 (B, 3, 32, 32) images.

    order "crop_flip": crop then flip (RandomCrop(32, padding=4) -> RandomHorizontalFlip);
    order "pad_flip_crop": flip the padded image then crop (Pad -> RandomHorizontalFlip -> RandomCrop(32)).
    """
    b = images.size(0)
    mode = "reflect" if padding_mode == "reflect" else "constant"
    padded = F.pad(images.float() if mode == "reflect" else images, (4, 4, 4, 4), mode=mode)
    if order == "pad_flip_crop":
        padded = torch.where(flips.view(b, 1, 1, 1), padded.flip(3), padded)
    ar = torch.arange(32, device=images.device)
    rows = (offsets[:, 0:1] + ar).view(b, 1, 32, 1).expand(b, 3, 32, 40)
    out = padded.gather(2, rows)
    cols = (offsets[:, 1:2] + ar).view(b, 1, 1, 32).expand(b, 3, 32, 32)
    out = out.gather(3, cols)
    if order == "crop_flip":
        out = torch.where(flips.view(b, 1, 1, 1), out.flip(3), out)
    return out.to(torch.uint8)


def normalize(images, mean, std):
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class DeviceCifarLoader:
    """A CIFAR loader with the whole dataset on the device as uint8 and the augmentation done there.

    Batch order follows the script's semantics: `sampler` (e.g. ClassBalancedSampler) when given, else a shuffled or
    sequential order; drop_last as the script had it. Yields (images float (B,3,32,32), labels int64).
    """

    def __init__(self, dataset, batch_size, device, mean, std, train, padding_mode="constant", order="crop_flip",
                 shuffle=False, drop_last=False, sampler=None, seed=0, channels_last=False):
        self.images = torch.as_tensor(dataset.data).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.as_tensor(dataset.targets, dtype=torch.long).to(device)
        self.batch_size, self.device, self.mean, self.std = batch_size, device, mean, std
        self.train, self.padding_mode, self.order = train, padding_mode, order
        self.shuffle, self.drop_last, self.sampler = shuffle, drop_last, sampler
        self.channels_last = channels_last
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self):
        n = len(self.sampler) if self.sampler is not None else len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def __iter__(self):
        n = len(self.labels)
        if self.sampler is not None:
            order = torch.as_tensor(list(self.sampler), device=self.device)
        elif self.shuffle:
            order = torch.randperm(n, device=self.device, generator=self.generator)
        else:
            order = torch.arange(n, device=self.device)
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            x = self.images[idx]
            if self.train:
                offsets = torch.randint(0, 9, (len(idx), 2), device=self.device, generator=self.generator)
                flips = torch.rand(len(idx), device=self.device, generator=self.generator) < 0.5
                x = device_augment(x, offsets, flips, self.padding_mode, self.order)
            x = normalize(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
