#!/usr/bin/env bash
# The CUDA benchmarks in one run: training step (bench/train_step.py) and MultiGen sampling
# (bench/sampling_throughput.py), SD1.4 architecture with random weights, nothing downloaded.
#
#   bash bench/cuda.sh [train|sampling|all]   # default all; results in bench/results/ (and $OUT if set)
#
# On an offline machine without this project's dependencies, put their wheels in .whl/ (diffusers,
# transformers, open_clip_torch, ftfy, wcwidth, importlib_metadata, pycocotools; torch from the machine):
# they are installed into a private folder first. Each part takes about 4 minutes on an H100, much of it
# the compilation; run the parts as separate jobs under a job time limit. With $OUT set, the JSON is
# written there (after every variant, "complete": false until the last), else to bench/results/.
# Each result carries its variants' FLOPs (bench/flops.py, counted on the meta device), achieved TFLOP/s and
# MFU. With the new results in bench/results/, `python bench/cost.py` regenerates docs/cost.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  pip install --quiet --no-index --no-deps --target /tmp/bench-site .whl/*.whl
  export PYTHONPATH="/tmp/bench-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
part="${1:-all}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$part" = train ] || [ "$part" = all ]; then
  python bench/train_step.py --device cuda --out "${OUT:-bench/results}/train_step_cuda.json"
fi
if [ "$part" = sampling ] || [ "$part" = all ]; then
  python bench/sampling_throughput.py --device cuda --out "${OUT:-bench/results}/sampling_throughput_cuda.json"
fi
