//! Enrolling a whole cabinet from a CSV file.
//!
//! The file is checked completely before anything is enrolled, so a typo on line 40 does not
//! leave 39 devices enrolled and the engineer unsure which. After that, a failed device never
//! stops the others: each is reported with its line and the server's words, and the run
//! ends with `DIR/enrollment-report.csv`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use est::Label;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::credentials::{AuthScheme, EnrollmentToken};
use crate::enrollment::{enroll_with_local_key, Device, Enrollment, LabelSession};
use crate::pem_files::{self, CredentialDir, Overwrite};
use crate::trust::CaTrust;
use crate::Error;

/// The report written next to the device directories.
pub const REPORT_FILE: &str = "enrollment-report.csv";

const COLUMNS: &str = "subject, token, label, dns, ip";

/// One `agent enroll --batch`.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// EST server base URL.
    pub server: String,
    /// SHA-256 fingerprint of the root CA, given out of band.
    pub ca_fingerprint: String,
    /// The CSV file.
    pub devices_csv: PathBuf,
    /// Each device goes to `out/<subject>/`.
    pub out: PathBuf,
    /// Label for rows that name none.
    pub default_label: Option<Label>,
    /// How tokens are sent.
    pub auth: AuthScheme,
    /// Whether existing key files may be replaced.
    pub overwrite: Overwrite,
    /// Enrollments in flight at once.
    pub concurrency: usize,
}

/// One device row of the CSV.
#[derive(Debug, Clone)]
pub struct BatchRow {
    /// Line in the file (the header is line 1).
    pub line: u64,
    /// The device.
    pub device: Device,
}

/// Reads and checks the whole CSV file.
pub fn read_devices(path: &Path, default_label: Option<&Label>) -> Result<Vec<BatchRow>, Error> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Usage(format!("can't read the batch file {}: {e}", path.display())))?;
    parse_devices(file, path, default_label)
}

#[derive(Default)]
struct ColumnIndex {
    subject: Option<usize>,
    token: Option<usize>,
    label: Option<usize>,
    dns: Option<usize>,
    ip: Option<usize>,
}

