//! Accuracy reports: top-1, top-5, per-class accuracy and the confusion matrix, as JSON and
//! the matrix as a PNG.

use std::path::Path;

use serde::Serialize;
use tch::Tensor;

use super::EvalError;

/// One class's share of correct top-1 predictions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassAccuracy {
    /// The class label.
    pub class: String,
    /// Test samples of the class.
    pub samples: u64,
    /// Top-1 accuracy on them, in percent.
    pub top1: f64,
}

/// How a probe did on the test set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    /// Top-1 accuracy in percent.
    pub top1: f64,
    /// Top-5 accuracy in percent (top-`classes` when there are fewer than 5 classes).
    pub top5: f64,
    /// Per class, in class order.
    pub per_class: Vec<ClassAccuracy>,
    /// `confusion[true][predicted]`: test samples of class `true` predicted as `predicted`.
    pub confusion: Vec<Vec<u64>>,
}

/// Scores of `ranked` `[N, classes]` (class indices, best first) against `labels` `[N]`.
///
/// Only the classes marked in `trained` (those with training samples) are predictions: the
/// others are dropped from every ranking before its first 5 are taken, so a test class absent
/// from the training set can never count as a hit, whatever rank a probe gave it.
pub fn score(ranked: &Tensor, labels: &Tensor, classes: &[String], trained: &[bool]) -> Scores {
    let ranked: Vec<Vec<i64>> = Vec::try_from(ranked).expect("a [N, classes] int64 tensor");
    let labels: Vec<i64> = Vec::try_from(labels).expect("a [N] int64 tensor");
    let c = classes.len();
    let mut confusion = vec![vec![0u64; c]; c];
    let (mut top1, mut top5) = (0u64, 0u64);
    for (row, &label) in ranked.iter().zip(&labels) {
        let mut predictions = row
            .iter()
            .copied()
            .filter(|&p| trained.get(p as usize).copied().unwrap_or(false));
        let Some(predicted) = predictions.next() else {
            continue;
        };
        confusion[label as usize][predicted as usize] += 1;
        top1 += u64::from(predicted == label);
        top5 += u64::from(
            std::iter::once(predicted)
                .chain(predictions.take(4))
                .any(|p| p == label),
        );
    }
    let n = labels.len().max(1) as f64;
    let per_class = classes
        .iter()
        .enumerate()
        .map(|(i, class)| {
            let samples: u64 = confusion[i].iter().sum();
            ClassAccuracy {
                class: class.clone(),
                samples,
                top1: 100.0 * confusion[i][i] as f64 / samples.max(1) as f64,
            }
        })
        .collect();
    Scores {
        top1: 100.0 * top1 as f64 / n,
        top5: 100.0 * top5 as f64 / n,
        per_class,
        confusion,
    }
}

/// Side of one confusion-matrix cell in the PNG, in pixels.
const CELL: u32 = 24;

/// Draws `confusion` as a heat map: one cell per (true class: row, predicted class: column),
/// from white (none of the row's samples) to dark blue (all of them); the diagonal is outlined
/// in green to find it at a glance. Class names and counts are in the JSON report.
pub fn confusion_png(confusion: &[Vec<u64>], path: &Path) -> Result<(), EvalError> {
    let c = confusion.len() as u32;
    let side = (c * CELL).max(1);
    let mut image = image::RgbImage::from_pixel(side, side, image::Rgb([255, 255, 255]));
    for (row, counts) in confusion.iter().enumerate() {
        let total: u64 = counts.iter().sum();
        for (column, &count) in counts.iter().enumerate() {
            let share = count as f64 / total.max(1) as f64;
            // White to rgb(8, 48, 107), matplotlib's "Blues" at 1.
            let mix = |full: f64| (255.0 - share * (255.0 - full)).round() as u8;
            let color = image::Rgb([mix(8.0), mix(48.0), mix(107.0)]);
            let diagonal = row == column;
            for y in 0..CELL {
                for x in 0..CELL {
                    let edge = x == 0 || y == 0 || x == CELL - 1 || y == CELL - 1;
                    let pixel = if edge && diagonal {
                        image::Rgb([0, 160, 0])
                    } else if edge {
                        image::Rgb([230, 230, 230])
                    } else {
                        color
                    };
                    image.put_pixel(column as u32 * CELL + x, row as u32 * CELL + y, pixel);
                }
            }
        }
    }
    image.save(path).map_err(|e| EvalError::file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_count_ranks_and_classes() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let ranked = Tensor::from_slice(&[0i64, 1, 2, 1, 0, 2, 2, 1, 0, 0, 2, 1]).view([4, 3]);
        let labels = Tensor::from_slice(&[0i64, 0, 1, 2]);
        let scores = score(&ranked, &labels, &classes, &[true; 3]);
        assert_eq!(scores.top1, 25.0);
        assert_eq!(scores.top5, 100.0);
        assert_eq!(scores.confusion, [[1, 1, 0], [0, 0, 1], [1, 0, 0]]);
        assert_eq!(scores.per_class[0].top1, 50.0);
        assert_eq!(scores.per_class[1].samples, 1);
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("confusion.png");
        confusion_png(&scores.confusion, &png).unwrap();
        let image = image::open(&png).unwrap();
        assert_eq!((image.width(), image.height()), (3 * CELL, 3 * CELL));
    }

    #[test]
    fn classes_without_training_samples_are_never_predicted() {
        // Six classes; only "a" has training samples. A probe still ranks all six.
        let classes: Vec<String> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let trained = [true, false, false, false, false, false];
        let ranked = Tensor::from_slice(&[1i64, 0, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]).view([2, 6]);
        // A test sample of "b" (absent from training) and one of "a".
        let labels = Tensor::from_slice(&[1i64, 0]);
        let scores = score(&ranked, &labels, &classes, &trained);
        assert_eq!(scores.top1, 50.0);
        assert_eq!(scores.top5, 50.0);
        assert_eq!(
            scores.confusion[1][0], 1,
            "b is predicted as a, the one trained class"
        );
        assert_eq!(scores.confusion[0][0], 1);
    }
}
