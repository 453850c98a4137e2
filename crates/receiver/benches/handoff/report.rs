//! Statistics, the table, results.json and the plot.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub(crate) fn of(mut samples: Vec<f64>) -> Stat {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_by(f64::total_cmp);
        Stat {
            median: samples[samples.len() / 2],
            min: samples[0],
            max: samples[samples.len() - 1],
        }
    }

    fn json(self) -> serde_json::Value {
        serde_json::json!({ "median": self.median, "min": self.min, "max": self.max })
    }
}

/// Where sender and receiver ran.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Regime {
    /// Unpinned: the scheduler puts the two processes on different CPUs.
    TwoCpus,
    /// Both processes pinned to one CPU: no cross-CPU wakeup, so sealpass's
    /// own work is a visible share of the round trip.
    OneCpu,
}

impl Regime {
    fn name(self) -> &'static str {
        match self {
            Regime::TwoCpus => "2 CPUs",
            Regime::OneCpu => "1 CPU",
        }
    }
}

pub(crate) struct Row {
    pub regime: Regime,
    pub method: String,
    pub bytes: Option<usize>,
    pub unit: &'static str,
    pub value: Stat,
    /// Ratio to the raw floor measured pair by pair in the same run.
    pub ratio_to_floor: Option<Stat>,
}

/// What a closing figure should be.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    AtMost(f64),
    AtLeast(f64),
    Below(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Target::AtMost(bound) => value <= bound,
            Target::AtLeast(bound) => value >= bound,
            Target::Below(bound) => value < bound,
        }
    }

    fn describe(self) -> String {
        match self {
            Target::AtMost(bound) => format!("<= {bound}"),
            Target::AtLeast(bound) => format!(">= {bound}"),
            Target::Below(bound) => format!("< {bound}"),
        }
    }
}

/// A closing ratio or figure, with the target it answers if any.
pub(crate) struct Line {
    /// A stable name for the figure, for tools that read results.json.
    pub id: Option<String>,
    pub what: String,
    pub value: f64,
    pub target: Option<Target>,
}

#[derive(Default)]
pub(crate) struct Report {
    pub rows: Vec<Row>,
    pub lines: Vec<Line>,
}

pub(crate) fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 30 => format!("{} GiB", s >> 30),
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s >> 10),
    }
}

impl Report {
    pub(crate) fn row(
        &mut self,
        regime: Regime,
        method: impl Into<String>,
        bytes: Option<usize>,
        unit: &'static str,
        value: Stat,
        ratio_to_floor: Option<Stat>,
    ) {
        self.rows.push(Row {
            regime,
            method: method.into(),
            bytes,
            unit,
            value,
            ratio_to_floor,
        });
    }

    /// A closing figure, and the target it answers if any.
    pub(crate) fn line(&mut self, what: impl Into<String>, value: f64, target: Option<Target>) {
        self.lines.push(Line {
            id: None,
            what: what.into(),
            value,
            target,
        });
    }

    /// [`Report::line`], with a stable `id` in results.json's `summary`.
    pub(crate) fn line_with_id(
        &mut self,
        id: impl Into<String>,
        what: impl Into<String>,
        value: f64,
        target: Option<Target>,
    ) {
        self.lines.push(Line {
            id: Some(id.into()),
            what: what.into(),
            value,
            target,
        });
    }

    /// Writes `name` (JSON) into the benchmark's output directory
    /// (`SEALPASS_BENCH_OUT`, else `target/bench`) and says so.
    pub(crate) fn write_json(&self, name: &str, runs: usize, quick: bool) -> PathBuf {
        let out = PathBuf::from(
            std::env::var_os("SEALPASS_BENCH_OUT").unwrap_or_else(|| "target/bench".into()),
        );
        std::fs::create_dir_all(&out).unwrap();
        let json = out.join(name);
        std::fs::write(
            &json,
            serde_json::to_string_pretty(&self.json(runs, quick)).unwrap(),
        )
        .unwrap();
        println!("wrote {}", json.display());
        out
    }