/// Parses and checks CSV text: a header row naming `subject` and `token` (and optionally
/// `label`, `dns`, `ip`, whose several values are separated by `;`), then one device per
/// row. `path` only names the file in errors.
pub fn parse_devices(
    mut csv_text: impl std::io::Read,
    path: &Path,
    default_label: Option<&Label>,
) -> Result<Vec<BatchRow>, Error> {
    let mut text = zeroize::Zeroizing::new(Vec::new());
    csv_text.read_to_end(&mut text).map_err(Error::io(path))?;
    // The csv crate's line count leaves out blank and comment lines, and its byte offset is
    // where it started reading, before skipping them; the line an editor shows comes from
    // skipping them here too and counting newlines.
    let line_at = |position: &csv::Position| {
        let mut at = usize::try_from(position.byte())
            .unwrap_or(usize::MAX)
            .min(text.len());
        while let Some(first) = text.get(at) {
            let skipped_line = *first == b'#' || *first == b'\n' || text[at..].starts_with(b"\r\n");
            if !skipped_line {
                break;
            }
            at += text[at..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(text.len() - at, |i| i + 1);
        }
        1 + text[..at].iter().filter(|b| **b == b'\n').count() as u64
    };
    let bad = |line: u64, reason: String| Error::BatchFile {
        path: path.to_owned(),
        line,
        reason,
    };
    let csv_error = |e: csv::Error| {
        let line = e.position().map(line_at).unwrap_or(1);
        let reason = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!("{len} fields where the header row has {expected_len}"),
            _ => e.to_string(),
        };
        bad(line, reason)
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_slice());

    let headers = reader.headers().map_err(csv_error)?.clone();
    if headers.iter().all(str::is_empty) {
        return Err(bad(
            1,
            format!("no header row; the first line must name the columns ({COLUMNS})"),
        ));
    }
    let mut columns = ColumnIndex::default();
    for (i, name) in headers.iter().enumerate() {
        let slot = match name.to_ascii_lowercase().as_str() {
            "subject" => &mut columns.subject,
            "token" => &mut columns.token,
            "label" => &mut columns.label,
            "dns" => &mut columns.dns,
            "ip" => &mut columns.ip,
            _ => {
                return Err(bad(
                    1,
                    format!("unknown column {name:?}; the columns are {COLUMNS}"),
                ))
            }
        };
        if slot.replace(i).is_some() {
            return Err(bad(1, format!("column {name:?} appears twice")));
        }
    }
    let (Some(subject_col), Some(token_col)) = (columns.subject, columns.token) else {
        return Err(bad(
            1,
            format!("the header row must name at least subject and token (columns: {COLUMNS})"),
        ));
    };

    let mut rows = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map(line_at).unwrap_or(0);
        let field = |col: Option<usize>| col.and_then(|i| record.get(i)).unwrap_or("");
        let subject = field(Some(subject_col));
        if subject.is_empty() {
            return Err(bad(line, "the subject is empty".into()));
        }
        crate::enrollment::check_subject(subject).map_err(|e| bad(line, e))?;
        if let Some(first) = seen.insert(subject.to_owned(), line) {
            return Err(bad(
                line,
                format!(
                    "subject {subject:?} is also on line {first}; each device needs its own row"
                ),
            ));
        }
        let token = EnrollmentToken::new(field(Some(token_col)))
            .map_err(|_| bad(line, format!("the token for {subject:?} is empty")))?;
        let label = match field(columns.label) {
            "" => default_label.cloned(),
            text => Some(
                text.parse::<Label>()
                    .map_err(|e| bad(line, e.to_string()))?,
            ),
        };
        let dns_names: Vec<String> = split_values(field(columns.dns))
            .map(str::to_owned)
            .collect();
        let ips = split_values(field(columns.ip))
            .map(|text| {
                text.parse()
                    .map_err(|_| bad(line, format!("{text:?} in column ip is not an IP address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let device = Device::new(subject, label, dns_names, ips, token)
            .map_err(|e| bad(line, e.to_string()))?;
        rows.push(BatchRow { line, device });
    }
    if rows.is_empty() {
        return Err(bad(1, "the file lists no devices".into()));
    }
    Ok(rows)
}

fn split_values(field: &str) -> impl Iterator<Item = &str> {
    field.split(';').map(str::trim).filter(|v| !v.is_empty())
}

/// How one row ended.
#[derive(Debug, Clone)]
pub struct RowOutcome {
    /// Line in the CSV file.
    pub line: u64,
    /// The device's subject.
    pub subject: String,
    /// The enrollment, or why it failed (the server's words and what to do).
    pub result: Result<Enrollment, String>,
}

/// The whole run, in file order.
#[derive(Debug, Clone)]
pub struct BatchOutcome {
    /// One entry per row.
    pub rows: Vec<RowOutcome>,
    /// Where the report went.
    pub report: PathBuf,
}

impl BatchOutcome {
    /// Devices enrolled.
    pub fn enrolled(&self) -> usize {
        self.rows.iter().filter(|r| r.result.is_ok()).count()
    }

    /// Devices that failed.
    pub fn failed(&self) -> usize {
        self.rows.len() - self.enrolled()
    }

    fn report_csv(&self) -> Result<Vec<u8>, Error> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        let csv = |e: csv::Error| Error::io(&self.report)(std::io::Error::other(e));
        writer
            .write_record(["subject", "status", "serial_or_error"])
            .map_err(csv)?;
        for row in &self.rows {
            let (status, detail) = match &row.result {
                Ok(enrollment) => ("enrolled", enrollment.serial.as_str()),
                Err(message) => ("failed", message.as_str()),
            };
            writer
                .write_record([row.subject.as_str(), status, detail])
                .map_err(csv)?;
        }
        writer
            .into_inner()
            .map_err(|e| Error::io(&self.report)(std::io::Error::other(e.to_string())))
    }
}

impl fmt::Display for BatchOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} enrolled, {} failed", self.enrolled(), self.failed())?;
        for row in &self.rows {
            if let Err(message) = &row.result {
                write!(f, "\n  line {} ({}): {message}", row.line, row.subject)?;
            }
        }
        write!(f, "\nreport: {}", self.report.display())
    }
}

