//! The event vocabulary and the two wire forms of an event: what the
//! application posts to `POST /v1/events`, and the envelope a receiver gets.
//!
//! Pure parsing and formatting, no I/O: the API calls [`parse_ingest`] and the
//! delivery workers call [`envelope`].

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::clock;

/// The six event types of the contract, and only these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    WorkflowRunStatusChanged,
    MeetingScheduled,
    MeetingConfirmed,
    MeetingCancelled,
    MeetingCompleted,
    MeetingNoShow,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::WorkflowRunStatusChanged,
        EventType::MeetingScheduled,
        EventType::MeetingConfirmed,
        EventType::MeetingCancelled,
        EventType::MeetingCompleted,
        EventType::MeetingNoShow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::WorkflowRunStatusChanged => "workflow_run.status_changed",
            EventType::MeetingScheduled => "meeting.scheduled",
            EventType::MeetingConfirmed => "meeting.confirmed",
            EventType::MeetingCancelled => "meeting.cancelled",
            EventType::MeetingCompleted => "meeting.completed",
            EventType::MeetingNoShow => "meeting.no_show",
        }
    }

    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// A validated ingest request. `data` is the caller's JSON object, byte for
/// byte, so receivers get it untouched.
#[derive(Debug)]
pub struct Ingest {
    pub event_type: EventType,
    pub client_id: Uuid,
    pub data: String,
    pub event_id: Option<Uuid>,
    pub timestamp_ms: Option<i64>,
}

/// Why an ingest body was refused; the API maps these to 400 and 422.
#[derive(Debug, PartialEq, Eq)]
pub enum IngestError {
    /// Not JSON at all (400).
    Unparseable(String),
    /// JSON, but a field is wrong (422, `invalid_field`).
    Invalid { field: &'static str, message: String },
    /// JSON, but a required field is not there (422, `missing_field`).
    Missing { field: &'static str },
}

impl IngestError {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        IngestError::Invalid { field, message: message.into() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest<'a> {
    #[serde(borrow)]
    event_type: Option<&'a RawValue>,
    #[serde(borrow)]
    client_id: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
}

/// Validates a `POST /v1/events` body.
pub fn parse_ingest(body: &[u8]) -> Result<Ingest, IngestError> {
    let raw: RawIngest = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => IngestError::invalid("body", e.to_string()),
        _ => IngestError::Unparseable(e.to_string()),
    })?;

    let event_type = required_str(raw.event_type, "event_type")?;
    let event_type = EventType::parse(&event_type).ok_or_else(|| {
        IngestError::invalid(
            "event_type",
            format!("unknown event type {event_type:?}; expected one of {}", type_list()),
        )
    })?;
    let client_id = parse_uuid(&required_str(raw.client_id, "client_id")?, "client_id")?;
    let data = data_object(raw.data.ok_or(IngestError::Missing { field: "data" })?)?;
    let event_id = optional_str(raw.event_id, "event_id")?.map(|s| parse_uuid(&s, "event_id")).transpose()?;
    let timestamp_ms = optional_str(raw.timestamp, "timestamp")?
        .map(|s| {
            clock::parse_rfc3339_ms(&s).ok_or_else(|| {
                IngestError::invalid("timestamp", format!("{s:?} is not an RFC 3339 timestamp"))
            })
        })
        .transpose()?;
    Ok(Ingest { event_type, client_id, data, event_id, timestamp_ms })
}

/// Checks an event's `data`: a JSON object, nested no deeper than
/// [`MAX_DEPTH`] (receivers, and our own comparisons, parse it).
pub fn data_object(d: &RawValue) -> Result<String, IngestError> {
    if !d.get().starts_with('{') {
        return Err(IngestError::invalid("data", "`data` must be a JSON object"));
    }
    if nesting_depth(d.get()) > MAX_DEPTH {
        return Err(IngestError::invalid("data", format!("`data` is nested deeper than {MAX_DEPTH} levels")));
    }
    Ok(d.get().to_owned())
}

/// Deepest nesting of objects and arrays accepted in `data`.
pub const MAX_DEPTH: usize = 64;

/// How deeply objects and arrays nest in a valid JSON text.
fn nesting_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
    for b in json.bytes() {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'{' | b'[') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b'}' | b']') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn type_list() -> String {
    EventType::ALL.map(EventType::as_str).join(", ")
}

fn required_str(v: Option<&RawValue>, field: &'static str) -> Result<String, IngestError> {
    optional_str(v, field)?.ok_or(IngestError::Missing { field })
}

