//! libtorch errors that arrive as panics.
//!
//! tch's infallible calls (`Tensor::matmul`, a module's forward pass, ...) unwrap the
//! `TchError` that a libtorch exception becomes, so an error inside libtorch panics: an
//! allocation that fails (host memory, CUDA out of memory) is the common one, and no setting
//! check can rule it out (it depends on the images, the model and what else holds the memory).
//! The `train` binary runs each command under [`catch_libtorch`], which turns such a panic
//! into an error naming libtorch's message, without the panic's report and C++ backtrace.
//! Any other panic is a bug and goes on unwinding with its report.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

thread_local! {
    /// Whether this thread runs inside [`catch_libtorch`].
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// The first line of the libtorch message in a panic of tch's (`called Result::unwrap() on an
/// Err value: Torch("MESSAGE\nException raised from ...")`), or `None` for any other panic.
pub fn libtorch_message(panic_message: &str) -> Option<String> {
    let start = panic_message.find("Torch(\"")? + "Torch(\"".len();
    let rest = &panic_message[start..];
    // The message is in Debug form: a line break is the two characters `\n`.
    let end = ["\\n", "\")"]
        .iter()
        .filter_map(|stop| rest.find(stop))
        .min()
        .unwrap_or(rest.len());
    let line = rest[..end].replace("\\\"", "\"").trim().to_owned();
    (!line.is_empty()).then_some(line)
}

/// The text a panic was raised with.
fn payload_text(payload: &(dyn Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
}

/// Installs a panic hook that stays silent for libtorch errors raised inside
/// [`catch_libtorch`] (they are reported as errors where it returns) and defers to the
/// previous hook for every other panic. Call it once, after any other hook is installed.
pub fn quiet_libtorch_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let caught = CATCHING.with(Cell::get)
            && payload_text(info.payload()).is_some_and(|t| libtorch_message(t).is_some());
        if !caught {
            previous(info);
        }
    }));
}

/// Runs `work`; a libtorch error that panics inside it (on this thread) comes back as
/// `Err(libtorch's message)`. Any other panic continues to unwind.
pub fn catch_libtorch<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CATCHING.with(|c| c.replace(true));
    let outcome = catch_unwind(AssertUnwindSafe(work));
    CATCHING.with(|c| c.set(outer));
    outcome.map_err(
        |payload| match payload_text(payload.as_ref()).and_then(libtorch_message) {
            Some(message) => message,
            None => resume_unwind(payload),
        },
    )
}

/// A hint to add to a libtorch error that reports an allocation failure.
pub fn memory_hint(message: &str) -> Option<&'static str> {
    let lower = message.to_lowercase();
    (lower.contains("out of memory") || lower.contains("allocate memory")).then_some(
        "the step did not fit in memory: a smaller batch, smaller crops or a smaller model \
         would",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn a_libtorch_error_comes_back_as_its_message() {
        quiet_libtorch_panics();
        let result = catch_libtorch(|| {
            let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
            let b = Tensor::zeros([4, 5], (Kind::Float, Device::Cpu));
            a.matmul(&b)
        });
        let message = result.expect_err("the shapes do not multiply");
        assert!(message.contains("cannot be multiplied"), "{message}");
        assert!(!message.contains("Exception raised from"), "{message}");
    }

    #[test]
    fn other_panics_keep_unwinding() {
        let outcome = catch_unwind(|| catch_libtorch(|| panic!("a bug")));
        let payload = outcome.expect_err("the panic went on");
        assert_eq!(payload_text(payload.as_ref()), Some("a bug"));
    }

    #[test]
    fn messages_are_cut_at_their_first_line() {
        let text = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. \
                    Tried to allocate 2.00 GiB\\nException raised from malloc at ...\")";
        let message = libtorch_message(text).unwrap();
        assert_eq!(message, "CUDA out of memory. Tried to allocate 2.00 GiB");
        assert!(memory_hint(&message).is_some());
        assert_eq!(libtorch_message("index out of bounds"), None);
        assert_eq!(
            libtorch_message("Torch(\"a \\\"quoted\\\" word\")").as_deref(),
            Some("a \"quoted\" word")
        );
    }
}