/// Enrolls every device in the CSV, a few at a time, and writes the report.
pub async fn enroll_batch(options: BatchOptions) -> Result<BatchOutcome, Error> {
    let rows = read_devices(&options.devices_csv, options.default_label.as_ref())?;
    std::fs::create_dir_all(&options.out).map_err(Error::io(&options.out))?;

    // One bootstrap for the whole cabinet: the root is the same under every label.
    let first_label = rows.first().and_then(|r| r.device.label());
    let trust =
        Arc::new(CaTrust::bootstrap(&options.server, &options.ca_fingerprint, first_label).await?);
    // A label the CA does not serve fails its rows, not the whole run.
    let labels: HashSet<Option<Label>> = rows.iter().map(|r| r.device.label().cloned()).collect();
    let mut sessions = HashMap::new();
    for label in labels {
        let session = LabelSession::open(&trust, label.as_ref())
            .await
            .map(Arc::new)
            .map_err(|e| row_message(&e));
        sessions.insert(label, session);
    }

    let progress = progress_bar(rows.len() as u64);
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let total = rows.len();
    for (index, row) in rows.into_iter().enumerate() {
        let session = sessions
            .get(&row.device.label().cloned())
            .cloned()
            .unwrap_or_else(|| Err("no session for this label".into()));
        let trust = Arc::clone(&trust);
        let permits = Arc::clone(&permits);
        let dir = CredentialDir::new(options.out.join(row.device.subject()));
        let (auth, overwrite) = (options.auth, options.overwrite);
        tasks.spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await;
            let result = match session {
                Ok(session) => enroll_row(&trust, &session, &row.device, auth, &dir, overwrite)
                    .await
                    .map_err(|e| row_message(&e)),
                Err(message) => Err(message),
            };
            (
                index,
                RowOutcome {
                    line: row.line,
                    subject: row.device.subject().to_owned(),
                    result,
                },
            )
        });
    }
    let mut outcomes: Vec<Option<RowOutcome>> = vec![None; total];
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((index, outcome)) => {
                progress.set_message(outcome.subject.clone());
                progress.inc(1);
                if let Some(slot) = outcomes.get_mut(index) {
                    *slot = Some(outcome);
                }
            }
            // A panicking row is a bug; the row stays unaccounted and is reported below.
            Err(e) => tracing::error!(error = %e, "an enrollment task failed"),
        }
    }
    progress.finish_and_clear();

    let outcome = BatchOutcome {
        rows: outcomes.into_iter().flatten().collect(),
        report: options.out.join(REPORT_FILE),
    };
    if outcome.rows.len() != total {
        tracing::error!(
            expected = total,
            got = outcome.rows.len(),
            "some rows have no result"
        );
    }
    pem_files::write_atomically(
        &outcome.report,
        &outcome.report_csv()?,
        0o644,
        Overwrite::Allow,
    )?;
    Ok(outcome)
}

async fn enroll_row(
    trust: &CaTrust,
    session: &LabelSession,
    device: &Device,
    auth: AuthScheme,
    dir: &CredentialDir,
    overwrite: Overwrite,
) -> Result<Enrollment, Error> {
    dir.prepare(overwrite)?;
    enroll_with_local_key(
        trust,
        session,
        device,
        &device.names()?,
        auth,
        dir,
        overwrite,
    )
    .await
}

/// A row's error without the step prefix: the row's line and subject already say which
/// device it was.
fn row_message(error: &Error) -> String {
    match error {
        Error::Est {
            source, command, ..
        } => crate::error::explain(source, *command),
        other => other.to_string(),
    }
}

