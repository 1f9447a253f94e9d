//! SVG plots of a task's curves: its demand (arrival curves scaled by WCET/BCET into work
//! units) against the service available to it. Hand-written SVG; the curves are drawn exactly
//! from their segments (jumps as vertical lines), converted to floats only for drawing. Used by
//! `vigil analyze --plot` and by the manager's dashboard.

use crate::units::trim_float;
use crate::Loaded;
use rtc::system::{Analysis, System};
use rtc::{Curve, Seg, Q};
use std::fmt::Write as _;
use std::path::Path;

/// Most segments drawn per curve; the horizon shrinks until every curve fits.
const MAX_DRAWN: usize = 20_000;

const W: f64 = 820.0;
const H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;

/// One curve to draw.
struct Line<'a> {
    label: String,
    curve: &'a Curve,
    color: &'static str,
    dashed: bool,
}

/// Writes `DIR/<task>.svg` for every task; returns how many were written. The error names
/// the file.
pub fn write_all(dir: &Path, l: &Loaded, a: &Analysis) -> Result<usize, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create the plot folder: {e}", dir.display()))?;
    let mut n = 0;
    for i in 0..l.system.tasks.len() {
        let svg = task_svg(l, &l.system, a, i);
        // Names are validated by `model` (letters, digits, '_', '-', '.'), so this stays in `dir`.
        let path = dir.join(format!("{}.svg", l.system.tasks[i].name));
        std::fs::write(&path, svg).map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
        n += 1;
    }
    Ok(n)
}

/// The plot of task `i` of `sys` (the model's system, or the same system rewritten for a
/// placement) under the analysis `a` of `sys`.
pub fn task_svg(l: &Loaded, sys: &System, a: &Analysis, i: usize) -> String {
    let (t, r) = (&sys.tasks[i], &a.tasks[i]);
    let unit = l.work_unit(i);
    let demand_u = r.input.upper.scale(&t.wcet);
    let demand_l = r.input.lower.scale(&t.bcet);
    let lines = [
        Line { label: "demand upper (αᵘ·wcet)".into(), curve: &demand_u, color: "#c0392b", dashed: false },
        Line { label: "demand lower (αˡ·bcet)".into(), curve: &demand_l, color: "#c0392b", dashed: true },
        Line { label: "service upper (βᵘ)".into(), curve: &r.service.upper, color: "#1f5fa8", dashed: true },
        Line { label: "service lower (βˡ)".into(), curve: &r.service.lower, color: "#1f5fa8", dashed: false },
    ];
    let horizon = horizon(&demand_u, &r.service.lower, r.wcrt.as_ref(), &lines);
    let resource = sys.resources.get(t.resource).map(|r| r.name.as_str()).unwrap_or("?");
    let wcrt = r.wcrt.as_ref().map(crate::units::human_time).unwrap_or_else(|| "unbounded".into());
    let title = format!("task {} on {} — wcrt {}", t.name, resource, wcrt);
    render(&title, unit, &lines, &horizon)
}

/// The time scale of the task: five mean inter-arrival times, three response times, two
/// patterns of the service (TDMA cycles, reservation periods, a latency), shrunk so that no
/// curve needs more than [`MAX_DRAWN`] pieces.
fn horizon(demand: &Curve, service: &Curve, wcrt: Option<&Q>, all: &[Line]) -> Q {
    let mut h = Q::zero();
    let rate = demand.rate();
    if rate.is_positive() {
        // Five activations (the curve is in work units: rate / height of one step).
        let step = demand.segments().iter().map(|s| s.yr.clone()).find(|y| y.is_positive()).unwrap_or_else(Q::one);
        h = Q::int(5) * &step / &rate;
    }
    if let Some(w) = wcrt {
        h = Q::max(&h, &(Q::int(3) * w));
    }
    if service.periodic_start().is_positive() || service.period() != &Q::one() {
        h = Q::max(&h, &(Q::int(2) * &(service.periodic_start() + service.period())));
    }
    if !h.is_positive() {
        h = Q::max(&(Q::int(2) * demand.periodic_start()), &Q::int(1000));
    }
    for _ in 0..40 {
        if all.iter().all(|l| pieces(l.curve, &h).is_some_and(|s| s.len() <= MAX_DRAWN)) {
            break;
        }
        h = &h / &Q::int(2);
    }
    h
}

