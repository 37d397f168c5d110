#!/usr/bin/env bash
# The peers of benchmarks/peers.py, each in its own virtual environment, outside the repository:
#
#   $PEERS_DIR/vanilla-rtrl         clone of github.com/omarschall/vanilla-rtrl  (NumPy reference)
#   $PEERS_DIR/sketched-rtrl        clone of github.com/sonaradarcn/sketched-rtrl (PyTorch reference)
#   $PEERS_DIR/venv-vanilla-rtrl    numpy, scipy (its utils import scipy)
#   $PEERS_DIR/venv-sketched-rtrl   torch (from PyPI), numpy
#   $PEERS_DIR/venv-braintrace      braintrace from PyPI (it brings its own jax)
#
# PEERS_DIR defaults to the folder "peers" beside the repository (the timing drivers look there
# too). PEERS_SRC is where the clones come from, with {owner} and {name} filled in; it defaults to
# GitHub (https://github.com/{owner}/{name}); a local mirror works the same way, e.g.
# PEERS_SRC='/srv/mirror/{owner}+{name}/repo'. Each clone is checked out at the commit the
# published table used; the versions below are those too. Idempotent: what exists is kept (a
# clone is only moved to its commit, a venv only gets what it lacks).
#
# Usage: bash benchmarks/peers/setup.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$(dirname "$repo")/peers}"
PEERS_SRC="${PEERS_SRC:-https://github.com/{owner}/{name}}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$PEERS_DIR"

clone() {  # owner name commit
  local url="${PEERS_SRC//\{owner\}/$1}"
  url="${url//\{name\}/$2}"
  if [ ! -d "$PEERS_DIR/$2/.git" ]; then
    git clone -q "$url" "$PEERS_DIR/$2"
  fi
  git -C "$PEERS_DIR/$2" -c advice.detachedHead=false checkout -q "$3"
}

venv() {  # name packages...
  local dir="$PEERS_DIR/venv-$1"
  shift
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q "$@"
}

clone omarschall vanilla-rtrl 4602f366b285687e03ba343c9344e072777bf8f3
clone sonaradarcn sketched-rtrl bb6055eb7ab783dc88dff83ea5177a7b05759a4b
venv vanilla-rtrl numpy==2.4.6 scipy==1.17.1
venv sketched-rtrl torch==2.14.1 numpy==2.4.6
venv braintrace braintrace==0.2.6
echo "peers ready in $PEERS_DIR"
