//! `GET /v1/sweeps/{id}/plot.svg`: learning against forgetting, one curve per job, drawn by
//! plotters' SVG backend (the text is left to the viewer's fonts, so no font files are needed).

use plotters::prelude::*;

/// One job's curve: its label and its (x, y) perplexities, step by step.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// The range of `values`, with a margin; a sane default when there are none.
fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !(low.is_finite() && high.is_finite()) {
        return 0.0..1.0;
    }
    let margin = ((high - low) * 0.05).max(0.02);
    low - margin..high + margin
}

/// Perplexity with three significant digits.
fn perplexity_label(log_perplexity: &f64) -> String {
    let value = log_perplexity.exp();
    let decimals = (2 - value.log10().floor() as i32).clamp(0, 6) as usize;
    format!("{value:.decimals$}")
}

/// The SVG document: x is the `x` set's perplexity (lower is learning), y the `y` set's (higher
/// is forgetting). Both axes are linear in log perplexity (the loss) and labelled in perplexity,
/// so a spike does not flatten the rest; each curve starts at its step-0 point (circled).
pub fn learning_vs_forgetting(title: &str, x: &str, y: &str, curves: &[Curve]) -> Result<String, String> {
    let logs: Vec<Vec<(f64, f64)>> =
        curves.iter().map(|c| c.points.iter().map(|&(a, b)| (a.ln(), b.ln())).collect()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let xs = range(logs.iter().flatten().map(|p| p.0));
        let ys = range(logs.iter().flatten().map(|p| p.1));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(xs, ys)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(format!("{x} perplexity (log scale; lower = learned more)"))
            .y_desc(format!("{y} perplexity (log scale; higher = forgot more)"))
            .x_label_formatter(&perplexity_label)
            .y_label_formatter(&perplexity_label)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (curve, points)) in curves.iter().zip(&logs).enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(curve.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            let marks = points.iter().enumerate().map(|(at, &p)| {
                let style = if at == 0 { color.stroke_width(2) } else { color.filled() };
                Circle::new(p, if at == 0 { 6 } else { 3 }, style)
            });
            chart.draw_series(marks).map_err(|e| e.to_string())?;
        }
        if !curves.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_curve_is_drawn_and_labelled() {
        let curves = [
            Curve { label: "lr=0.0001".into(), points: vec![(50.0, 40.0), (30.0, 41.0), (25.0, 42.0)] },
            Curve { label: "lr=0.003".into(), points: vec![(50.0, 40.0), (20.0, 60.0)] },
        ];
        let svg = learning_vs_forgetting("sweep <a&b>", "domain", "general", &curves).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("lr=0.0001") && svg.contains("lr=0.003") && svg.contains("domain perplexity"));
        assert!(svg.contains("sweep &lt;a&amp;b&gt;"), "text is escaped");
        let strokes = |color: &str| svg.matches(&format!("stroke=\"{color}\" stroke-width=\"2\" points")).count();
        let (first, second) = (Palette99::pick(0).to_rgba(), Palette99::pick(1).to_rgba());
        let hex = |c: RGBAColor| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2);
        assert_eq!((strokes(&hex(first)), strokes(&hex(second))), (2, 2), "each curve and its legend line");
        let ticks: Vec<f64> = svg.lines().filter_map(|line| line.trim().parse().ok()).collect();
        assert!(ticks.len() >= 6 && ticks.iter().all(|t| (18.0..70.0).contains(t)), "ticks in perplexity: {ticks:?}");
        assert!(learning_vs_forgetting("empty", "a", "b", &[]).unwrap().contains("empty"));
    }
}
