//! Charts as SVG documents, drawn by plotters' SVG backend: a job's curves (`GET
//! /v1/jobs/{id}/plot.svg`) and a sweep's learning against forgetting. Text is left to the
//! viewer's fonts, so no font files are needed; plotters escapes it.

use std::ops::Range;

use plotters::prelude::*;

/// One line: its label and its (x, y) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn thin and pale, behind the others (a raw series under its smoothed one).
    pub faint: bool,
}

/// How a chart's y axis reads.
#[derive(Clone, Copy, PartialEq)]
pub enum Scale {
    Linear,
    /// Linear in the log of the value, labelled in the value: a perplexity spike does not flatten
    /// the rest.
    Log,
}

impl Scale {
    fn to_axis(self, v: f64) -> f64 {
        match self {
            Scale::Linear => v,
            Scale::Log => v.ln(),
        }
    }

    fn label(self, v: f64) -> String {
        let value = match self {
            Scale::Linear => v,
            Scale::Log => v.exp(),
        };
        if value == 0.0 || !value.is_finite() || (value.fract() == 0.0 && value.abs() < 1e6) {
            return format!("{value:.0}");
        }
        let magnitude = value.abs().log10().floor() as i32;
        if !(-3..6).contains(&magnitude) {
            return format!("{value:.2e}");
        }
        let decimals = (2 - magnitude).clamp(0, 6) as usize;
        format!("{value:.decimals$}")
    }
}

/// The range of `values`, with a margin; a sane default when there are none.
pub fn range(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !(low.is_finite() && high.is_finite()) {
        return 0.0..1.0;
    }
    let margin = ((high - low) * 0.05).max(high.abs().max(1e-12) * 0.01);
    low - margin..high + margin
}

/// What a chart shows and how.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub x_scale: Scale,
    pub y_scale: Scale,
    pub series: &'a [Series],
    /// Mark every point (a dot; the first one circled).
    pub marks: bool,
    pub size: (u32, u32),
}

fn draw_error(error: impl std::fmt::Display) -> String {
    error.to_string()
}

/// The chart as an SVG document. Points that are not finite (or not positive on a log axis) are
/// left out.
pub fn render(chart: &Chart) -> Result<String, String> {
    let axis: Vec<Vec<(f64, f64)>> = chart
        .series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .map(|&(x, y)| (chart.x_scale.to_axis(x), chart.y_scale.to_axis(y)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, chart.size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        if axis.iter().all(Vec::is_empty) {
            let note = format!("{} (no data yet)", chart.title);
            ChartBuilder::on(&root)
                .caption(note, ("sans-serif", 20))
                .build_cartesian_2d(0.0..1.0, 0.0..1.0)
                .map_err(draw_error)?;
            root.present().map_err(draw_error)?;
            drop(root);
            return Ok(svg);
        }
        let xs = range(axis.iter().flatten().map(|p| p.0));
        let ys = range(axis.iter().flatten().map(|p| p.1));
        let mut plot = ChartBuilder::on(&root)
            .caption(chart.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(xs, ys)
            .map_err(draw_error)?;
        let (x_scale, y_scale) = (chart.x_scale, chart.y_scale);
        let x_label = move |v: &f64| x_scale.label(*v);
        let y_label = move |v: &f64| y_scale.label(*v);
        plot.configure_mesh()
            .x_desc(chart.x_desc)
            .y_desc(chart.y_desc)
            .x_label_formatter(&x_label)
            .y_label_formatter(&y_label)
            .draw()
            .map_err(draw_error)?;
        let mut labelled = false;
        for (i, (series, points)) in chart.series.iter().zip(&axis).enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let style = if series.faint { color.mix(0.35).stroke_width(1) } else { color.stroke_width(2) };
            let drawn = plot.draw_series(LineSeries::new(points.clone(), style)).map_err(draw_error)?;
            if !series.label.is_empty() {
                labelled = true;
                drawn
                    .label(series.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
            if chart.marks {
                let marks = points.iter().enumerate().map(|(at, &p)| {
                    let style = if at == 0 { color.stroke_width(2) } else { color.filled() };
                    Circle::new(p, if at == 0 { 6 } else { 3 }, style)
                });
                plot.draw_series(marks).map_err(draw_error)?;
            }
        }
        if labelled {
            plot.configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(draw_error)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_in_the_values_scale() {
        assert_eq!(Scale::Log.label(45.5f64.ln()), "45.5");
        assert_eq!(Scale::Linear.label(3e-4), "3.00e-4");
        assert_eq!(Scale::Linear.label(0.005), "0.00500");
        assert_eq!(Scale::Linear.label(2.5e-7), "2.50e-7");
        assert_eq!(Scale::Linear.label(1234.5), "1234");
        assert_eq!(Scale::Linear.label(70.0), "70");
        let r = range([2.0, 4.0].into_iter());
        assert!(r.start < 2.0 && r.end > 4.0);
        assert_eq!(range(std::iter::empty()), 0.0..1.0);
    }
}
