"""The parity core: our implementation against fixtures computed by the authors' code.

Each `<paper>/parity.py` rebuilds a fixture's configuration and computes every checked quantity twice with our own
code: in float32, as the reference was computed, and in float64 from the same (fp16-grid) weights and input. This
module compares the pair with the reference and decides.

The tolerance of a float32 item is derived from rounding measured on this machine, never a constant:

    scale      max |ours64| over the entry (or a floor the checker ties to the layer, so an analytically zero
               gradient is compared in absolute terms against its layer's size)
    spread     max |ours32 - ours64| / scale        our own float32 rounding error, here, on this CPU
    tolerance  SPREAD_MULTIPLE * max(spread, FLOOR)  FLOOR = FLOOR_ULPS * eps(float32)
    error      max |ref - ours64| / scale           the reference's distance from the exact value of our math

The reference is another float32 evaluation of the same math (other kernels, other summation orders), so its
rounding error is of the order of ours; SPREAD_MULTIPLE covers kernels that round several times worse, and FLOOR a
quantity that our kernels happen to get exact. A wrong formula moves ours64 itself, so it shows as an error however
the rounding falls. An item whose tolerance would exceed the smallest relative effect it is meant to see (`detect`)
is chaotic in float32: it is reported as "not comparable in float32" and does not decide; the fixture's float64
reference, checked in float64 with the stated F64 tolerances, is what checks it.

Checksums (fixtures store sums rather than whole tensors) are compared through the same rule: each stored field is
normalised by the matching field of our float64 tensor (sum and abs_sum by abs_sum, sq_sum by sq_sum, l2 by l2,
leading values by the rms), which makes every field a dimensionless number of order one.

Fixtures live under one root: `--fixtures-root DIR`, else $OKD_FIXTURES, else `../shared/fixtures` beside the
repository (`fixtures_root`).
"""
import argparse
import contextlib
import math
import os
import pathlib
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

EPS32 = torch.finfo(torch.float32).eps
FLOOR_ULPS = 4
FLOOR = FLOOR_ULPS * EPS32
SPREAD_MULTIPLE = 8.0
DETECT = 1e-3  # default: a float32 item must see a 0.1 % relative change to be worth comparing in float32
F64 = {"loss": 1e-10, "output": 1e-9, "meta": 1e-6}  # float64 references, relative to the item's scale

ENV_VAR = "OKD_FIXTURES"
DEFAULT_ROOT = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"


# ------------------------------------------------------------------------------------------- fixture files ----
def fixtures_root(override=None):
    """The folder holding <paper>/ fixture folders: OVERRIDE, else $OKD_FIXTURES, else ../shared/fixtures."""
    return pathlib.Path(override or os.environ.get(ENV_VAR) or DEFAULT_ROOT).expanduser()


def fixture_files(paper, root=None):
    """The paper's `*_fixture.pt` files, sorted (weight files such as `*_fixture_net0.pt` are not fixtures)."""
    folder = fixtures_root(root) / paper
    return sorted(folder.glob("*_fixture.pt")) if folder.is_dir() else []


def fingerprint_files(paper, root=None):
    """The paper's `*.json` state-dict fingerprints, sorted."""
    folder = fixtures_root(root) / paper
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


class FixtureError(RuntimeError):
    """A fixture that cannot be read or does not follow SCHEMA.md."""


def load_fixture(path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise FixtureError(f"fixture {path} does not exist")
    try:
        fixture = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        raise FixtureError(f"fixture {path} cannot be read: {type(e).__name__}: {e}") from e
    if not isinstance(fixture, dict):
        raise FixtureError(f"fixture {path} is not a dict (see SCHEMA.md)")
    return fixture


def load_weight_files(folder, names):
    """Merge sibling weight files (plain {key: tensor} dicts, names relative to FOLDER), in the order given."""
    state = {}
    for name in names:
        file = pathlib.Path(folder) / name
        if not file.is_file():
            raise FixtureError(f"weight file {file} named by the fixture is missing")
        state.update(torch.load(file, map_location="cpu", weights_only=False))
    return state


def as_dtype(state, dtype=torch.float32):
    """Floating tensors of a state dict in DTYPE (float16 fixture weights -> float32 is exact); others untouched."""
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in state.items()}


