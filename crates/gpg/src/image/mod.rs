//! Images for vision-language models: PNG decoding to 8-bit RGB (transparency composited on
//! white, as transformers' `convert_to_rgb` does), Pillow's bicubic resampling ported exactly,
//! and the Qwen2-VL image processor that turns an image into the patch rows the vision tower
//! reads (`pixel_values`) and its patch grid (`image_grid_thw`).
//!
//! Everything here is integer or f32 arithmetic chosen to reproduce transformers' slow (PIL)
//! `Qwen2VLImageProcessor` bit for bit; the tests check that on committed PNG fixtures.

pub mod decode;
pub mod processor;
pub mod resample;

pub use decode::{load_rgb, RgbImage};
pub use processor::{smart_resize, ImageProcessor, ProcessedImage};
