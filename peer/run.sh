#!/usr/bin/env bash
# Peer suite: PEFT's own tests/test_custom_models.py, from the sdist of the peft version locked in constraints.txt,
# run on GeoRA's rows (peer/geora_rows.py, docs/peer_suite.md). Runs in the active Python environment, which must have
# peft-geora installed (.ci/run's venv, or .venv). Extra arguments go to pytest (e.g. -k "MLP and 5", -x).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^peft==\([^[:space:]]*\)$/\1/p' constraints.txt)
if [ -z "$version" ]; then
    echo "peer: constraints.txt pins no peft==<version>" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/peft-peer.XXXXXX")
trap 'rm -rf "$work"' EXIT
python -m pip download -q -c constraints.txt --no-deps --no-binary :all: "peft==$version" -d "$work"
tar -xzf "$work/peft-$version.tar.gz" -C "$work"
# what PEFT's test modules import beyond peft-geora's [test] extra, pinned by constraints.txt
python -m pip install -q -c constraints.txt -r peer/requirements.txt

echo "peer: PEFT $version tests/test_custom_models.py on GeoRA's rows"
PEFT_TESTS_DIR="$work/peft-$version/tests" HF_HUB_OFFLINE=1 PYTHONHASHSEED=0 python -m pytest -q peer "$@"