/// The curve's pieces on `[0, h)`, with pieces that continue each other merged (a straight
/// line has period 1 and would otherwise be one piece per time unit).
fn pieces(c: &Curve, h: &Q) -> Option<Vec<Seg>> {
    let mut out: Vec<Seg> = Vec::new();
    for s in c.unroll(h).ok()? {
        if let Some(p) = out.last() {
            let v = p.at(&s.x);
            if s.y == v && s.yr == v && s.s == p.s {
                continue;
            }
        }
        out.push(s);
    }
    Some(out)
}

/// Points of the curve on `[0, h]`: value at each breakpoint, right limit, and the end of
/// each piece, so jumps become vertical lines.
fn points(c: &Curve, h: &Q) -> Vec<(f64, f64)> {
    let segs: Vec<Seg> = pieces(c, h).unwrap_or_default();
    let mut pts = Vec::with_capacity(segs.len() * 3);
    for (i, s) in segs.iter().enumerate() {
        let end = segs.get(i + 1).map(|n| n.x.clone()).unwrap_or_else(|| h.clone());
        pts.push((s.x.to_f64(), s.y.to_f64()));
        pts.push((s.x.to_f64(), s.yr.to_f64()));
        pts.push((end.to_f64(), s.at(&end).to_f64()));
    }
    pts
}

