#!/usr/bin/env bash
# Reproduce the README's tables.  bash reproduce.sh list | smoke | tableN [--scale smoke|short|full] [--seeds "1 2"]
#                                 [--out DIR] [--data-root DIR] [--nproc N] [--dry-run]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ $# -eq 0 ]; then
    exec "${PYTHON:-python}" -m common.reproduce --help
fi
exec "${PYTHON:-python}" -m common.reproduce "$@"
