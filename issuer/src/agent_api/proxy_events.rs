//! Audit records from the agents' PLC proxies (`ReportProxyEvents`, DESIGN §5 "Legacy PLC
//! proxy"). An agent keeps no audit log: what its proxy refuses is appended here, to the
//! issuer's hash-chained log, with the reporting node's SPIFFE ID.

use proto::agent::ProxyEvent;
use proto::SpiffeId;

/// Most events one call may carry.
pub const MAX_EVENTS: usize = 1000;

/// A Modbus request the proxy refused (function code not allowed for the peer).
const REQUEST_REFUSED: &str = "modbus.request_refused";
/// Events the agent could not keep (its queue was full), reported as one count.
const EVENTS_DROPPED: &str = "proxy.events_dropped";

/// The audit kind and detail for `event`, or why it is not a valid event. The caller adds
/// the node.
pub fn audit_record(event: &ProxyEvent) -> Result<(&'static str, serde_json::Value), String> {
    let kind = match event.kind.as_str() {
        REQUEST_REFUSED => "proxy.request_refused",
        EVENTS_DROPPED => "proxy.events_dropped",
        other => {
            return Err(format!(
                "unknown kind {:?}; known: {REQUEST_REFUSED}, {EVENTS_DROPPED}",
                shortened(other)
            ))
        }
    };
    // A drop summary may span devices; every other event names its device.
    if !(kind == "proxy.events_dropped" && event.device.is_empty()) {
        proto::check_device_name(&event.device).map_err(|why| format!("device: {why}"))?;
    }
    if !event.peer_spiffe_id.is_empty() {
        SpiffeId::new(&event.peer_spiffe_id).map_err(|e| {
            format!(
                "peer_spiffe_id {:?} is not a SPIFFE ID: {e}",
                shortened(&event.peer_spiffe_id)
            )
        })?;
    }
    if event.function_code > 0xff || event.unit_id > 0xff || event.transaction_id > 0xffff {
        return Err(format!(
            "function_code {}, unit_id {} (at most 255) or transaction_id {} (at most 65535) out of range",
            event.function_code, event.unit_id, event.transaction_id
        ));
    }
    if event.at < 0 {
        return Err(format!("at {} is before 1970", event.at));
    }
    let mut detail = serde_json::json!({
        "device": event.device,
        "peer": event.peer_spiffe_id,
        "function_code": event.function_code,
        "transaction_id": event.transaction_id,
        "unit_id": event.unit_id,
        "at": event.at,
    });
    if kind == "proxy.events_dropped" {
        detail["count"] = event.count.into();
    }
    Ok((kind, detail))
}

/// At most 80 characters of an agent's text, for an error message.
fn shortened(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> ProxyEvent {
        ProxyEvent {
            device: "press-7".into(),
            peer_spiffe_id: "spiffe://plant.example/historian".into(),
            kind: REQUEST_REFUSED.into(),
            function_code: 6,
            transaction_id: 0x1234,
            unit_id: 1,
            at: 1_700_000_000,
            count: 1,
        }
    }

    #[test]
    fn a_refused_request_keeps_its_modbus_fields() {
        let (kind, detail) = audit_record(&refused()).expect("valid");
        assert_eq!(kind, "proxy.request_refused");
        assert_eq!(detail["device"], "press-7");
        assert_eq!(detail["peer"], "spiffe://plant.example/historian");
        assert_eq!(detail["function_code"], 6);
        assert_eq!(detail["transaction_id"], 0x1234);
        assert_eq!(detail["unit_id"], 1);
        assert_eq!(detail["at"], 1_700_000_000);
    }

    #[test]
    fn a_drop_summary_needs_no_device_and_carries_its_count() {
        let summary = ProxyEvent {
            kind: EVENTS_DROPPED.into(),
            count: 42,
            at: 1_700_000_000,
            ..ProxyEvent::default()
        };
        let (kind, detail) = audit_record(&summary).expect("valid");
        assert_eq!(kind, "proxy.events_dropped");
        assert_eq!(detail["count"], 42);
    }

    /// Spoils a valid event in one way.
    type Spoil = fn(&mut ProxyEvent);

    #[test]
    fn bad_events_are_refused_with_the_reason() {
        let cases: [(Spoil, &str); 6] = [
            (|e| e.kind = "modbus.allowed".into(), "unknown kind"),
            (|e| e.device = "press 7".into(), "device"),
            (|e| e.device.clear(), "device"),
            (|e| e.peer_spiffe_id = "https://x".into(), "not a SPIFFE ID"),
            (|e| e.function_code = 256, "out of range"),
            (|e| e.at = -1, "before 1970"),
        ];
        for (spoil, expected) in cases {
            let mut event = refused();
            spoil(&mut event);
            let why = audit_record(&event).expect_err("refused");
            assert!(why.contains(expected), "{why}");
        }
    }
}
