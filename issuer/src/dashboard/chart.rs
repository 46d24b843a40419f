//! The expiry timeline as inline SVG, drawn on the server: stacked bars per 30-day window, one
//! colour per label, a y axis with round ticks, each window's total written above its bar and
//! its date range below. No script, no external assets.

use std::fmt::Write as _;

use super::escape;
use super::timeline::{labels, Timeline};

/// Label colours, in label order. No red or amber: on this page those mean "expires soon".
pub(super) const COLOURS: [&str; 8] = [
    "#2f6db5", "#3a9a5b", "#9b4dca", "#4aa3a3", "#7a6a00", "#c05299", "#1f3f73", "#6b6b6b",
];

// The drawing's geometry, in SVG user units (the SVG scales to the page's width).
const WIDTH: f64 = 1200.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 26.0;
const PLOT: f64 = 240.0;
const BELOW: f64 = 118.0;

/// Round y-axis ticks for a tallest bar of `max`: (step, top), with at most five steps of 1,
/// 2 or 5 times a power of ten, and `top` the first tick at or above `max`.
pub(super) fn y_scale(max: usize) -> (usize, usize) {
    let max = max.max(1);
    let mut power = 1usize;
    loop {
        for base in [1, 2, 5] {
            let step = base * power;
            let steps = max.div_ceil(step);
            if steps <= 5 {
                return (step, steps * step);
            }
        }
        power = power.saturating_mul(10);
    }
}

/// Appends the chart (or a sentence saying there is nothing to chart) and its legend.
pub(super) fn render(html: &mut String, timeline: &Timeline) {
    let windows = timeline.windows.len();
    let totals: Vec<usize> = (0..windows)
        .map(|i| timeline.counts.values().map(|c| c[i]).sum())
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0);
    if max == 0 {
        html.push_str(
            "<p class=\"empty\">No valid certificate expires in the next two years.</p>\n",
        );
        return;
    }
    let (step, top) = y_scale(max);
    let y = |value: usize| TOP + PLOT - value as f64 / top as f64 * PLOT;
    let slot = (WIDTH - LEFT - RIGHT) / windows as f64;
    let _ = write!(
        html,
        r##"<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="Valid certificates expiring per 30-day window, by label" font-family="system-ui, sans-serif">
<g class="y-axis">
<text x="14" y="{mid}" transform="rotate(-90 14 {mid})" text-anchor="middle" font-size="13" fill="#4a5868">certificates</text>
"##,
        height = TOP + PLOT + BELOW,
        mid = TOP + PLOT / 2.0,
    );
    for tick in (0..=top).step_by(step) {
        let at = y(tick);
        let _ = writeln!(
            html,
            r##"<line x1="{LEFT}" x2="{x2}" y1="{at}" y2="{at}" stroke="{grid}"/><text class="tick" x="{tx}" y="{ty}" text-anchor="end" font-size="13" fill="#1d2733">{tick}</text>"##,
            x2 = WIDTH - RIGHT,
            grid = if tick == 0 { "#4a5868" } else { "#e1e6ec" },
            tx = LEFT - 8.0,
            ty = at + 4.5,
        );
    }
    let _ = writeln!(
        html,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}" stroke="#4a5868"/></g>"##,
        bottom = TOP + PLOT,
    );
    let ranges = labels(&timeline.windows);
    for (i, window) in timeline.windows.iter().enumerate() {
        let x = LEFT + i as f64 * slot;
        let _ = writeln!(
            html,
            r#"<g class="bucket" data-first="{first}" data-last="{last}" data-count="{total}">"#,
            first = window.first,
            last = window.last,
            total = totals[i],
        );
        let mut stacked = 0;
        for (li, (label, counts)) in timeline.counts.iter().enumerate() {
            let n = counts[i];
            if n == 0 {
                continue;
            }
            let _ = writeln!(
                html,
                r#"<rect class="bar" data-label="{label}" data-count="{n}" x="{bx:.1}" y="{by:.1}" width="{bw:.1}" height="{bh:.1}" fill="{colour}"><title>{label}: {n} expiring {first} – {last}</title></rect>"#,
                label = escape(label),
                bx = x + 5.0,
                by = y(stacked + n),
                bw = slot - 10.0,
                bh = y(stacked) - y(stacked + n),
                colour = COLOURS[li % COLOURS.len()],
                first = window.first,
                last = window.last,
            );
            stacked += n;
        }
        if totals[i] > 0 {
            let _ = writeln!(
                html,
                r##"<text class="count" x="{cx:.1}" y="{cy:.1}" text-anchor="middle" font-size="14" font-weight="600" fill="#1d2733">{total}</text>"##,
                cx = x + slot / 2.0,
                cy = y(totals[i]) - 6.0,
                total = totals[i],
            );
        }
        let (lx, ly) = (x + slot / 2.0 + 4.0, TOP + PLOT + 14.0);
        let _ = writeln!(
            html,
            r##"<text class="range" x="{lx:.1}" y="{ly:.1}" transform="rotate(-40 {lx:.1} {ly:.1})" text-anchor="end" font-size="12" fill="#1d2733">{range}</text></g>"##,
            range = ranges[i],
        );
    }
    html.push_str("</svg>\n<div class=\"legend\">");
    for (li, (label, counts)) in timeline.counts.iter().enumerate() {
        let _ = write!(
            html,
            r#"<span><i style="background:{colour}"></i>{label} ({n})</span>"#,
            colour = COLOURS[li % COLOURS.len()],
            label = escape(label),
            n = counts.iter().sum::<usize>(),
        );
    }
    html.push_str("</div>\n");
}

#[cfg(test)]
mod tests {
    use super::y_scale;

    #[test]
    fn the_y_axis_has_at_most_five_round_steps_reaching_the_tallest_bar() {
        for (max, expected) in [
            (0, (1, 1)),
            (1, (1, 1)),
            (4, (1, 4)),
            (6, (2, 6)),
            (7, (2, 8)),
            (11, (5, 15)),
            (23, (5, 25)),
            (26, (10, 30)),
            (980, (200, 1000)),
            (41_095, (10_000, 50_000)),
        ] {
            assert_eq!(y_scale(max), expected, "max {max}");
        }
    }
}
