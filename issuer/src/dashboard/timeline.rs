//! The dashboard's expiry timeline: valid certificates counted by label into 30-day windows
//! that start at today's UTC midnight, so each window is a whole run of calendar days and
//! can be labelled by its true first and last date ("7 Dec – 5 Jan 2027"), never by a month
//! name it only overlaps.

use std::collections::BTreeMap;
use std::sync::Arc;

use time::{Date, OffsetDateTime};

use crate::authority::Authority;
use crate::store::{InventoryQuery, Status};

/// How long a computed timeline is shown before it is computed again: it pages through every
/// valid certificate of the next two years (most of a large inventory), which a dashboard
/// left open and reloaded must not redo on every load.
const TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// 25 windows of 30 days, so two-year PLC certificates show.
pub(super) const WINDOWS: usize = 25;
const WINDOW_DAYS: i64 = 30;
const DAY_SECS: i64 = 86_400;
/// The table's red and amber thresholds, counted here too so the page's summary agrees.
pub(super) const RED_DAYS: i64 = 7;
pub(super) const AMBER_DAYS: i64 = 30;

/// The last timeline computed, and when.
#[derive(Debug, Default)]
pub struct TimelineCache(std::sync::Mutex<Option<(std::time::Instant, Arc<Timeline>)>>);

/// Counts of valid certificates by label and 30-day window, from today on. Serialized into
/// the page (`#expiries`) for anyone reading it by machine; `buckets` and `counts` keep the
/// shape they had when a script drew the chart.
#[derive(Debug, serde::Serialize)]
pub struct Timeline {
    /// The first day of each window, `YYYY-MM-DD` (UTC).
    pub(super) buckets: Vec<String>,
    /// The last day of each window, `YYYY-MM-DD` (UTC), inclusive.
    pub(super) bucket_ends: Vec<String>,
    /// Per label, one count per window.
    pub(super) counts: BTreeMap<String, Vec<usize>>,
    /// Valid certificates expiring in under 7 days.
    pub(super) within_red: usize,
    /// Valid certificates expiring in under 30 days (the 7-day ones included).
    pub(super) within_amber: usize,
    /// When this was counted (RFC 3339, whole seconds).
    pub(super) counted_at: String,
    /// The windows as dates, for the chart's labels.
    #[serde(skip)]
    pub(super) windows: Vec<Window>,
}

/// One window of the timeline: whole UTC days from `first` to `last`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    pub(super) first: Date,
    pub(super) last: Date,
}

impl Window {
    /// "7 Dec – 5 Jan", with the last day's year when `with_year`.
    pub(super) fn label(&self, with_year: bool) -> String {
        let day = |d: Date| format!("{} {}", d.day(), month_abbreviation(d.month()));
        let year = if with_year {
            format!(" {}", self.last.year())
        } else {
            String::new()
        };
        format!("{} – {}{year}", day(self.first), day(self.last))
    }
}

/// The timeline's windows for `today`: 30 whole days each, back to back.
pub(super) fn windows(today: Date) -> Vec<Window> {
    (0..WINDOWS as i64)
        .map(|i| Window {
            first: today + time::Duration::days(i * WINDOW_DAYS),
            last: today + time::Duration::days((i + 1) * WINDOW_DAYS - 1),
        })
        .collect()
}

/// Which window a certificate expiring at `not_after` falls in, counting from the start of
/// `today` (`None` before it or past the last window).
pub(super) fn window_of(today_start: i64, not_after: i64) -> Option<usize> {
    let index = (not_after - today_start).div_euclid(WINDOW_DAYS * DAY_SECS);
    usize::try_from(index).ok().filter(|i| *i < WINDOWS)
}

/// The labels every year-bearing window shows: the first, and each whose last day falls in
/// a later year than the window before's, so a reader always knows which year a bar is in.
pub(super) fn labels(windows: &[Window]) -> Vec<String> {
    windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let with_year = i == 0 || windows[i - 1].last.year() != w.last.year();
            w.label(with_year)
        })
        .collect()
}

fn month_abbreviation(month: time::Month) -> &'static str {
    use time::Month::*;
    match month {
        January => "Jan",
        February => "Feb",
        March => "Mar",
        April => "Apr",
        May => "May",
        June => "Jun",
        July => "Jul",
        August => "Aug",
        September => "Sep",
        October => "Oct",
        November => "Nov",
        December => "Dec",
    }
}