# ----------------------------------------------------------------------------------------------- values ----
def flat(x):
    """Tensors, numbers, (nested) lists/tuples of them -> one float64 CPU vector."""
    if isinstance(x, (list, tuple)):
        parts = [flat(v) for v in x]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if torch.is_tensor(x):
        return x.detach().to("cpu", torch.float64).reshape(-1)
    return torch.tensor([float(x)], dtype=torch.float64)


def checksum(t, first=5):
    """float64 {n, sum, abs_sum, sq_sum, l2, first} of a tensor (the fields every fixture's checksums draw on)."""
    v = flat(t)
    sq = float((v * v).sum())
    return {"n": v.numel(), "sum": float(v.sum()), "abs_sum": float(v.abs().sum()), "sq_sum": sq,
            "l2": math.sqrt(sq), "first": v[:first].tolist()}


def stored_checksum(ref):
    """A fixture checksum in any of its stored forms -> {field: value(s)}: DCM {sum, abs_sum, sq_sum, first, shape},
    OKDDip {sum, abs_sum, sq_sum, first4} or {sum, l2} or {l2, sum, full}, FFSD (sum, sum of squares)."""
    if isinstance(ref, (tuple, list)):
        return {"sum": float(ref[0]), "sq_sum": float(ref[1])}
    out = {k: ref[k] for k in ("sum", "abs_sum", "sq_sum", "l2") if k in ref}
    first = ref.get("first", ref.get("first4"))
    if first is not None:
        out["first"] = list(first)
    return out


def checksum_vectors(ours32, ours64, ref, scale_floor=0.0):
    """(ours32, ours64, ref) as float64 vectors over the fields the reference stores, each field normalised by the
    matching size of our float64 tensor (at least SCALE_FLOOR per element): numbers of order one."""
    ref = stored_checksum(ref)
    k = len(ref.get("first", ()))
    c32, c64 = checksum(ours32, k), checksum(ours64, k)
    n, s = max(c64["n"], 1), float(scale_floor)
    norm = {"sum": max(c64["abs_sum"], n * s), "abs_sum": max(c64["abs_sum"], n * s),
            "sq_sum": max(c64["sq_sum"], n * s * s), "l2": max(c64["l2"], math.sqrt(n) * s),
            "first": max(c64["l2"] / math.sqrt(n), s)}

    def vector(c):
        values = []
        for field in ref:
            v = c[field] if field != "first" else c[field][:k]
            values += [x / max(norm[field], 1e-300) for x in (v if field == "first" else [v])]
        return torch.tensor(values, dtype=torch.float64)

    if len(c32["first"]) < k:  # a tensor smaller than the stored leading values: a layout difference
        return None
    return vector(c32), vector(c64), vector(ref)


# ------------------------------------------------------------------------------------------------ report ----
OK, FAIL, CHAOTIC = "ok", "FAIL", "n/c"


class Item:
    __slots__ = ("name", "status", "error", "tolerance", "spread", "scale", "note")

    def __init__(self, name, status, error, tolerance, spread=None, scale=None, note=""):
        self.name, self.status, self.error, self.tolerance = name, status, error, tolerance
        self.spread, self.scale, self.note = spread, scale, note

    def line(self, width):
        spread = f"  spread {self.spread:.1e}" if self.spread is not None else " " * 16
        scale = f"  scale {self.scale:.1e}" if self.scale is not None else ""
        return (f"  {self.status:<4} {self.name:<{width}}  err {self.error:8.1e}  tol {self.tolerance:8.1e}"
                f"{spread}{scale}{'  ' + self.note if self.note else ''}")


