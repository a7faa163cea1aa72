#!/usr/bin/env bash
# Download, on this CPU machine, the wheels the GPU machine lacks, and split the
# ones too large for one device call (64 MiB with the working tree) into parts
# spread over folders .dali1 .. .daliN, one folder to carry per call.
#
#   bash benchmarks/prepare_gpu_wheels.sh        # -> .whl/ and .dali1 .. .daliN
#   SKIP_DALI=1 bash benchmarks/prepare_gpu_wheels.sh   # -> .whl/ only (open_clip, DeepSpeed, ...)
#
# The GPU machine has Python 3.12, torch 2.11 (cu130), triton 3.6, torchvision,
# timm; it lacks open_clip, DALI and DeepSpeed (../shared/ENVIRONMENT.md).
# Both folders are ignored by git (.gitignore). See benchmarks/README.md for
# the calls that carry them.
set -euo pipefail
cd "$(dirname "$0")/.."
PART_MB="${PART_MB:-55}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64)
download() {
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$1" "${@:2}"
}
rm -rf .whl .dali[0-9]* /tmp/clipdistill-big
mkdir -p .whl /tmp/clipdistill-big
# Small wheels travel whole.
download .whl open_clip_torch==3.3.0 ftfy wcwidth pytest-benchmark py-cpuinfo
# open_clip's tokenizer imports regex; timm brings the rest (huggingface_hub, safetensors), not regex.
download .whl regex==2026.11.15
# DeepSpeed's dependencies (the versions tested on the CPU; pydantic-core must match pydantic). numpy,
# packaging and torch are on the GPU machine already.
download .whl einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 pydantic==2.14.3 \
  pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 tqdm==4.70.1
# DeepSpeed itself is an sdist, which the GPU machine (no network, no build dependencies) cannot
# install: build a wheel here with no precompiled ops (DS_BUILD_OPS=0; ops are JIT-built if ever
# needed, and a ZeRO-3 frozen teacher needs none), pure Python. Its setup.py imports torch: use an
# environment that has it, without build isolation (which would fetch another torch).
DS_PYTHON="${DS_PYTHON:-.venv/bin/python}"
DS_BUILD_OPS=0 "$DS_PYTHON" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
if [ "${SKIP_DALI:-0}" = 1 ]; then
  du -sh .whl | sed 's/^/  /'
  echo "{\"small_wheels\": $(ls .whl | wc -l), \"parts\": 0, \"part_folders\": 0}"
  exit 0
fi
# DALI and its codec wheels are split.
download /tmp/clipdistill-big nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13
n=0
for wheel in /tmp/clipdistill-big/*.whl; do
  name=$(basename "$wheel")
  split -b "${PART_MB}M" -d -a 2 "$wheel" "/tmp/clipdistill-big/$name.part"
done
# Deal parts into folders of at most PART_MB each (first fit, in order).
folder=1; used=0
for part in /tmp/clipdistill-big/*.whl.part*; do
  size=$(( $(stat -c %s "$part") / 1048576 + 1 ))
  if [ $(( used + size )) -gt "$PART_MB" ] && [ "$used" -gt 0 ]; then folder=$((folder + 1)); used=0; fi
  mkdir -p ".dali$folder"; mv "$part" ".dali$folder/"; used=$((used + size)); n=$((n + 1))
done
du -sh .whl .dali* | sed 's/^/  /'
echo "{\"small_wheels\": $(ls .whl | wc -l), \"parts\": $n, \"part_folders\": $folder}"
