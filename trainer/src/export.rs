//! Trunk weights as safetensors files with torchvision's key names.
//!
//! A [`crate::regnet::RegNetY`] names its variables like torchvision's state dict, so exporting
//! is taking the variables under the trunk's prefix, stripping the prefix, and writing them all:
//! weights, batch-norm running statistics and `num_batches_tracked`. The result loads into
//! torchvision with
//!
//! ```python
//! model = torchvision.models.regnet_y_400mf()
//! model.fc = torch.nn.Identity()  # the file holds the trunk only
//! with safetensors.safe_open(path, framework="pt") as f:
//!     model.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True)
//! ```
//!
//! (`trainer/tests/regnet_torchvision.rs` does exactly this and compares the features.)
//! [`load_trunk`] reads such a file, or a torchvision checkpoint converted to safetensors, back
//! into a var store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, TchError, Tensor};

/// What can go wrong moving a trunk in or out of a safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The prefix names no variable: probably the wrong prefix.
    #[error("the var store has no variables under the prefix {prefix:?}")]
    NothingToExport {
        /// The prefix as given.
        prefix: String,
    },
    /// libtorch or the safetensors codec failed on the file.
    #[error("{}: {source}", path.display())]
    Torch {
        /// The file.
        path: PathBuf,
        /// libtorch's error.
        #[source]
        source: TchError,
    },
    /// Writing or renaming the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file lacks tensors the model has (as torch's `load_state_dict(strict=True)`, a
    /// missing `num_batches_tracked` is tolerated).
    #[error(
        "{}: missing {} tensors the model needs, e.g. {}",
        path.display(),
        keys.len(),
        keys.first().map_or("", String::as_str)
    )]
    Missing {
        /// The file.
        path: PathBuf,
        /// The missing keys (without the var-store prefix), sorted.
        keys: Vec<String>,
    },
    /// A tensor of the file has another shape than the model's variable.
    #[error("{}: tensor {key} has shape {found:?}, the model needs {expected:?}", path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// The key (without the var-store prefix).
        key: String,
        /// The variable's shape.
        expected: Vec<i64>,
        /// The file's shape.
        found: Vec<i64>,
    },
}

/// The variables under `prefix` (all of them for `""`), keyed by their names with `prefix.`
/// stripped. A trailing `.` on the prefix is ignored.
fn variables_under(vs: &VarStore, prefix: &str) -> HashMap<String, Tensor> {
    let prefix = prefix.trim_end_matches('.');
    vs.variables()
        .into_iter()
        .filter_map(|(name, tensor)| {
            if prefix.is_empty() {
                return Some((name, tensor));
            }
            let key = name.strip_prefix(prefix)?.strip_prefix('.')?;
            Some((key.to_owned(), tensor))
        })
        .collect()
}

