//! Figures as PNG and SVG from one description (plotters; text drawn with a TrueType font
//! found on the system, DejaVu Sans by default, or the file named by `ATTRACTORS_FONT`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::output::{write_atomic, OutDir};

/// One curve.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// `(x, y)` points.
    pub points: Vec<(f64, f64)>,
}

/// What to draw.
#[derive(Debug, Clone)]
pub enum Figure {
    /// Line chart.
    Lines {
        /// Title.
        title: String,
        /// x axis label.
        x_label: String,
        /// y axis label.
        y_label: String,
        /// One line per series.
        series: Vec<Series>,
        /// Logarithmic x axis.
        log_x: bool,
        /// Logarithmic y axis.
        log_y: bool,
    },
    /// `matrix[row][col]`, drawn with row 0 at the bottom; NaN cells left grey.
    /// Heatmap (rows of `matrix` are the y ticks).
    Heatmap {
        /// Title.
        title: String,
        /// x axis label.
        x_label: String,
        /// y axis label.
        y_label: String,
        /// Column labels.
        x_ticks: Vec<String>,
        /// Row labels.
        y_ticks: Vec<String>,
        /// Values `[row][column]` (NaN: blank).
        matrix: Vec<Vec<f64>>,
    },
    /// Horizontal bars, first bar on top.
    /// Horizontal bars.
    Bars {
        /// Title.
        title: String,
        /// x axis label.
        x_label: String,
        /// `(label, value)` per bar.
        bars: Vec<(String, f64)>,
    },
    /// Panels side by side.
    Row(Vec<Figure>),
}

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn init_font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("ATTRACTORS_FONT").map(PathBuf::from).into_iter().chain(FONT_PATHS.iter().map(PathBuf::from)).collect();
        let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            "no TrueType font for figure text: install fonts-dejavu-core (scripts/setup.sh does) or set ATTRACTORS_FONT to a .ttf file".to_string()
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read font {}: {e}", path.display()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{} is not a usable font: set ATTRACTORS_FONT to a .ttf file", path.display()))
    })
    .clone()
}

/// Write `stem.png` and `stem.svg` into `dir` (each written whole, then renamed).
pub fn save(fig: &Figure, dir: &OutDir, stem: &str) -> Result<[PathBuf; 2], String> {
    init_font()?;
    let size = fig.size();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        fig.draw(&root)?;
        root.present().map_err(|e| e.to_string())?;
    }
    let svg_path = write_atomic(&dir.path(&format!("{stem}.svg")), svg.as_bytes()).map_err(|e| e.to_string())?;
    let png_path = dir.path(&format!("{stem}.png"));
    let tmp = dir.path(&format!(".{stem}.tmp.png"));
    let r = (|| {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        fig.draw(&root)?;
        root.present().map_err(|e| format!("cannot write {}: {e}", png_path.display()))
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &png_path).map_err(|e| format!("cannot write {}: {e}", png_path.display()))?;
    Ok([png_path, svg_path])
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("drawing failed: {e:?}")
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Colour for a value in [0, 1] (viridis-like ramp).
fn ramp(t: f64) -> RGBColor {
    const STOPS: [(f64, [f64; 3]); 5] =
        [(0.0, [68.0, 1.0, 84.0]), (0.25, [59.0, 82.0, 139.0]), (0.5, [33.0, 145.0, 140.0]), (0.75, [94.0, 201.0, 98.0]), (1.0, [253.0, 231.0, 37.0])];
    let t = t.clamp(0.0, 1.0);
    let k = STOPS.iter().position(|s| s.0 >= t).unwrap_or(4).max(1);
    let (a, b) = (STOPS[k - 1], STOPS[k]);
    let f = (t - a.0) / (b.0 - a.0);
    let c = |i: usize| (a.1[i] + f * (b.1[i] - a.1[i])).round() as u8;
    RGBColor(c(0), c(1), c(2))
}

fn finite_range(vals: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (0.1, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    }
}

impl Figure {
    fn size(&self) -> (u32, u32) {
        match self {
            Figure::Lines { .. } => (900, 560),
            Figure::Heatmap { .. } => (820, 760),
            Figure::Bars { bars, .. } => (760, 150 + 36 * bars.len().max(1) as u32),
            Figure::Row(p) => {
                let sizes: Vec<(u32, u32)> = p.iter().map(|f| f.size()).collect();
                (sizes.iter().map(|s| s.0).sum::<u32>().max(1), sizes.iter().map(|s| s.1).max().unwrap_or(400))
            }
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(err)?;
        match self {
            Figure::Lines { title, x_label, y_label, series, log_x, log_y } => draw_lines(root, title, x_label, y_label, series, *log_x, *log_y),
            Figure::Heatmap { title, x_label, y_label, x_ticks, y_ticks, matrix } => draw_heatmap(root, title, x_label, y_label, x_ticks, y_ticks, matrix),
            Figure::Bars { title, x_label, bars } => draw_bars(root, title, x_label, bars),
            Figure::Row(panels) => {
                let widths: Vec<u32> = panels.iter().map(|f| f.size().0).collect();
                let mut rest = root.clone();
                for (f, w) in panels.iter().zip(widths) {
                    let (left, right) = rest.split_horizontally(w as i32);
                    f.draw(&left)?;
                    rest = right;
                }
                Ok(())
            }
        }
    }
}

/// A log axis's tick: `3e-5`, or plain between 0.01 and 10,000 (`0.5`, `20`), without the
/// float noise of ticks computed as powers (`9.999999e-5`).
fn log_fmt(v: &f64) -> String {
    if *v >= 0.01 && *v < 1e4 {
        let s = format!("{:.2}", v);
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}")
    }
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, xl: &str, yl: &str, series: &[Series], log_x: bool, log_y: bool) -> Result<(), String> {
    let (x0, x1) = finite_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)), log_x);
    let (y0, y1) = finite_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)), log_y);
    // Integer x values (layers, positions) get integer tick labels, never 2.5 or 5.0.
    let int_x = !log_x && series.iter().flat_map(|s| s.points.iter()).all(|p| !p.0.is_finite() || p.0.fract() == 0.0);
    let x_fmt = |v: &f64| if v.fract().abs() < 1e-9 { format!("{v:.0}") } else { String::new() };
    let n_x = ((x1 - x0).round().max(0.0) as usize + 1).clamp(2, 16);
    let mut b = ChartBuilder::on(root);
    b.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(45).y_label_area_size(80);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            let mut mesh = chart.configure_mesh();
            mesh.x_desc(xl).y_desc(yl).label_style(("sans-serif", 14));
            if int_x {
                mesh.x_labels(n_x).x_label_formatter(&x_fmt);
            }
            if log_y {
                mesh.y_label_formatter(&log_fmt);
            }
            mesh.draw().map_err(err)?;
            for (k, s) in series.iter().enumerate() {
                let c = COLORS[k % COLORS.len()];
                let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_x || p.0 > 0.0) && (!log_y || p.1 > 0.0)).collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                    .map_err(err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, c.filled()))).map_err(err)?;
            }
            if series.len() > 1 {
                chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", 14)).draw().map_err(err)?;
            }
        }};
    }
    match (log_x, log_y) {
        (false, false) => body!(b.build_cartesian_2d(x0..x1, y0..y1).map_err(err)?),
        (true, false) => body!(b.build_cartesian_2d((x0..x1).log_scale(), y0..y1).map_err(err)?),
        (false, true) => body!(b.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(err)?),
        (true, true) => body!(b.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale()).map_err(err)?),
    }
    Ok(())
}

fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    xl: &str,
    yl: &str,
    x_ticks: &[String],
    y_ticks: &[String],
    m: &[Vec<f64>],
) -> Result<(), String> {
    let rows = m.len();
    let cols = m.iter().map(|r| r.len()).max().unwrap_or(0);
    let (lo, hi) = {
        let v: Vec<f64> = m.iter().flatten().copied().filter(|v| v.is_finite()).collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi > lo {
            (lo, hi)
        } else {
            (0.0, 1.0)
        }
    };
    let (main, bar) = root.split_horizontally(root.dim_in_pixel().0 as i32 - 120);
    let mut chart = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size((y_ticks.iter().map(|t| t.chars().count()).max().unwrap_or(0) as u32 * 8 + 30).clamp(60, 240))
        .build_cartesian_2d((0..cols.max(1) - 1).into_segmented(), (0..rows.max(1) - 1).into_segmented())
        .map_err(err)?;
    let xt = x_ticks.to_vec();
    let yt = y_ticks.to_vec();
    // labels sit at the centre of their cell
    let name = |t: &[String], v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => t.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(xl)
        .y_desc(yl)
        .x_labels(cols.min(16))
        .y_labels(rows.min(16))
        .x_label_formatter(&|v| name(&xt, v))
        .y_label_formatter(&|v| name(&yt, v))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(m.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(c, &v)| {
                let color = if v.is_finite() { ramp((v - lo) / (hi - lo)) } else { RGBColor(220, 220, 220) };
                Rectangle::new([(SegmentValue::Exact(c), SegmentValue::Exact(r)), (SegmentValue::Exact(c + 1), SegmentValue::Exact(r + 1))], color.filled())
            })
        }))
        .map_err(err)?;
    // colour bar
    let mut cb = ChartBuilder::on(&bar).margin_top(50).margin_bottom(57).margin_left(8).right_y_label_area_size(70).build_cartesian_2d(0.0..1.0, lo..hi).map_err(err)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.3}"))
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    let steps = 64;
    cb.draw_series((0..steps).map(|k| {
        let a = lo + (hi - lo) * k as f64 / steps as f64;
        let b = lo + (hi - lo) * (k + 1) as f64 / steps as f64;
        Rectangle::new([(0.0, a), (1.0, b)], ramp(k as f64 / (steps - 1) as f64).filled())
    }))
    .map_err(err)?;
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, xl: &str, bars: &[(String, f64)]) -> Result<(), String> {
    let n = bars.len();
    let hi = bars.iter().map(|b| b.1).filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-12) * 1.1;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(170)
        .build_cartesian_2d(0.0..hi, 0..n.max(1))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(xl)
        .y_labels(n.max(1))
        .y_label_formatter(&|v| if *v < n { names[n - 1 - *v].clone() } else { String::new() })
        .label_style(("sans-serif", 18))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(k, b)| {
            let y = n - 1 - k;
            Rectangle::new([(0.0, y), (b.1.max(0.0), y + 1)], COLORS[0].mix(0.85).filled())
        }))
        .map_err(err)?;
    Ok(())
}

/// True when `p` starts with the PNG signature (used by tests and the report).
pub fn is_png(p: &Path) -> bool {
    std::fs::read(p).map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n")).unwrap_or(false)
}
#[cfg(test)]
mod tests {
    #[test]
    fn log_ticks_read_cleanly() {
        assert_eq!(super::log_fmt(&9.999999999e-5), "1e-4");
        assert_eq!(super::log_fmt(&2.0e-7), "2e-7");
        assert_eq!(super::log_fmt(&0.5), "0.5");
        assert_eq!(super::log_fmt(&20.000000001), "20");
        assert_eq!(super::log_fmt(&1e6), "1e6");
    }
}
