//! Links the trainer against the libtorch of the project's venv (see `.cargo/config.toml`):
//! checks that it is torch 2.11.0 (what tch 0.24 binds), sets the run-time search path so the
//! binaries run without `LD_LIBRARY_PATH`, and keeps `libtorch_cuda.so` as a dependency. The
//! linker would otherwise drop it (nothing names a symbol in it; it registers the CUDA backend
//! from its static initializers), and CUDA would silently never be found.
//!
//! It also compiles the C++ bridge to PyTorch's distributed engine (`cpp/bridge.cpp`: c10d's
//! TCPStore and ProcessGroupGloo, a synchronized batch norm; ProcessGroupNCCL with the `nccl`
//! feature) against the same libtorch's headers. The wheel ships no Gloo headers: they come
//! from Debian's `libgloo-dev`, which scripts/setup.sh installs.

use std::path::PathBuf;

const TORCH_VERSION: &str = "2.11.0";

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cpp/bridge.cpp");
    let libtorch = PathBuf::from(std::env::var("LIBTORCH").unwrap_or_else(|_| {
        panic!("LIBTORCH is not set: run scripts/setup.sh, which installs torch {TORCH_VERSION} into .venv (.cargo/config.toml points LIBTORCH at it)")
    }));
    let version_file = libtorch.join("version.py");
    let version = std::fs::read_to_string(&version_file).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/setup.sh to install torch {TORCH_VERSION} into .venv",
            version_file.display()
        )
    });
    let found = version
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_owned())
        .unwrap_or_default();
    if found.split('+').next() != Some(TORCH_VERSION) {
        panic!(
            "{}: torch {found:?}, but tch 0.24 needs torch {TORCH_VERSION}: run scripts/setup.sh",
            version_file.display()
        );
    }
    compile_bridge(&libtorch);
    // The library folder through the canonical path, so the rpath survives a rebuilt symlink.
    let lib = libtorch
        .join("lib")
        .canonicalize()
        .expect("libtorch lib folder");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    } else {
        println!(
            "cargo:warning=libtorch has no libtorch_cuda.so (a CPU build of torch): the trainer will run on CPU only"
        );
    }
}

/// Compiles `cpp/bridge.cpp` (see the module documentation).
fn compile_bridge(libtorch: &std::path::Path) {
    let include = libtorch.join("include");
    let gloo_header = PathBuf::from("/usr/include/gloo/config.h");
    if !gloo_header.exists() {
        panic!(
            "{}: missing; the distributed bridge needs Gloo's headers: run scripts/setup.sh \
             (it installs Debian's libgloo-dev)",
            gloo_header.display()
        );
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("cpp/bridge.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // torch 2.11.0's wheels are built with the C++11 ABI (torch._C._GLIBCXX_USE_CXX11_ABI).
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // Without these, c10d's headers leave ProcessGroupGloo out.
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None)
        // Warnings of libtorch's own headers are not ours to fix.
        .warnings(false)
        // Debug information of libtorch's headers would make a huge object for nothing.
        .debug(false)
        .opt_level(2);
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        // The CUDA and NCCL headers of the wheel's nvidia-* packages, beside the torch package
        // (CUDA's crt/ and CCCL come from nvidia-cuda-crt and nvidia-cuda-cccl: `SEER_NCCL=1
        // scripts/setup.sh`), and any folders in SEER_CUDA_INCLUDE (colon-separated).
        println!("cargo:rerun-if-env-changed=SEER_CUDA_INCLUDE");
        let mut folders: Vec<PathBuf> = std::env::var("SEER_CUDA_INCLUDE")
            .map(|v| std::env::split_paths(&v).collect())
            .unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(libtorch.join("../nvidia")) {
            let mut packages: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            packages.sort();
            folders.extend(packages.into_iter().map(|p| p.join("include")));
        }
        let mut found = false;
        for folder in folders.iter().filter(|f| f.is_dir()) {
            build.include(folder);
            let cccl = folder.join("cccl");
            if cccl.is_dir() {
                build.include(cccl);
            }
            found |= folder.join("cuda_runtime.h").exists();
        }
        if !found || !folders.iter().any(|f| f.join("crt/host_config.h").exists()) {
            panic!(
                "the nccl feature needs CUDA's headers with crt/ (nvidia-cuda-runtime, \
                 nvidia-cuda-crt, nvidia-cuda-cccl beside torch in .venv): run \
                 SEER_NCCL=1 scripts/setup.sh, or name header folders in SEER_CUDA_INCLUDE"
            );
        }
        build
            .define("SEER_NCCL", None)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None);
    }
    build.compile("seer_bridge");
}
