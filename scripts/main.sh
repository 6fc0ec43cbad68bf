#!/usr/bin/env bash
# Main job: SAMA noisy-label reweighting on real MNIST digits (plain vs SAMA clean test accuracy).
# Sets up .venv/ from requirements.lock first. Extra arguments go to the experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m experiments.noisy_labels_demo "$@"
