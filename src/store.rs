//! Durable state: one sled database, written only by one committer thread.
//!
//! Every mutation is a request to the committer, which drains whatever
//! requests are waiting, applies them as one atomic sled batch, flushes,
//! `fdatasync`s sled's data file and only then answers them all (group
//! commit). An answer therefore means "on disk", which is what lets the API
//! acknowledge an event. Reads go straight to sled from any thread.
//!
//! Layout, one keyspace with one-byte prefixes (see [`keys`]):
//! `E seq` event, `I event_id` → seq, `D seq webhook` delivery,
//! `Q due seq webhook` the due index. `seq` is a time-ordered u64 assigned
//! here, so records are laid out by time (sled compacts that far better than
//! random keys), and "what is due next" is a range scan over `Q`.
//!
//! This module knows nothing of HTTP, configuration or scheduling policy.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::clock;
use crate::event::EventType;

/// First byte of every stored value; bump it when a record's shape changes.
const FORMAT_VERSION: u8 = 1;
/// Most requests folded into one batch and one fsync.
const MAX_BATCH: usize = 4096;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    pub event_id: Uuid,
    pub event_type: EventType,
    pub client_id: Uuid,
    pub timestamp_ms: i64,
    /// Whether the application supplied `timestamp` (else it is the ingest time).
    pub timestamp_given: bool,
    pub test: bool,
    /// The application's `data` object, as the bytes it sent.
    pub data: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Pending,
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Retrying => "retrying",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub webhook_id: Uuid,
    pub status: Status,
    pub next_attempt_at: Option<i64>,
    pub attempts: Vec<Attempt>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub delivery_id: Uuid,
    pub started_at_ms: i64,
    pub duration_ms: u64,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response_body: String,
}

/// One delivery: an event (by sequence number) to one webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryKey {
    pub seq: u64,
    pub webhook: Uuid,
}

/// An entry of the due index. Ordered as its stored key: time, then delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Due {
    pub at_ms: u64,
    pub key: DeliveryKey,
}

impl Due {
    /// The smallest entry due at `at_ms`: a range bound.
    pub fn at(at_ms: u64) -> Due {
        Due {
            at_ms,
            key: DeliveryKey {
                seq: 0,
                webhook: Uuid::nil(),
            },
        }
    }
}

/// A new event and the webhooks it fans out to.
pub struct NewEvent {
    pub record: EventRecord,
    pub webhooks: Vec<Uuid>,
}

#[derive(Debug)]
pub enum Ingested {
    /// Stored now; these deliveries are due.
    Accepted(Vec<Due>),
    /// The same event_id with the same content was stored before.
    Duplicate,
    /// The same event_id with different content was stored before.
    Conflict,
}

/// What happens to a delivery after an attempt (or instead of one).
#[derive(Debug)]
pub struct Outcome {
    pub key: DeliveryKey,
    pub attempt: Option<Attempt>,
    pub status: Status,
    /// When the next attempt is due; `Some` exactly when `status` is `Retrying`.
    pub next_attempt_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another nexor-webhookd is already using the storage directory {0}")]
    Locked(PathBuf),
    #[error("storage cannot take writes: {0}")]
    Unavailable(String),
    #[error("stored record {key} cannot be decoded: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("no delivery {0:?}")]
    UnknownDelivery(DeliveryKey),
    #[error("storage is shut down")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Cheap-to-clone handle on the database and its committer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    data_file: File,
    // Options only so that Drop can close the channel and then join.
    requests: Option<mpsc::Sender<Request>>,
    committer: Option<thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// The last handle gone: let the committer finish what it holds, so the
    /// database is closed (and its lock released) when this returns.
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(c) = self.committer.take() {
            let _ = c.join();
        }
    }
}

enum Request {
    Ingest(NewEvent, oneshot::Sender<Result<Ingested, StoreError>>),
    Record(Outcome, oneshot::Sender<Result<(), StoreError>>),
}

