//! The operator dashboard at `/ui` (DESIGN §6): a chart of upcoming expiries by label and the
//! inventory table with the CLI's filters, soonest expiry first, each row saying how many days
//! it has left and coloured when that is few. Plain server-rendered HTML and SVG, no script
//! and no external assets, so it works on a plant network without internet. Served behind
//! the same operator client-certificate check as the operator API ([`crate::operator_api`]).

mod chart;
mod timeline;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::authority::Authority;
use crate::store::{InventoryQuery, Status};
use timeline::TimelineCache;
use timeline::{AMBER_DAYS, RED_DAYS};

/// Rows shown in the table (the first page); the summary says how many match in all.
const ROWS: usize = 500;
const DAY_SECS: i64 = 86_400;
/// How often the page reloads itself, for an operator who keeps it open.
const REFRESH_SECS: u32 = 300;

/// The filter form's fields, as they arrive in the query string (empty means "any").
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    label: String,
    /// Absent: valid certificates only, what an operator watches. Empty: any status.
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    subject: String,
    /// A duration such as `30d`.
    #[serde(default)]
    expiring_within: String,
}

/// The dashboard's own state: what it reads, and its timeline cache.
#[derive(Debug)]
struct Dashboard {
    authority: Arc<Authority>,
    timeline: TimelineCache,
}

/// `GET /ui`, for any router's state (the dashboard keeps its own).
pub fn router<S: Clone + Send + Sync + 'static>(authority: Arc<Authority>) -> axum::Router<S> {
    axum::Router::new()
        .route("/ui", axum::routing::get(page))
        .with_state(Arc::new(Dashboard {
            authority,
            timeline: TimelineCache::default(),
        }))
}

/// `GET /ui`.
async fn page(State(dashboard): State<Arc<Dashboard>>, Query(filters): Query<Filters>) -> Response {
    match render(&dashboard.authority, &dashboard.timeline, &filters) {
        Ok(html) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            html,
        )
            .into_response(),
        Err((status, message)) => (status, format!("{message}\n")).into_response(),
    }
}