/// Progress on the terminal only: a progress bar in a CI log or a piped output is noise.
fn progress_bar(len: u64) -> ProgressBar {
    if !(std::io::stderr().is_terminal() && std::io::stdout().is_terminal()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<BatchRow>, Error> {
        let label: Label = "plc".parse().expect("label");
        parse_devices(text.as_bytes(), Path::new("devices.csv"), Some(&label))
    }

    fn line_of(err: Error) -> (u64, String) {
        match err {
            Error::BatchFile { line, reason, .. } => (line, reason),
            other => panic!("expected a batch file error, got {other}"),
        }
    }

    #[test]
    fn good_file_parses_with_optional_columns_and_defaults() {
        let rows = parse(
            "\u{feff}subject,token,label,dns,ip\n\
             plc-1,tok1,,plc-1.plant;plc-1.cell2,10.0.0.1\n\
             # spare slot, not commissioned yet\n\
             \n\
             hmi-2 , tok2 ,hmi,,10.0.0.2; fd00::2\n",
        )
        .expect("parses");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[0].device.subject(), "plc-1");
        assert_eq!(rows[0].device.label().map(Label::as_str), Some("plc"));
        assert_eq!(rows[1].line, 5);
        assert_eq!(rows[1].device.subject(), "hmi-2");
        assert_eq!(rows[1].device.label().map(Label::as_str), Some("hmi"));
        let names = rows[0].device.names().expect("names");
        assert_eq!(
            names,
            crate::csr::DeviceNames::new(
                "plc-1",
                &["plc-1.plant".into(), "plc-1.cell2".into()],
                &["10.0.0.1".parse().expect("ip")]
            )
            .expect("names")
        );
        // Tokens never show in Debug, even for a whole batch.
        assert!(!format!("{rows:?}").contains("tok1"));
    }

    #[test]
    fn columns_may_come_in_any_order() {
        let rows = parse("token,subject\ntok,plc-1\n").expect("parses");
        assert_eq!(rows[0].device.subject(), "plc-1");
    }

    #[test]
    fn bad_header_is_refused_on_line_1() {
        let (line, reason) = line_of(parse("name,token\nplc-1,t\n").expect_err("bad"));
        assert_eq!(line, 1);
        assert!(reason.contains("unknown column \"name\""), "{reason}");
        let (line, reason) = line_of(parse("subject,label\nplc-1,plc\n").expect_err("bad"));
        assert_eq!(line, 1);
        assert!(reason.contains("subject and token"), "{reason}");
        let (line, _) = line_of(parse("subject,token,subject\na,b,c\n").expect_err("bad"));
        assert_eq!(line, 1);
        let (line, _) = line_of(parse("").expect_err("empty"));
        assert_eq!(line, 1);
    }

    #[test]
    fn duplicate_subject_names_both_lines() {
        let err = parse("subject,token\nplc-1,a\nplc-2,b\nplc-1,c\n").expect_err("dup");
        let (line, reason) = line_of(err);
        assert_eq!(line, 4);
        assert!(reason.contains("also on line 2"), "{reason}");
    }

    #[test]
    fn empty_subject_names_its_line() {
        let (line, reason) = line_of(parse("subject,token\nplc-1,a\n ,b\n").expect_err("empty"));
        assert_eq!(line, 3);
        assert!(reason.contains("subject is empty"), "{reason}");
    }

    #[test]
    fn other_bad_rows_name_their_line() {
        let cases = [
            ("subject,token\nplc-1,\n", 2, "token"),
            (
                "subject,token,ip\nplc-1,t,10.0.0.300\n",
                2,
                "not an IP address",
            ),
            ("subject,token,label\nplc-1,t,PLC!\n", 2, "label"),
            ("subject,token\nplc-1,t\n../etc,t\n", 3, "can't be used"),
            ("subject,token\nplc-1,t,extra\n", 2, "3 fields"),
            ("subject,token\n", 1, "no devices"),
            (
                "subject,token\nplc-1,a\n\n# moved\r\nplc-1,b\n",
                5,
                "also on line 2",
            ),
            ("subject,token\r\n\r\nplc-1,t,x\r\n", 3, "3 fields"),
        ];
        for (text, want_line, want) in cases {
            let (line, reason) = line_of(parse(text).expect_err(text));
            assert_eq!(line, want_line, "{text}: {reason}");
            assert!(reason.contains(want), "{text}: {reason}");
        }
    }

    #[test]
    fn error_message_names_file_and_line() {
        let err = parse("subject,token\nplc-1,a\nplc-1,b\n").expect_err("dup");
        assert!(err.is_usage());
        assert!(
            err.to_string().starts_with("devices.csv, line 3: "),
            "{err}"
        );
    }

    #[test]
    fn summary_counts_and_lists_failures_and_report_has_one_row_per_device() {
        let outcome = BatchOutcome {
            rows: vec![
                RowOutcome {
                    line: 2,
                    subject: "plc-1".into(),
                    result: Ok(Enrollment {
                        subject: "CN=plc-1".into(),
                        serial: "0a0b".into(),
                        not_after: "2027-01-01T00:00:00Z".into(),
                        files: vec![],
                    }),
                },
                RowOutcome {
                    line: 3,
                    subject: "plc-2".into(),
                    result: Err("EST server answered 401: token already used, sorry".into()),
                },
            ],
            report: PathBuf::from("out/enrollment-report.csv"),
        };
        let text = outcome.to_string();
        assert!(text.starts_with("1 enrolled, 1 failed\n"), "{text}");
        assert!(
            text.contains("line 3 (plc-2): EST server answered 401: token already used"),
            "{text}"
        );
        let report = String::from_utf8(outcome.report_csv().expect("csv")).expect("utf8");
        assert_eq!(
            report,
            "subject,status,serial_or_error\nplc-1,enrolled,0a0b\nplc-2,failed,\"EST server answered 401: token already used, sorry\"\n"
        );
    }
}
