//! The one renderer of the command line's output: aligned tables for a terminal, pretty JSON
//! and RFC 4180 CSV for scripts. Every command prints through it, so one table looks like
//! another and scripts parse one JSON style.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Standard output is gone or failed: nothing more is written to it.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
/// The first write to standard output that failed other than on a closed pipe.
static STDOUT_FAILED: Mutex<Option<String>> = Mutex::new(None);

/// Writes the command's output. A reader that has gone (`| head`) ends the output quietly,
/// as it does for other Unix tools, instead of the panic `println!` gives; any other failure
/// (a full disk behind `> file`) is kept for [`output_failure`], so the command still fails.
pub fn emit(text: std::fmt::Arguments<'_>) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = std::io::stdout().lock().write_fmt(text) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            if let Ok(mut failed) = STDOUT_FAILED.lock() {
                failed.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Why the command's output could not be written, if it could not (not a closed pipe).
pub fn output_failure() -> Option<String> {
    STDOUT_FAILED.lock().ok().and_then(|failed| failed.clone())
}

/// Output formats of `issuer inventory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for a terminal.
    Table,
    /// A JSON array.
    Json,
    /// RFC 4180 CSV with a header row.
    Csv,
}

/// Output formats of the list commands (tokens, entries, agents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    Table,
    Json,
}

/// Rows under headers, as a table or CSV.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Rows {
    /// Rows under these headers.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row of cells, one per header.
    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// Aligned columns for a terminal, two spaces apart, no trailing blanks.
    pub fn table(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
                + "\n"
        };
        let mut out = line(&self.headers);
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }

    /// RFC 4180 CSV with a header row.
    pub fn csv(&self) -> String {
        let line = |cells: &[String]| {
            cells
                .iter()
                .map(|c| csv_cell(c))
                .collect::<Vec<_>>()
                .join(",")
                + "\n"
        };
        let mut out = line(&self.headers);
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// Pretty JSON and a newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

/// Quotes a CSV cell when needed, and defuses spreadsheet formulas (`=`, `+`, `-`, `@`).
fn csv_cell(cell: &str) -> String {
    let cell = if cell.starts_with(['=', '+', '-', '@']) {
        format!("'{cell}")
    } else {
        cell.to_owned()
    };
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(subjects: &[&str]) -> Rows {
        let mut rows = Rows::new(&["serial", "subject", "sans"]);
        for s in subjects {
            rows.push(vec!["0a".into(), (*s).into(), "dns:a".into()]);
        }
        rows
    }

    #[test]
    fn csv_quotes_and_defuses_cells() {
        let out = rows(&["a,b", "=cmd"]).csv();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "serial,subject,sans");
        assert!(lines[1].contains("\"a,b\""));
        assert!(lines[2].contains(",'=cmd,"));
    }

    #[test]
    fn table_aligns_columns() {
        let out = rows(&["plc-7", "long-subject-name"]).table();
        let starts: Vec<usize> = out
            .lines()
            .map(|l| l.find("dns:a").unwrap_or(usize::MAX))
            .collect();
        assert_eq!(starts[1], starts[2]);
        assert!(out.starts_with("serial"));
        assert!(out.lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn json_is_pretty_with_a_newline() {
        assert_eq!(json(&["a"]), "[\n  \"a\"\n]\n");
    }
}
