# Shared by every script in launch/ (sourced, not run): finds the repository, installs
# libtorch on first use and builds the release binaries.
set -euo pipefail

PG2_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG2_TORCH_VERSION=2.11.0
PG2_CUDA_CCCL_VERSION=13.0.85
PG2_CUDA_CRT_VERSION=13.0.88
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PG2_ROOT/target}"

pg2_die() {
    echo "pg2: $*" >&2
    exit 1
}

# Installs libtorch from the PyPI torch wheel into .deps/torch, once. With PG2_CACHE_DIR
# set (CI), .deps is a link into that cache, so later clones reuse the install.
pg2_bootstrap() {
    local deps="$PG2_ROOT/.deps"
    if [[ -n "${PG2_CACHE_DIR:-}" && ! -e "$deps" ]]; then
        mkdir -p "$PG2_CACHE_DIR/deps"
        ln -s "$PG2_CACHE_DIR/deps" "$deps"
    fi
    if [[ ! -f "$deps/torch/torch/lib/libtorch.so" ]]; then
        command -v python3 >/dev/null || pg2_die "python3 (with pip) is needed once, to fetch libtorch from the torch==$PG2_TORCH_VERSION wheel"
        echo "pg2: installing libtorch $PG2_TORCH_VERSION from PyPI (torch==$PG2_TORCH_VERSION and its CUDA runtime, about 4.6 GB) into .deps/torch, once ..." >&2
        mkdir -p "$deps"
        rm -rf "$deps/torch.partial"
        python3 -m pip install --disable-pip-version-check --no-cache-dir --progress-bar on \
            --target "$deps/torch.partial" "torch==$PG2_TORCH_VERSION" >&2 \
            || pg2_die "pip could not install torch==$PG2_TORCH_VERSION; check the network access to PyPI and the disk space, then rerun"
        mv "$deps/torch.partial" "$deps/torch"
    fi
    # The CUDA headers c10d's ProcessGroupNCCL includes beyond those the torch wheel ships
    # (nv/target, crt/host_config.h), matching its CUDA 13.0 runtime: 19 MB, once.
    local headers="$deps/cuda-headers"
    if [[ ! -f "$headers/.complete" ]]; then
        echo "pg2: installing the CUDA headers ProcessGroupNCCL needs (nvidia-cuda-cccl, nvidia-cuda-crt) into .deps/cuda-headers, once ..." >&2
        rm -rf "$headers"
        python3 -m pip install --disable-pip-version-check --no-cache-dir --no-deps --quiet \
            --target "$headers" "nvidia-cuda-cccl==$PG2_CUDA_CCCL_VERSION" "nvidia-cuda-crt==$PG2_CUDA_CRT_VERSION" >&2 \
            && touch "$headers/.complete" \
            || echo "pg2: warning: pip could not install the CUDA header wheels; building without the NCCL backend (GPU data parallelism) until a rerun can" >&2
    fi
    command -v cargo >/dev/null || pg2_die "cargo is needed: install Rust (https://rustup.rs) and rerun"
    if [[ -n "${PG2_CACHE_DIR:-}" ]]; then
        # The cache's real path, identical in every clone, keeps the cached build valid.
        export LIBTORCH="$(cd "$deps/torch/torch" && pwd -P)"
    fi
}

# Builds the release binaries (a no-op when they are up to date).
pg2_build() {
    (cd "$PG2_ROOT" && cargo build --release --locked --bins)
}
