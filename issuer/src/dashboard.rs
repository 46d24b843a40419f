//! The operator dashboard at `/ui` (DESIGN §6): the inventory table with the CLI's filters,
//! and a timeline of upcoming expiries by label. Plain server-rendered HTML; one small inline
//! script draws the timeline as SVG from numbers embedded in the page. No external assets,
//! so it works on a plant network without internet. Served behind the same operator
//! client-certificate check as the operator API ([`crate::operator_api`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::authority::Authority;
use crate::store::{InventoryQuery, Status};

/// How long a computed timeline is shown before it is computed again: it pages through every
/// valid certificate of the next two years (most of a large inventory), which a dashboard
/// left open and reloaded must not redo on every load.
const TIMELINE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The last timeline computed, and when.
#[derive(Debug, Default)]
pub struct TimelineCache(std::sync::Mutex<Option<(std::time::Instant, Arc<Timeline>)>>);

/// Rows shown in the table (the first page); the summary says how many match in all.
const ROWS: usize = 500;
/// The timeline: 25 buckets of 30 days, so two-year PLC certificates show.
const BUCKETS: usize = 25;
const BUCKET_SECS: i64 = 30 * 86_400;

/// The filter form's fields, as they arrive in the query string (empty means "any").
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    label: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    subject: String,
    /// A duration such as `30d`.
    #[serde(default)]
    expiring_within: String,
}

