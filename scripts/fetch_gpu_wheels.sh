#!/usr/bin/env bash
# Download (and where needed build) into .whl/ the Python wheels the GPU machine's image lacks, for the GPU
# validation campaign (docs/GPU_CAMPAIGN.md). Run it HERE (it needs PyPI), then carry `.whl` in the
# device `run` call (scripts/gpu_campaign.sh installs them to /tmp/site there).
#
#   bash scripts/fetch_gpu_wheels.sh               # bitsandbytes slimmed to its CUDA 13 libraries
#   BNB_KEEP_CUDA=all bash scripts/fetch_gpu_wheels.sh   # the bitsandbytes wheel exactly as PyPI serves it
#
# What the image lacks (docs/SOURCES.md#gpu-image): bitsandbytes, hydra-core, omegaconf
# and omegaconf's antlr4-python3-runtime. PyYAML, packaging, numpy, torch (2.11.0+cu130), transformers, pandas,
# matplotlib, tabulate and nvidia-ml-py are there. hydra-joblib-launcher is NOT fetched: GPU jobs must run one at a
# time (NVML's device-level peak sees every process on the GPU), so the campaign uses Hydra's basic launcher.
#
# Versions: requirements-lock.txt (bitsandbytes, hydra-core, omegaconf). antlr4-python3-runtime is not in the lock:
# hydra-core 1.3.8 and omegaconf 2.3 require antlr4-python3-runtime==4.9.*, whose last release 4.9.3 exists on
# PyPI only as an sdist, so it is built here into a pure-Python py3-none-any wheel (`pip wheel`).
#
# Download flags: exactly the device README's (Python 3.12, CPython, manylinux x86_64), plus manylinux_2_24, the tag
# bitsandbytes 0.50.2 is published under. bitsandbytes' wheel (43 MB) holds native libraries for CUDA 11.8-13.2,
# ROCm and XPU; the GPU image's torch is built for CUDA 13.0, and bitsandbytes loads the library of the runtime's
# CUDA version (same major only, cextension.get_cuda_bnb_library_path). So by default the wheel is repacked keeping
# only libbitsandbytes_cuda13*.so (+ the CPU library): every other file, the metadata and the RECORD hashes of
# the kept files are unchanged; the dropped files' RECORD lines are removed. BNB_KEEP_CUDA=all skips this.
#
# The working tree that travels to the device (tracked + untracked-not-ignored files + carried paths) must stay
# under 64 MiB; this script fails unless the wheels plus that tree stay under BUDGET_MIB (default 48 MiB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST="$ROOT/.whl"
LOCK="$ROOT/requirements-lock.txt"
BNB_KEEP_CUDA="${BNB_KEEP_CUDA:-cuda13}"
BUDGET_MIB="${BUDGET_MIB:-48}"
LIMIT_MIB=64
ANTLR_VERSION_DEFAULT="4.9.3"

locked() {  # locked NAME [DEFAULT] -> the version pinned in requirements-lock.txt
  local v
  v="$(grep -iE "^$1==" "$LOCK" | head -1 | cut -d= -f3 || true)"
  if [[ -z "$v" ]]; then
    [[ -n "${2:-}" ]] || { echo "fetch_gpu_wheels: $1 is not pinned in $LOCK; pin it there" >&2; exit 2; }
    v="$2"
  fi
  echo "$v"
}

BNB_V="$(locked bitsandbytes)"
HYDRA_V="$(locked hydra-core)"
OMEGA_V="$(locked omegaconf)"
ANTLR_V="$(locked antlr4-python3-runtime "$ANTLR_VERSION_DEFAULT")"

