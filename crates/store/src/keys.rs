//! Key encoding: one keyspace, one-byte prefixes, big-endian integers so
//! that byte order is numeric order.
//!
//! | key | value |
//! |---|---|
//! | `E seq` | event |
//! | `I event_id` | seq, for ids the application chose (the only key led by a random id: kept small) |
//! | `D webhook seq` | delivery (so a webhook's deliveries sort by time; an event's are found through its record) |
//! | `Q due_ms seq webhook` | nothing: the due index |
//! | `F first_seq` | last_seq: the events of one batch, some of whose deliveries have no `Q` entry yet (see the committer) |
//! | `H due_second` | how many `Q` entries fall in that second (so counting what is due costs a second's entries at most) |
//! | `W webhook` | the webhook's stats |
//! | `Z webhook seq` | due time: a delivery set aside because it could not be read |
//! | `C` | batches committed and the last event seq, 16 bytes: compared at open with the ledger of what was acknowledged (see `durable`) |
//! | `V` | the layout version of all of the above |

use uuid::Uuid;

use super::{DeliveryKey, Due, StoreError};

pub const EVENT: u8 = b'E';
pub const INDEX: u8 = b'I';
pub const DELIVERY: u8 = b'D';
pub const DUE: u8 = b'Q';
pub const DUE_COUNT: u8 = b'H';
pub const FRESH_RANGE: u8 = b'F';
pub const STATS: u8 = b'W';
pub const SET_ASIDE: u8 = b'Z';
pub const LAYOUT: [u8; 1] = [b'V'];
pub const MARK: [u8; 1] = [b'C'];
/// Bump when keys or records change shape; a database of another layout is
/// refused at open rather than misread.
pub const LAYOUT_VERSION: u8 = 6;

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn uuid_at(b: &[u8], at: usize) -> Uuid {
    Uuid::from_bytes(b[at..at + 16].try_into().expect("16 bytes"))
}

pub fn event(seq: u64) -> [u8; 9] {
    let mut k = [EVENT; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn index(event_id: &Uuid) -> [u8; 17] {
    let mut k = [INDEX; 17];
    k[1..].copy_from_slice(event_id.as_bytes());
    k
}

pub fn delivery(d: DeliveryKey) -> [u8; 25] {
    let mut k = [DELIVERY; 25];
    k[1..17].copy_from_slice(d.webhook.as_bytes());
    k[17..].copy_from_slice(&d.seq.to_be_bytes());
    k
}

pub fn parse_delivery(k: &[u8]) -> DeliveryKey {
    DeliveryKey { webhook: uuid_at(k, 1), seq: u64_at(k, 17) }
}

pub fn due(d: Due) -> [u8; 33] {
    let mut k = [DUE; 33];
    k[1..9].copy_from_slice(&d.at_ms.to_be_bytes());
    k[9..17].copy_from_slice(&d.key.seq.to_be_bytes());
    k[17..].copy_from_slice(d.key.webhook.as_bytes());
    k
}

pub fn parse_due(k: &[u8]) -> Due {
    Due { at_ms: u64_at(k, 1), key: DeliveryKey { seq: u64_at(k, 9), webhook: uuid_at(k, 17) } }
}

/// The `H` key of a second of due times (`at_ms / 1000`).
pub fn due_count(second: u64) -> [u8; 9] {
    let mut k = [DUE_COUNT; 9];
    k[1..].copy_from_slice(&second.to_be_bytes());
    k
}

/// The `F` key of the batch whose first event is `first_seq`.
pub fn fresh_range(first_seq: u64) -> [u8; 9] {
    let mut k = [FRESH_RANGE; 9];
    k[1..].copy_from_slice(&first_seq.to_be_bytes());
    k
}

/// An `H` or `F` value: a big-endian u64.
pub fn u64_value(key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
    let bytes = value.try_into().map_err(|_| StoreError::Corrupt {
        key: format!("{key:?}"),
        reason: format!("{} bytes where a number of 8 was expected", value.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

pub fn set_aside(d: DeliveryKey) -> [u8; 25] {
    let mut k = delivery(d);
    k[0] = SET_ASIDE;
    k
}

pub fn stats(webhook: &Uuid) -> [u8; 17] {
    let mut k = [STATS; 17];
    k[1..].copy_from_slice(webhook.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due_at(at_ms: u64, seq: u64, w: u8) -> Due {
        Due { at_ms, key: DeliveryKey { seq, webhook: Uuid::from_bytes([w; 16]) } }
    }

    #[test]
    fn due_keys_sort_like_due_entries() {
        let mut entries = vec![
            due_at(5, 1, 1),
            due_at(1 << 40, 0, 0),
            due_at(5, 0, 9),
            due_at(4, u64::MAX, 255),
            due_at(256, 0, 0),
        ];
        let mut by_key = entries.clone();
        by_key.sort_by_key(|d| due(*d));
        entries.sort();
        assert_eq!(entries, by_key);
        for d in entries {
            assert_eq!(parse_due(&due(d)), d);
            assert_eq!(parse_delivery(&delivery(d.key)), d.key);
        }
    }

    #[test]
    fn a_webhooks_deliveries_sort_by_time() {
        let w = Uuid::from_bytes([3; 16]);
        let older = delivery(DeliveryKey { seq: 255, webhook: w });
        let newer = delivery(DeliveryKey { seq: 256, webhook: w });
        assert!(older < newer);
    }
}