    pub(crate) fn print(&self) {
        println!(
            "{:<7} {:<62} {:>8} {:>12} {:>24} {:>7} {:>8}",
            "regime", "method", "size", "median", "spread", "unit", "x floor"
        );
        for row in &self.rows {
            println!(
                "{:<7} {:<62} {:>8} {:>12.1} {:>24} {:>7} {:>8}",
                row.regime.name(),
                row.method,
                row.bytes.map_or("-".into(), human),
                row.value.median,
                format!("{:.1}..{:.1}", row.value.min, row.value.max),
                row.unit,
                row.ratio_to_floor
                    .map_or(String::new(), |r| format!("{:.2}", r.median)),
            );
        }
        println!();
        for line in &self.lines {
            match line.target {
                Some(target) => println!(
                    "{}: {:.2}  (target {}: {})",
                    line.what,
                    line.value,
                    target.describe(),
                    if target.met(line.value) {
                        "met"
                    } else {
                        "NOT met"
                    }
                ),
                None => println!("{}: {:.2}", line.what, line.value),
            }
        }
    }

    pub(crate) fn json(&self, runs: usize, quick: bool) -> serde_json::Value {
        let rows: Vec<_> = self
            .rows
            .iter()
            .map(|row| {
                serde_json::json!({
                    "regime": row.regime.name(),
                    "method": row.method,
                    "bytes": row.bytes,
                    "unit": row.unit,
                    "value": row.value.json(),
                    "ratio_to_floor_same_run": row.ratio_to_floor.map(Stat::json),
                })
            })
            .collect();
        let lines: Vec<_> = self
            .lines
            .iter()
            .map(|line| {
                serde_json::json!({
                    "id": line.id,
                    "what": line.what,
                    "value": line.value,
                    "target": line.target.map(Target::describe),
                    "met": line.target.map(|target| target.met(line.value)),
                })
            })
            .collect();
        serde_json::json!({
            "runs": runs,
            "quick": quick,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            "results": rows,
            "summary": lines,
        })
    }

    /// Time against size, both axes logarithmic, one line per method measured at
    /// several sizes in µs.
    pub(crate) fn plot(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for row in &self.rows {
            let (Some(bytes), "µs") = (row.bytes, row.unit) else {
                continue;
            };
            let label = match row.regime {
                Regime::TwoCpus => row.method.clone(),
                Regime::OneCpu => format!("{} [1 CPU]", row.method),
            };
            // x is log2(bytes) on a linear axis, so ticks fall on powers of two.
            let point = ((bytes as f64).log2(), row.value.median);
            match series.iter_mut().find(|(name, _)| *name == label) {
                Some((_, points)) => points.push(point),
                None => series.push((label, vec![point])),
            }
        }
        series.retain(|(_, points)| points.len() > 1);
        let all = series.iter().flat_map(|(_, points)| points.iter());
        let (mut x_low, mut x_high, mut y_low, mut y_high) = (f64::MAX, 0f64, f64::MAX, 0f64);
        for &(x, y) in all {
            x_low = x_low.min(x);
            x_high = x_high.max(x);
            y_low = y_low.min(y);
            y_high = y_high.max(y);
        }
        let root = SVGBackend::new(path, (1100, 700)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "sealpass: time per message against size (both axes logarithmic)",
                ("sans-serif", 24),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(
                x_low.floor() - 0.5..x_high.ceil() + 0.5,
                // Room above the highest line for the legend.
                (y_low / 2.0..y_high * 20.0).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("bytes per message")
            .y_desc("µs per message (median)")
            .x_labels(((x_high - x_low) as usize / 2).max(2) + 1)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-9 && x.round() as i64 % 2 == 0 {
                    human(2f64.powf(x.round()) as usize)
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| {
                if *y < 1.0 {
                    format!("{y:.1}")
                } else {
                    format!("{y:.0}")
                }
            })
            .draw()?;
        for (index, (label, points)) in series.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                });
            chart.draw_series(
                points
                    .iter()
                    .map(|&point| Circle::new(point, 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