impl Store {
    /// Opens (or creates) the database under `path` and starts the committer.
    pub fn open(path: &Path, cache_capacity: u64) -> Result<Store, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", path.display()))
        })?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(path.to_owned())
                }
                e => StoreError::Unavailable(format!("cannot open {}: {e}", path.display())),
            })?;
        // sled's flush uses sync_file_range, which neither empties the disk's
        // write cache nor persists the file size: fdatasync this file after it.
        let data_file = File::open(path.join("db"))?;
        let last_seq = match db.scan_prefix([keys::EVENT]).keys().next_back() {
            Some(k) => keys::seq_of_event(&k?),
            None => 0,
        };
        let (requests, rx) = mpsc::channel();
        let committer = Committer {
            db: db.clone(),
            data_file: data_file.try_clone()?,
            last_seq,
        };
        let committer = thread::Builder::new()
            .name("committer".into())
            .spawn(move || committer.run(rx))?;
        let inner = Inner {
            db,
            data_file,
            requests: Some(requests),
            committer: Some(committer),
        };
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// Stores an event and its deliveries; answers once they are on disk.
    pub async fn ingest(&self, event: NewEvent) -> Result<Ingested, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Ingest(event, tx))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records an attempt's outcome; blocks the calling (non-async) thread
    /// until it is on disk.
    pub fn record_blocking(&self, outcome: Outcome) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Record(outcome, tx))?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn send(&self, r: Request) -> Result<(), StoreError> {
        let requests = self.inner.requests.as_ref().ok_or(StoreError::Closed)?;
        requests.send(r).map_err(|_| StoreError::Closed)
    }

    /// The sequence number of the event with this id.
    pub fn find_event(&self, event_id: &Uuid) -> Result<Option<u64>, StoreError> {
        Ok(self
            .inner
            .db
            .get(keys::index(event_id))?
            .map(|v| keys::u64_at(&v, 0)))
    }

    pub fn event(&self, seq: u64) -> Result<Option<EventRecord>, StoreError> {
        get(&self.inner.db, &keys::event(seq))
    }

    pub fn delivery(&self, key: DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        get(&self.inner.db, &keys::delivery(key))
    }

    /// Every delivery of one event, in webhook-id order.
    pub fn deliveries(&self, seq: u64) -> Result<Vec<(DeliveryKey, DeliveryRecord)>, StoreError> {
        let mut prefix = vec![keys::DELIVERY];
        prefix.extend_from_slice(&seq.to_be_bytes());
        self.inner
            .db
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((keys::parse_delivery(&k), codec::decode(&k, &v)?))
            })
            .collect()
    }

    /// Up to `limit` due-index entries from `from` (inclusive) that are due
    /// no later than `until_ms`.
    pub fn scan_due(&self, from: Due, until_ms: u64, limit: usize) -> Result<Vec<Due>, StoreError> {
        let end = keys::due(Due::at(until_ms.saturating_add(1)));
        self.inner
            .db
            .range(keys::due(from)..end)
            .keys()
            .take(limit)
            .map(|k| Ok(keys::parse_due(&k?)))
            .collect()
    }

    /// The first due-index entry at or after `from`.
    pub fn first_due_from(&self, from: Due) -> Result<Option<Due>, StoreError> {
        let start = keys::due(from).to_vec();
        match self
            .inner
            .db
            .range(start..vec![keys::DUE + 1])
            .keys()
            .next()
        {
            Some(k) => Ok(Some(keys::parse_due(&k?))),
            None => Ok(None),
        }
    }

    /// Flushes and syncs everything written so far (for a clean stop).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.inner.db.flush()?;
        self.inner.data_file.sync_data()?;
        Ok(())
    }
}

fn get<T: DeserializeOwned>(db: &sled::Db, key: &[u8]) -> Result<Option<T>, StoreError> {
    match db.get(key)? {
        Some(v) => Ok(Some(codec::decode(key, &v)?)),
        None => Ok(None),
    }
}

/// The single writer. Owns sequence numbering and the event_id check, so
/// both are race-free without locks.
struct Committer {
    db: sled::Db,
    data_file: File,
    last_seq: u64,
}

/// Writes of one batch, readable before they are applied so that later
/// requests in the same batch see earlier ones.
#[derive(Default)]
struct Pending {
    batch: sled::Batch,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Pending {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.batch.insert(key.clone(), value.clone());
        self.overlay.insert(key, Some(value));
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.batch.remove(key.clone());
        self.overlay.insert(key, None);
    }

