//! What makes a batch durable beyond sled's own flush, and the daemon's own
//! record of what it has acknowledged.
//!
//! sled's `flush` writes its log with `sync_file_range`, which survives a
//! crash of the process but not a power cut; an item bigger than a quarter
//! of a segment goes to a file of its own under `blobs/`, which sled never
//! syncs at all, nor the directories it creates files in. [`Syncer::sync`]
//! therefore follows every flush with an `fdatasync` of `db`, of every new
//! or grown file in the storage directory and in `blobs/`, and of each
//! directory whose entries changed — before anything is acknowledged.
//!
//! sled's recovery cuts its log at the first damaged record and says
//! nothing, and an emptied `db` opens as a new database. So the syncer also
//! keeps a ledger, the file `acknowledged`, rewritten and synced after each
//! sync: the number of batches the store had committed and the last event
//! sequence number at that point. Every batch also stores that count in
//! sled (`C`), so at open a store that holds fewer batches than the ledger
//! says were acknowledged is damaged, and is refused rather than served
//! short ([`check`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{keys, StoreError};
use crate::clock;

/// The ledger's file name, in the storage directory next to sled's files.
pub const LEDGER: &str = "acknowledged";
const MAGIC: &[u8; 8] = b"NXWHACK1";
const LEDGER_LEN: usize = 48;

/// How far the store had got: batches committed and the last event
/// sequence number then. Stored in sled under `C` with every batch, and in
/// the ledger once that batch is synced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    pub commits: u64,
    pub last_seq: u64,
}

impl Mark {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.commits.to_be_bytes());
        b[8..].copy_from_slice(&self.last_seq.to_be_bytes());
        b
    }

    /// The mark stored in sled; the default for a database that has none
    /// (new, emptied, or written by a build before the ledger).
    pub fn stored(db: &sled::Db) -> Result<Mark, StoreError> {
        let Some(v) = db.get(keys::MARK)? else { return Ok(Mark::default()) };
        if v.len() != 16 {
            return Err(StoreError::Corrupt {
                key: "C".into(),
                reason: format!("{} bytes, not 16", v.len()),
            });
        }
        Ok(Mark { commits: keys::u64_at(&v, 0), last_seq: keys::u64_at(&v, 8) })
    }
}

/// What the ledger says was acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acknowledged {
    pub mark: Mark,
    /// When the ledger was written (ms since the epoch).
    pub at_ms: i64,
}

fn checksum(b: &[u8]) -> [u8; 8] {
    Sha256::digest(b)[..8].try_into().expect("8 bytes")
}

fn encode_ledger(a: &Acknowledged) -> [u8; LEDGER_LEN] {
    let mut b = [0; LEDGER_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..24].copy_from_slice(&a.mark.encode());
    b[24..32].copy_from_slice(&a.at_ms.to_be_bytes());
    let sum = checksum(&b[..32]);
    b[32..40].copy_from_slice(&sum);
    b
}

fn decode_ledger(b: &[u8]) -> Option<Acknowledged> {
    if b.len() < 40 || &b[..8] != MAGIC || b[32..40] != checksum(&b[..32]) {
        return None;
    }
    let mark = Mark { commits: keys::u64_at(b, 8), last_seq: keys::u64_at(b, 16) };
    Some(Acknowledged { mark, at_ms: keys::u64_at(b, 24) as i64 })
}

/// Reads the ledger of the store under `dir`: `None` if there is none (a new
/// store, or one from a build before the ledger).
pub fn read_ledger(dir: &Path) -> Result<Option<Acknowledged>, StoreError> {
    let bytes = match std::fs::read(dir.join(LEDGER)) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StoreError::Unavailable(format!("cannot read {}: {e}", dir.join(LEDGER).display())))
        }
    };
    decode_ledger(&bytes).map(Some).ok_or_else(|| StoreError::Damaged {
        path: dir.to_owned(),
        detail: format!("its ledger {LEDGER} is unreadable ({} bytes)", bytes.len()),
    })
}