/// Writes the variables under `prefix` to a safetensors file at `path`, keyed by their names
/// below the prefix: for a [`crate::regnet::RegNetY`] built on `vs.root() / "trunk"`, `prefix`
/// is `"trunk"` and the keys are torchvision's (`stem.0.weight`, ...). Returns the number of
/// tensors written.
///
/// The tensors are copied to the CPU, in their own dtype (an `f32` trunk gives `f32`, the
/// counters `i64`). The file is written under a temporary name beside `path` and renamed into
/// place, so no reader sees half a file.
pub fn export_trunk(
    vs: &VarStore,
    prefix: &str,
    path: impl AsRef<Path>,
) -> Result<usize, ExportError> {
    let path = path.as_ref();
    let mut tensors: Vec<(String, Tensor)> = variables_under(vs, prefix)
        .into_iter()
        .map(|(key, tensor)| (key, tensor.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    if tensors.is_empty() {
        return Err(ExportError::NothingToExport {
            prefix: prefix.to_owned(),
        });
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    // A failed write or rename leaves no half-written file behind.
    let written = Tensor::write_safetensors(&tensors, &partial)
        .map_err(|source| ExportError::Torch {
            path: partial.clone(),
            source,
        })
        .and_then(|()| {
            std::fs::rename(&partial, path).map_err(|source| ExportError::Io {
                path: path.to_owned(),
                source,
            })
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written?;
    Ok(tensors.len())
}

/// Reads a safetensors file of trunk tensors (as [`export_trunk`] writes them, or a
/// torchvision state dict saved with safetensors) into the variables under `prefix`.
///
/// Every variable must be in the file with its shape, except `num_batches_tracked`, which
/// keeps its value when absent (torch's `_BatchNorm` does the same). Values are converted to
/// each variable's dtype and device. Returns the file's keys the model has no variable for
/// (e.g. a classifier's `fc.weight`), sorted, so the caller decides whether they matter.
pub fn load_trunk(
    vs: &VarStore,
    prefix: &str,
    path: impl AsRef<Path>,
) -> Result<Vec<String>, ExportError> {
    let path = path.as_ref();
    let mut file: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|source| ExportError::Torch {
            path: path.to_owned(),
            source,
        })?
        .into_iter()
        .collect();
    let variables = variables_under(vs, prefix);
    if variables.is_empty() {
        return Err(ExportError::NothingToExport {
            prefix: prefix.to_owned(),
        });
    }
    let mut missing: Vec<String> = variables
        .keys()
        .filter(|key| !file.contains_key(*key) && !key.ends_with("num_batches_tracked"))
        .cloned()
        .collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(ExportError::Missing {
            path: path.to_owned(),
            keys: missing,
        });
    }
    // Check every shape before changing any variable, so a bad file leaves the model as it was.
    for (key, variable) in &variables {
        if let Some(source) = file.get(key)
            && source.size() != variable.size()
        {
            return Err(ExportError::Shape {
                path: path.to_owned(),
                key: key.clone(),
                expected: variable.size(),
                found: source.size(),
            });
        }
    }
    tch::no_grad(|| {
        for (key, variable) in variables {
            if let Some(source) = file.remove(&key) {
                let mut variable = variable;
                variable
                    .f_copy_(&source)
                    .map_err(|source| ExportError::Torch {
                        path: path.to_owned(),
                        source,
                    })?;
            }
        }
        Ok(())
    })?;
    let mut unexpected: Vec<String> = file.into_keys().collect();
    unexpected.sort();
    Ok(unexpected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regnet::{RegNetY, preset};
    use tch::nn::ModuleT;

    fn trunk(seed: i64) -> (VarStore, RegNetY) {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let model = RegNetY::new(&(vs.root() / "trunk"), &preset("200MF").unwrap()).unwrap();
        (vs, model)
    }

    #[test]
    fn round_trip_restores_weights_and_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trunk.safetensors");
        let input = Tensor::randn([2, 3, 32, 32], tch::kind::FLOAT_CPU);
        let (vs, model) = trunk(1);
        let _ = model.forward_t(&input, true);
        // A head beside the trunk must stay out of the file.
        let _head = vs.root().sub("head").zeros("weight", &[3]);
        let written = export_trunk(&vs, "trunk", &path).unwrap();
        assert_eq!(written, variables_under(&vs, "trunk").len());

        let (other_vs, other) = trunk(2);
        let before = other.forward_t(&input, false);
        let expected = model.forward_t(&input, false);
        assert!(!before.allclose(&expected, 1e-6, 1e-6, false));
        let unexpected = load_trunk(&other_vs, "trunk.", &path).unwrap();
        assert!(unexpected.is_empty(), "{unexpected:?}");
        let after = other.forward_t(&input, false);
        assert!(after.equal(&expected));
        let counter = &other_vs.variables()["trunk.stem.1.num_batches_tracked"];
        assert_eq!(counter.int64_value(&[]), 1);

        let keys: Vec<String> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(keys.contains(&"stem.0.weight".to_owned()), "{keys:?}");
        assert!(!keys.iter().any(|k| k.starts_with("head")), "{keys:?}");
    }

    #[test]
    fn missing_and_misshapen_tensors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trunk.safetensors");
        let (vs, _model) = trunk(1);
        export_trunk(&vs, "trunk", &path).unwrap();
        let mut tensors = Tensor::read_safetensors(&path).unwrap();

        // A file without counters still loads; an extra key is reported.
        tensors.retain(|(k, _)| !k.ends_with("num_batches_tracked"));
        tensors.push((
            "fc.weight".to_owned(),
            Tensor::zeros([2, 2], tch::kind::FLOAT_CPU),
        ));
        Tensor::write_safetensors(&tensors, &path).unwrap();
        assert_eq!(load_trunk(&vs, "trunk", &path).unwrap(), ["fc.weight"]);

        tensors.retain(|(k, _)| k != "stem.0.weight");
        Tensor::write_safetensors(&tensors, &path).unwrap();
        match load_trunk(&vs, "trunk", &path) {
            Err(ExportError::Missing { keys, .. }) => assert_eq!(keys, ["stem.0.weight"]),
            other => panic!("{other:?}"),
        }

        tensors.push((
            "stem.0.weight".to_owned(),
            Tensor::zeros([32, 3, 1, 1], tch::kind::FLOAT_CPU),
        ));
        Tensor::write_safetensors(&tensors, &path).unwrap();
        let error = load_trunk(&vs, "trunk", &path).unwrap_err();
        assert!(matches!(error, ExportError::Shape { ref key, .. } if key == "stem.0.weight"));

        assert!(matches!(
            export_trunk(&vs, "trunkk", &path),
            Err(ExportError::NothingToExport { .. })
        ));
    }
}
