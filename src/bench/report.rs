//! Presenting benchmark results: an aligned table, CSV, line plots (SVG and PNG) and per-sample
//! overlays of the kept patches and the importance heatmap.

use crate::error::{Error, Result};
use crate::io::write_atomic;
use image::{Rgb, RgbImage};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans Mono (see assets/fonts/DejaVu-LICENSE), so PNG text renders without system fonts.
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The bundled font is valid; a failure would only lose text in PNG plots.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Renders `rows` (first row = header) as columns padded to their widest cell; numbers
/// (cells that parse as f64) are right-aligned.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if i > 0 && s.parse::<f64>().is_ok() {
                    format!("{s:>w$}", w = widths[c])
                } else {
                    format!("{s:<w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(
                &widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("  "),
            );
            out.push('\n');
        }
    }
    out
}

/// Writes rows (the first is the header) as CSV, atomically; fields with commas, quotes or
/// newlines are quoted.
pub fn write_csv(path: &Path, rows: &[Vec<String>]) -> Result<()> {
    let mut w = csv::WriterBuilder::new().flexible(true).from_writer(vec![]);
    for r in rows {
        w.write_record(r).map_err(|e| csv_err(path, e))?;
    }
    let bytes = w.into_inner().map_err(|e| csv_err(path, e))?;
    write_atomic(path, &bytes)
}

fn csv_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::arg("csv", format!("{}: {e}", path.display()))
}

/// A CSV file read whole: its header and rows, fields looked up by column name.
pub struct CsvTable {
    pub path: std::path::PathBuf,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl CsvTable {
    /// Reads `path`; an error names the file and the line that is not CSV.
    pub fn read(path: &Path) -> Result<CsvTable> {
        let mut r = csv::ReaderBuilder::new()
            .from_path(path)
            .map_err(|e| csv_err(path, e))?;
        let header = r
            .headers()
            .map_err(|e| csv_err(path, e))?
            .iter()
            .map(str::to_string)
            .collect();
        let rows = r
            .records()
            .map(|rec| {
                rec.map(|rec| rec.iter().map(str::to_string).collect())
                    .map_err(|e| csv_err(path, e))
            })
            .collect::<Result<_>>()?;
        Ok(CsvTable {
            path: path.to_path_buf(),
            header,
            rows,
        })
    }

    /// Index of column `name`; an error names the file and the column.
    pub fn col(&self, name: &str) -> Result<usize> {
        self.header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| csv_err(&self.path, format!("has no column `{name}`")))
    }

    /// Column `name` of every row as text.
    pub fn column(&self, name: &str) -> Result<Vec<&str>> {
        let c = self.col(name)?;
        Ok(self
            .rows
            .iter()
            .map(|r| r.get(c).map_or("", |s| s.as_str()))
            .collect())
    }
}

/// One line of a plot: its label and points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line plot with markers, one line per series, written as `stem.svg` and `stem.png`.
pub fn line_plot(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    plot(stem, (title, x_label, y_label), series, true)
}

/// A scatter plot (markers only), one colour per series, written as `stem.svg` and `stem.png`.
pub fn scatter_plot(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    plot(stem, (title, x_label, y_label), series, false)
}

fn plot(
    stem: &Path,
    (title, x_label, y_label): (&str, &str, &str),
    series: &[Series],
    lines: bool,
) -> Result<()> {
    register_font();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if all.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = |a: f64, b: f64| {
        let d = if b > a {
            (b - a) * 0.08
        } else {
            a.abs().max(1.0) * 0.1
        };
        (a - d, b + d)
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let (labels, bounds) = ((title, x_label, y_label), (x0, x1, y0, y1));
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    let mut svg_text = String::new();
    {
        let root = SVGBackend::with_string(&mut svg_text, (800, 560)).into_drawing_area();
        draw(&root, labels, series, lines, bounds).map_err(|e| plot_err(&svg, e))?;
    }
    write_atomic(&svg, svg_text.as_bytes())?;
    let mut buf = vec![0u8; 800 * 560 * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (800, 560)).into_drawing_area();
        draw(&root, labels, series, lines, bounds).map_err(|e| plot_err(&png, e))?;
    }
    let img = RgbImage::from_raw(800, 560, buf).ok_or_else(|| plot_err(&png, "buffer size"))?;
    save_png(&img, &png)
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::arg("plot", format!("{}: {e}", path.display()))
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    (title, x_label, y_label): (&str, &str, &str),
    series: &[Series],
    lines: bool,
    (x0, x1, y0, y1): (f64, f64, f64, f64),
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut pts = s.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let line = if lines { pts.clone() } else { vec![] };
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(e)?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(e)?;
    }
    // The legend goes to the corner whose 45% x 45% box holds the fewest points.
    let in_box = |right: bool, top: bool| {
        let (fx, fy) = (0.45 * (x1 - x0), 0.45 * (y1 - y0));
        series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|&&(x, y)| {
                (if right { x > x1 - fx } else { x < x0 + fx })
                    && (if top { y > y1 - fy } else { y < y0 + fy })
            })
            .count()
    };
    let position = [
        (true, true, SeriesLabelPosition::UpperRight),
        (true, false, SeriesLabelPosition::LowerRight),
        (false, false, SeriesLabelPosition::LowerLeft),
        (false, true, SeriesLabelPosition::UpperLeft),
    ]
    .into_iter()
    .min_by_key(|&(r, t, _)| in_box(r, t))
    .map_or(SeriesLabelPosition::UpperRight, |c| c.2);
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