/// What a damaged store lacks: every batch after `found` up to `acknowledged`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    pub found: Mark,
    pub acknowledged: Acknowledged,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (found, ack) = (self.found, self.acknowledged.mark);
        let time = |seq: u64| match seq {
            0 => "the start".to_owned(),
            s => clock::format_ms(super::seq_time_ms(s)),
        };
        write!(
            f,
            "it holds {} committed batches but {} were acknowledged (the last at {}): {} batches are missing",
            found.commits,
            ack.commits,
            clock::format_ms(self.acknowledged.at_ms),
            ack.commits - found.commits,
        )?;
        if ack.last_seq > found.last_seq {
            write!(
                f,
                ", with every event stored after {} (sequence numbers {}..={})",
                time(found.last_seq),
                found.last_seq + 1,
                ack.last_seq
            )
        } else {
            write!(f, " (no events: attempt outcomes, redeliveries, cancellations or pruning)")
        }
    }
}

/// Compares what sled recovered with the ledger: `Ok(None)` if nothing
/// acknowledged is missing, `Ok(Some(loss))` if something is, which the
/// caller refuses unless the operator accepted the loss.
pub fn check(dir: &Path, found: Mark) -> Result<Option<Loss>, StoreError> {
    Ok(read_ledger(dir)?
        .filter(|ack| ack.mark.commits > found.commits)
        .map(|acknowledged| Loss { found, acknowledged }))
}

/// Syncs sled's files after its flush, then writes the ledger.
pub struct Syncer {
    dir: PathBuf,
    db_file: File,
    ledger: File,
    /// Each directory's files (other than `db` and the ledger, synced
    /// every time) with the length they had when last synced.
    synced: HashMap<PathBuf, HashMap<OsString, u64>>,
}

impl Syncer {
    /// The syncer of the store under `dir`, which sled has opened, and
    /// whose ledger [`check`] has read. A missing ledger is made, whole,
    /// holding `found`. Syncs the directory's parent too, since the
    /// directory may just have been made.
    pub fn new(dir: &Path, found: Mark) -> Result<Syncer, StoreError> {
        let io = |what: &str, e: std::io::Error| StoreError::Unavailable(format!("cannot {what}: {e}"));
        let db_file = File::open(dir.join("db")).map_err(|e| io("open sled's data file", e))?;
        let path = dir.join(LEDGER);
        if !path.exists() {
            // Written aside and renamed into place: an empty or half-written
            // ledger must never be what a power cut leaves.
            let aside = dir.join(format!("{LEDGER}.new"));
            let first = Acknowledged { mark: found, at_ms: clock::now_ms() };
            std::fs::write(&aside, encode_ledger(&first))
                .and_then(|()| File::open(&aside)?.sync_all())
                .and_then(|()| std::fs::rename(&aside, &path))
                .map_err(|e| io("make the ledger", e))?;
            sync_dir(dir)?;
        }
        let ledger = OpenOptions::new().write(true).open(&path).map_err(|e| io("open the ledger", e))?;
        // The directory and its parents may just have been made: each one's
        // entry must be durable too.
        for ancestor in dir.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(ancestor)?;
        }
        Ok(Syncer { dir: dir.to_owned(), db_file, ledger, synced: HashMap::new() })
    }

    /// A second handle on sled's data file.
    pub fn db_file(&self) -> Result<File, StoreError> {
        Ok(self.db_file.try_clone()?)
    }

    /// Flushes sled and makes everything it wrote durable, then records
    /// `mark` (which that flush covers) in the ledger.
    pub fn sync(&mut self, db: &sled::Db, mark: Mark) -> Result<(), StoreError> {
        db.flush()?;
        let blobs = self.dir.join("blobs");
        for dir in [blobs.as_path(), self.dir.clone().as_path()] {
            patiently(dir, || self.sync_files(dir))?;
        }
        self.db_file.sync_data()?;
        let ack = Acknowledged { mark, at_ms: clock::now_ms() };
        self.ledger.write_all_at(&encode_ledger(&ack), 0)?;
        self.ledger.sync_data()?;
        Ok(())
    }

    /// Syncs the files of `dir` that are new or grew since the last call,
    /// then `dir` itself if its entries changed. What was synced is noted
    /// only once all of it was, so a call that fails can simply be made
    /// again.
    fn sync_files(&mut self, dir: &Path) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let empty = HashMap::new();
        let known = self.synced.get(dir).unwrap_or(&empty);
        let mut now = HashMap::with_capacity(known.len());
        let mut changed = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            changed |= !known.contains_key(&name);
            if !meta.is_file() || name == "db" || name == LEDGER || name == "blobs" {
                now.insert(name, 0);
                continue;
            }
            let len = meta.len();
            if known.get(&name) != Some(&len) {
                // A blob is written once, whole, before the batch that points
                // at it is applied; one still being written (by the next
                // batch) is synced again once its length changes.
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            now.insert(name, len);
        }
        changed |= known.keys().any(|name| !now.contains_key(name));
        if changed {
            File::open(dir)?.sync_all()?;
        }
        self.synced.insert(dir.to_owned(), now);
        Ok(())
    }
}

