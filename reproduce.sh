#!/usr/bin/env bash
# Reproduce the README's tables.
#   bash reproduce.sh list | smoke | tableN [--scale smoke|short|full] [--seeds "1 2"] [--out DIR] [--data-root DIR]
#                                    [--nproc N] [--jobs N --gpus 0,1] [--slurm ...] [--plan] [--dry-run]
#   bash reproduce.sh gpu-check [--device cuda] [--tiny]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ $# -eq 0 ]; then
    exec "${PYTHON:-python}" -m common.reproduce --help
fi
if [ "$1" = "gpu-check" ]; then
    shift
    exec "${PYTHON:-python}" -m common.gpu_check "$@"
fi
exec "${PYTHON:-python}" -m common.reproduce "$@"
