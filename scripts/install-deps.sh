#!/usr/bin/env bash
# Installs strata's build and test dependencies from Debian's packages: only what is missing,
# so running it again is quick and changes nothing. Needs root (or sudo).
#   scripts/install-deps.sh            build + test dependencies
#   scripts/install-deps.sh --bench    also what the benchmark plots and namespace clusters need
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libopenmpi-dev openmpi-bin
  libucx-dev ucx-utils
  librocksdb-dev libprotobuf-dev protobuf-compiler
  libbenchmark-dev libgtest-dev
  libisal-dev libdnnl-dev
  # Debian's oneDNN is built with its OpenCL GPU runtime: dnnl-config.cmake looks for OpenCL and
  # fails the configure without these (they are only recommended, and we install no recommends).
  ocl-icd-opencl-dev opencl-c-headers
  nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev
  libsentencepiece-dev sentencepiece
  iproute2
  # The demo's training corpus (the fortune cookies of fortune-mod).
  fortunes
  # Reference checks and benchmark peers only (numerics against PyTorch; tokenizer models for
  # test fixtures). OpenBLAS is what Debian's PyTorch multiplies with; strata itself uses oneDNN.
  python3-torch python3-numpy python3-sentencepiece libopenblas0-pthread
)
if [[ "${1:-}" == "--bench" ]]; then
  packages+=(python3-matplotlib python3-numpy)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-deps: done"
