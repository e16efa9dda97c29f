//! Event-type patterns of endpoints: an exact type (`order.paid`), a prefix ending in `.*`
//! (`order.*`, which matches `order.paid` and `order.refund.created` but not `order`), or `*`.
//! `*`, and an endpoint without patterns, match every type except the operational `triggers.*`
//! ones; only a pattern naming them (`triggers.*`, `triggers.endpoint.disabled`) does.

use crate::config::TEXT_FIELD_CHARS_MAX;

/// The prefix of the server's own operational event types.
pub const OPERATIONAL_PREFIX: &str = "triggers.";
/// Emitted when an endpoint is disabled (410 Gone, or failing for too long).
pub const ENDPOINT_DISABLED: &str = "triggers.endpoint.disabled";
/// Emitted when a delivery ends failed (its round of attempts used up).
pub const DELIVERY_FAILED: &str = "triggers.delivery.failed";

/// Whether `event_type` is one of the server's operational types.
pub fn is_operational(event_type: &str) -> bool {
    event_type.starts_with(OPERATIONAL_PREFIX)
}

/// Why a pattern is not valid, or `None` when it is.
pub fn pattern_error(pattern: &str) -> Option<String> {
    let chars = pattern.chars().count();
    if chars == 0 || chars > TEXT_FIELD_CHARS_MAX {
        return Some(format!(
            "an event type pattern must be 1 to {TEXT_FIELD_CHARS_MAX} characters"
        ));
    }
    if pattern.contains('\0') {
        return Some("an event type pattern must not contain NUL characters".into());
    }
    let star = pattern.find('*');
    match star {
        None => None,
        Some(_) if pattern == "*" => None,
        Some(i) if i == pattern.len() - 1 && pattern.ends_with(".*") && pattern.len() > 2 => None,
        Some(_) => Some(format!(
            "`{pattern}`: `*` may only stand alone or end a prefix as `.*` (order.*)"
        )),
    }
}

/// Whether `pattern` matches `event_type`.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    if pattern == "*" {
        return !is_operational(event_type);
    }
    match pattern.strip_suffix('*') {
        // `order.*`: the type starts with `order.` and has something after it.
        Some(prefix) => event_type.len() > prefix.len() && event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

/// Whether an endpoint with `patterns` (`None`: all types) takes `event_type`.
pub fn endpoint_takes(patterns: Option<&[String]>, event_type: &str) -> bool {
    match patterns {
        None => !is_operational(event_type),
        Some(ps) => ps.iter().any(|p| pattern_matches(p, event_type)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_exact_prefix_or_star() {
        assert!(pattern_error("order.paid").is_none());
        assert!(pattern_error("order.*").is_none());
        assert!(pattern_error("*").is_none());
        for bad in ["", "order*", "*.paid", "or*der", ".*", "order.**", "a\0b"] {
            assert!(pattern_error(bad).is_some(), "{bad:?}");
        }
        assert!(pattern_error(&"a".repeat(256)).is_some());
    }

    #[test]
    fn matching_and_the_operational_types() {
        assert!(pattern_matches("order.paid", "order.paid"));
        assert!(!pattern_matches("order.paid", "order.paid.twice"));
        assert!(pattern_matches("order.*", "order.paid"));
        assert!(pattern_matches("order.*", "order.refund.created"));
        assert!(!pattern_matches("order.*", "order"));
        assert!(!pattern_matches("order.*", "orders.paid"));
        assert!(pattern_matches("*", "anything"));
        // `*` and no patterns never take the operational types; naming them does.
        assert!(!pattern_matches("*", DELIVERY_FAILED));
        assert!(!endpoint_takes(None, ENDPOINT_DISABLED));
        assert!(endpoint_takes(None, "order.paid"));
        let ops = vec!["triggers.*".to_string()];
        assert!(endpoint_takes(Some(&ops), DELIVERY_FAILED));
        assert!(!endpoint_takes(Some(&ops), "order.paid"));
        let one = vec![ENDPOINT_DISABLED.to_string(), "order.*".to_string()];
        assert!(endpoint_takes(Some(&one), ENDPOINT_DISABLED));
        assert!(!endpoint_takes(Some(&one), DELIVERY_FAILED));
    }
}
