#!/usr/bin/env bash
# Regenerates the Python modules for csi_driver/proto/*.proto with grpcio-tools.
#
# Usage: scripts/gen-proto.sh [OUT_DIR]
#   Without OUT_DIR the modules are written next to the .proto files. With it they land in
#   OUT_DIR/csi_driver/proto/ (tests/unit/test_proto.py uses that to check the committed
#   modules are current).
#
# The repository root is the import root, so the .proto files are named
# csi_driver/proto/<name>.proto and protoc emits package-absolute imports
# (`from csi_driver.proto import csi_pb2`) without any post-editing. The output depends only on
# the .proto files and the grpcio-tools version (which is written into the modules).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${1:-$ROOT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

cd "$ROOT"
export LC_ALL=C
wkt=$("$PYTHON" -c 'import pathlib, grpc_tools; print(pathlib.Path(grpc_tools.__file__).parent / "_proto")')

for proto in csi_driver/proto/csi.proto csi_driver/proto/registration.proto; do
    "$PYTHON" -m grpc_tools.protoc \
        --proto_path=. \
        --proto_path="$wkt" \
        --python_out="$OUT" \
        --grpc_python_out="$OUT" \
        --pyi_out="$OUT" \
        "$proto"
done
