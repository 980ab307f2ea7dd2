//! Placeholder crate; see the open issues.
