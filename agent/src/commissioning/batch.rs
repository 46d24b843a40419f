//! Enrolling a whole cabinet from a CSV file.
//!
//! The file is checked completely before anything is enrolled, so a typo on line 40 does not
//! leave 39 devices enrolled and the engineer unsure which; every problem is listed at once,
//! each with its line, so a long file is fixed in one pass. After that, a failed device never
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

use crate::commissioning::credentials::{AuthScheme, EnrollmentToken};
use crate::commissioning::enrollment::{enroll_with_local_key, Device, Enrollment, LabelSession};
use crate::commissioning::trust::CaTrust;
use crate::pem_files::{self, CredentialDir, Overwrite};
use crate::{BatchProblem, Error};

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
/// row. `path` only names the file in errors, which list every problem in line order (only
/// the header's when the header is bad, since rows can't be read without it).
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
    let csv_problem = |e: &csv::Error| {
        let line = e.position().map(line_at).unwrap_or(1);
        let reason = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!("{len} fields where the header row has {expected_len}"),
            // A spreadsheet's "CSV" export often uses the Windows code page for "ü" or "°".
            csv::ErrorKind::Utf8 { .. } => {
                "the line is not UTF-8 text; save the file as \"CSV UTF-8\"".to_owned()
            }
            _ => e.to_string(),
        };
        BatchProblem { line, reason }
    };
    let refuse = |problems: Vec<BatchProblem>| Error::BatchFile {
        path: path.to_owned(),
        problems,
    };
    let header_problem = |reason: String| BatchProblem { line: 1, reason };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_slice());

    // Without a sound header no row can be read, so its problems are all there is to say.
    let headers = reader
        .headers()
        .map_err(|e| refuse(vec![csv_problem(&e)]))?
        .clone();
    if headers.iter().all(str::is_empty) {
        return Err(refuse(vec![header_problem(format!(
            "no header row; the first line must name the columns ({COLUMNS})"
        ))]));
    }
    let mut columns = ColumnIndex::default();
    let mut problems = Vec::new();
    for (i, name) in headers.iter().enumerate() {
        let slot = match name.to_ascii_lowercase().as_str() {
            "subject" => &mut columns.subject,
            "token" => &mut columns.token,
            "label" => &mut columns.label,
            "dns" => &mut columns.dns,
            "ip" => &mut columns.ip,
            _ => {
                problems.push(header_problem(format!(
                    "unknown column {name:?}; the columns are {COLUMNS}"
                )));
                continue;
            }
        };
        if slot.replace(i).is_some() {
            problems.push(header_problem(format!("column {name:?} appears twice")));
        }
    }
    let missing: Vec<&str> = [("subject", columns.subject), ("token", columns.token)]
        .into_iter()
        .filter(|(_, col)| col.is_none())
        .map(|(name, _)| name)
        .collect();
    if !missing.is_empty() {
        problems.push(header_problem(format!(
            "the header row must name at least subject and token; there is no {} column (columns: {COLUMNS})",
            missing.join(" or ")
        )));
    }
    if !problems.is_empty() {
        return Err(refuse(problems));
    }

    // Every row is checked even after a bad one, so one run lists everything to fix.
    let mut rows = Vec::new();
    let mut records = 0_usize;
    let mut seen: HashMap<String, u64> = HashMap::new();
    for record in reader.records() {
        records += 1;
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                problems.push(csv_problem(&e));
                continue;
            }
        };
        let line = record.position().map(line_at).unwrap_or(0);
        match check_row(&record, line, &columns, default_label, &mut seen) {
            Ok(device) => rows.push(BatchRow { line, device }),
            Err(reasons) => problems.extend(
                reasons
                    .into_iter()
                    .map(|reason| BatchProblem { line, reason }),
            ),
        }
    }
    if records == 0 {
        problems.push(header_problem("the file lists no devices".into()));
    }
    if !problems.is_empty() {
        return Err(refuse(problems));
    }
    Ok(rows)
}

