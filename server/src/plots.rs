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
        if self == Scale::Log && (!value.is_finite() || value == 0.0) {
            // Past f64's range (a log axis reaching 1e308 and beyond): written from the log itself.
            let decimal = v / std::f64::consts::LN_10;
            let exponent = decimal.floor();
            return format!("{:.2}e{exponent:.0}", 10f64.powf(decimal - exponent));
        }
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

/// The largest magnitude an axis reaches; points beyond it are drawn at its edge. Plotters works
/// out spans and tick steps in f64: a span of ±1e308 overflows to infinity and its tick loop never
/// ends (a stored loss of 1e308 once hung every chart request).
pub const AXIS_LIMIT: f64 = 1e100;

/// The range of `values` (each clamped to ±[`AXIS_LIMIT`]), with a margin; a sane default when
/// there are none. The margin is at least 1% of the largest magnitude, so the span never vanishes
/// beneath the values' precision.
pub fn range(values: impl Iterator<Item = f64>) -> Range<f64> {
    let clamped = values.filter(|v| !v.is_nan()).map(|v| v.clamp(-AXIS_LIMIT, AXIS_LIMIT));
    let (low, high) = clamped.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !(low.is_finite() && high.is_finite()) {
        return 0.0..1.0;
    }
    let magnitude = high.abs().max(low.abs()).max(1e-12);
    let margin = ((high - low) * 0.05).max(magnitude * 0.01);
    low - margin..high + margin
}

/// `text` without control characters, which XML 1.0 cannot carry (a name holding one made the
/// whole SVG unreadable).
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect()
}

/// An SVG document as a response a browser will not sniff into anything else, nor run scripts in
/// when it is opened on its own.
pub fn svg_response(svg: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let headers = [
        ("content-type", "image/svg+xml"),
        ("x-content-type-options", "nosniff"),
        ("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'"),
    ];
    (headers, svg).into_response()
}

/// Renders `chart` on a blocking thread: drawing thousands of points is CPU work that must not
/// hold up the runtime's threads (and `/healthz` with them).
pub async fn render_off_runtime(chart: Chart) -> Result<String, String> {
    tokio::task::spawn_blocking(move || render(&chart)).await.map_err(|e| format!("the chart's thread failed: {e}"))?
}

/// What a chart shows and how.
pub struct Chart {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub x_scale: Scale,
    pub y_scale: Scale,
    pub series: Vec<Series>,
    /// Mark every point (a dot; the first one circled).
    pub marks: bool,
    pub size: (u32, u32),
}

fn draw_error(error: impl std::fmt::Display) -> String {
    error.to_string()
}

/// The chart as an SVG document. Points that are not finite (or not positive on a log axis) are
/// left out; those beyond ±[`AXIS_LIMIT`] are drawn at its edge.
pub fn render(chart: &Chart) -> Result<String, String> {
    let clamp = |v: f64| v.clamp(-AXIS_LIMIT, AXIS_LIMIT);
    let axis: Vec<Vec<(f64, f64)>> = chart
        .series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .map(|&(x, y)| (chart.x_scale.to_axis(x), chart.y_scale.to_axis(y)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|(x, y)| (clamp(x), clamp(y)))
                .collect()
        })
        .collect();
    let (title, x_desc, y_desc) = (printable(&chart.title), printable(&chart.x_desc), printable(&chart.y_desc));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, chart.size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        if axis.iter().all(Vec::is_empty) {
            let note = format!("{title} (no data yet)");
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
            .caption(&title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(xs, ys)
            .map_err(draw_error)?;
        let (x_scale, y_scale) = (chart.x_scale, chart.y_scale);
        let x_label = move |v: &f64| x_scale.label(*v);
        let y_label = move |v: &f64| y_scale.label(*v);
        plot.configure_mesh()
            .x_desc(&x_desc)
            .y_desc(&y_desc)
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
                    .label(printable(&series.label))
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
        assert_eq!(Scale::Log.label(710.0 * std::f64::consts::LN_10), "1.00e710");
        let r = range([2.0, 4.0].into_iter());
        assert!(r.start < 2.0 && r.end > 4.0);
        assert_eq!(range(std::iter::empty()), 0.0..1.0);
    }

    fn chart(title: &str, label: &str, points: Vec<(f64, f64)>, y_scale: Scale) -> Chart {
        let series = vec![Series { label: label.into(), points, faint: false }];
        let (title, x_desc, y_desc) = (title.into(), "step".into(), "loss".into());
        Chart { title, x_desc, y_desc, x_scale: Scale::Linear, y_scale, series, marks: true, size: (320, 160) }
    }

    /// Renders on another thread, failing (instead of hanging the test) past a generous bound.
    fn render_within_seconds(chart: Chart, seconds: u64) -> String {
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(render(&chart)));
        let svg = outcome.recv_timeout(std::time::Duration::from_secs(seconds)).expect("the chart never finished");
        svg.unwrap()
    }

    #[test]
    fn extreme_finite_values_plot_in_bounded_time_and_stay_on_the_chart() {
        let cases = [
            vec![(1.0, 1e308), (2.0, -1e308)],
            vec![(1.0, f64::MAX), (2.0, f64::MIN), (3.0, 2.0)],
            vec![(1.0, 1e300), (2.0, 1e300)],
            vec![(1.0, -1e-300), (2.0, 5e-324), (3.0, 0.0)],
            vec![(-1e308, 1.0), (1e308, 2.0)],
        ];
        for points in cases {
            for scale in [Scale::Linear, Scale::Log] {
                let svg = render_within_seconds(chart("extreme", "loss", points.clone(), scale), 20);
                assert!(svg.trim_end().ends_with("</svg>"), "{points:?}");
                assert!(!svg.contains("NaN") && !svg.contains("inf"), "{points:?}: {svg}");
            }
        }
        let r = range([1e308, -1e308].into_iter());
        assert!(r.start.is_finite() && r.end.is_finite() && r.start < -AXIS_LIMIT && r.end > AXIS_LIMIT);
    }

    #[test]
    fn control_characters_in_names_leave_a_well_formed_document() {
        let svg =
            render_within_seconds(chart("job\u{1}\u{8}", "set\u{0}", vec![(1.0, 2.0), (2.0, 1.5)], Scale::Linear), 20);
        assert!(!svg.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{svg}");
        assert!(svg.contains("job\u{fffd}\u{fffd}"), "{svg}");
    }
}