class Report:
    """The items checked on one fixture, each with its error, its derived tolerance and the measured spread."""

    def __init__(self, title):
        self.title, self.items = title, []

    # -- float32 items: tolerance from the measured float32-vs-float64 spread ----------------------------------
    def float32(self, name, ours32, ref, ours64, scale=None, scale_floor=0.0, detect=DETECT, also=()):
        """One quantity (tensor, number or nested list). ALSO: further float32 results of ours (another memory
        layout, other kernels); the spread is the largest of them all."""
        self.entries(name, {"": (ours32, ref, ours64)}, scale=scale, scale_floor=scale_floor, detect=detect,
                     also={"": also} if also else None)

    def entries(self, name, entries, scale=None, scale_floor=0.0, detect=DETECT, shared_spread=False, also=None):
        """Several quantities {key: (ours32, ref, ours64)}, each with its own scale (its largest |ours64|, at least
        SCALE_FLOOR, or SCALE if given) and spread. SHARED_SPREAD: one spread for all, the largest (for scalars,
        whose individual spreads are a single rounding draw each). The item reports its worst entry."""
        rows = {}
        for key, (o32, ref, o64) in entries.items():
            a, r, e = flat(o32), flat(ref), flat(o64)
            if not (a.shape == r.shape == e.shape):
                self._add(Item(name + (f" [{key}]" if key else ""), FAIL, math.inf, 0.0,
                               note=f"shape: ours {tuple(a.shape)}, reference {tuple(r.shape)}"))
                return
            s = scale if scale is not None else max(float(e.abs().max()) if e.numel() else 0.0, scale_floor, 1e-300)
            others = [flat(v) for v in (also or {}).get(key, ())]
            rows[key] = (a / s, r / s, e / s, [v / s for v in others], s)
        self._decide(name, {k: v[:4] for k, v in rows.items()}, detect, shared_spread,
                     scale=rows[next(iter(rows))][4] if len(rows) == 1 else None)

    def checksums(self, name, ours32, refs, ours64, detect=DETECT, scale_floor=0.0, also=()):
        """Stored checksums {key: checksum} against our tensors {key: tensor} (float32 and float64). A key missing
        on our side is a failure; the item reports its worst entry. ALSO: further float32 results of ours, each a
        {key: tensor} (another memory layout: other kernels), counted in the measured spread."""
        missing = [k for k in refs if k not in ours32 or k not in ours64]
        if missing:
            self._add(Item(name, FAIL, math.inf, 0.0, note=f"{len(missing)} stored keys not produced, e.g. "
                                                            f"{missing[:3]}"))
            return
        rows = {}
        for key, ref in refs.items():
            if isinstance(ref, dict) and "shape" in ref and list(ours64[key].shape) != list(ref["shape"]):
                self._add(Item(name, FAIL, math.inf, 0.0, note=f"{key}: shape {list(ours64[key].shape)}, reference "
                                                                f"{list(ref['shape'])}"))
                return
            vectors = checksum_vectors(ours32[key], ours64[key], ref, scale_floor)
            if vectors is None:
                self._add(Item(name, FAIL, math.inf, 0.0, note=f"{key}: fewer values than the stored checksum"))
                return
            a, e, r = vectors
            rows[key] = (a, r, e, [checksum_vectors(other[key], ours64[key], ref, scale_floor)[0] for other in also])
        self._decide(name, rows, detect, shared_spread=False)

    def _decide(self, name, rows, detect, shared_spread, scale=None):
        spreads = {k: max([float((a - e).abs().max()) if e.numel() else 0.0] +
                          [float((v - e).abs().max()) for v in alt])
                   for k, (a, r, e, alt) in rows.items()}
        if shared_spread:
            common = max(spreads.values(), default=0.0)
            spreads = {k: common for k in spreads}
        worst, chaotic, compared = None, 0, 0
        for key, (a, r, e, _) in rows.items():
            err = float((r - e).abs().max()) if e.numel() else 0.0
            if not math.isfinite(err):
                err = math.inf
            tol = SPREAD_MULTIPLE * max(spreads[key], FLOOR)
            if tol > detect:
                chaotic += 1
                continue
            compared += 1
            if worst is None or err / tol > worst[1] / worst[2]:
                worst = (key, err, tol, spreads[key])
        n = len(rows)
        if worst is None:
            key = max(spreads, key=spreads.get) if spreads else ""
            a, r, e, _ = rows[key]
            err = float((r - e).abs().max()) if e.numel() else 0.0
            self._add(Item(name, CHAOTIC, err, SPREAD_MULTIPLE * max(spreads.get(key, 0.0), FLOOR),
                           spreads.get(key), scale, note=f"not comparable in float32 (tolerance above the "
                                                         f"{detect:.0e} it must detect)"))
            return
        key, err, tol, spread = worst
        note = (f"worst: {key}" if key and n > 1 else (key or "")) + \
            (f"; {chaotic}/{n} entries not comparable in float32" if chaotic else "")
        self._add(Item(name, OK if err <= tol else FAIL, err, tol, spread, scale, note.strip("; ")))

    # -- float64 references -----------------------------------------------------------------------------------
    def float64(self, name, ours64, ref, rtol, scale=None):
        """A float64 reference against our float64 value: error relative to the reference's largest magnitude."""
        a, r = flat(ours64), flat(ref)
        if a.shape != r.shape:
            self._add(Item(name, FAIL, math.inf, rtol, note=f"shape: ours {tuple(a.shape)}, reference "
                                                            f"{tuple(r.shape)}"))
            return
        s = scale if scale is not None else max(float(r.abs().max()) if r.numel() else 0.0, 1e-300)
        err = float((a - r).abs().max()) / s if r.numel() else 0.0
        self._add(Item(name, OK if err <= rtol else FAIL, err if math.isfinite(err) else math.inf, rtol, None, s,
                       "float64"))

    # -- exact facts: layouts, counts, flags ------------------------------------------------------------------
    def exact(self, name, condition, detail=""):
        self._add(Item(name, OK if condition else FAIL, 0.0 if condition else math.inf, 0.0, note=detail))

    def equal(self, name, ours, ref):
        """Values that must be identical (integers, counts, booleans, names)."""
        same = ours == ref
        self.exact(name, bool(same), "" if same else f"ours {_short(ours)}, reference {_short(ref)}")

    def _add(self, item):
        self.items.append(item)

    # -- outcome ----------------------------------------------------------------------------------------------
    @property
    def ok(self):
        return bool(self.items) and all(i.status != FAIL for i in self.items)

    def failed(self):
        return [i.name for i in self.items if i.status == FAIL]

    def not_comparable(self):
        return [i.name for i in self.items if i.status == CHAOTIC]

    def item(self, name):
        return next(i for i in self.items if i.name == name)

    def format(self):
        width = max([len(i.name) for i in self.items] + [10])
        counts = {s: sum(i.status == s for i in self.items) for s in (OK, FAIL, CHAOTIC)}
        lines = [f"== {self.title}"] + [i.line(width) for i in self.items]
        summary = f"{len(self.items)} items: {counts[OK]} ok, {counts[FAIL]} failed"
        if counts[CHAOTIC]:
            summary += f", {counts[CHAOTIC]} not comparable in float32"
        lines.append(f"  -> {'PASS' if self.ok else 'FAIL'} ({summary})")
        return "\n".join(lines)