/// A string field, where `null` counts as absent.
fn optional_str(v: Option<&RawValue>, field: &'static str) -> Result<Option<String>, IngestError> {
    match v {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map(Some)
            .map_err(|_| IngestError::invalid(field, format!("`{field}` must be a string"))),
    }
}

fn parse_uuid(s: &str, field: &'static str) -> Result<Uuid, IngestError> {
    // Only the canonical hyphenated form: ids are compared as text by receivers.
    if s.len() != 36 {
        return Err(IngestError::invalid(field, format!("{s:?} is not a uuid")));
    }
    Uuid::parse_str(s).map_err(|_| IngestError::invalid(field, format!("{s:?} is not a uuid")))
}

/// The parts of one attempt's envelope.
pub struct Envelope<'a> {
    pub event_type: EventType,
    pub event_id: Uuid,
    pub webhook_id: Uuid,
    pub delivery_id: Uuid,
    pub timestamp_ms: i64,
    pub client_id: Uuid,
    pub test: bool,
    pub data: &'a str,
}

/// The envelope as serde writes it: the contract's eight keys, in this
/// order (a derived `Serialize` writes fields in declaration order). The
/// signature covers these bytes, so field order and names are the contract.
#[derive(Serialize)]
struct Wire<'a> {
    event_type: &'a str,
    event_id: Uuid,
    webhook_id: Uuid,
    delivery_id: Uuid,
    timestamp: &'a str,
    client_id: Uuid,
    test: bool,
    /// `None` (written `null`) only for stored data that is not JSON, which
    /// ingest never lets in ([`data_object`]): a record damaged past its
    /// codec still gives a receiver a JSON body, not a panic.
    data: Option<&'a RawValue>,
}

/// Room for everything but `data`, so the body is written into one
/// allocation: the keys and punctuation (110 bytes), four uuids (144), the
/// timestamp (24), `false` and the longest type name (27) make 310.
const ENVELOPE_HEAD: usize = 320;

