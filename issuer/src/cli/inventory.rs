//! `issuer inventory`: the certificates this CA issued, filtered, in pages from the admin
//! socket; with `--fail-if-expiring-within`, the monitoring alarm.

use std::time::Duration;

use super::render::{self, Format, Rows};
use super::{parse_duration, ConfigArg};
use crate::operator_api::CertificateRow;
use crate::store::{CertificateRecord, InventoryQuery, Status};
use crate::Error;
use proto::rfc3339_unix as rfc3339;

/// Rows asked of the admin socket at a time.
const PAGE: usize = 1000;

#[derive(Debug, clap::Args)]
pub(super) struct InventoryArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Only certificates expiring within this long (e.g. 30d, 12h).
    #[arg(long, value_parser = parse_duration)]
    expiring_within: Option<Duration>,
    /// Only this label.
    #[arg(long)]
    label: Option<String>,
    /// Only this status (valid, expired, revoked, superseded).
    #[arg(long)]
    status: Option<Status>,
    /// Only this owner, e.g. token:3fa9c2d1.
    #[arg(long)]
    owner: Option<String>,
    /// Only subjects containing this text.
    #[arg(long)]
    subject: Option<String>,
    /// Only certificates whose SPIFFE ID (URI SAN) starts with this prefix.
    #[arg(long)]
    spiffe_prefix: Option<String>,
    /// For cron and monitoring: list the valid certificates that expire within this long
    /// (with the other filters) and exit 1 if any do. Superseded and revoked
    /// certificates never count.
    #[arg(long, value_parser = parse_duration)]
    fail_if_expiring_within: Option<Duration>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Stop after this many rows.
    #[arg(long)]
    limit: Option<usize>,
}

pub(super) async fn run(args: InventoryArgs) -> Result<(), Error> {
    // The alarm is about certificates devices still use: a superseded certificate has a
    // renewed successor and a revoked one is dead, so neither keeps it ringing (the metrics
    // gauges count the same way).
    let status = match (args.fail_if_expiring_within, args.status) {
        (Some(_), None | Some(Status::Valid)) => Some(Status::Valid),
        (Some(_), Some(other)) => {
            return Err(Error::Config(format!(
                "--fail-if-expiring-within counts only valid certificates; drop --status {}, \
                 or list those with --expiring-within instead",
                status_text(other)
            )))
        }
        (None, status) => status,
    };
    let client = args.config.admin().await?;
    let mut query = InventoryQuery {
        expiring_within_secs: args
            .fail_if_expiring_within
            .or(args.expiring_within)
            .map(|d| d.as_secs()),
        label: args.label,
        status,
        owner: args.owner,
        subject: args.subject,
        spiffe_prefix: args.spiffe_prefix,
        after: None,
        limit: Some(PAGE),
        skip_total: false,
    };
    let mut rows = Vec::new();
    let total = loop {
        let page = client.inventory(&query).await?;
        let total = page.total.unwrap_or_default();
        rows.extend(page.certificates);
        if let Some(l) = args.limit.filter(|l| rows.len() >= *l) {
            rows.truncate(l);
            break total;
        }
        match page.next {
            Some(next) => query.after = Some(next),
            None => break total,
        }
    };
    say_raw!("{}", render_rows(&rows, args.format));
    if args.format == Format::Table {
        eprintln!("{} of {total} certificates shown", rows.len());
    }
    match args.fail_if_expiring_within {
        Some(window) if total > 0 => Err(Error::Expiring(format!(
            "{total} certificate(s) expire within {}",
            proto::duration::format(window)
        ))),
        _ => Ok(()),
    }
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

/// Certificates in `format`: the JSON is the records themselves, table and CSV one row each.
fn render_rows(records: &[CertificateRecord], format: Format) -> String {
    if format == Format::Json {
        let rows: Vec<CertificateRow> = records.iter().map(CertificateRow::from).collect();
        return render::json(&rows);
    }
    let headers = match format {
        Format::Table => HEADERS.map(|h| h.to_uppercase().replace('_', " ")),
        _ => HEADERS.map(str::to_owned),
    };
    let mut rows = Rows::new(&headers.each_ref().map(String::as_str));
    for r in records {
        rows.push(vec![
            r.serial.to_string(),
            r.subject.clone(),
            r.sans.join(" "),
            r.label.clone(),
            r.owner.clone(),
            rfc3339(r.not_after),
            status_text(r.status),
        ]);
    }
    match format {
        Format::Table => rows.table(),
        _ => rows.csv(),
    }
}

/// A status as the inventory writes it (`valid`, `superseded`, …).
fn status_text(status: Status) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::Serial;

    fn row(subject: &str) -> CertificateRecord {
        CertificateRecord {
            serial: Serial::parse("0a").expect("serial"),
            subject: subject.into(),
            sans: vec!["dns:a".into(), "ip:10.0.0.1".into()],
            label: "plc".into(),
            owner: "token:1234".into(),
            issued_at: 0,
            not_after: 86_400,
            status: Status::Valid,
            renews: None,
            der: Vec::new(),
        }
    }

    #[test]
    fn csv_has_the_lowercase_header_row() {
        let out = render_rows(&[row("a,b"), row("=cmd")], Format::Csv);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "serial,subject,sans,label,owner,not_after,status");
        assert!(lines[1].contains("\"a,b\""));
        assert!(lines[2].contains(",'=cmd,"));
    }

    #[test]
    fn table_headers_are_upper_case_words() {
        let out = render_rows(&[row("plc-7")], Format::Table);
        assert!(out.starts_with("SERIAL"));
        assert!(out.lines().next().is_some_and(|l| l.contains("NOT AFTER")));
    }

    #[test]
    fn json_is_an_array_of_records() {
        let out = render_rows(&[row("plc-7")], Format::Json);
        let parsed: Vec<CertificateRow> = serde_json::from_str(&out).expect("json");
        assert_eq!(parsed[0].subject, "plc-7");
        // Byte for byte what scripts have parsed since the first release.
        assert_eq!(
            serde_json::to_string(&parsed[0]).expect("json"),
            concat!(
                r#"{"serial":"0000000000000000000000000000000a","subject":"plc-7","#,
                r#""sans":["dns:a","ip:10.0.0.1"],"label":"plc","owner":"token:1234","#,
                r#""issued_at":0,"not_after":86400,"status":"valid"}"#
            )
        );
    }
}
