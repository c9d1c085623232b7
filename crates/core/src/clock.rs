//! Wall-clock time as the daemon stores and shows it.
//!
//! Everything durable keeps time as milliseconds since the Unix epoch (`i64`),
//! so due times sort as integers; this module converts to and from the
//! contract's text form (RFC 3339, UTC, milliseconds, `Z`).

use std::time::{SystemTime, UNIX_EPOCH};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// `2026-04-17T16:30:00.000Z` for a millisecond timestamp.
pub fn format_ms(ms: i64) -> String {
    let dt = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

/// Parses any RFC 3339 timestamp (any offset) to UTC milliseconds; sub-millisecond
/// digits are truncated. `None` when the text is not RFC 3339 or is before 1970.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let dt = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let ms = dt.unix_timestamp_nanos() / 1_000_000;
    (ms >= 0).then_some(ms as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_millis_and_z() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_776_443_400_012), "2026-04-17T16:30:00.012Z");
    }

    #[test]
    fn parses_offsets_to_utc() {
        let z = parse_rfc3339_ms("2026-04-17T16:30:00.012Z").unwrap();
        assert_eq!(z, 1_776_443_400_012);
        assert_eq!(parse_rfc3339_ms("2026-04-17T18:30:00.012+02:00"), Some(z));
        assert_eq!(parse_rfc3339_ms("2026-04-17 16:30"), None);
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }
}
