//! The results: one section per workload, written as markdown (for the
//! book's Benchmarks chapter, docs/src/benchmarks.md) and JSON (for tools).

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

/// Median, min and max of a figure over runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        let median = if values.is_empty() { 0.0 } else { values[values.len() / 2] };
        Spread { median, min: values.first().copied().unwrap_or(0.0), max: values.last().copied().unwrap_or(0.0) }
    }

    /// `median (min–max)` with `decimals` digits.
    pub fn show(&self, decimals: usize) -> String {
        format!("{:.d$} ({:.d$}–{:.d$})", self.median, self.min, self.max, d = decimals)
    }
}

/// Percentile `p` (0–100) of `values` (nearest rank).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// How a figure compares with its target.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

/// One workload's results.
#[derive(Debug, Serialize)]
pub struct Section {
    /// `w1` … `w7`.
    pub id: &'static str,
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Lines under the table: ratios, targets, what limits a figure.
    pub notes: Vec<String>,
    /// The figures, for tools.
    pub data: Value,
    /// More tables under the notes: a title, a header and rows each.
    pub tables: Vec<(String, Vec<String>, Vec<Vec<String>>)>,
}

impl Section {
    pub fn new(id: &'static str, title: &str, header: &[&str]) -> Section {
        Section {
            id,
            title: title.to_string(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
            data: Value::Null,
            tables: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, line: String) {
        self.notes.push(line);
    }

    /// A table under the notes, with its own title and header.
    pub fn table(&mut self, title: String, header: &[&str], rows: Vec<Vec<String>>) {
        self.tables.push((title, header.iter().map(|h| h.to_string()).collect(), rows));
    }

    fn markdown(&self) -> String {
        let mut md = format!("### {} — {}\n\n", self.id.to_uppercase(), self.title);
        table_markdown(&mut md, &self.header, &self.rows);
        if !self.notes.is_empty() {
            md.push('\n');
            for note in &self.notes {
                md.push_str(&format!("- {note}\n"));
            }
        }
        for (title, header, rows) in &self.tables {
            md.push_str(&format!("\n{title}\n\n"));
            table_markdown(&mut md, header, rows);
        }
        md.push('\n');
        md
    }
}

fn table_markdown(md: &mut String, header: &[String], rows: &[Vec<String>]) {
    md.push_str(&format!("| {} |\n", header.join(" | ")));
    let align: Vec<&str> = (0..header.len()).map(|i| if i == 0 { "---" } else { "---:" }).collect();
    md.push_str(&format!("|{}|\n", align.join("|")));
    for row in rows {
        md.push_str(&format!("| {} |\n", row.join(" | ")));
    }
}

/// Everything measured in one run of the suite.
#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: String,
    pub sections: Vec<Section>,
}

impl Report {
    pub fn new(machine: &str) -> Report {
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default();
        Report { date, machine: machine.to_string(), sections: Vec::new() }
    }

    pub fn add(&mut self, section: Section) {
        eprint!("{}", section.markdown());
        self.sections.push(section);
    }

    pub fn markdown(&self) -> String {
        let mut md = format!("Measured {} on {}.\n\n", self.date, self.machine);
        for section in &self.sections {
            md.push_str(&section.markdown());
        }
        md
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("latest.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("latest.md"), self.markdown())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn a_section_renders_as_a_markdown_table_with_notes() {
        let mut section = Section::new("w9", "demo", &["peer", "figure"]);
        section.row(vec!["a".into(), "1".into()]);
        section.note("target met".into());
        section.table("Where it goes:".into(), &["part", "µs"], vec![vec!["b".into(), "2".into()]]);
        let md = section.markdown();
        assert!(md.contains("- target met\n\nWhere it goes:\n\n| part | µs |\n|---|---:|\n| b | 2 |\n"), "{md}");
        assert!(md.starts_with("### W9 — demo\n\n| peer | figure |\n|---|---:|\n| a | 1 |\n"), "{md}");
        assert!(md.contains("- target met"), "{md}");
    }
}
