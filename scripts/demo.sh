#!/usr/bin/env bash
# The main-job command of README.md: set up (idempotent), then `sip demo` on the embedded default.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/sip demo "$@"
