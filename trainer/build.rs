//! Links the trainer against the libtorch of the project's venv (see `.cargo/config.toml`):
//! checks that it is torch 2.11.0 (what tch 0.24 binds), sets the run-time search path so the
//! binaries run without `LD_LIBRARY_PATH`, and keeps `libtorch_cuda.so` as a dependency. The
//! linker would otherwise drop it (nothing names a symbol in it; it registers the CUDA backend
//! from its static initializers), and CUDA would silently never be found.

use std::path::PathBuf;

const TORCH_VERSION: &str = "2.11.0";

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
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
