//! A picture of a dataset: one row per class, the first images of each class side by side.

use std::path::Path;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::manifest::Split;

/// Writes a PNG grid to `out`: row r holds up to `per_class` images of class r (in split
/// order), each scaled up `zoom` times, with a 2-pixel gap. Returns the class name of
/// each row, top to bottom.
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
    let mut grid = image::RgbImage::from_pixel(
        cell_w * per_class as u32,
        cell_h * rows,
        image::Rgb([255, 255, 255]),
    );
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
        let (x0, y0) = (filled[row] as u32 * cell_w + 1, row as u32 * cell_h + 1);
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
