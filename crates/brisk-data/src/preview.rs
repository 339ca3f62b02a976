//! A picture of a dataset: one row per class, its name on the left (an 8x8 bitmap font),
//! then the first images of that class side by side.

use std::path::Path;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::manifest::Split;

/// Draws `text` in black with its top-left corner at (x0, y0), 8x8 pixels a character;
/// characters outside the font's Basic Latin set show as '?'.
fn draw_text(img: &mut image::RgbImage, text: &str, x0: u32, y0: u32) {
    use font8x8::UnicodeFonts;
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (gy, bits) in glyph.iter().enumerate() {
            for gx in 0..8 {
                let (x, y) = (x0 + i as u32 * 8 + gx, y0 + gy as u32);
                if bits >> gx & 1 == 1 && x < img.width() && y < img.height() {
                    img.put_pixel(x, y, image::Rgb([0, 0, 0]));
                }
            }
        }
    }
}

/// Writes a PNG grid to `out`: row r starts with the name of class r, then up to
/// `per_class` of its images (in split order), each scaled up `zoom` times, with a
/// 2-pixel gap. Returns the class name of each row, top to bottom.
pub fn write_preview(
    data: &Dataset,
    split: Split,
    per_class: usize,
    zoom: u32,
    out: &Path,
) -> Result<Vec<String>> {
    let m = data.manifest();
    let (h, w, c) = (m.height as u32, m.width as u32, m.channels);
    let (cell_w, cell_h) = (w * zoom + 2, h * zoom + 2);
    let rows = m.classes.len() as u32;
    let margin = m.classes.iter().map(|n| n.chars().count()).max().unwrap_or(0) as u32 * 8 + 6;
    let mut grid = image::RgbImage::from_pixel(
        margin + cell_w * per_class as u32,
        cell_h * rows,
        image::Rgb([255, 255, 255]),
    );
    for (r, name) in m.classes.iter().enumerate() {
        draw_text(
            &mut grid,
            name,
            3,
            r as u32 * cell_h + cell_h.saturating_sub(8) / 2,
        );
    }
    let mut filled = vec![0usize; m.classes.len()];
    for i in 0..data.len(split) {
        if filled.iter().all(|&f| f >= per_class) {
            break;
        }
        let Some((img, label)) = data.get(split, i) else {
            break;
        };
        let row = label as usize;
        if filled[row] >= per_class {
            continue;
        }
        let (x0, y0) = (margin + filled[row] as u32 * cell_w + 1, row as u32 * cell_h + 1);
        for y in 0..h * zoom {
            for x in 0..w * zoom {
                let p = ((y / zoom) * w + x / zoom) as usize * c;
                // Grey images repeat their one channel.
                let px = [img[p], img[p + (1 % c)], img[p + (2 % c)]];
                grid.put_pixel(x0 + x, y0 + y, image::Rgb(px));
            }
        }
        filled[row] += 1;
    }
    grid.save(out)
        .map_err(|e| Error::corrupt(out, format!("cannot write PNG: {e}")))?;
    Ok(m.classes.clone())
}
