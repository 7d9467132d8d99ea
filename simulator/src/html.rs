//! The HTML report: one self-contained page (charts drawn with plotters as inline SVG, no
//! network needed to view it).

use plotters::prelude::*;

use crate::report::{NOT_MEASURED, Report};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Throughput over time: devices done per second, from the once-a-second samples.
fn throughput_svg(r: &Report) -> Result<String, String> {
    let mut points: Vec<(f64, f64)> = Vec::new();
    let mut prev = (0.0, 0u64);
    for &(t, done) in &r.throughput {
        if t > prev.0 {
            points.push((t, (done - prev.1.min(done)) as f64 / (t - prev.0)));
        }
        prev = (t, done);
    }
    let max_t = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_y = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Devices completed per second", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_t, 0.0..max_y)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc("devices/s")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(points, &BLUE))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Picks one figure out of a phase's latency summary.
type Percentile = fn(&crate::report::PhaseLatency) -> u64;

/// Latency percentiles per phase (log scale, microseconds).
fn latency_svg(r: &Report) -> Result<String, String> {
    let phases: Vec<(&String, &crate::report::PhaseLatency)> = r.phases.iter().collect();
    let n = phases.len().max(1);
    let max = phases
        .iter()
        .map(|(_, p)| p.max_us)
        .max()
        .unwrap_or(10)
        .max(10) as f64
        * 2.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Latency per phase: p50, p90, p99, max", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), (1.0..max).log_scale())
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = phases.iter().map(|(k, _)| (*k).clone()).collect();
        chart
            .configure_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("microseconds")
            .draw()
            .map_err(|e| e.to_string())?;
        let series: [(&str, RGBColor, Percentile); 4] = [
            ("p50", BLUE, |p| p.p50_us),
            ("p90", GREEN, |p| p.p90_us),
            ("p99", RED, |p| p.p99_us),
            ("max", BLACK, |p| p.max_us),
        ];
        for (label, color, f) in series {
            let pts: Vec<(f64, f64)> = phases
                .iter()
                .enumerate()
                .map(|(i, (_, p))| (i as f64, f(p).max(1) as f64))
                .collect();
            chart
                .draw_series(PointSeries::of_element(
                    pts.clone(),
                    4,
                    color,
                    &|c, s, st| EmptyElement::at(c) + Circle::new((0, 0), s, st.filled()),
                ))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| Circle::new((x, y), 4, color.filled()));
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(1)))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Fonts tried for chart text, in order (plotters draws no text without one).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers the first font found as "sans-serif"; false when there is none.
fn register_font() -> bool {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DONE.get_or_init(|| {
        for path in FONTS {
            if let Ok(bytes) = std::fs::read(path) {
                // Registered once for the life of the process, as plotters requires.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// The whole page.
pub fn render(r: &Report) -> Result<String, String> {
    let font_note = if register_font() {
        ""
    } else {
        "<p>(No TrueType font was found on this machine, so the charts carry no labels; \
         install fonts-dejavu-core. The tables below hold every figure.)</p>"
    };
    let mb = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
    let mut rows = String::new();
    let mut row =
        |k: &str, v: String| rows += &format!("<tr><th>{}</th><td>{}</td></tr>\n", esc(k), esc(&v));
    for (k, v) in &r.config {
        row(k, v.clone());
    }
    row(
        "devices ok / failed",
        format!("{} / {}", r.devices_ok, r.devices_failed),
    );
    row("wall time", format!("{:.1} s", r.wall_seconds));
    row("devices per second", format!("{:.0}", r.devices_per_second));
    row(
        "crypto ceiling (this machine)",
        format!(
            "{:.0} devices/s ({:.0} us per device on one core, {} cores, timed in {}); achieved {:.0}%",
            r.ceiling.devices_per_second,
            r.ceiling.per_device_us,
            r.ceiling.cores,
            r.ceiling.clock.describe(),
            r.fraction_of_ceiling * 100.0
        ),
    );
    let c = &r.ceiling;
    row(
        "crypto cost per device (one core)",
        format!(
            "keygen + CSR {:.0} us, token {:.0} us, CA verify {:.0} us, CA issue + lint {:.0} us, device check {:.0} us, HTTPS handshake {:.0} us, mutual-TLS handshake {:.0} us",
            c.device_keygen_csr_us,
            c.token_sign_us,
            c.ca_verify_us,
            c.ca_issue_us,
            c.device_verify_us,
            c.https_handshake_us,
            c.mtls_handshake_us
        ),
    );
    row(
        "CA peak memory / CPU",
        match &r.ca {
            Some(ca) => format!("{} / {:.1} s", mb(ca.peak_memory_bytes), ca.cpu_seconds),
            None => NOT_MEASURED.to_string(),
        },
    );
    if r.ca_nodes.len() > 1 {
        for n in &r.ca_nodes {
            row(
                &format!("CA node {} peak memory / CPU / restarts", n.node),
                format!(
                    "{} / {:.1} s / {}",
                    mb(n.peak_memory_bytes),
                    n.cpu_seconds,
                    n.restarts
                ),
            );
        }
    }
    row(
        "simulator peak memory / CPU (device phases)",
        format!(
            "{} / {:.1} s",
            mb(r.simulator.peak_memory_bytes),
            r.simulator.cpu_seconds
        ),
    );
    row("verification pass: time, peak memory", r.pass_text());
    row("store on disk", r.store_text());
    row("CA restarts (SIGKILL)", r.ca_restarts.to_string());
    let mut errors = String::new();
    for (k, v) in &r.errors {
        errors += &format!("<tr><td>{}</td><td>{v}</td></tr>", esc(k));
    }
    if errors.is_empty() {
        errors = "<tr><td colspan=2>none</td></tr>".into();
    }
    let mut phases = String::new();
    for (k, p) in &r.phases {
        phases += &format!(
            "<tr><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(k),
            p.count,
            p.mean_us,
            p.p50_us,
            p.p90_us,
            p.p99_us,
            p.p999_us,
            p.max_us
        );
    }
    let v = &r.verification;
    let verdict = esc(&r.verification_word());
    let result = r.verdict.word();
    let reasons: String = r
        .verdict
        .reasons
        .iter()
        .map(|x| format!("<li>{}</li>", esc(x)))
        .collect();
    let verification = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    Ok(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Imprint simulation report</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.ok{{color:#070}}.bad{{color:#a00}}pre{{background:#f6f6f6;padding:1em}}</style></head>
<body><h1>Imprint simulation report</h1>
<h2>Result: <span class="{result_cls}">{result}</span></h2>
<ul>{reasons}</ul>
<h2>Verification: <span class="{cls}">{verdict}</span> <small>({where_})</small></h2>
<table>{rows}</table>
{font_note}<h2>Throughput</h2>{throughput}
<h2>Latency</h2>{latency}
<table><tr><th>phase</th><th>count</th><th>mean us</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>{phases}</table>
<h2>Errors by type</h2><table>{errors}</table>
<h2>Verification pass ({where_})</h2><pre>{verification}</pre>
</body></html>
"#,
        cls = if v.ok() && r.verdict.passed {
            "ok"
        } else {
            "bad"
        },
        result_cls = if r.verdict.passed { "ok" } else { "bad" },
        where_ = esc(v.label()),
        throughput = throughput_svg(r)?,
        latency = latency_svg(r)?,
        verification = esc(&verification),
    ))
}