/// Writes an RGB image as PNG, atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: format!("cannot encode PNG: {e}"),
        })?;
    write_atomic(path, &bytes)
}

/// The image with the importance of each patch as a heatmap (blue low, red high, half
/// transparent) and the kept patches outlined in white. `importance[p]` and `kept` index the
/// row-major `grid x grid` patches of a square image.
pub fn overlay(img: &RgbImage, grid: u32, importance: &[f32], kept: &[usize]) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = img.clone();
    let max = importance
        .iter()
        .cloned()
        .fold(0.0f32, f32::max)
        .max(f32::MIN_POSITIVE);
    let cell = |x: u32, y: u32| ((y * grid / h) * grid + x * grid / w) as usize;
    for (x, y, p) in out.enumerate_pixels_mut() {
        let t = importance.get(cell(x, y)).copied().unwrap_or(0.0) / max;
        let heat = [
            255.0 * t,
            64.0 * (1.0 - (2.0 * t - 1.0).abs()),
            255.0 * (1.0 - t),
        ];
        for (c, hc) in p.0.iter_mut().zip(heat) {
            *c = (0.5 * *c as f32 + 0.5 * hc).round() as u8;
        }
    }
    let white = Rgb([255, 255, 255]);
    for &k in kept {
        let (gx, gy) = ((k as u32) % grid, (k as u32) / grid);
        let (xa, xb) = (gx * w / grid, ((gx + 1) * w / grid).max(1) - 1);
        let (ya, yb) = (gy * h / grid, ((gy + 1) * h / grid).max(1) - 1);
        for x in xa..=xb.min(w - 1) {
            out.put_pixel(x, ya, white);
            out.put_pixel(x, yb.min(h - 1), white);
        }
        for y in ya..=yb.min(h - 1) {
            out.put_pixel(xa, y, white);
            out.put_pixel(xb.min(w - 1), y, white);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_and_csv_escapes() {
        let rows = vec![
            vec!["config".to_string(), "acc".to_string()],
            vec!["sum/last_token".to_string(), "0.5".to_string()],
            vec!["a,b".to_string(), "12.25".to_string()],
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "config          acc");
        assert_eq!(lines[2], "sum/last_token    0.5");
        assert_eq!(lines[3], "a,b             12.25");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        write_csv(&p, &rows).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "config,acc\nsum/last_token,0.5\n\"a,b\",12.25\n"
        );
    }

    #[test]
    fn plots_write_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("acc");
        let s = vec![
            Series {
                label: "sum".into(),
                points: vec![(144.0, 0.5), (288.0, 0.7), (576.0, 0.8)],
            },
            Series {
                label: "variance".into(),
                points: vec![(144.0, 0.6), (288.0, 0.75)],
            },
        ];
        line_plot(
            &stem,
            "accuracy vs kept tokens",
            "kept image tokens",
            "accuracy",
            &s,
        )
        .unwrap();
        let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
        assert!(svg.contains("variance") && svg.contains("accuracy vs kept tokens"));
        let png = image::open(stem.with_extension("png")).unwrap().to_rgb8();
        assert_eq!(png.dimensions(), (800, 560));
        // Some pixels carry text/lines: not a blank canvas.
        assert!(png.pixels().filter(|p| p.0 != [255, 255, 255]).count() > 1000);
    }

    #[test]
    fn overlay_outlines_kept_patches() {
        let img = RgbImage::from_pixel(8, 8, Rgb([0, 0, 0]));
        let o = overlay(&img, 2, &[0.0, 1.0, 0.0, 0.0], &[1]);
        assert_eq!(o.get_pixel(4, 0).0, [255, 255, 255]); // kept patch 1's border
        assert_eq!(o.get_pixel(7, 3).0, [255, 255, 255]);
        assert_eq!(o.get_pixel(5, 1).0, [128, 0, 0]); // hottest patch interior: red
        assert_eq!(o.get_pixel(1, 5).0, [0, 0, 128]); // coldest: blue
    }
}
