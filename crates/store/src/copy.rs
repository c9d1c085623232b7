//! Copies of a whole store: `backup` of a running daemon and `restore` into
//! a stopped one's empty directory. Both write a new store directory, key by
//! key, with its own ledger, synced like any batch.
//!
//! A backup is taken on the committer's thread between two batches, so the
//! copy is one state the store was in (ingest waits meanwhile); `restore`
//! reads a backup that nothing else has open. The copy is written into a
//! scratch directory beside the target and renamed into place once it is
//! durable, so an interrupted copy never looks like a store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::committer::{free_bytes, room};
use super::{durable, StoreError};

/// Keys per sled batch while copying: big enough to keep sled's per-batch
/// cost small, small enough to bound the memory one batch holds.
const KEYS_PER_BATCH: usize = 4096;
/// Room to leave on the target's filesystem besides the copy itself
/// (sled writes a value into its log, and may again when it cleans it).
const AMPLIFICATION: u64 = 2;

/// What a copy wrote.
#[derive(Debug, Clone)]
pub struct Copied {
    pub path: PathBuf,
    pub keys: u64,
    pub events: u64,
    /// Bytes of keys and values copied.
    pub bytes: u64,
}

/// Why a copy's target cannot be written to.
pub fn unusable_target(to: &Path) -> Option<String> {
    if !to.is_absolute() {
        return Some(format!("{} is not an absolute path", to.display()));
    }
    match std::fs::read_dir(to).map(|mut entries| entries.next().is_some()) {
        Ok(true) => {
            Some(format!("{} is not empty; copies go only into a new or empty directory", to.display()))
        }
        Ok(false) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match to.parent() {
            Some(p) if p.is_dir() => None,
            _ => Some(format!("the parent directory of {} does not exist", to.display())),
        },
        Err(e) => Some(format!("{} cannot be used: {e}", to.display())),
    }
}

/// Copies every key of `from` into a new store at `to` (absent, or an empty
/// directory), with a ledger saying it holds what it holds; counts each
/// batch of keys in `progress`.
pub fn copy(from: &sled::Db, to: &Path, progress: &AtomicU64) -> Result<Copied, StoreError> {
    if let Some(why) = unusable_target(to) {
        return Err(StoreError::Target(why));
    }
    let parent = to.parent().expect("an absolute path that is not / has a parent");
    room(free_bytes(parent), from.size_on_disk()?.saturating_mul(AMPLIFICATION))?;
    let scratch = tempfile::Builder::new().prefix(".nexor-webhookd-copy-").tempdir_in(parent)?;
    let db = sled::Config::new().path(scratch.path()).cache_capacity(16 << 20).open()?;
    let mut copied = Copied { path: to.to_owned(), keys: 0, events: 0, bytes: 0 };
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for kv in from.iter() {
        let (k, v) = kv?;
        copied.keys += 1;
        copied.events += u64::from(k.first() == Some(&super::keys::EVENT));
        copied.bytes += (k.len() + v.len()) as u64;
        batch.insert(k, v);
        in_batch += 1;
        if in_batch == KEYS_PER_BATCH {
            db.apply_batch(std::mem::take(&mut batch))?;
            in_batch = 0;
            progress.fetch_add(1, Ordering::Relaxed);
        }
    }
    db.apply_batch(batch)?;
    let mark = durable::Mark::stored(&db)?;
    durable::Syncer::new(scratch.path(), mark)?.sync(&db, mark)?;
    drop(db);
    // Over an empty directory, rename replaces it.
    std::fs::rename(scratch.path(), to)?;
    let _ = scratch.keep();
    std::fs::File::open(parent)?.sync_all()?;
    Ok(copied)
}
