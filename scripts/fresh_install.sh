#!/usr/bin/env bash
# A new user's first hour, on this machine: a brand-new venv in a temporary folder from the README's set-up
# command (no pip cache, nothing reused), the lock check, `--help` of both entry scripts, then the README's
# smoke run (train + evaluate, random weights, synthetic phantoms) into the temporary folder.
#   bash scripts/fresh_install.sh            # about 10 min: the install (torch's CUDA build on Linux) then the run
# Run it before you stop whenever requirements.in or requirements.txt changed. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
tmp=$(mktemp -d /tmp/fresh-install.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)
step() { echo "=== $* ($(( $(date +%s) - t0 )) s)"; }

step "the README's set-up command, in $tmp/.venv"
"$PY" -m venv "$tmp/.venv"
PIP_NO_CACHE_DIR=1 "$tmp/.venv/bin/pip" install -q -r requirements.txt
export PATH="$tmp/.venv/bin:$PATH"
step "the venv against the lock"
python scripts/check_lock.py requirements.txt
step "--help"
python train.py --help > /dev/null && python evaluate.py --help > /dev/null
step "the README's smoke run"
python train.py --data synthetic --shots 1 --random-init --clip ViT-B-16 --steps 200 --out "$tmp/run"
python evaluate.py --ckpt "$tmp/run/run.pt"
step "done: a fresh install trains and evaluates"