    fn get(&self, db: &sled::Db, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(db.get(key)?.map(|v| v.to_vec())),
        }
    }
}

impl Committer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut requests = vec![first];
            while requests.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            self.commit(requests);
        }
    }

    fn commit(&mut self, requests: Vec<Request>) {
        let mut pending = Pending::default();
        let seq_before = self.last_seq;
        let answers: Vec<_> = requests
            .into_iter()
            .map(|r| match r {
                Request::Ingest(ev, tx) => Answer::Ingest(self.ingest(&mut pending, ev), tx),
                Request::Record(o, tx) => Answer::Record(self.record(&mut pending, o), tx),
            })
            .collect();
        let written = self
            .db
            .apply_batch(pending.batch)
            .and_then(|_| self.db.flush().map(drop))
            .map_err(StoreError::from)
            .and_then(|_| self.data_file.sync_data().map_err(StoreError::from));
        if let Err(e) = &written {
            // Nothing of this batch is acknowledged; the sequence numbers it
            // used may be reused.
            tracing::error!(error = %e, "storage write failed");
            self.last_seq = seq_before;
        }
        for answer in answers {
            let fail = || {
                StoreError::Unavailable(
                    written
                        .as_ref()
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                )
            };
            match answer {
                Answer::Ingest(r, tx) => {
                    drop(tx.send(if written.is_ok() { r } else { Err(fail()) }))
                }
                Answer::Record(r, tx) => {
                    drop(tx.send(if written.is_ok() { r } else { Err(fail()) }))
                }
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        // Milliseconds in the high bits keep keys time-ordered across restarts;
        // the low 16 bits number events within a millisecond.
        self.last_seq = (self.last_seq + 1).max((clock::now_ms() as u64) << 16);
        self.last_seq
    }

    fn ingest(&mut self, p: &mut Pending, ev: NewEvent) -> Result<Ingested, StoreError> {
        let index_key = keys::index(&ev.record.event_id);
        if let Some(seq) = p.get(&self.db, &index_key)? {
            let seq = keys::u64_at(&seq, 0);
            let event_key = keys::event(seq);
            let stored: EventRecord = match p.get(&self.db, &event_key)? {
                Some(v) => codec::decode(&event_key, &v)?,
                None => {
                    return Err(StoreError::Corrupt {
                        key: format!("event {seq}"),
                        reason: "index points at nothing".into(),
                    })
                }
            };
            return Ok(if same_content(&stored, &ev.record) {
                Ingested::Duplicate
            } else {
                Ingested::Conflict
            });
        }
        let seq = self.next_seq();
        let now = clock::now_ms().max(0) as u64;
        p.insert(index_key.to_vec(), seq.to_be_bytes().to_vec());
        p.insert(keys::event(seq).to_vec(), codec::encode(&ev.record));
        let mut due = Vec::with_capacity(ev.webhooks.len());
        for webhook in ev.webhooks {
            let key = DeliveryKey { seq, webhook };
            let record = DeliveryRecord {
                webhook_id: webhook,
                status: Status::Pending,
                next_attempt_at: Some(now as i64),
                attempts: Vec::new(),
            };
            p.insert(keys::delivery(key).to_vec(), codec::encode(&record));
            let d = Due { at_ms: now, key };
            p.insert(keys::due(d).to_vec(), Vec::new());
            due.push(d);
        }
        Ok(Ingested::Accepted(due))
    }

    fn record(&mut self, p: &mut Pending, o: Outcome) -> Result<(), StoreError> {
        let key = keys::delivery(o.key);
        let mut record: DeliveryRecord = match p.get(&self.db, &key)? {
            Some(v) => codec::decode(&key, &v)?,
            None => return Err(StoreError::UnknownDelivery(o.key)),
        };
        if let Some(at) = record.next_attempt_at {
            p.remove(
                keys::due(Due {
                    at_ms: at.max(0) as u64,
                    key: o.key,
                })
                .to_vec(),
            );
        }
        if let Some(at) = o.next_attempt_at {
            p.insert(
                keys::due(Due {
                    at_ms: at.max(0) as u64,
                    key: o.key,
                })
                .to_vec(),
                Vec::new(),
            );
        }
        record.attempts.extend(o.attempt);
        record.status = o.status;
        record.next_attempt_at = o.next_attempt_at;
        p.insert(key.to_vec(), codec::encode(&record));
        Ok(())
    }
}

enum Answer {
    Ingest(
        Result<Ingested, StoreError>,
        oneshot::Sender<Result<Ingested, StoreError>>,
    ),
    Record(
        Result<(), StoreError>,
        oneshot::Sender<Result<(), StoreError>>,
    ),
}

/// Whether a repeated event_id carries the same event. `data` is compared as
/// JSON values (key order and spacing do not matter); the timestamp only when
/// both requests gave one.
fn same_content(a: &EventRecord, b: &EventRecord) -> bool {
    let data = |r: &EventRecord| serde_json::from_str::<serde_json::Value>(&r.data).ok();
    a.event_type == b.event_type
        && a.client_id == b.client_id
        && a.test == b.test
        && (!a.timestamp_given || !b.timestamp_given || a.timestamp_ms == b.timestamp_ms)
        && data(a) == data(b)
}

/// Key encoding. Big-endian integers make byte order equal numeric order.
mod keys {
    use super::{DeliveryKey, Due};
    use uuid::Uuid;

    pub const EVENT: u8 = b'E';
    pub const INDEX: u8 = b'I';
    pub const DELIVERY: u8 = b'D';
    pub const DUE: u8 = b'Q';

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

    pub fn seq_of_event(k: &[u8]) -> u64 {
        u64_at(k, 1)
    }

    pub fn index(event_id: &Uuid) -> [u8; 17] {
        let mut k = [INDEX; 17];
        k[1..].copy_from_slice(event_id.as_bytes());
        k
    }

    pub fn delivery(d: DeliveryKey) -> [u8; 25] {
        let mut k = [DELIVERY; 25];
        k[1..9].copy_from_slice(&d.seq.to_be_bytes());
        k[9..].copy_from_slice(d.webhook.as_bytes());
        k
    }

    pub fn parse_delivery(k: &[u8]) -> DeliveryKey {
        DeliveryKey {
            seq: u64_at(k, 1),
            webhook: uuid_at(k, 9),
        }
    }

    pub fn due(d: Due) -> [u8; 33] {
        let mut k = [DUE; 33];
        k[1..9].copy_from_slice(&d.at_ms.to_be_bytes());
        k[9..17].copy_from_slice(&d.key.seq.to_be_bytes());
        k[17..].copy_from_slice(d.key.webhook.as_bytes());
        k
    }

    pub fn parse_due(k: &[u8]) -> Due {
        Due {
            at_ms: u64_at(k, 1),
            key: DeliveryKey {
                seq: u64_at(k, 9),
                webhook: uuid_at(k, 17),
            },
        }
    }
}

/// The one pair of functions that knows the value encoding: a format-version
/// byte, then bincode.
mod codec {
    use super::{StoreError, FORMAT_VERSION};
    use serde::de::DeserializeOwned;
    use serde::Serialize;

    pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
            .expect("writing to a Vec cannot fail");
        out
    }

    pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            key: hex::encode(key),
            reason,
        };
        match bytes.split_first() {
            Some((&FORMAT_VERSION, rest)) => {
                bincode::serde::decode_from_slice(rest, bincode::config::standard())
                    .map(|(v, _)| v)
                    .map_err(|e| corrupt(e.to_string()))
            }
            Some((v, _)) => Err(corrupt(format!(
                "format version {v}, this build reads {FORMAT_VERSION}"
            ))),
            None => Err(corrupt("empty value".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(at_ms: u64, seq: u64, w: u8) -> Due {
        Due {
            at_ms,
            key: DeliveryKey {
                seq,
                webhook: Uuid::from_bytes([w; 16]),
            },
        }
    }

    #[test]
    fn due_keys_sort_like_due_entries() {
        let mut entries = vec![
            due(5, 1, 1),
            due(1 << 40, 0, 0),
            due(5, 0, 9),
            due(4, u64::MAX, 255),
            due(5, 1, 0),
            due(256, 0, 0),
        ];
        let mut by_key = entries.clone();
        by_key.sort_by_key(|d| keys::due(*d));
        entries.sort();
        assert_eq!(entries, by_key);
        for d in entries {
            assert_eq!(keys::parse_due(&keys::due(d)), d);
        }
    }

    #[test]
    fn codec_round_trips_and_refuses_other_versions() {
        let a = Attempt {
            delivery_id: Uuid::from_bytes([7; 16]),
            started_at_ms: 12,
            duration_ms: 3,
            status_code: Some(503),
            error: Some("HTTP 503".into()),
            response_body: "busy".into(),
        };
        let bytes = codec::encode(&a);
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: Attempt = codec::decode(b"k", &bytes).unwrap();
        assert_eq!(back.response_body, "busy");
        let mut future = bytes.clone();
        future[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            codec::decode::<Attempt>(b"k", &future),
            Err(StoreError::Corrupt { .. })
        ));
    }

    fn record(data: &str, ts: Option<i64>) -> EventRecord {
        EventRecord {
            event_id: Uuid::nil(),
            event_type: EventType::MeetingScheduled,
            client_id: Uuid::nil(),
            timestamp_ms: ts.unwrap_or(99),
            timestamp_given: ts.is_some(),
            test: false,
            data: data.into(),
        }
    }

    #[test]
    fn repeated_event_ids_compare_content_not_bytes() {
        assert!(same_content(
            &record(r#"{"a":1,"b":2}"#, None),
            &record(r#"{ "b":2, "a":1 }"#, Some(5))
        ));
        assert!(!same_content(
            &record(r#"{"a":1}"#, None),
            &record(r#"{"a":2}"#, None)
        ));
        assert!(!same_content(
            &record("{}", Some(1)),
            &record("{}", Some(2))
        ));
    }

    #[tokio::test]
    async fn ingest_is_durable_idempotent_and_time_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let webhooks = vec![Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16])];
        let new = |id: u8, data: &str| NewEvent {
            record: EventRecord {
                event_id: Uuid::from_bytes([id; 16]),
                ..record(data, None)
            },
            webhooks: webhooks.clone(),
        };
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            assert!(matches!(
                Store::open(dir.path(), 1 << 20),
                Err(StoreError::Locked(_))
            ));
            let Ingested::Accepted(first) = store.ingest(new(1, "{}")).await.unwrap() else {
                panic!()
            };
            assert_eq!(first.len(), 2);
            assert!(matches!(
                store.ingest(new(1, "{ }")).await.unwrap(),
                Ingested::Duplicate
            ));
            assert!(matches!(
                store.ingest(new(1, r#"{"x":1}"#)).await.unwrap(),
                Ingested::Conflict
            ));
            let Ingested::Accepted(second) = store.ingest(new(2, "{}")).await.unwrap() else {
                panic!()
            };
            assert!(second[0].key.seq > first[0].key.seq);

            let o = Outcome {
                key: first[0].key,
                attempt: None,
                status: Status::Retrying,
                next_attempt_at: Some(1 << 50),
            };
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.record_blocking(o))
                .await
                .unwrap()
                .unwrap();
        }
        // Reopened: everything acknowledged is there, the due index moved.
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let seq = store
            .find_event(&Uuid::from_bytes([1; 16]))
            .unwrap()
            .unwrap();
        assert_eq!(store.deliveries(seq).unwrap().len(), 2);
        let due_now = store
            .scan_due(Due::at(0), clock::now_ms() as u64, 100)
            .unwrap();
        assert_eq!(due_now.len(), 3);
        let later = store
            .first_due_from(Due::at(clock::now_ms() as u64 + 1))
            .unwrap()
            .unwrap();
        assert_eq!(later.at_ms, 1 << 50);
        let Ingested::Accepted(third) = store.ingest(new(3, "{}")).await.unwrap() else {
            panic!()
        };
        assert!(third[0].key.seq > seq);
    }
}