/// The cached timeline, or a fresh count if the cached one is older than [`TTL`].
pub(super) fn cached(
    authority: &Authority,
    cache: &TimelineCache,
) -> Result<Arc<Timeline>, crate::Error> {
    let cache = &cache.0;
    if let Some((at, timeline)) = cache.lock().ok().and_then(|c| c.clone()) {
        if at.elapsed() < TTL {
            return Ok(timeline);
        }
    }
    let timeline = Arc::new(count(authority)?);
    if let Ok(mut cached) = cache.lock() {
        *cached = Some((std::time::Instant::now(), timeline.clone()));
    }
    Ok(timeline)
}

fn count(authority: &Authority) -> Result<Timeline, crate::Error> {
    let now = authority.now().to_offset(time::UtcOffset::UTC);
    let today = now.date();
    let today_start = OffsetDateTime::new_utc(today, time::Time::MIDNIGHT).unix_timestamp();
    let end = today_start + WINDOWS as i64 * WINDOW_DAYS * DAY_SECS;
    let mut counts: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let (mut within_red, mut within_amber) = (0, 0);
    let mut query = InventoryQuery {
        expiring_within_secs: Some(u64::try_from(end - now.unix_timestamp()).unwrap_or(0)),
        status: Some(Status::Valid),
        limit: Some(10_000),
        skip_total: true,
        ..InventoryQuery::default()
    };
    loop {
        let page = authority.inventory(&query)?;
        for row in &page.certificates {
            let left = row.not_after - now.unix_timestamp();
            within_red += usize::from(left < RED_DAYS * DAY_SECS);
            within_amber += usize::from(left < AMBER_DAYS * DAY_SECS);
            if let Some(window) = window_of(today_start, row.not_after) {
                counts
                    .entry(row.label.clone())
                    .or_insert_with(|| vec![0; WINDOWS])[window] += 1;
            }
        }
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    let windows = windows(today);
    Ok(Timeline {
        buckets: windows.iter().map(|w| w.first.to_string()).collect(),
        bucket_ends: windows.iter().map(|w| w.last.to_string()).collect(),
        counts,
        within_red,
        within_amber,
        counted_at: proto::rfc3339(now),
        windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    #[test]
    fn windows_are_thirty_whole_days_back_to_back_from_today() {
        let w = windows(date!(2026 - 12 - 07));
        assert_eq!(w.len(), WINDOWS);
        assert_eq!(w[0].first, date!(2026 - 12 - 07));
        assert_eq!(w[0].last, date!(2027 - 01 - 05));
        assert_eq!(w[1].first, date!(2027 - 01 - 06));
        for pair in w.windows(2) {
            assert_eq!(pair[0].last + time::Duration::days(1), pair[1].first);
        }
        assert_eq!(w[24].last, date!(2028 - 12 - 25));
    }

    #[test]
    fn window_labels_give_true_day_ranges_and_the_year_where_it_changes() {
        let labels = labels(&windows(date!(2026 - 12 - 07)));
        assert_eq!(labels[0], "7 Dec – 5 Jan 2027");
        assert_eq!(labels[1], "6 Jan – 4 Feb");
        // 2 Dec 2027 – 31 Dec 2027 stays in 2027; the next window ends in 2028.
        assert_eq!(labels[12], "2 Dec – 31 Dec");
        assert_eq!(labels[13], "1 Jan – 30 Jan 2028");
        assert!(
            labels.iter().all(|l| l.contains(" – ")),
            "every label is a range: {labels:?}"
        );
    }

    #[test]
    fn a_certificate_falls_in_the_window_of_its_expiry_day() {
        let today = datetime!(2026-12-07 00:00 UTC).unix_timestamp();
        let at = |t: OffsetDateTime| window_of(today, t.unix_timestamp());
        assert_eq!(at(datetime!(2026-12-07 23:00 UTC)), Some(0));
        assert_eq!(at(datetime!(2027-01-05 23:59:59 UTC)), Some(0));
        assert_eq!(at(datetime!(2027-01-06 00:00 UTC)), Some(1));
        assert_eq!(at(datetime!(2028-12-25 23:59:59 UTC)), Some(24));
        assert_eq!(at(datetime!(2028-12-26 00:00 UTC)), None);
        assert_eq!(at(datetime!(2026-12-06 23:59:59 UTC)), None);
    }
}