/// How long a sync waits for file descriptors to come free before it fails.
/// The API's connection cap keeps a reserve for storage, so running out
/// means something else holds them (a flood, or a leak), and the API's
/// timeouts give them back within seconds.
const FD_PATIENCE: Duration = Duration::from_secs(20);

/// Runs `op` again while it fails for want of file descriptors (EMFILE,
/// ENFILE): nothing is wrong with the disk, so a sync must not end the
/// process for that; acknowledgements wait meanwhile.
fn patiently(what: &Path, mut op: impl FnMut() -> std::io::Result<()>) -> Result<(), StoreError> {
    let started = Instant::now();
    let mut said = false;
    loop {
        match op() {
            Err(e)
                if matches!(
                    rustix::io::Errno::from_io_error(&e),
                    Some(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)
                ) && started.elapsed() < FD_PATIENCE =>
            {
                if !said {
                    tracing::warn!(error = %e, "out of file descriptors while syncing storage; waiting for some to come free");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(StoreError::Unavailable(format!("cannot sync {}: {e}", what.display()))),
            Ok(()) => return Ok(()),
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Unavailable(format!("cannot sync the directory {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_round_trips_and_refuses_damage() {
        let ack = Acknowledged { mark: Mark { commits: 7, last_seq: 1 << 40 }, at_ms: 1_776_443_400_000 };
        let bytes = encode_ledger(&ack);
        assert_eq!(decode_ledger(&bytes), Some(ack));
        for i in 0..40 {
            let mut bad = bytes;
            bad[i] ^= 1;
            assert_eq!(decode_ledger(&bad), None, "a flipped bit in byte {i}");
        }
        assert_eq!(decode_ledger(&bytes[..39]), None);
    }

    #[test]
    fn a_store_short_of_its_ledger_is_a_loss() {
        let dir = tempfile::tempdir().unwrap();
        let ack = |commits| Acknowledged { mark: Mark { commits, last_seq: commits << 16 }, at_ms: 0 };
        assert_eq!(check(dir.path(), Mark::default()).unwrap(), None, "no ledger: a new store");
        std::fs::write(dir.path().join(LEDGER), encode_ledger(&ack(5))).unwrap();
        assert_eq!(check(dir.path(), ack(5).mark).unwrap(), None);
        assert_eq!(check(dir.path(), ack(6).mark).unwrap(), None);
        let loss = check(dir.path(), ack(3).mark).unwrap().unwrap();
        assert_eq!(loss, Loss { found: ack(3).mark, acknowledged: ack(5) });
        assert!(loss.to_string().contains("2 batches are missing"), "{loss}");
        std::fs::write(dir.path().join(LEDGER), b"half").unwrap();
        assert!(matches!(check(dir.path(), ack(9).mark), Err(StoreError::Damaged { .. })));
    }
}