def _short(v, n=80):
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


RULE = (f"float32 items: error = max|ref - ours64| / scale, tolerance = {SPREAD_MULTIPLE:g} x max(measured "
        f"float32 spread max|ours32 - ours64| / scale, {FLOOR_ULPS} eps32 = {FLOOR:.1e}); float64 references: "
        f"stated relative tolerances")


# --------------------------------------------------------------------------------------------- dtype audit ----
class _DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t) and t.is_floating_point():
                self.seen.setdefault(t.dtype, str(func))
        return out


@contextlib.contextmanager
def floating_dtypes():
    """Records the floating dtypes of every tensor any op produces inside the block: {dtype: first op}."""
    recorder = _DtypeRecorder()
    with recorder:
        yield recorder.seen


# ------------------------------------------------------------------------------------------------ command ----
def checker_main(paper, check_fixture, doc, argv=None, add_arguments=None):
    """`python -m <paper>.parity [FIXTURE ...] [--fixtures-root DIR]`: check each fixture, print its report, exit 0
    only when every fixture passes. CHECK_FIXTURE(path, args) -> Report; a fixture that cannot be checked (unreadable,
    not of the schema, a configuration the scripts do not support) is a failure with its reason."""
    parser = argparse.ArgumentParser(prog=f"python -m {paper}.parity", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="*", help=f"fixture files (default: every *_fixture.pt in the fixtures "
                                                    f"root's {paper}/ folder)")
    parser.add_argument("--fixtures-root", default=None,
                        help=f"folder holding <paper>/ fixture folders (default: ${ENV_VAR}, else {DEFAULT_ROOT.name} "
                             f"../shared/fixtures beside the repository)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    paths = [pathlib.Path(p) for p in args.fixtures] or fixture_files(paper, args.fixtures_root)
    if not paths:
        print(f"no fixture given and no *_fixture.pt in {fixtures_root(args.fixtures_root) / paper}", file=sys.stderr)
        return 2
    print(RULE)
    passed = 0
    for path in paths:
        try:
            report = check_fixture(path, args)
        except FixtureError as e:
            print(f"== {path.name}\n  FAIL cannot be checked: {e}")
            continue
        print(report.format())
        passed += report.ok
    print(f"{passed}/{len(paths)} fixtures match")
    return 0 if passed == len(paths) else 1
