#!/usr/bin/env bash
# Download, on this CPU machine, the wheels the GPU machine lacks, and split the
# ones too large for one device call (64 MiB with the working tree) into parts
# spread over folders .dali1 .. .daliN, one folder to carry per call.
#
#   bash benchmarks/prepare_gpu_wheels.sh        # -> .whl/ and .dali1 .. .daliN
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
# Small pure-Python wheels travel whole.
download .whl open_clip_torch==3.3.0 ftfy wcwidth pytest-benchmark py-cpuinfo
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
