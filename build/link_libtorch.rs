//! Build script shared by every pg2 crate that links libtorch (each crate's
//! `Cargo.toml` points `build` here, so there is exactly one copy).
//!
//! torch-sys links libtorch but leaves two gaps that bite at run time:
//! - no rpath, so binaries and tests only start with `LD_LIBRARY_PATH` set (the wheel's
//!   NCCL folder is added too, for the libnccl.so.2 that libtorch_cuda needs);
//! - the linker's `--as-needed` drops `libtorch_cuda.so`, because no symbol of
//!   it is referenced directly, and CUDA then silently stays unavailable.
//!
//! Both are fixed with link arguments for this crate's binaries and tests only (global
//! rustflags would also reach proc-macros, which must not link libtorch).
//!
//! A crate's `src/*.cpp` files (small shims for libtorch functions that tch does not
//! generate) are compiled here against the same libtorch headers, with torch-sys's flags.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(root) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: run ./launch/test or ./launch/launch once, whose bootstrap installs libtorch under .deps/ (see README)");
    };
    let lib = PathBuf::from(&root).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // NCCL, which libtorch_cuda (c10d's ProcessGroupNCCL) loads, from the same wheel.
    let nccl = PathBuf::from(&root).join("../nvidia/nccl/lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    compile_shims(&PathBuf::from(&root));
}

/// Compiles the crate's `src/*.cpp` into one static library, if it has any. The build
/// script reruns on any change under `src/`; the C++ is recompiled only when a shim's text
/// or the libtorch it is built against changed.
fn compile_shims(root: &std::path::Path) {
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("src");
    println!("cargo:rerun-if-changed={}", src.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    if files.is_empty() {
        return;
    }
    files.sort();
    let name = format!("{}_shim", std::env::var("CARGO_PKG_NAME").unwrap().replace('-', "_"));
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let cuda = cuda_includes(root);
    // Lets a crate's tests tell the real c10d NCCL shim from the stub built without headers.
    println!("cargo:rustc-check-cfg=cfg(pg2_c10d_nccl)");
    if cuda.is_some() {
        println!("cargo:rustc-cfg=pg2_c10d_nccl");
    }
    let mut digest = format!("{} {cuda:?}", root.display());
    for f in &files {
        digest.push_str(&std::fs::read_to_string(f).unwrap());
    }
    let digest = format!("{:x}", {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        digest.hash(&mut h);
        h.finish()
    });
    let stamp = out.join(format!("{name}.stamp"));
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == digest) && out.join(format!("lib{name}.a")).exists() {
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static={name}");
        println!("cargo:rustc-link-lib=stdc++");
        return;
    }
    let include = root.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT");
    if let Some(cuda) = cuda {
        build
            .includes(&cuda)
            .define("USE_C10D_NCCL", None)
            .define("PG2_WITH_C10D_NCCL", None)
            .define("PG2_WITH_CUDA_HEADERS", None);
    }
    build.files(&files).compile(&name);
    std::fs::write(&stamp, digest).unwrap();
}

/// The include folders c10d's NCCL headers need, when they are all there: CUDA's runtime
/// and NCCL's headers from the torch wheel's neighbours, `nv/target` and `crt/host_config.h`
/// from the cccl and crt header wheels the bootstrap installs in `.deps/cuda-headers`
/// (whose `.complete` marker it writes last).
fn cuda_includes(root: &std::path::Path) -> Option<Vec<PathBuf>> {
    let installed = root.join("../../cuda-headers");
    if installed.join(".complete").exists() {
        println!("cargo:rerun-if-changed={}", installed.join(".complete").display());
    }
    let nvidia = root.join("../nvidia");
    let headers = installed.join("nvidia/cu13/include");
    let dirs = vec![nvidia.join("cu13/include"), nvidia.join("nccl/include"), headers.join("cccl"), headers];
    let present = root.join("lib/libtorch_cuda.so").exists() && installed.join(".complete").exists();
    (present && dirs.iter().all(|d| d.is_dir())).then_some(dirs)
}
