#!/usr/bin/env bash
# Idempotent set-up on a fresh machine (run as root, or with sudo available for apt-get):
#   - Debian's dataset-fashion-mnist (the real data of the embedded default), when missing;
#   - a virtual environment in .venv at the repository root with sip and its test extras.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (a stamp skips pip when
# pyproject.toml has not changed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $sudo_cmd apt-get update -q >/dev/null && $sudo_cmd apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$py" -m venv .venv
fi
stamp=".venv/.sip-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing sip into .venv (first run takes a few minutes: torch is large)"
  # torch and torchvision must be a matching pair; on this project's machines pip is capped at this
  # pair and finds it on local disk. Elsewhere pip resolves the same versions from PyPI.
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  # ray: Ray Data for `--engine ray` and its slow tests (tests/test_scale_ray.py -m slow);
  # lora: peft, for `generate.lora` (LCM-LoRA, style LoRAs) and its tests (tests/test_few_step.py)
  .venv/bin/pip install -q -e ".[test,ray,lora,detect]"
  echo "$want" > "$stamp"
fi
