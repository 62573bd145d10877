#!/usr/bin/env bash
# Install what the test suite needs and run it, on a fresh machine with nothing but Python and apt.
# README's test command and .ci/run both call this script. Run it from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
export GRADIO_ANALYTICS_ENABLED=False PIP_DISABLE_PIP_VERSION_CHECK=1
# The browser test must run here, not skip: a missing chromium is a failure with a message.
export CCASERVE_REQUIRE_BROWSER=1

if ! command -v chromium >/dev/null; then
    echo "==> installing Debian's chromium (apt) for the browser test"
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    echo "==> creating the virtual environment .venv"
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
echo "==> installing torch==2.13.0 (the CPU build) first, so nothing pulls a CUDA build"
pip install -q torch==2.13.0
echo "==> installing ccaserve with its test extras (pytest, ruff, httpx, playwright): pip install -e .[dev]"
pip install -q -e ".[dev]"
echo "==> ruff check ."
ruff check .
echo "==> python -m pytest tests"
python -m pytest tests "$@"