/// About six round tick values covering `[0, max]`.
fn ticks(max: f64) -> Vec<f64> {
    if max.is_nan() || max <= 0.0 || !max.is_finite() {
        return vec![0.0];
    }
    let raw = max / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    (0..).map(|i| i as f64 * step).take_while(|v| *v <= max * 1.000001).collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn render(title: &str, unit: &str, lines: &[Line], h: &Q) -> String {
    let hx = h.to_f64();
    let series: Vec<Vec<(f64, f64)>> = lines.iter().map(|l| points(l.curve, h)).collect();
    // Scale to the demand (the first curves); service far above it is clipped.
    let top = |v: &[Vec<(f64, f64)>]| v.iter().flatten().map(|p| p.1).filter(|y| y.is_finite()).fold(0.0, f64::max);
    let demand_top = top(&series[..series.len().min(2)]);
    let ymax = if demand_top > 0.0 { (demand_top * 1.4).min(top(&series)) } else { top(&series) };
    let ymax = if ymax > 0.0 { ymax * 1.05 } else { 1.0 };
    // Time axis in ms when the horizon is long enough.
    let (tscale, tunit) = if hx >= 2000.0 { (1000.0, "ms") } else { (1.0, "µs") };
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / hx * pw;
    let sy = |y: f64| TOP + ph - y / ymax * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#, W / 2.0, esc(title));
    // Grid, ticks and labels.
    for v in ticks(hx / tscale) {
        let x = sx(v * tscale);
        let _ = writeln!(s, r##"<line x1="{x:.2}" y1="{TOP}" x2="{x:.2}" y2="{:.2}" stroke="#e5e5e5"/>"##, TOP + ph);
        let _ = writeln!(s, r#"<text x="{x:.2}" y="{:.2}" text-anchor="middle">{}</text>"#, TOP + ph + 16.0, trim_float(v, 6));
    }
    let (yscale, yunit) = match unit {
        "µs" if ymax >= 2000.0 => (1000.0, "ms of processing"),
        "µs" => (1.0, "µs of processing"),
        "B" if ymax >= 2000.0 => (1000.0, "kB"),
        u => (1.0, u),
    };
    for v in ticks(ymax / yscale) {
        let y = sy(v * yscale);
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{y:.2}" x2="{:.2}" y2="{y:.2}" stroke="#e5e5e5"/>"##, LEFT + pw);
        let _ = writeln!(s, r#"<text x="{:.2}" y="{:.2}" text-anchor="end">{}</text>"#, LEFT - 6.0, y + 4.0, trim_float(v, 6));
    }
    // Axes.
    let _ = writeln!(s, r#"<line x1="{LEFT}" y1="{:.2}" x2="{:.2}" y2="{:.2}" stroke="black"/>"#, TOP + ph, LEFT + pw, TOP + ph);
    let _ = writeln!(s, r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.2}" stroke="black"/>"#, TOP + ph);
    let _ = writeln!(s, r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">window length Δ ({tunit})</text>"#, LEFT + pw / 2.0, H - 12.0);
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.2}" text-anchor="middle" transform="rotate(-90 18 {:.2})">work ({})</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(yunit)
    );
    // Curves, clipped to the plot area.
    let _ = writeln!(s, r#"<clipPath id="area"><rect x="{LEFT}" y="{TOP}" width="{pw:.2}" height="{ph:.2}"/></clipPath>"#);
    let _ = writeln!(s, r#"<g clip-path="url(#area)">"#);
    for (l, pts) in lines.iter().zip(&series) {
        let mut d = String::new();
        for (i, (x, y)) in pts.iter().enumerate() {
            let _ = write!(d, "{}{:.2},{:.2} ", if i == 0 { "M" } else { "L" }, sx(*x), sy(*y));
        }
        let dash = if l.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(s, r#"<path d="{}" fill="none" stroke="{}" stroke-width="1.8"{dash}/>"#, d.trim_end(), l.color);
    }
    s.push_str("</g>\n");
    // Legend.
    let (lx, ly) = (LEFT + 12.0, TOP + 10.0);
    let _ = writeln!(
        s,
        r##"<rect x="{lx}" y="{ly}" width="230" height="{}" fill="white" fill-opacity="0.85" stroke="#999"/>"##,
        18.0 * lines.len() as f64 + 8.0
    );
    for (i, l) in lines.iter().enumerate() {
        let y = ly + 16.0 + 18.0 * i as f64;
        let dash = if l.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            s,
            r#"<line x1="{:.2}" y1="{:.2}" x2="{:.2}" y2="{:.2}" stroke="{}" stroke-width="1.8"{dash}/>"#,
            lx + 8.0,
            y - 4.0,
            lx + 38.0,
            y - 4.0,
            l.color
        );
        let _ = writeln!(s, r#"<text x="{:.2}" y="{y:.2}">{}</text>"#, lx + 46.0, esc(&l.label));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::models::EventModel;

    #[test]
    fn staircase_points_have_vertical_jumps() {
        let (up, _) = EventModel::Periodic { period: Q::int(10) }.curves().unwrap();
        let pts = points(&up, &Q::int(25));
        // At 0 the value is 0 and jumps to 1 right after; at 10 it jumps to 2; at 20 to 3.
        assert_eq!(pts.first(), Some(&(0.0, 0.0)));
        assert!(pts.windows(2).any(|w| w[0] == (0.0, 0.0) && w[1] == (0.0, 1.0)), "{pts:?}");
        assert!(pts.windows(2).any(|w| w[0] == (10.0, 1.0) && w[1] == (10.0, 2.0)), "{pts:?}");
        assert_eq!(pts.last(), Some(&(25.0, 3.0)));
    }

    #[test]
    fn svg_has_axes_ticks_and_legend() {
        let (up, lo) = EventModel::Periodic { period: Q::int(10_000) }.curves().unwrap();
        let svc = rtc::models::dedicated(&Q::one());
        let lines = [
            Line { label: "demand upper".into(), curve: &up, color: "red", dashed: false },
            Line { label: "demand lower".into(), curve: &lo, color: "red", dashed: true },
            Line { label: "service lower".into(), curve: &svc.1, color: "blue", dashed: false },
        ];
        let h = horizon(&up, &svc.1, Some(&Q::int(2000)), &lines);
        assert_eq!(h, Q::int(50_000), "five periods");
        let svg = render("t <1>", "µs", &lines, &h);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("window length Δ (ms)") && svg.contains("demand lower") && svg.contains("t &lt;1&gt;"));
        assert_eq!(svg.matches("<path").count(), 3);
        assert_eq!(ticks(30.0), vec![0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]);
    }
}