/// `GET /ui`.
pub async fn page(
    State(authority): State<Arc<Authority>>,
    Query(filters): Query<Filters>,
) -> Response {
    match render(&authority, &filters) {
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

fn render(authority: &Authority, filters: &Filters) -> Result<String, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let unavailable = |e: crate::Error| (StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let status = match filters.status.as_str() {
        "" => None,
        text => Some(
            serde_json::from_value::<Status>(serde_json::Value::String(text.to_owned()))
                .map_err(|_| bad(format!("unknown status {text:?}")))?,
        ),
    };
    let expiring_within_secs = match filters.expiring_within.trim() {
        "" => None,
        text => Some(
            crate::duration::parse(text)
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
    let timeline = cached_timeline(authority).map_err(unavailable)?;
    // Not `authority.status()`: that counts the whole inventory, which the page never shows.
    let labels: Vec<String> = authority.profiles.keys().cloned().collect();

    let mut html = String::with_capacity(64 * 1024);
    let _ = write!(
        html,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Plant PKI · {domain}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2733; }}
h1 {{ font-size: 1.3rem; margin: 0 0 .3rem; }} h2 {{ font-size: 1rem; margin: 1.2rem 0 .4rem; }}
.summary {{ color: #4a5868; margin: 0 0 1rem; }}
form {{ display: flex; gap: .6rem; flex-wrap: wrap; align-items: end; margin: .5rem 0 1rem; }}
label {{ display: flex; flex-direction: column; font-size: 12px; color: #4a5868; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #e1e6ec; font-size: 13px; }}
th {{ background: #f3f5f8; }} td.serial {{ font-family: monospace; }}
tr.revoked td, tr.expired td {{ color: #98a2ad; }} tr.revoked td.status {{ color: #b3261e; }}
#timeline svg {{ max-width: 100%; }} .legend span {{ margin-right: 1rem; }}
</style></head>
<body>
<h1>Plant PKI · {domain}</h1>
<p class="summary">Issuing key: {key}. {total} certificates match these filters{shown}.</p>
<h2>Upcoming expiries by label (valid certificates, per 30 days, next two years; recounted every 30 s)</h2>
<div id="timeline" data-rendered="false"></div>
<h2>Inventory</h2>
<form method="get" action="/ui">
"#,
        domain = escape(&authority.trust_domain),
        key = escape(&authority.ca.key_location()),
        total = page.total.unwrap_or(page.certificates.len()),
        shown = if page.next.is_some() {
            format!(" (the first {ROWS} by expiry are shown)")
        } else {
            String::new()
        },
    );
    select(&mut html, "label", "Label", &labels, &filters.label);
    let statuses: Vec<String> = ["valid", "expired", "revoked", "superseded"]
        .map(str::to_owned)
        .to_vec();
    select(&mut html, "status", "Status", &statuses, &filters.status);
    let _ = write!(
        html,
        r#"<label>Subject contains<input name="subject" value="{subject}"></label>
<label>Expiring within<input name="expiring_within" placeholder="30d" size="6" value="{within}"></label>
<button type="submit">Filter</button> <a href="/ui">clear</a>
</form>
<table id="inventory"><thead><tr><th>Serial</th><th>Subject</th><th>Names</th><th>Label</th><th>Owner</th><th>Not after</th><th>Status</th></tr></thead>
<tbody>
"#,
        subject = escape(&filters.subject),
        within = escape(&filters.expiring_within),
    );
    for row in &page.certificates {
        let status = serde_json::to_value(row.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(
            html,
            r#"<tr class="{status}" data-label="{label}"><td class="serial">{serial}</td><td>{subject}</td><td>{sans}</td><td>{label}</td><td>{owner}</td><td>{not_after}</td><td class="status">{status}</td></tr>"#,
            label = escape(&row.label),
            serial = escape(&row.serial),
            subject = escape(&row.subject),
            sans = escape(&row.sans.join(", ")),
            owner = escape(&row.owner),
            not_after = crate::est_backend::rfc3339(row.not_after),
        );
    }
    let data = serde_json::to_string(timeline.as_ref())
        .unwrap_or_else(|_| "{}".into())
        .replace("</", "<\\/");
    let _ = write!(
        html,
        r#"</tbody></table>
<script type="application/json" id="expiries">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"#
    );
    Ok(html)
}

fn cached_timeline(authority: &Authority) -> Result<Arc<Timeline>, crate::Error> {
    let cache = &authority.timeline_cache.0;
    if let Some((at, timeline)) = cache.lock().ok().and_then(|c| c.clone()) {
        if at.elapsed() < TIMELINE_TTL {
            return Ok(timeline);
        }
    }
    let timeline = Arc::new(timeline(authority)?);
    if let Ok(mut cached) = cache.lock() {
        *cached = Some((std::time::Instant::now(), timeline.clone()));
    }
    Ok(timeline)
}

/// Counts of valid certificates by label and 30-day bucket, from now on.
#[derive(Debug, serde::Serialize)]
pub struct Timeline {
    /// The start date of each bucket, `YYYY-MM-DD`.
    buckets: Vec<String>,
    /// Per label, one count per bucket.
    counts: BTreeMap<String, Vec<usize>>,
}

fn timeline(authority: &Authority) -> Result<Timeline, crate::Error> {
    let now = authority.now();
    let mut counts: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut query = InventoryQuery {
        expiring_within_secs: Some((BUCKETS as i64 * BUCKET_SECS) as u64),
        status: Some(Status::Valid),
        limit: Some(10_000),
        skip_total: true,
        ..InventoryQuery::default()
    };
    loop {
        let page = authority.inventory(&query)?;
        for row in &page.certificates {
            let bucket = ((row.not_after - now.unix_timestamp()) / BUCKET_SECS)
                .clamp(0, BUCKETS as i64 - 1) as usize;
            counts
                .entry(row.label.clone())
                .or_insert_with(|| vec![0; BUCKETS])[bucket] += 1;
        }
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    let buckets = (0..BUCKETS)
        .map(|i| {
            let start = now + time::Duration::seconds(i as i64 * BUCKET_SECS);
            format!(
                "{:04}-{:02}-{:02}",
                start.year(),
                u8::from(start.month()),
                start.day()
            )
        })
        .collect();
    Ok(Timeline { buckets, counts })
}

fn select(html: &mut String, name: &str, caption: &str, options: &[String], chosen: &str) {
    let _ = write!(
        html,
        r#"<label>{caption}<select name="{name}"><option value="">any</option>"#
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

/// Draws the timeline: stacked bars per bucket, one colour per label, with a legend.
const SCRIPT: &str = r#"
(function () {
  var data = JSON.parse(document.getElementById('expiries').textContent);
  var box = document.getElementById('timeline');
  var ns = 'http://www.w3.org/2000/svg';
  var labels = Object.keys(data.counts);
  var colours = ['#2f6db5', '#e08a1e', '#3a9a5b', '#9b4dca', '#c23b3b', '#4aa3a3', '#7a7a7a'];
  var totals = data.buckets.map(function (_, i) {
    return labels.reduce(function (sum, l) { return sum + data.counts[l][i]; }, 0);
  });
  var max = Math.max(1, Math.max.apply(null, totals));
  var width = 760, height = 180, pad = 28, bar = (width - pad) / data.buckets.length;
  var svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 ' + (width + 24) + ' ' + (height + 40));
  svg.setAttribute('width', width + 24);
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', 'expiries per 30 days by label');
  data.buckets.forEach(function (start, i) {
    var y = height;
    labels.forEach(function (l, li) {
      var n = data.counts[l][i];
      if (!n) { return; }
      var h = n / max * (height - 10);
      y -= h;
      var r = document.createElementNS(ns, 'rect');
      r.setAttribute('x', pad + i * bar + 2);
      r.setAttribute('y', y);
      r.setAttribute('width', bar - 4);
      r.setAttribute('height', h);
      r.setAttribute('fill', colours[li % colours.length]);
      r.setAttribute('class', 'bar');
      r.setAttribute('data-label', l);
      r.setAttribute('data-count', n);
      var t = document.createElementNS(ns, 'title');
      t.textContent = l + ': ' + n + ' from ' + start;
      r.appendChild(t);
      svg.appendChild(r);
    });
    if (i % 3 === 0) {
      var text = document.createElementNS(ns, 'text');
      text.setAttribute('x', pad + i * bar + bar / 2);
      text.setAttribute('y', height + 16);
      text.setAttribute('text-anchor', 'middle');
      text.setAttribute('font-size', '10');
      text.textContent = start.slice(0, 7);
      svg.appendChild(text);
    }
    if (totals[i]) {
      var sum = document.createElementNS(ns, 'text');
      sum.setAttribute('x', pad + i * bar + bar / 2);
      sum.setAttribute('y', y - 3);
      sum.setAttribute('text-anchor', 'middle');
      sum.setAttribute('font-size', '10');
      sum.textContent = totals[i];
      svg.appendChild(sum);
    }
  });
  box.appendChild(svg);
  var legend = document.createElement('div');
  legend.className = 'legend';
  labels.forEach(function (l, li) {
    var s = document.createElement('span');
    s.style.color = colours[li % colours.length];
    s.textContent = '\u25A0 ' + l;
    legend.appendChild(s);
  });
  if (!labels.length) { legend.textContent = 'No valid certificate expires in the next two years.'; }
  box.appendChild(legend);
  box.setAttribute('data-rendered', 'true');
})();
"#;

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn text_from_certificates_cannot_break_out_of_the_page() {
        assert_eq!(
            escape(r#"<script>"x"&'y'</script>"#),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
    }
}