if ! git check-ignore -q .whl/probe.whl 2>/dev/null; then
  echo "fetch_gpu_wheels: .whl/ is not git-ignored; add '/.whl/' to .git/info/exclude or .gitignore first" >&2
  exit 2
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/*.tar.gz  # one version of each: two stop the install on the device
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in "bitsandbytes==$BNB_V" "hydra-core==$HYDRA_V" "omegaconf==$OMEGA_V"; do
  echo "download $spec"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec"
done

echo "build antlr4-python3-runtime==$ANTLR_V (sdist only on PyPI) into a py3-none-any wheel"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "antlr4-python3-runtime==$ANTLR_V"
compgen -G "$DEST/antlr4_python3_runtime-$ANTLR_V-py3-none-any.whl" >/dev/null \
  || { echo "fetch_gpu_wheels: the antlr4 build did not give a py3-none-any wheel" >&2; exit 1; }

BNB_WHL="$(ls "$DEST"/bitsandbytes-"$BNB_V"-*.whl)"
echo "bitsandbytes wheel as downloaded: $(basename "$BNB_WHL") $(du -k "$BNB_WHL" | cut -f1) KiB" \
     "sha256 $(sha256sum "$BNB_WHL" | cut -c1-16)..."
if [[ "$BNB_KEEP_CUDA" != "all" ]]; then
  "$PY" - "$BNB_WHL" "$BNB_KEEP_CUDA" <<'EOF'
"""Repack a bitsandbytes wheel keeping only the native GPU libraries whose name starts with the kept prefix."""
import os, re, sys, zipfile

path, keep = sys.argv[1], sys.argv[2]
native = re.compile(r"^bitsandbytes/libbitsandbytes_(cuda|rocm|xpu)[^/]*\.so$")
tmp = path + ".tmp"
dropped = []
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    names = src.namelist()
    drop = {n for n in names if native.match(n) and not n.startswith(f"bitsandbytes/libbitsandbytes_{keep}")}
    kept_native = sorted(n for n in names if native.match(n) and n not in drop)
    if not kept_native:
        sys.exit(f"fetch_gpu_wheels: no native library matches {keep!r}; set BNB_KEEP_CUDA=all")
    for info in src.infolist():
        if info.filename in drop:
            dropped.append(info.filename)
            continue
        data = src.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(l for l in lines if l.split(",", 1)[0] not in drop).encode()
        dst.writestr(info, data)
os.replace(tmp, path)
print(f"kept {', '.join(os.path.basename(n) for n in kept_native)}; dropped {len(dropped)} other native libraries")
EOF
  echo "bitsandbytes wheel repacked: $(du -k "$BNB_WHL" | cut -f1) KiB"
fi

echo "check: the wheels install with --no-index --no-deps and import (here, on the CPU)"
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$DEST"/*.whl
PYTHONPATH="$SITE" "$PY" - <<'EOF'
import logging
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import importlib.metadata, os
import antlr4, bitsandbytes, hydra, omegaconf
for mod in (antlr4, bitsandbytes, hydra, omegaconf):
    assert mod.__file__.startswith(os.environ["PYTHONPATH"]), f"{mod.__name__} was not imported from the wheels"
print(f"  bitsandbytes {bitsandbytes.__version__}, hydra-core {hydra.__version__}, omegaconf {omegaconf.__version__},"
      f" antlr4-python3-runtime {importlib.metadata.version('antlr4-python3-runtime')}")
EOF

wheels_kib=$(du -ck "$DEST"/*.whl | tail -1 | cut -f1)
tree_kib=$(git ls-files -z -co --exclude-standard | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
total_kib=$((wheels_kib + tree_kib))
echo
ls -l "$DEST"/*.whl | awk '{printf "  %8d KiB  %s\n", $5/1024, $NF}'
awk -v w="$wheels_kib" -v t="$tree_kib" -v l="$LIMIT_MIB" 'BEGIN {
  printf "wheels: %.1f MiB; travelling working tree without them: %.1f MiB; together %.1f MiB of the %d MiB limit\n",
         w / 1024, t / 1024, (w + t) / 1024, l }'
if (( total_kib > BUDGET_MIB * 1024 )); then
  echo "fetch_gpu_wheels: over the ${BUDGET_MIB} MiB budget (limit ${LIMIT_MIB} MiB); keep BNB_KEEP_CUDA=cuda13" >&2
  exit 1
fi
echo "ok: well under the limit; carry '.whl' in the device run call (docs/GPU_CAMPAIGN.md)"
