#!/usr/bin/env bash
# One-time set-up: the Python packages, and Fashion-MNIST from Debian's package where apt is available
# (elsewhere pass --download to the scripts, or put torchvision's files under ./data).
set -euo pipefail
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -r "$(dirname "$0")/requirements.txt"
