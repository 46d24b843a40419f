//! Inventory output for operators: an aligned table, JSON, or CSV.

use crate::store::CertificateRecord;
use proto::rfc3339_unix;

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

const HEADERS: [&str; 7] = [
    "serial",
    "subject",
    "sans",
    "label",
    "owner",
    "not_after",
    "status",
];

fn columns(r: &CertificateRecord) -> [String; 7] {
    [
        r.serial.clone(),
        r.subject.clone(),
        r.sans.join(" "),
        r.label.clone(),
        r.owner.clone(),
        rfc3339_unix(r.not_after),
        serde_json::to_value(r.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    ]
}

/// Renders rows in `format`.
pub fn render(rows: &[CertificateRecord], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).unwrap_or_default() + "\n",
        Format::Csv => {
            let mut out = HEADERS.join(",") + "\n";
            for row in rows {
                let cells: Vec<String> = columns(row).iter().map(|c| csv_cell(c)).collect();
                out.push_str(&cells.join(","));
                out.push('\n');
            }
            out
        }
        Format::Table => {
            let cells: Vec<[String; 7]> = rows.iter().map(columns).collect();
            let mut widths = HEADERS.map(str::len);
            for row in &cells {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let line = |row: &[String]| {
                row.iter()
                    .zip(widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_owned()
                    + "\n"
            };
            let mut out = line(&HEADERS.map(|h| h.to_uppercase().replace('_', " ")));
            for row in &cells {
                out.push_str(&line(row));
            }
            out
        }
    }
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
    use crate::store::Status;

    fn row(subject: &str) -> CertificateRecord {
        CertificateRecord {
            serial: "0a".into(),
            subject: subject.into(),
            sans: vec!["dns:a".into(), "ip:10.0.0.1".into()],
            label: "plc".into(),
            owner: "token:1234".into(),
            issued_at: 0,
            not_after: 86_400,
            status: Status::Valid,
            renews: None,
            der: String::new(),
        }
    }

    #[test]
    fn csv_quotes_and_defuses_cells() {
        let out = render(&[row("a,b"), row("=cmd")], Format::Csv);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "serial,subject,sans,label,owner,not_after,status");
        assert!(lines[1].contains("\"a,b\""));
        assert!(lines[2].contains(",'=cmd,"));
    }

    #[test]
    fn table_aligns_columns() {
        let out = render(&[row("plc-7"), row("long-subject-name")], Format::Table);
        let starts: Vec<usize> = out
            .lines()
            .map(|l| l.find("dns:a").unwrap_or(usize::MAX))
            .collect();
        assert_eq!(starts[1], starts[2]);
        assert!(out.starts_with("SERIAL"));
    }

    #[test]
    fn json_is_an_array_of_records() {
        let out = render(&[row("plc-7")], Format::Json);
        let parsed: Vec<CertificateRecord> = serde_json::from_str(&out).expect("json");
        assert_eq!(parsed[0].subject, "plc-7");
    }
}
