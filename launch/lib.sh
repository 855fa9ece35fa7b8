# Shared by every script in launch/ (sourced, not run): finds the repository, installs
# libtorch on first use and builds the release binaries.
set -euo pipefail

PG2_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG2_TORCH_VERSION=2.11.0
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
    # cudarc looks for libnccl.so, the wheel ships libnccl.so.2 (the binaries' rpath covers this folder).
    local nccl="$deps/torch/nvidia/nccl/lib"
    if [[ -f "$nccl/libnccl.so.2" && ! -e "$nccl/libnccl.so" ]]; then
        ln -s libnccl.so.2 "$nccl/libnccl.so"
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
