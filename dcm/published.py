"""DCM's published numbers (README Table, CIFAR-100 test error) and the smoke runs of every method and partner."""
from common.results import Row, Run, Table

SOURCE = "authors' README (sundw2014/DCM): Testing error (%, mean +/- std over 5 runs) on CIFAR-100"
WRN = ("main.py", "--depth", "28", "--width", "10")
SMOKE_ARGS = ("--depth", "16", "--width", "0.5", "--epochs", "1", "--steps-per-epoch", "2", "--eval-batches", "1",
              "--nthread", "0")
SCALE = {"smoke": SMOKE_ARGS + ("--batch_size", "8"),
         "short": ("--epochs", "20", "--epoch_step", "[6,12,16]")}
MOBILENET_NOTE = ("MobileNet accuracy with batch-statistics BN at test time, as the released wrn_mobi/main.py "
                  "computed it (it never calls eval()); the eval-mode number is logged as test/net2/top1")

# (pair, method, net column, published error, std); the README's table, cell by cell.
PUBLISHED = [
    ("WRN-28-10 | WRN-28-10", "baseline", 1, 18.72, 0.24), ("WRN-28-10 | WRN-28-10", "baseline", 2, 18.72, 0.24),
    ("WRN-28-10 | WRN-28-10", "dml", 1, 17.89, 0.26), ("WRN-28-10 | WRN-28-10", "dml", 2, 17.95, 0.07),
    ("WRN-28-10 | WRN-28-10", "dcm", 1, 16.61, 0.24), ("WRN-28-10 | WRN-28-10", "dcm", 2, 16.65, 0.22),
    ("WRN-28-10 | MobileNet", "baseline", 1, 18.72, 0.24), ("WRN-28-10 | MobileNet", "baseline", 2, 26.30, 0.35),
    ("WRN-28-10 | MobileNet", "dml", 1, 17.24, 0.13), ("WRN-28-10 | MobileNet", "dml", 2, 23.91, 0.22),
    ("WRN-28-10 | MobileNet", "dcm", 1, 16.83, 0.07), ("WRN-28-10 | MobileNet", "dcm", 2, 21.43, 0.20),
]


def pair_arch(depth, width, net2):
    """The bench's name of a pair: 'wrn-28-10|wrn-28-10', 'wrn-28-10|mobilenet', or 'wrn-28-10' trained alone."""
    wrn = f"wrn-{depth}-{float(width):g}"
    return wrn if net2 == "none" else f"{wrn}|{wrn if net2 == 'wrn' else 'mobilenet'}"


def row(pair, method, net, error, std):
    partner = "mobilenet" if "MobileNet" in pair else "wrn"
    note = ""
    if method == "baseline" and not (partner == "mobilenet" and net == 2):
        # The WRN-28-10 baseline is one network trained alone; the README repeats it in every WRN cell.
        partner, key = "none", "test/net1/top1"
        note = "WRN-28-10 trained alone (--net2 none); the README gives the same baseline in every WRN cell"
    elif partner == "mobilenet" and net == 2:
        key = "test/net2_batchstats/top1"
        note = MOBILENET_NOTE + ("; baseline: WRN and MobileNet trained in one process with no interaction"
                                 if method == "baseline" else "")
    else:
        key = f"test/net{net}/top1"
    argv = WRN + ("--net2", partner, "--method", method)
    net_name = pair.split(" | ")[net - 1]
    return Row(name=f"{pair}, {method.upper() if method != 'baseline' else 'baseline'}, net {net} ({net_name})",
               value=error, std=std, metric="error", key=key, workdir="dcm", argv=argv,
               match={"script": "dcm/main.py", "depth": 28, "width": 10.0, "net2": partner, "method": method},
               epochs=200, n=5, statistic="mean ± std over 5 runs", protocol="final", source=SOURCE,
               scale_args=SCALE, note=note, bench=(method, pair_arch(28, 10, partner)))


TABLES = [Table(id="table1", title="DCM: CIFAR-100 test error (%), WRN-28-10 | WRN-28-10 and WRN-28-10 | MobileNet, "
                                   "baseline / DML / DCM", source=SOURCE,
                rows=tuple(row(*cell) for cell in PUBLISHED), seeds=(1, 2, 3, 4, 5))]

SMOKE_NAMES = {"none": "wrn alone", "wrn": "wrn|wrn", "mobilenet": "wrn|mobilenet"}


def smoke_run(partner, method):
    """One smoke run per distinct command of the table (--net2, --method), standing for every row that reads it."""
    rows = tuple((table.id, r.name) for table in TABLES for r in table.rows
                 if (r.match["net2"], r.match["method"]) == (partner, method))
    return Run(name=f"dcm {method} {SMOKE_NAMES[partner]}", workdir="dcm",
               argv=("main.py", "--net2", partner, "--method", method) + SMOKE_ARGS
               + ("--batch_size", "4" if partner == "mobilenet" else "8"), rows=rows)


SMOKE = [smoke_run(partner, method) for partner, method in
         dict.fromkeys((r.match["net2"], r.match["method"]) for table in TABLES for r in table.rows)]
