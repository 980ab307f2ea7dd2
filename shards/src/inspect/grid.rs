//! `shards grid`: a contact sheet of random samples.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{PixelType, ResizeOptions, Resizer};
use futures::StreamExt;
use image::{Rgb, RgbImage};

use super::{InspectError, SplitMix64, check_decoder, default_jobs};
use crate::decode::RgbRef;
use crate::meta::IndexEntry;
use crate::reader::read_indexed_sample;
use crate::{Dataset, StoreError};

/// Color of the border between tiles, and of tiles whose image is unreadable.
const BORDER: Rgb<u8> = Rgb([24, 24, 24]);
const UNREADABLE: Rgb<u8> = Rgb([160, 0, 0]);

/// The largest contact sheet [`grid()`] makes: 2^28 pixels (768 MiB of RGB), e.g. about 2,000
/// tiles of 256 pixels. Larger sheets are refused before anything is read.
pub const MAX_SHEET_PIXELS: u64 = 1 << 28;

/// Columns, rows, width and height of a sheet of `count` tiles, or why it cannot be made.
fn layout(count: usize, tile: u32, border: u32) -> Result<(u32, u32, u32, u32), InspectError> {
    let too_large = || InspectError::SheetTooLarge {
        count,
        tile,
        border,
    };
    let count = u32::try_from(count).map_err(|_| too_large())?;
    let columns = (f64::from(count).sqrt().ceil() as u32).max(1);
    let rows = count.div_ceil(columns).max(1);
    let side = |n: u32| u64::from(n) * (u64::from(tile) + u64::from(border)) + u64::from(border);
    let (width, height) = (side(columns), side(rows));
    if width.saturating_mul(height) > MAX_SHEET_PIXELS {
        return Err(too_large());
    }
    // Within 2^28 pixels, each side fits in u32.
    Ok((columns, rows, width as u32, height as u32))
}

/// How [`grid()`] samples and lays out tiles.
#[derive(Debug, Clone)]
pub struct GridOptions {
    /// Samples shown (default 64); fewer when the dataset is smaller.
    pub count: usize,
    /// Seed of the random choice (default 0): the same seed picks the same samples.
    pub seed: u64,
    /// Side of each square tile in pixels (default 128).
    pub tile: u32,
    /// Border between and around tiles in pixels (default 2).
    pub border: u32,
    /// Samples read and decoded at once (default: the machine's cores).
    pub jobs: usize,
}

impl Default for GridOptions {
    fn default() -> Self {
        Self {
            count: 64,
            seed: 0,
            tile: 128,
            border: 2,
            jobs: default_jobs(),
        }
    }
}

/// A contact sheet and what is on it.
#[derive(Debug, Clone)]
pub struct ContactSheet {
    /// The picture: tiles left to right, top to bottom.
    pub image: RgbImage,
    /// `(shard, key)` of each tile in order.
    pub samples: Vec<(String, String)>,
    /// Tiles per row.
    pub columns: u32,
}

impl ContactSheet {
    /// The sheet as PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>, InspectError> {
        let mut out = std::io::Cursor::new(Vec::new());
        self.image
            .write_to(&mut out, image::ImageFormat::Png)
            .map_err(InspectError::Encode)?;
        Ok(out.into_inner())
    }
}

/// `(shard, key, tile pixels)`; no pixels when the image does not decode.
type Tile = (String, String, Option<Vec<u8>>);

