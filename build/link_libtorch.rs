//! Build script shared by every pg2 crate that links libtorch (each crate's
//! `Cargo.toml` points `build` here, so there is exactly one copy).
//!
//! torch-sys links libtorch but leaves two gaps that bite at run time:
//! - no rpath, so binaries and tests only start with `LD_LIBRARY_PATH` set (the wheel's
//!   NCCL folder is added too, for the NCCL that pg2-dist loads at run time);
//! - the linker's `--as-needed` drops `libtorch_cuda.so`, because no symbol of
//!   it is referenced directly, and CUDA then silently stays unavailable.
//!
//! Both are fixed with link arguments for this crate's binaries and tests only (global
//! rustflags would also reach proc-macros, which must not link libtorch).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(root) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: run ./launch/bootstrap, which installs libtorch under .deps/ (see README)");
    };
    let lib = PathBuf::from(&root).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // NCCL, which pg2-dist loads at run time from the same wheel.
    let nccl = PathBuf::from(&root).join("../nvidia/nccl/lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
