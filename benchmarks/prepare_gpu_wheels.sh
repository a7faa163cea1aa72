#!/usr/bin/env bash
# Download, on this CPU machine, the wheels the GPU machine lacks, pinned and checked against
# the hashes in benchmarks/wheelsets/*.txt, in the folders the device calls carry.
#
#   bash benchmarks/prepare_gpu_wheels.sh core        # -> .whl/  (open_clip + ftfy + wcwidth, ~2.3 MB; call 1)
#   bash benchmarks/prepare_gpu_wheels.sh dali        # -> .dali1 .. .daliN (DALI's full set, split; each
#                                                      #    carry <= 55 MiB with the working tree)
#   bash benchmarks/prepare_gpu_wheels.sh deepspeed   # -> .whl-ds/ (DeepSpeed built here + its dependencies)
#   bash benchmarks/prepare_gpu_wheels.sh synthesis   # -> .whl-syn/ (diffusers + importlib_metadata, ~6.4 MB)
#   bash benchmarks/prepare_gpu_wheels.sh all         # or several: core dali
#
# The GPU machine has Python 3.12, torch 2.11 (cu130), triton 3.6, torchvision 0.26, timm,
# regex, tqdm, huggingface_hub, safetensors, numpy, packaging, pyyaml, six, wheel; it lacks
# open_clip, DALI and DeepSpeed, and has no network (the device tool's KINDS.md). Every folder
# is ignored by git (.gitignore); the last line printed is one JSON line of sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB="${LIMIT_MIB:-55}"
PY="${PYTHON:-python3}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64)
download() {  # download DEST REQUIREMENTS_FILE: exactly the pinned files, hashes required
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" --require-hashes -d "$1" -r "$2"
}

check_complete() {  # every requirement met by the set or by what the GPU machine has
  "$PY" benchmarks/gpu_wheels.py requirements --have benchmarks/wheelsets/gpu_machine.txt "$@"
}

prepare_core() {
  rm -rf .whl && mkdir -p .whl
  download .whl benchmarks/wheelsets/core.txt
  check_complete .whl/*.whl
}

prepare_dali() {
  local big=/tmp/clipdistill-dali-wheels
  rm -rf .dali[0-9]* "$big" && mkdir -p "$big"
  download "$big" benchmarks/wheelsets/dali.txt
  check_complete "$big"/*.whl
  # The large wheels first, so that the small ones fill the last folder's room.
  mapfile -t wheels < <(ls -S "$big"/*.whl)
  "$PY" benchmarks/gpu_wheels.py split --limit-mib "$LIMIT_MIB" --prefix .dali "${wheels[@]}"
}

prepare_synthesis() {
  rm -rf .whl-syn && mkdir -p .whl-syn
  download .whl-syn benchmarks/wheelsets/synthesis.txt
  check_complete .whl-syn/*.whl
}

prepare_deepspeed() {
  rm -rf .whl-ds && mkdir -p .whl-ds
  # DeepSpeed's dependencies (the versions tested on the CPU; pydantic-core must match pydantic).
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl-ds einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 pydantic==2.14.3 \
    pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  # DeepSpeed ships an sdist, which the GPU machine (no network) cannot build: build a pure-Python
  # wheel here with no precompiled ops (DS_BUILD_OPS=0). Its setup.py imports torch: use an
  # environment that has it, without build isolation (which would fetch another torch).
  DS_BUILD_OPS=0 "${DS_PYTHON:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl-ds
}

[ $# -gt 0 ] || set -- core
for what in "$@"; do
  case "$what" in
    core) prepare_core ;;
    dali) prepare_dali ;;
    deepspeed) prepare_deepspeed ;;
    synthesis) prepare_synthesis ;;
    all) prepare_core; prepare_dali; prepare_deepspeed; prepare_synthesis ;;
    *) echo "usage: $0 core|dali|deepspeed|synthesis|all ..." >&2; exit 2 ;;
  esac
done
folders=()
for f in .whl .whl-ds .whl-syn .dali[0-9]*; do [ -d "$f" ] && folders+=("$f"); done
du -sh "${folders[@]}" 2>/dev/null | sed 's/^/  /'
"$PY" benchmarks/gpu_wheels.py sizes "${folders[@]}"