/// The JSON body of one attempt: exactly the contract's eight keys, in its
/// order, with `data` spliced in as the bytes the application sent.
pub fn envelope(e: &Envelope) -> Vec<u8> {
    let timestamp = clock::format_ms(e.timestamp_ms);
    let wire = Wire {
        event_type: e.event_type.as_str(),
        event_id: e.event_id,
        webhook_id: e.webhook_id,
        delivery_id: e.delivery_id,
        timestamp: &timestamp,
        client_id: e.client_id,
        test: e.test,
        data: serde_json::from_str(e.data).ok(),
    };
    let mut body = Vec::with_capacity(ENVELOPE_HEAD + e.data.len());
    // Writing to a Vec cannot fail, and strings, uuids, a bool and raw JSON
    // always serialise.
    serde_json::to_writer(&mut body, &wire).expect("an envelope always serialises into a Vec");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "6f1c1a3e-2b6e-4c1e-9d55-0c8a3f7e9b10";

    fn field_of(r: Result<Ingest, IngestError>) -> &'static str {
        match r {
            Err(IngestError::Invalid { field, .. } | IngestError::Missing { field }) => field,
            other => panic!("expected a 422, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_full_event_and_keeps_data_bytes() {
        let body = format!(
            r#"{{"event_type":"meeting.scheduled","client_id":"{CLIENT}","data":{{"b":1, "a":[true]}},"event_id":"550e8400-e29b-41d4-a716-446655440000","timestamp":"2026-04-17T16:30:00Z"}}"#
        );
        let i = parse_ingest(body.as_bytes()).unwrap();
        assert_eq!(i.event_type, EventType::MeetingScheduled);
        assert_eq!(i.data, r#"{"b":1, "a":[true]}"#);
        assert_eq!(i.timestamp_ms, Some(1_776_443_400_000));
    }

    #[test]
    fn classifies_bad_input() {
        assert!(matches!(parse_ingest(b"{nope"), Err(IngestError::Unparseable(_))));
        assert!(matches!(parse_ingest(b""), Err(IngestError::Unparseable(_))));
        let t = |s: &str| parse_ingest(s.replace("CLIENT", CLIENT).as_bytes());
        assert_eq!(field_of(t(r#"{"client_id":"CLIENT","data":{}}"#)), "event_type");
        assert_eq!(
            field_of(t(r#"{"event_type":"meeting.eaten","client_id":"CLIENT","data":{}}"#)),
            "event_type"
        );
        assert_eq!(
            field_of(t(r#"{"event_type":"meeting.scheduled","client_id":"nope","data":{}}"#)),
            "client_id"
        );
        assert_eq!(
            field_of(t(r#"{"event_type":"meeting.scheduled","client_id":"CLIENT","data":[1]}"#)),
            "data"
        );
        assert_eq!(field_of(t(r#"{"event_type":"meeting.scheduled","client_id":"CLIENT"}"#)), "data");
        assert_eq!(
            field_of(t(
                r#"{"event_type":"meeting.scheduled","client_id":"CLIENT","data":{},"event_id":"x"}"#
            )),
            "event_id"
        );
        assert_eq!(
            field_of(t(
                r#"{"event_type":"meeting.scheduled","client_id":"CLIENT","data":{},"timestamp":"soon"}"#
            )),
            "timestamp"
        );
        assert_eq!(field_of(t(r#"{"event_type":7,"client_id":"CLIENT","data":{}}"#)), "event_type");
        assert_eq!(field_of(t(r#"[1,2]"#)), "body");
        assert_eq!(
            field_of(t(r#"{"event_type":"meeting.scheduled","client_id":"CLIENT","data":{},"extra":1}"#)),
            "body"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5000))]
        /// Any bytes: a verdict, never a panic; and whatever is accepted has a
        /// known type and an object for data.
        #[test]
        fn ingest_parser_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(i) = parse_ingest(&body) {
                proptest::prop_assert!(i.data.starts_with('{'), "data {} is not an object", i.data);
            }
        }

        /// JSON-shaped input with the right keys and arbitrary values.
        #[test]
        fn ingest_fields_are_validated(
            t in "[a-z_.]{0,30}", client in "[0-9a-f-]{0,40}", data in "\\{\\}|\\[\\]|1|\"x\"|null|\\{\"a\":\\[1,\\{\\}\\]\\}",
            id in "[0-9a-f-]{0,40}", ts in "[0-9TZ:.+-]{0,30}",
        ) {
            let body = format!(r#"{{"event_type":"{t}","client_id":"{client}","data":{data},"event_id":"{id}","timestamp":"{ts}"}}"#);
            match parse_ingest(body.as_bytes()) {
                Ok(i) => {
                    proptest::prop_assert_eq!(i.event_type.as_str(), t.as_str());
                    proptest::prop_assert!(i.data.starts_with('{'), "data {} is not an object", i.data);
                }
                Err(IngestError::Invalid { .. } | IngestError::Missing { .. }) => {}
                Err(IngestError::Unparseable(m)) => proptest::prop_assert!(false, "valid JSON called unparseable: {}", m),
            }
        }
    }

    #[test]
    fn nesting_depth_ignores_brackets_in_strings() {
        assert_eq!(nesting_depth(r#"{"a":[1,{"b":"[[[{{"}]}"#), 3);
        assert_eq!(nesting_depth(r#"{"a":"\\\"[[["}"#), 1);
        assert_eq!(nesting_depth("{}"), 1);
    }

    #[test]
    fn deeply_nested_data_is_refused_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let body =
            format!(r#"{{"event_type":"meeting.scheduled","client_id":"{CLIENT}","data":{{"x":{deep}}}}}"#);
        assert!(parse_ingest(body.as_bytes()).is_err());
    }

    #[test]
    fn envelope_has_the_eight_keys_in_order() {
        let id = Uuid::nil();
        let body = envelope(&Envelope {
            event_type: EventType::MeetingNoShow,
            event_id: id,
            webhook_id: id,
            delivery_id: id,
            timestamp_ms: 0,
            client_id: id,
            test: true,
            data: r#"{"x":"y"}"#,
        });
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        let mut expected = vec![
            "client_id",
            "data",
            "delivery_id",
            "event_id",
            "event_type",
            "test",
            "timestamp",
            "webhook_id",
        ];
        expected.sort();
        assert_eq!(keys, expected);
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["event_type"], "meeting.no_show");
        assert_eq!(v["test"], true);
        assert_eq!(v["data"]["x"], "y");
    }

    /// What `envelope` wrote with `format!` before it used serde: the oracle
    /// for the properties below, since the signature covers these bytes.
    fn envelope_by_format(e: &Envelope) -> Vec<u8> {
        format!(
            r#"{{"event_type":"{}","event_id":"{}","webhook_id":"{}","delivery_id":"{}","timestamp":"{}","client_id":"{}","test":{},"data":{}}}"#,
            e.event_type.as_str(),
            e.event_id,
            e.webhook_id,
            e.delivery_id,
            clock::format_ms(e.timestamp_ms),
            e.client_id,
            e.test,
            e.data
        )
        .into_bytes()
    }

    fn uuid(s: &str) -> Uuid {
        Uuid::parse_str(s).unwrap()
    }

    #[test]
    fn envelope_bytes_are_the_contract() {
        let base = Envelope {
            event_type: EventType::WorkflowRunStatusChanged,
            event_id: uuid("550e8400-e29b-41d4-a716-446655440000"),
            webhook_id: uuid("0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f"),
            delivery_id: uuid("F47AC10B-58CC-4372-A567-0E02B2C3D479"),
            timestamp_ms: 1_796_407_349_123,
            client_id: uuid(CLIENT),
            test: false,
            data: "{}",
        };
        let head = concat!(
            r#"{"event_type":"workflow_run.status_changed","event_id":"550e8400-e29b-41d4-a716-446655440000","#,
            r#""webhook_id":"0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f","delivery_id":"f47ac10b-58cc-4372-a567-0e02b2c3d479","#,
            r#""timestamp":"2026-12-04T18:02:29.123Z","client_id":"6f1c1a3e-2b6e-4c1e-9d55-0c8a3f7e9b10","test":false,"data":"#
        );
        // Data is the application's bytes untouched: its spaces, its own
        // escapes (`\u00e9`, `\/`, a surrogate pair), raw unicode, nesting.
        for data in [
            "{}",
            r#"{"name": "Zoë Ødegård 日本語 🎉", "note":"tab\there \"quoted\" back\\slash \/ \u00e9 \ud83c\udf89"}"#,
            r#"{"a":{"b":{"c":[1, -2.50e+3, true, null, {"d":[]}]}},"big":123456789012345678901234567890}"#,
            "{\n  \"ctrl\": \"\\u0000\\u001f\",\n  \"x\": 1\n}",
        ] {
            let e = Envelope { data, ..base };
            let body = envelope(&e);
            assert_eq!(String::from_utf8(body.clone()).unwrap(), format!("{head}{data}}}"));
            assert_eq!(body, envelope_by_format(&e));
        }
        let e = Envelope { event_type: EventType::MeetingNoShow, test: true, timestamp_ms: 0, ..base };
        assert_eq!(
            String::from_utf8(envelope(&e)).unwrap(),
            concat!(
                r#"{"event_type":"meeting.no_show","event_id":"550e8400-e29b-41d4-a716-446655440000","#,
                r#""webhook_id":"0b1c2d3e-4f50-4617-8829-3a4b5c6d7e8f","delivery_id":"f47ac10b-58cc-4372-a567-0e02b2c3d479","#,
                r#""timestamp":"1970-01-01T00:00:00.000Z","client_id":"6f1c1a3e-2b6e-4c1e-9d55-0c8a3f7e9b10","test":true,"data":{}}"#
            )
        );
        // The head estimate holds for the longest type, so one allocation.
        assert!(envelope(&base).len() - base.data.len() <= ENVELOPE_HEAD);
        // Stored data that is not JSON (ingest refuses it) still makes JSON.
        let damaged = envelope(&Envelope { data: "{\"a\":", ..base });
        assert!(damaged.ends_with(br#""test":false,"data":null}"#));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Whatever the event, and whatever text the data's strings hold, the
        /// bytes are those `format!` wrote.
        #[test]
        fn envelope_is_what_format_wrote(
            ty in 0..EventType::ALL.len(), ids in proptest::prelude::any::<[u128; 4]>(),
            ms in 0..=253_402_300_799_999i64, test in proptest::prelude::any::<bool>(),
            key in ".{0,8}", text in ".{0,40}", n in proptest::prelude::any::<f64>(), pad in "[ \t\n]{0,2}",
        ) {
            let data = format!(
                "{{{pad}{}:{pad}{},\"n\":{n},\"nested\":{{\"v\":[{},{pad}null]}}}}",
                serde_json::to_string(&key).unwrap(),
                serde_json::to_string(&text).unwrap(),
                serde_json::to_string(&text).unwrap().replace('/', "\\/"),
            );
            let e = Envelope {
                event_type: EventType::ALL[ty],
                event_id: Uuid::from_u128(ids[0]),
                webhook_id: Uuid::from_u128(ids[1]),
                delivery_id: Uuid::from_u128(ids[2]),
                timestamp_ms: ms,
                client_id: Uuid::from_u128(ids[3]),
                test,
                data: &data,
            };
            proptest::prop_assert_eq!(envelope(&e), envelope_by_format(&e));
        }
    }
}
