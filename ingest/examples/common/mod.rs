//! Helpers shared by the ingest examples (each example includes this file as a module).

/// The median, the smallest and the largest of `values` (not empty).
pub fn median_and_range(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
    )
}
