//! Wall-clock time as the daemon stores and shows it.
//!
//! Everything durable keeps time as milliseconds since the Unix epoch (`i64`),
//! so due times sort as integers; this module converts to and from the
//! contract's text form (RFC 3339, UTC, milliseconds, `Z`).

use std::time::{SystemTime, UNIX_EPOCH};
use time::format_description::well_known::Rfc3339;
use time::format_description::StaticFormatDescription;
use time::macros::format_description;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The contract's timestamp form. RFC 3339 itself (`Rfc3339`) prints as
/// many fraction digits as the value needs, and none for a whole second;
/// receivers get exactly three, and `Z` rather than `+00:00`.
const RFC3339_MS: StaticFormatDescription =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// `2026-04-17T16:30:00.000Z` for a millisecond timestamp.
pub fn format_ms(ms: i64) -> String {
    let dt = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    // Only a value lacking a component can fail to format, and an
    // OffsetDateTime has every one this description names.
    dt.format(RFC3339_MS).expect("an OffsetDateTime has every component")
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

    /// What `format_ms` did by hand before the format description: the
    /// oracle for the property below, since receivers compare these bytes.
    fn format_ms_by_hand(ms: i64) -> String {
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

    /// The last millisecond of 9999: `time` holds four-digit years, and the
    /// daemon's times (stored, parsed, or now) are never before 1970.
    const LAST_MS: i64 = 253_402_300_799_999;

    #[test]
    fn formats_the_ends_of_the_range() {
        assert_eq!(format_ms(LAST_MS), "9999-12-31T23:59:59.999Z");
        // Beyond it `time` has no date, and the epoch stands in, as before.
        assert_eq!(format_ms(LAST_MS + 1), "1970-01-01T00:00:00.000Z");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]
        #[test]
        fn format_ms_is_what_it_was_by_hand(ms in 0..=LAST_MS) {
            let new = format_ms(ms);
            proptest::prop_assert_eq!(&new, &format_ms_by_hand(ms));
            proptest::prop_assert_eq!(parse_rfc3339_ms(&new), Some(ms));
        }
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
