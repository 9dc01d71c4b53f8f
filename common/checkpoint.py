"""Complete, atomic, verified training checkpoints.

A checkpoint is a plain `torch.save` dict (so `torch.load` reads it) holding whatever the script puts in it (every
network, optimizer and scheduler, epoch and step, sampler state, best metric) plus:

    format   "okd-checkpoint/1"
    meta     what the run is (script, architecture, ...): a resumed run must match it
    rng      torch / CUDA / NumPy / Python RNG states
    digest   sha256 over every tensor and value, checked on load (torch's zip format does not catch flipped bits)

Writes go to a temporary file in the same folder, are fsync'ed and renamed over the old file, so a crash at any point
leaves either the old or the new checkpoint, never a torn one.
"""
import hashlib
import os
import pickle
import random
import shutil

import numpy as np
import torch

FORMAT = "okd-checkpoint/2"
EARLIER_FORMATS = ("okd-checkpoint/1",)  # written before the epoch driver; their layout cannot be resumed
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    pass


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _update_digest(h, obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"N{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            h.update(repr(k).encode())
            _update_digest(h, v)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _update_digest(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def digest(obj):
    h = hashlib.sha256()
    _update_digest(h, obj)
    return h.hexdigest()


def save_checkpoint(path, state, meta=None, include_rng=True):
    """Atomically write STATE (a dict) plus format, meta, RNG states and digest to PATH."""
    payload = dict(state)
    payload["format"] = FORMAT
    payload["meta"] = dict(meta or {})
    if include_rng:
        payload["rng"] = rng_state()
    payload.pop("digest", None)
    payload["digest"] = digest(payload)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path, expect_meta=None, map_location="cpu", restore_rng=False):
    """Load and verify a checkpoint written by save_checkpoint.

    Refuses (CheckpointError, nothing written anywhere) a missing, truncated or corrupt file, a file that is not a
    checkpoint of this repository, and one whose meta disagrees with EXPECT_META (e.g. another architecture).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and was not loaded: {e}") from e
    if isinstance(state, dict) and state.get("format") in EARLIER_FORMATS:
        raise CheckpointError(
            f"checkpoint {path} was written by an earlier version of this repository ({state['format']}); this version "
            f"stores runs differently and cannot resume it. Start a new run (--overwrite, or another --run-dir), or "
            f"finish this one with the version that wrote it. The file was not changed.")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this repository (no '{FORMAT}' format tag); "
            f"to start from plain weights use the script's weight-loading option instead of --resume")
    stored = state.pop("digest", None)
    if stored is None or digest(state) != stored:
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match its digest; not loaded")
    state["digest"] = stored
    if expect_meta:
        meta = state.get("meta", {})
        diffs = [f"{k}: checkpoint has {meta.get(k, '<missing>')!r}, this run has {v!r}"
                 for k, v in expect_meta.items() if meta.get(k) != v]
        if diffs:
            raise CheckpointError(f"checkpoint {path} belongs to a different run configuration:\n  " +
                                  "\n  ".join(diffs))
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


def load_state_dict_checked(module, state_dict, what="network"):
    """module.load_state_dict with one readable message on missing/unexpected keys or shape mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
              for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        if shapes:
            lines.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:3]}")
        raise CheckpointError(f"weights do not fit the {what} (wrong architecture or options?): " + "; ".join(lines))
    module.load_state_dict(state_dict)



class ResumableEpoch:
    """One epoch of (step, batch) pairs that a mid-epoch checkpoint can replay exactly.

    At the start of an epoch it records the RNG states, the sampler's state and the loader's own state (the
    generator of a DeviceCifarLoader) from which the loader draws its order, augmentation and worker seeds.
    state(step) is what a mid-epoch checkpoint stores; given it back (`resume=`), the epoch re-creates the same
    loader iterator, fetches and drops the `step` batches already trained on (so every RNG stream, worker ones
    included, advances exactly as before), then restores the RNG states saved with the checkpoint and continues.
    """

    def __init__(self, loader, resume=None):
        self.loader = loader
        self.sampler = getattr(loader, "sampler", None)
        if not hasattr(self.sampler, "state_dict"):
            self.sampler = None
        stateful = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
        self.start_step = 0
        if resume is not None and resume.get("step", 0) > 0:
            self.start_step = resume["step"]
            set_rng_state(resume["epoch_rng"])
            if self.sampler is not None and resume.get("sampler") is not None:
                self.sampler.load_state_dict(resume["sampler"])
            if stateful and resume.get("loader") is not None:
                loader.load_state_dict(resume["loader"])
        self.epoch_rng = rng_state()
        self.epoch_sampler = self.sampler.state_dict() if self.sampler is not None else None
        self.epoch_loader = loader.state_dict() if stateful else None
        self.resume_rng = resume.get("rng") if resume is not None and self.start_step else None

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self.start_step):
            next(it)
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)
        yield from enumerate(it, self.start_step)

    def state(self, step):
        """For a checkpoint written after `step` batches of this epoch (the current RNG is saved with it)."""
        return {"step": step, "epoch_rng": self.epoch_rng, "sampler": self.epoch_sampler,
                "loader": self.epoch_loader, "rng": rng_state()}


def keep_copy(path, copy_path):
    """COPY_PATH becomes the file PATH is now (a hard link: no copy; a plain copy where links are not supported),
    replaced atomically, so it survives PATH being overwritten later."""
    folder = os.path.dirname(os.path.abspath(copy_path))
    tmp = os.path.join(folder, f".{os.path.basename(copy_path)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, copy_path)