/// Picks `count` samples uniformly at random across all shards (reservoir
/// sampling over the indexes, so memory is `count` entries), reads each with
/// one ranged read, and tiles them center-cropped to squares.
pub async fn grid(dataset: &Dataset, options: &GridOptions) -> Result<ContactSheet, InspectError> {
    let tile = options.tile.max(1);
    // The sheet for `count` samples must be possible before any is read.
    layout(options.count, tile, options.border)?;
    let mut rng = SplitMix64::new(options.seed);
    let mut chosen: Vec<(usize, IndexEntry)> = Vec::with_capacity(options.count.min(4096));
    let mut seen = 0u64;
    let indexes = futures::stream::iter(dataset.manifest.shards.iter().enumerate())
        .map(|(i, shard)| async move { dataset.index(shard).await.map(|index| (i, index)) })
        .buffered(16);
    futures::pin_mut!(indexes);
    while let Some(index) = indexes.next().await {
        let (shard, index) = index?;
        for entry in index.samples {
            seen += 1;
            if chosen.len() < options.count {
                chosen.push((shard, entry));
            } else {
                let slot = rng.below(seen) as usize;
                if slot < options.count {
                    chosen[slot] = (shard, entry);
                }
            }
        }
    }
    if chosen.is_empty() {
        return Err(InspectError::Empty {
            url: dataset.location.url.clone(),
        });
    }
    // Reading in shard order is kinder to the store; the order on the sheet does not matter.
    chosen.sort_by_key(|(shard, entry)| (*shard, entry.offset));

    let tiles: Vec<Result<Tile, StoreError>> = futures::stream::iter(chosen)
        .map(|(shard_number, entry)| {
            let shard = dataset.manifest.shards[shard_number].clone();
            let dataset = dataset.clone();
            async move {
                let sample = read_indexed_sample(dataset.location.store.as_ref(), &dataset.shard_path(&shard), &shard.name, &entry).await?;
                let key = sample.key.clone();
                let pixels = tokio::task::spawn_blocking(move || {
                    let (_, data) = sample.image()?;
                    match check_decoder().decode(data) {
                        Ok(image) => square_tile(image, tile),
                        Err(e) => {
                            tracing::warn!(key = %crate::printable(&sample.key), error = %e, "image does not decode; its tile is left red");
                            None
                        }
                    }
                })
                .await
                .expect("a tile task panicked");
                Ok((shard.name, key, pixels))
            }
        })
        .buffered(options.jobs.max(1) * 2)
        .collect()
        .await;

    let (columns, _, width, height) = layout(tiles.len(), tile, options.border)?;
    let border = options.border;
    let mut sheet = RgbImage::from_pixel(width, height, BORDER);
    let mut samples = Vec::with_capacity(tiles.len());
    for (i, tile_result) in tiles.into_iter().enumerate() {
        let (shard, key, pixels) = tile_result?;
        let (column, row) = (i as u32 % columns, i as u32 / columns);
        let (x0, y0) = (
            border + column * (tile + border),
            border + row * (tile + border),
        );
        match pixels {
            Some(pixels) => {
                let tile_image = RgbImage::from_raw(tile, tile, pixels).expect("tile buffer size");
                image::imageops::replace(&mut sheet, &tile_image, i64::from(x0), i64::from(y0));
            }
            None => {
                let red = RgbImage::from_pixel(tile, tile, UNREADABLE);
                image::imageops::replace(&mut sheet, &red, i64::from(x0), i64::from(y0));
            }
        }
        samples.push((shard, key));
    }
    Ok(ContactSheet {
        image: sheet,
        samples,
        columns,
    })
}

/// Center-crops `image` to a square and resizes it to `tile` x `tile` RGB bytes.
fn square_tile(image: RgbRef<'_>, tile: u32) -> Option<Vec<u8>> {
    if image.width == 0 || image.height == 0 {
        return None;
    }
    let source = ImageRef::new(image.width, image.height, image.data, PixelType::U8x3).ok()?;
    let mut destination = Image::new(tile, tile, PixelType::U8x3);
    Resizer::new()
        .resize(
            &source,
            &mut destination,
            &ResizeOptions::new().fit_into_destination(None),
        )
        .ok()?;
    Some(destination.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheet_layout_is_checked_before_anything_is_read() {
        // 64 tiles of 128 with 2-pixel borders: 8 x 8, 8 * 130 + 2 = 1042 pixels a side.
        assert_eq!(layout(64, 128, 2).unwrap(), (8, 8, 1042, 1042));
        assert_eq!(layout(5, 10, 0).unwrap(), (3, 2, 30, 20));
        for (count, tile, border) in [
            (4_000_000_000, 128, 2),
            (usize::MAX, 8, 0),
            (64, 128, 4_294_967_168),
            (64, 128, u32::MAX),
            (64, 128, 100_000),
            (1, 2048, 20_000),
        ] {
            let error = layout(count, tile, border).unwrap_err();
            assert!(
                matches!(error, InspectError::SheetTooLarge { .. }),
                "{count} {tile} {border}: {error}"
            );
        }
    }

    #[test]
    fn tile_is_center_square() {
        // Left third red, middle green, right third blue: the center crop is all green.
        let image = RgbImage::from_fn(300, 100, |x, _| {
            if x < 100 {
                Rgb([255, 0, 0])
            } else if x < 200 {
                Rgb([0, 255, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let image = RgbRef {
            width: image.width(),
            height: image.height(),
            data: image.as_raw(),
        };
        let tile = square_tile(image, 10).unwrap();
        assert_eq!(tile.len(), 300);
        assert!(
            tile.chunks(3).all(|p| p[1] > 200 && p[0] < 60 && p[2] < 60),
            "{tile:?}"
        );
    }
}
