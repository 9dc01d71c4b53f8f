"""How every script ends on an expected failure: its message and a non-zero exit status, not a traceback.

    if __name__ == "__main__":
        run_main(main)

Expected failures: a missing or corrupt dataset, a refused checkpoint or run folder, a NaN stop, a file that cannot
be written. `--debug` (or OKD_DEBUG=1) shows the traceback as well. Ctrl-C says how to continue; a stop signal
(SIGTERM, SIGUSR1) saves the step reached first (common.loop) and says so.
"""
import sys

from common.checkpoint import CheckpointError
from common.data import DatasetNotFoundError
from common.logging import NonFiniteLossError
from common.loop import RunStopped
from common.options import RunFolderError, debug_requested

EXPECTED = (DatasetNotFoundError, CheckpointError, NonFiniteLossError, RunFolderError, OSError)


def run_main(main, argv=None):
    try:
        return main(argv)
    except RunStopped as e:  # a stop signal: the step reached is saved; the shell convention 128 + signal number
        print(f"{e}", file=sys.stderr)
        raise SystemExit(128 + e.signum)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command with --resume to continue from its last checkpoint",
              file=sys.stderr)
        raise SystemExit(130)
    except EXPECTED as e:
        if debug_requested(argv):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
