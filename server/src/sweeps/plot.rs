//! `GET /v1/sweeps/{id}/plot.svg`: learning against forgetting, one curve per job.

use crate::plots::{Chart, Scale, Series};

/// One job's curve: its label and its (x, y) perplexities, step by step.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// The chart: x is the `x` set's perplexity (lower is learning), y the `y` set's (higher
/// is forgetting), both on log scales; each curve starts at its step-0 point (circled).
pub fn learning_vs_forgetting(title: &str, x: &str, y: &str, curves: Vec<Curve>) -> Chart {
    let series = curves.into_iter().map(|c| Series { label: c.label, points: c.points, faint: false }).collect();
    Chart {
        title: title.to_string(),
        x_desc: format!("{x} perplexity (log scale; lower = learned more)"),
        y_desc: format!("{y} perplexity (log scale; higher = forgot more)"),
        x_scale: Scale::Log,
        y_scale: Scale::Log,
        series,
        marks: true,
        size: (960, 640),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plots::render;

    #[test]
    fn every_curve_is_drawn_and_labelled() {
        let curves = [
            Curve { label: "lr=0.0001".into(), points: vec![(50.0, 40.0), (30.0, 41.0), (25.0, 42.0)] },
            Curve { label: "lr=0.003".into(), points: vec![(50.0, 40.0), (20.0, 60.0)] },
        ];
        let svg = render(&learning_vs_forgetting("sweep <a&b>", "domain", "general", curves.into())).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("lr=0.0001") && svg.contains("lr=0.003") && svg.contains("domain perplexity"));
        assert!(svg.contains("sweep &lt;a&amp;b&gt;"), "text is escaped");
        let strokes = |color: &str| svg.matches(&format!("stroke=\"{color}\" stroke-width=\"2\" points")).count();
        use plotters::style::{Color, Palette, Palette99};
        let (first, second) = (Palette99::pick(0).to_rgba(), Palette99::pick(1).to_rgba());
        let hex = |c: plotters::style::RGBAColor| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2);
        assert_eq!((strokes(&hex(first)), strokes(&hex(second))), (2, 2), "each curve and its legend line");
        let ticks: Vec<f64> = svg.lines().filter_map(|line| line.trim().parse().ok()).collect();
        assert!(ticks.len() >= 6 && ticks.iter().all(|t| (18.0..70.0).contains(t)), "ticks in perplexity: {ticks:?}");
        assert!(render(&learning_vs_forgetting("empty", "a", "b", vec![])).unwrap().contains("empty"));
    }
}