/// One row's device, or everything wrong with the row in column order. `columns` has passed
/// the header check, so it names subject and token. `seen` holds the subjects of earlier rows
/// with their first line, so a duplicate names the line to compare.
fn check_row(
    record: &csv::StringRecord,
    line: u64,
    columns: &ColumnIndex,
    default_label: Option<&Label>,
    seen: &mut HashMap<String, u64>,
) -> Result<Device, Vec<String>> {
    let field = |col: Option<usize>| col.and_then(|i| record.get(i)).unwrap_or("");
    let mut reasons = Vec::new();
    let subject = field(columns.subject);
    let subject_ok = if subject.is_empty() {
        reasons.push("the subject is empty".to_owned());
        false
    } else if let Err(reason) = crate::commissioning::enrollment::check_subject(subject) {
        reasons.push(reason);
        false
    } else if let Some(first) = seen.get(subject) {
        reasons.push(format!(
            "subject {subject:?} is also on line {first}; each device needs its own row"
        ));
        false
    } else {
        seen.insert(subject.to_owned(), line);
        true
    };
    let token = EnrollmentToken::new(field(columns.token));
    if token.is_err() {
        reasons.push(if subject_ok {
            format!("the token for {subject:?} is empty")
        } else {
            "the token is empty".to_owned()
        });
    }
    let label = match field(columns.label) {
        "" => Ok(default_label.cloned()),
        text => text.parse::<Label>().map(Some).map_err(|e| e.to_string()),
    };
    if let Err(reason) = &label {
        reasons.push(reason.clone());
    }
    let dns_names: Vec<String> = split_values(field(columns.dns))
        .map(str::to_owned)
        .collect();
    let mut ips = Vec::new();
    for text in split_values(field(columns.ip)) {
        match text.parse() {
            Ok(ip) => ips.push(ip),
            Err(_) => reasons.push(format!("{text:?} in column ip is not an IP address")),
        }
    }
    match (token, label) {
        (Ok(token), Ok(label)) if reasons.is_empty() => {
            Device::new(subject, label, dns_names, ips, token).map_err(|e| vec![e.to_string()])
        }
        _ => Err(reasons),
    }
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

    fn problems_of(err: Error) -> Vec<(u64, String)> {
        match err {
            Error::BatchFile { problems, .. } => {
                problems.into_iter().map(|p| (p.line, p.reason)).collect()
            }
            other => panic!("expected a batch file error, got {other}"),
        }
    }

    /// The line and reason of a file with exactly one problem.
    fn line_of(err: Error) -> (u64, String) {
        let mut problems = problems_of(err);
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.remove(0)
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
            crate::commissioning::csr::DeviceNames::new(
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
        let problems = problems_of(parse("name,token\nplc-1,t\n").expect_err("bad"));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].0, 1);
        assert!(
            problems[0].1.contains("unknown column \"name\""),
            "{problems:?}"
        );
        assert!(problems[1].1.contains("no subject column"), "{problems:?}");
        let (line, reason) = line_of(parse("subject,label\nplc-1,plc\n").expect_err("bad"));
        assert_eq!(line, 1);
        assert!(reason.contains("subject and token"), "{reason}");
        let (line, _) = line_of(parse("subject,token,subject\na,b,c\n").expect_err("bad"));
        assert_eq!(line, 1);
        let (line, _) = line_of(parse("").expect_err("empty"));
        assert_eq!(line, 1);
    }

    #[test]
    fn every_header_problem_is_listed_and_rows_are_not_checked() {
        let problems =
            problems_of(parse("name,token,token,colour\n,\nplc-1,t,t,red\n").expect_err("bad"));
        let lines: Vec<u64> = problems.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 1, 1, 1], "{problems:?}");
        assert!(
            problems[0].1.contains("unknown column \"name\""),
            "{problems:?}"
        );
        assert!(
            problems[1].1.contains("\"token\" appears twice"),
            "{problems:?}"
        );
        assert!(
            problems[2].1.contains("unknown column \"colour\""),
            "{problems:?}"
        );
        assert!(problems[3].1.contains("no subject column"), "{problems:?}");
    }

    #[test]
    fn every_bad_row_is_listed_in_line_order() {
        let err = parse(
            "subject,token,label,ip\n\
             plc-1,t1,,\n\
             ,t2,,\n\
             plc-3,,,\n\
             # a comment line still counts\n\
             plc-1,t4,,\n\
             plc-5,t5,PLC!,\n\
             plc-6,t6,,10.0.0.300;10.0.0.6;fd00::zz\n\
             plc-7,t7\n\
             ../etc,t8,,\n\
             plc-1,,,\n\
             plc-9,t9,,\n",
        )
        .expect_err("bad rows");
        assert!(err.is_usage());
        let problems = problems_of(err);
        let expected: &[(u64, &str)] = &[
            (3, "the subject is empty"),
            (4, "the token for \"plc-3\" is empty"),
            (6, "\"plc-1\" is also on line 2"),
            (7, "label"),
            (8, "\"10.0.0.300\" in column ip"),
            (8, "\"fd00::zz\" in column ip"),
            (9, "2 fields where the header row has 4"),
            (10, "can't be used"),
            (11, "\"plc-1\" is also on line 2"),
            (11, "the token is empty"),
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:?}");
        for ((line, reason), (want_line, want)) in problems.iter().zip(expected) {
            assert_eq!(line, want_line, "{problems:?}");
            assert!(reason.contains(want), "line {line}: {reason}");
        }
    }

    #[test]
    fn long_list_of_problems_is_cut_with_a_count_of_the_rest() {
        let mut text = String::from("subject,token\n");
        for _ in 0..60 {
            text.push_str(",t\n");
        }
        let err = parse(&text).expect_err("bad rows");
        let message = err.to_string();
        assert!(
            message.starts_with(
                "devices.csv: 60 problems, nothing enrolled:\n  line 2: the subject is empty\n"
            ),
            "{message}"
        );
        let listed = message.lines().filter(|l| l.starts_with("  line ")).count();
        assert_eq!(listed, crate::error::BATCH_PROBLEMS_SHOWN, "{message}");
        assert!(message.contains("\n  line 51: "), "{message}");
        assert!(!message.contains("line 52"), "{message}");
        assert!(message.ends_with("\n  … and 10 more"), "{message}");
        assert_eq!(problems_of(err).len(), 60);
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
    fn text_that_is_not_utf8_names_its_line_and_the_rest_is_still_checked() {
        let text: &[u8] = b"subject,token\nplc-1,a\nplc-\xfc,b\n,c\n";
        let err = parse_devices(text, Path::new("devices.csv"), None).expect_err("latin-1");
        let problems = problems_of(err);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].0, 3);
        assert!(problems[0].1.contains("not UTF-8"), "{problems:?}");
        assert_eq!(problems[1], (4, "the subject is empty".to_owned()));
    }

    #[test]
    fn error_message_names_file_count_and_each_line() {
        let err = parse("subject,token\nplc-1,a\nplc-1,b\n").expect_err("dup");
        assert!(err.is_usage());
        assert_eq!(
            err.to_string(),
            "devices.csv: 1 problem, nothing enrolled:\n  line 3: subject \"plc-1\" is also on line 2; each device needs its own row"
        );
        let err = parse("subject,token\n,a\nplc-2,\n").expect_err("two");
        assert_eq!(
            err.to_string(),
            "devices.csv: 2 problems, nothing enrolled:\n  line 2: the subject is empty\n  line 3: the token for \"plc-2\" is empty"
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
