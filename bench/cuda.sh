#!/usr/bin/env bash
# The CUDA benchmarks in one run: training step (bench/train_step.py) and MultiGen sampling
# (bench/sampling_throughput.py), SD1.4 architecture with random weights, nothing downloaded.
#
#   bash bench/cuda.sh            # results in bench/results/, copied to $OUT when it is set
#
# On a machine without this project's dependencies, put their wheels in .whl/ (diffusers, transformers,
# open_clip_torch, ftfy, wcwidth, importlib_metadata, pycocotools; torch from the machine): they are
# installed into a private folder first. About 8-10 minutes on an H200, most of it the two compilations.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  pip install --quiet --no-index --no-deps --target /tmp/bench-site .whl/*.whl
  export PYTHONPATH="/tmp/bench-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python bench/train_step.py --device cuda
python bench/sampling_throughput.py --device cuda
if [ -n "${OUT:-}" ]; then
  cp bench/results/train_step_cuda.json bench/results/sampling_throughput_cuda.json "$OUT"/
fi
