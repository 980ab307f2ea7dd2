//! Decoding a stored image to RGB8, once per source image, into a reused buffer.
//!
//! The decoder is the shards crate's ([`shards::decode`]: libjpeg-turbo for JPEG, the `image`
//! crate otherwise, a pixel limit from the header), so that `shards verify` passes exactly the
//! images this pipeline decodes. It is re-exported here for the pipeline's users.

pub use shards::decode::{DecodeError, Decoder};