fn render(
    authority: &Authority,
    timeline_cache: &TimelineCache,
    filters: &Filters,
) -> Result<String, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let unavailable = |e: crate::Error| (StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let status_text = filters.status.as_deref().unwrap_or("valid").trim();
    let status = match status_text {
        "" => None,
        text => Some(
            serde_json::from_value::<Status>(serde_json::Value::String(text.to_owned()))
                .map_err(|_| bad(format!("unknown status {text:?}; use valid, expired, revoked, superseded or leave it empty for any")))?,
        ),
    };
    let expiring_within_secs = match filters.expiring_within.trim() {
        "" => None,
        text => Some(
            proto::duration::parse(text)
                .map_err(|e| bad(format!("expiring within {text:?}: {e}")))?
                .as_secs(),
        ),
    };
    let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
    let query = InventoryQuery {
        expiring_within_secs,
        label: non_empty(&filters.label),
        status,
        subject: non_empty(&filters.subject),
        limit: Some(ROWS),
        ..InventoryQuery::default()
    };
    let page = authority.inventory(&query).map_err(unavailable)?;
    let timeline = timeline::cached(authority, timeline_cache).map_err(unavailable)?;
    let now = authority.now().unix_timestamp();
    // Every profile the issuer issues under, the SVID ones too, and any label still in the
    // timeline whose profile has since left the configuration. Not `authority.status()`:
    // that counts the whole inventory, which the page never shows.
    let labels: Vec<String> = authority
        .profiles
        .keys()
        .chain(authority.spiffe_profiles.keys())
        .chain(timeline.counts.keys())
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    let mut html = String::with_capacity(64 * 1024);
    let _ = write!(
        html,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Plant PKI · {domain}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECS}">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2733; }}
h1 {{ font-size: 1.3rem; margin: 0 0 .3rem; }} h2 {{ font-size: 1.05rem; margin: 1.4rem 0 .2rem; }}
.note, .summary {{ color: #4a5868; margin: 0 0 .6rem; }}
.cards {{ display: flex; gap: .8rem; margin: .8rem 0; flex-wrap: wrap; }}
.card {{ display: block; padding: .5rem .9rem; border-radius: 6px; border: 1px solid #e1e6ec; color: inherit; text-decoration: none; min-width: 11rem; }}
.card b {{ display: block; font-size: 1.6rem; line-height: 1.2; }}
.card.red {{ background: #fde8e7; border-color: #f3b8b4; }} .card.red b {{ color: #b3261e; }}
.card.amber {{ background: #fff3dc; border-color: #f2d08f; }} .card.amber b {{ color: #8a5300; }}
.card.calm {{ background: #eef6f0; border-color: #bfdcc7; }} .card.calm b {{ color: #2d6b3f; }}
svg.chart {{ width: 100%; max-width: 1200px; height: auto; display: block; }}
.legend {{ margin: .2rem 0 0 64px; }} .legend span {{ margin-right: 1.2rem; white-space: nowrap; }}
.legend i {{ display: inline-block; width: .8rem; height: .8rem; margin-right: .3rem; vertical-align: -1px; border-radius: 2px; }}
form {{ display: flex; gap: .6rem; flex-wrap: wrap; align-items: end; margin: .5rem 0 .6rem; }}
label {{ display: flex; flex-direction: column; font-size: 12px; color: #4a5868; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #e1e6ec; font-size: 13px; }}
th {{ background: #f3f5f8; position: sticky; top: 0; }} td.serial {{ font-family: monospace; font-size: 12px; }}
.days-left {{ text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }}
tr.expires-red td {{ background: #fde8e7; }} tr.expires-red td.days-left {{ color: #b3261e; font-weight: 700; }}
tr.expires-amber td {{ background: #fff3dc; }} tr.expires-amber td.days-left {{ color: #8a5300; font-weight: 700; }}
tr.revoked td, tr.expired td, tr.superseded td {{ color: #7b8793; }}
tr.revoked td.status, tr.expired td.status, tr.expired td.days-left {{ color: #b3261e; }}
.key {{ display: inline-block; padding: 0 .4rem; border-radius: 3px; }}
.key.red {{ background: #fde8e7; color: #b3261e; }} .key.amber {{ background: #fff3dc; color: #8a5300; }}
</style></head>
<body>
<h1>Plant PKI · {domain}</h1>
<p class="note">Issuing key: {key}. Times are UTC. Counts as of {counted_at}; the page reloads every {minutes} minutes.</p>
<div class="cards">
<a class="card {red_class}" href="/ui?expiring_within={RED_DAYS}d"><b id="within-red">{within_red}</b>valid certificates expire in under {RED_DAYS} days</a>
<a class="card {amber_class}" href="/ui?expiring_within={AMBER_DAYS}d"><b id="within-amber">{within_amber}</b>expire in under {AMBER_DAYS} days</a>
</div>
<h2>Upcoming expiries</h2>
<p class="note">Valid certificates per 30-day window over the next two years, stacked by label; the number above a bar is its total.</p>
<div id="timeline">
"#,
        domain = escape(&authority.trust_domain),
        key = escape(&authority.ca.key_location()),
        counted_at = timeline.counted_at.replace('T', " ").replace('Z', " UTC"),
        minutes = REFRESH_SECS / 60,
        within_red = timeline.within_red,
        within_amber = timeline.within_amber,
        red_class = if timeline.within_red > 0 {
            "red"
        } else {
            "calm"
        },
        amber_class = if timeline.within_amber > 0 {
            "amber"
        } else {
            "calm"
        },
    );
    chart::render(&mut html, &timeline);
    let _ = write!(
        html,
        r#"</div>
<h2>Inventory</h2>
<form method="get" action="/ui">
"#
    );
    select(&mut html, "label", "Label", &labels, &filters.label);
    let statuses: Vec<String> = ["valid", "expired", "revoked", "superseded"]
        .map(str::to_owned)
        .to_vec();
    select(&mut html, "status", "Status", &statuses, status_text);
    let _ = write!(
        html,
        r#"<label>Subject contains<input name="subject" value="{subject}"></label>
<label>Expiring within<input name="expiring_within" placeholder="30d" size="6" value="{within}"></label>
<button type="submit">Filter</button> <a href="/ui">reset</a>
</form>
<p class="summary">{total} {which}certificates match{shown}, soonest expiry first. <span class="key red">under {RED_DAYS} days left</span> <span class="key amber">under {AMBER_DAYS} days left</span></p>
<table id="inventory"><thead><tr><th>Serial</th><th>Subject</th><th>Names</th><th>Label</th><th>Owner</th><th>Not after</th><th class="days-left">Days left</th><th>Status</th></tr></thead>
<tbody>
"#,
        subject = escape(&filters.subject),
        within = escape(&filters.expiring_within),
        total = page.total.unwrap_or(page.certificates.len()),
        which = match status {
            Some(s) => format!("{} ", status_name(s)),
            None => String::new(),
        },
        shown = if page.next.is_some() {
            format!(" (the first {ROWS} are shown)")
        } else {
            String::new()
        },
    );
    for row in &page.certificates {
        let left = TimeLeft::of(row.status, row.not_after, now);
        let _ = writeln!(
            html,
            r#"<tr class="{status}{urgency}" data-label="{label}"><td class="serial">{serial}</td><td>{subject}</td><td>{sans}</td><td>{label}</td><td>{owner}</td><td><time datetime="{rfc3339}">{not_after}</time></td><td class="days-left">{left}</td><td class="status">{status}</td></tr>"#,
            status = status_name(row.status),
            urgency = left.class().map(|c| format!(" {c}")).unwrap_or_default(),
            label = escape(&row.label),
            serial = escape(&row.serial.to_string()),
            subject = escape(&row.subject),
            sans = escape(&row.sans.join(", ")),
            owner = escape(&row.owner),
            rfc3339 = proto::rfc3339_unix(row.not_after),
            not_after = readable_time(row.not_after),
            left = left.text(),
        );
    }
    if page.certificates.is_empty() {
        html.push_str(
            "<tr id=\"no-rows\"><td colspan=\"8\">No certificate matches these filters.</td></tr>\n",
        );
    }
    let data = serde_json::to_string(timeline.as_ref())
        .unwrap_or_else(|_| "{}".into())
        .replace("</", "<\\/");
    let _ = write!(
        html,
        r#"</tbody></table>
<script type="application/json" id="expiries">{data}</script>
</body></html>
"#
    );
    Ok(html)
}

/// What a table row says in its "days left" column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeLeft {
    /// Valid, with this many whole days left.
    Days(i64),
    /// Past notAfter.
    Expired,
    /// Revoked or superseded: its notAfter no longer says when it must be replaced.
    NotApplicable,
}

impl TimeLeft {
    fn of(status: Status, not_after: i64, now: i64) -> Self {
        match status {
            Status::Valid if not_after > now => Self::Days((not_after - now).div_euclid(DAY_SECS)),
            Status::Valid | Status::Expired => Self::Expired,
            Status::Revoked | Status::Superseded => Self::NotApplicable,
        }
    }

    fn text(self) -> String {
        match self {
            Self::Days(0) => "under 1".to_owned(),
            Self::Days(days) => days.to_string(),
            Self::Expired => "expired".to_owned(),
            Self::NotApplicable => "–".to_owned(),
        }
    }

    /// The row's highlight: red under [`RED_DAYS`], amber under [`AMBER_DAYS`].
    fn class(self) -> Option<&'static str> {
        match self {
            Self::Days(days) if days < RED_DAYS => Some("expires-red"),
            Self::Days(days) if days < AMBER_DAYS => Some("expires-amber"),
            _ => None,
        }
    }
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Valid => "valid",
        Status::Expired => "expired",
        Status::Revoked => "revoked",
        Status::Superseded => "superseded",
    }
}

/// `2027-01-05 14:03 UTC`: what an operator scans a column of.
fn readable_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

fn select(html: &mut String, name: &str, caption: &str, options: &[String], chosen: &str) {
    let _ = write!(
        html,
        r#"<label>{caption}<select name="{name}"><option value=""{any}>any</option>"#,
        any = if chosen.is_empty() { " selected" } else { "" },
    );
    for option in options {
        let selected = if option == chosen { " selected" } else { "" };
        let option = escape(option);
        let _ = write!(
            html,
            r#"<option value="{option}"{selected}>{option}</option>"#
        );
    }
    html.push_str("</select></label>\n");
}

/// HTML-escapes text for element content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{escape, Status, TimeLeft};

    #[test]
    fn days_left_count_whole_days_and_colour_the_last_week_red_and_month_amber() {
        let now = 1_000_000_000;
        let day = 86_400;
        for (status, not_after, text, class) in [
            (Status::Valid, now + 3600, "under 1", Some("expires-red")),
            (
                Status::Valid,
                now + 6 * day + 3600,
                "6",
                Some("expires-red"),
            ),
            (Status::Valid, now + 7 * day, "7", Some("expires-amber")),
            (
                Status::Valid,
                now + 29 * day + 3600,
                "29",
                Some("expires-amber"),
            ),
            (Status::Valid, now + 30 * day, "30", None),
            (Status::Valid, now + 400 * day, "400", None),
            (Status::Valid, now, "expired", None),
            (Status::Expired, now - day, "expired", None),
            (Status::Revoked, now + day, "–", None),
            (Status::Superseded, now + day, "–", None),
        ] {
            let left = TimeLeft::of(status, not_after, now);
            assert_eq!(
                (left.text().as_str(), left.class()),
                (text, class),
                "{left:?}"
            );
        }
    }

    #[test]
    fn text_from_certificates_cannot_break_out_of_the_page() {
        assert_eq!(
            escape(r#"<script>"x"&'y'</script>"#),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
    }
}
