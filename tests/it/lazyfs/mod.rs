//! A LazyFS-like FUSE filesystem for power-cut tests (the model is Jepsen's
//! LazyFS): everything lives in memory; what a program writes is visible at
//! once but survives a [`LazyFs::power_cut`] only if it was made durable the
//! way POSIX asks for:
//!
//! - a file's contents and size, as of its last `fsync` or `fdatasync`;
//! - a directory's entries (create, mkdir, rename, unlink, rmdir), as of that
//!   directory's last `fsync` (FUSE `fsyncdir`). Strict: syncing a file does
//!   not make its name durable, and syncing a directory does not make the
//!   directory's own name in its parent durable.
//!
//! A power cut keeps exactly the tree reachable from the root through durable
//! entries, each file with its durable contents; anything else is gone. It
//! unmounts (so the kernel keeps no page or attribute from before the cut),
//! reverts, and mounts again at the same path. Whoever uses the mount must be
//! gone first (kill the daemon and wait for it): a cut with a file still open
//! fails, saying who holds it.
//!
//! Contents are 64 KiB pages shared between the current and the durable copy
//! (`Arc`, copied on write), so an fsync costs a vector of pointers, not the
//! file. Locks: `flock` and POSIX locks are left to the kernel (the FUSE
//! default when the filesystem does not ask for them), which is what sled's
//! lock on its `db` file needs within one machine. As root, fuser mounts
//! with mount(2) itself: no libfuse and no `fusermount3` are needed.
#![allow(dead_code)] // not every test file uses every part

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const PAGE: usize = 64 * 1024;
const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;
/// What statfs reports: 4 TiB in 4 KiB blocks, so free-space checks pass.
const BLOCK: u64 = 4096;
const BLOCKS: u64 = 1 << 30;

type Res<T> = Result<T, Errno>;

/// A file's bytes: `size`, and pages of `PAGE` bytes (`None` reads as zeros;
/// bytes of a page past `size` are always zero).
#[derive(Clone, Default)]
struct Content {
    size: u64,
    pages: Vec<Option<Arc<Vec<u8>>>>,
}

impl Content {
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let end = offset.saturating_add(len as u64).min(self.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let (p, o) = ((pos / PAGE as u64) as usize, (pos % PAGE as u64) as usize);
            let n = ((PAGE - o) as u64).min(end - pos) as usize;
            match self.pages.get(p).and_then(Option::as_ref) {
                Some(page) => out.extend_from_slice(&page[o..o + n]),
                None => out.resize(out.len() + n, 0),
            }
            pos += n as u64;
        }
        out
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        let pages = end.div_ceil(PAGE as u64) as usize;
        if self.pages.len() < pages {
            self.pages.resize(pages, None);
        }
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let (p, o) = ((pos / PAGE as u64) as usize, (pos % PAGE as u64) as usize);
            let n = (PAGE - o).min(data.len() - done);
            let page = self.pages[p].get_or_insert_with(|| Arc::new(vec![0; PAGE]));
            Arc::make_mut(page)[o..o + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.size = self.size.max(end);
    }

    fn set_len(&mut self, size: u64) {
        if size < self.size {
            self.pages.truncate(size.div_ceil(PAGE as u64) as usize);
            let o = (size % PAGE as u64) as usize;
            if o != 0 {
                if let Some(Some(page)) = self.pages.last_mut() {
                    Arc::make_mut(page)[o..].fill(0);
                }
            }
        }
        self.size = size;
    }

    /// Whether both hold the same bytes because they share every page.
    fn same(&self, other: &Content) -> bool {
        self.size == other.size
            && self.pages.len() == other.pages.len()
            && self.pages.iter().zip(&other.pages).all(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            })
    }
}

enum Node {
    File { cur: Content, dur: Content },
    Dir { cur: BTreeMap<OsString, u64>, dur: BTreeMap<OsString, u64>, parent: u64 },
}

struct Inode {
    node: Node,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Current directory entries naming it.
    links: u32,
    /// Open file handles.
    opens: u32,
    /// Durable directory entries naming it.
    durable_refs: u32,
}

impl Inode {
    fn new(node: Node, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        Inode {
            node,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            links: 1,
            opens: 0,
            durable_refs: 0,
        }
    }
    fn is_dir(&self) -> bool {
        matches!(self.node, Node::Dir { .. })
    }
}

/// What a power cut took back.
#[derive(Debug, Default)]
pub struct CutReport {
    /// Paths that existed before the cut and do not after it.
    pub lost: Vec<String>,
    /// Files that survived with other contents than they had (`path: size before -> after`).
    pub reverted: Vec<String>,
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            let mut s = v.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 8 {
                s.push_str(&format!(", … ({} more)", v.len() - 8));
            }
            s
        };
        write!(
            f,
            "{} path(s) gone [{}]; {} file(s) reverted to their last sync [{}]",
            self.lost.len(),
            list(&self.lost),
            self.reverted.len(),
            list(&self.reverted)
        )
    }
}

/// The whole filesystem; it outlives each mount.
pub struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    next_fh: u64,
    /// fsync/fdatasync calls on files, and fsync calls on directories.
    pub file_syncs: u64,
    pub dir_syncs: u64,
    /// While set, syncs wait here unanswered, as on a disk that stops
    /// answering: the inode, whether it is a directory, and the reply.
    held: Option<Vec<(u64, bool, ReplyEmpty)>>,
}

impl Default for State {
    fn default() -> State {
        let mut root = Inode::new(
            Node::Dir { cur: Default::default(), dur: Default::default(), parent: ROOT },
            0o755,
            0,
            0,
        );
        root.durable_refs = 1; // the mount itself: the root is always there
        State {
            inodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            next_fh: 1,
            file_syncs: 0,
            dir_syncs: 0,
            held: None,
        }
    }
}

impl State {
    fn get(&self, ino: u64) -> Res<&Inode> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn get_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64) -> Res<FileAttr> {
        let i = self.get(ino)?;
        let (kind, size, nlink) = match &i.node {
            Node::File { cur, .. } => (FileType::RegularFile, cur.size, i.links),
            Node::Dir { cur, .. } => (FileType::Directory, cur.len() as u64 * 32, 2),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            crtime: i.ctime,
            kind,
            perm: i.perm,
            nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        })
    }

    fn entries(&self, dir: u64) -> Res<&BTreeMap<OsString, u64>> {
        match &self.get(dir)?.node {
            Node::Dir { cur, .. } => Ok(cur),
            Node::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Res<&mut BTreeMap<OsString, u64>> {
        let i = self.get_mut(dir)?;
        i.mtime = SystemTime::now();
        i.ctime = i.mtime;
        match &mut i.node {
            Node::Dir { cur, .. } => Ok(cur),
            Node::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Res<u64> {
        self.entries(parent)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    /// A new file or directory named `name` in `parent` (not durable yet).
    fn make(&mut self, parent: u64, name: &OsStr, dir: bool, perm: u16, req: &Request) -> Res<u64> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let node = if dir {
            Node::Dir { cur: Default::default(), dur: Default::default(), parent }
        } else {
            Node::File { cur: Default::default(), dur: Default::default() }
        };
        self.inodes.insert(ino, Inode::new(node, perm, req.uid(), req.gid()));
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        Ok(ino)
    }

    fn open(&mut self, ino: u64) -> Res<u64> {
        self.get_mut(ino)?.opens += 1;
        self.next_fh += 1;
        Ok(self.next_fh)
    }

    fn release(&mut self, ino: u64) {
        if let Ok(i) = self.get_mut(ino) {
            i.opens = i.opens.saturating_sub(1);
        }
        self.forget_if_unreachable(ino);
    }

    /// Drops what nothing can reach any more: a file with no name and no
    /// handle loses its current contents; with no durable name either, the
    /// inode goes (and a directory's hold on its durable entries with it).
    fn forget_if_unreachable(&mut self, ino: u64) {
        let Some(i) = self.inodes.get_mut(&ino) else { return };
        if ino == ROOT || i.links > 0 || i.opens > 0 {
            return;
        }
        if let Node::File { cur, .. } = &mut i.node {
            *cur = Content::default();
        }
        if i.durable_refs > 0 {
            return;
        }
        if let Some(Inode { node: Node::Dir { dur, .. }, .. }) = self.inodes.remove(&ino) {
            for child in dur.into_values() {
                if let Some(c) = self.inodes.get_mut(&child) {
                    c.durable_refs -= 1;
                }
                self.forget_if_unreachable(child);
            }
        }
    }

    /// Removes the entry `name` from `parent`: a file (`dir == false`) or an
    /// empty directory.
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        let ino = self.lookup(parent, name)?;
        let i = self.get(ino)?;
        match (&i.node, dir) {
            (Node::File { .. }, true) => return Err(Errno::ENOTDIR),
            (Node::Dir { .. }, false) => return Err(Errno::EISDIR),
            (Node::Dir { cur, .. }, true) if !cur.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(parent)?.remove(name);
        let i = self.get_mut(ino)?;
        i.links -= 1;
        i.ctime = SystemTime::now();
        self.forget_if_unreachable(ino);
        Ok(())
    }

    fn rename(&mut self, parent: u64, name: &OsStr, to: u64, to_name: &OsStr, flags: RenameFlags) -> Res<()> {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let ino = self.lookup(parent, name)?;
        self.entries(to)?;
        let moving_dir = self.get(ino)?.is_dir();
        if moving_dir {
            // Not into itself or below it.
            let mut at = to;
            while at != ROOT {
                if at == ino {
                    return Err(Errno::EINVAL);
                }
                at = match self.get(at)?.node {
                    Node::Dir { parent, .. } => parent,
                    Node::File { .. } => ROOT,
                };
            }
        }
        if let Ok(old) = self.lookup(to, to_name) {
            if old == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (&self.get(old)?.node, moving_dir) {
                (Node::Dir { .. }, false) => return Err(Errno::EISDIR),
                (Node::File { .. }, true) => return Err(Errno::ENOTDIR),
                (Node::Dir { cur, .. }, true) if !cur.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
            self.entries_mut(to)?.remove(to_name);
            self.get_mut(old)?.links -= 1;
            self.forget_if_unreachable(old);
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(to)?.insert(to_name.to_owned(), ino);
        let i = self.get_mut(ino)?;
        i.ctime = SystemTime::now();
        if let Node::Dir { parent, .. } = &mut i.node {
            *parent = to;
        }
        Ok(())
    }

    fn file_mut(&mut self, ino: u64) -> Res<&mut Content> {
        match &mut self.get_mut(ino)?.node {
            Node::File { cur, .. } => Ok(cur),
            Node::Dir { .. } => Err(Errno::EISDIR),
        }
    }

    fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Res<()> {
        self.file_mut(ino)?.write(offset, data);
        let i = self.get_mut(ino)?;
        i.mtime = SystemTime::now();
        i.ctime = i.mtime;
        Ok(())
    }

    fn set_len(&mut self, ino: u64, size: u64) -> Res<()> {
        self.file_mut(ino)?.set_len(size);
        let i = self.get_mut(ino)?;
        i.mtime = SystemTime::now();
        i.ctime = i.mtime;
        Ok(())
    }

    /// fsync, fdatasync: the file's contents and size become durable.
    fn sync_file(&mut self, ino: u64) -> Res<()> {
        self.file_syncs += 1;
        match &mut self.get_mut(ino)?.node {
            Node::File { cur, dur } => *dur = cur.clone(),
            Node::Dir { .. } => return self.sync_dir(ino),
        }
        Ok(())
    }

    /// fsync of a directory: its entries become durable (not its own name).
    fn sync_dir(&mut self, ino: u64) -> Res<()> {
        self.dir_syncs += 1;
        let (new, old) = match &mut self.get_mut(ino)?.node {
            Node::Dir { cur, dur, .. } => (cur.clone(), std::mem::replace(dur, cur.clone())),
            Node::File { .. } => return Err(Errno::ENOTDIR),
        };
        for child in new.values() {
            if let Some(c) = self.inodes.get_mut(child) {
                c.durable_refs += 1;
            }
        }
        for child in old.values() {
            if let Some(c) = self.inodes.get_mut(child) {
                c.durable_refs -= 1;
            }
            self.forget_if_unreachable(*child);
        }
        Ok(())
    }

    /// Every path below the root and its inode, following current (`durable
    /// == false`) or durable entries; each directory is listed once.
    fn paths(&self, durable: bool) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let mut seen = HashSet::from([ROOT]);
        let mut stack = vec![(String::new(), ROOT)];
        while let Some((path, ino)) = stack.pop() {
            let Some(Inode { node: Node::Dir { cur, dur, .. }, .. }) = self.inodes.get(&ino) else {
                continue;
            };
            for (name, child) in if durable { dur } else { cur } {
                let p = format!("{path}/{}", name.to_string_lossy());
                out.insert(p.clone(), *child);
                if seen.insert(*child) {
                    stack.push((p, *child));
                }
            }
        }
        out
    }

    /// Everything not durable is dropped: the tree becomes what the durable
    /// entries reach, each file with its durable contents.
    pub fn power_cut(&mut self) -> CutReport {
        let before = self.paths(false);
        let after = self.paths(true);
        let mut report = CutReport::default();
        for (path, ino) in &before {
            match after.get(path) {
                None => report.lost.push(path.clone()),
                Some(a) if a != ino => report.reverted.push(format!("{path}: another file")),
                Some(_) => {
                    if let Some(Inode { node: Node::File { cur, dur }, .. }) = self.inodes.get(ino) {
                        if !cur.same(dur) {
                            report.reverted.push(format!("{path}: {} -> {} bytes", cur.size, dur.size));
                        }
                    }
                }
            }
        }
        let reachable: HashSet<u64> = after.values().copied().chain([ROOT]).collect();
        self.inodes.retain(|ino, _| reachable.contains(ino));
        let mut names: Vec<(u64, u64)> = Vec::new(); // (child, dir)
        for (ino, i) in &mut self.inodes {
            i.opens = 0;
            i.links = 0;
            i.durable_refs = 0;
            match &mut i.node {
                Node::File { cur, dur } => *cur = dur.clone(),
                Node::Dir { cur, dur, .. } => {
                    *cur = dur.clone();
                    names.extend(dur.values().map(|c| (*c, *ino)));
                }
            }
        }
        for (child, dir) in names {
            let c = self.inodes.get_mut(&child).expect("reachable");
            c.links += 1;
            c.durable_refs += 1;
            if let Node::Dir { parent, .. } = &mut c.node {
                *parent = dir;
            }
        }
        let root = self.inodes.get_mut(&ROOT).expect("root");
        root.links = 1;
        root.durable_refs = 1;
        report
    }

    /// Bytes held in pages (current and durable copies, shared pages once).
    pub fn bytes_held(&self) -> u64 {
        let mut seen = HashSet::new();
        let mut n = 0;
        for i in self.inodes.values() {
            if let Node::File { cur, dur } = &i.node {
                for p in cur.pages.iter().chain(&dur.pages).flatten() {
                    if seen.insert(Arc::as_ptr(p)) {
                        n += PAGE as u64;
                    }
                }
            }
        }
        n
    }
}

/// The FUSE side: every call takes the state's lock for its whole length.
struct Ops(Arc<Mutex<State>>);

impl Ops {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

impl fuser::Filesystem for Ops {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.state();
        match s.lookup(parent.0, name).and_then(|ino| s.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        let result = (|| {
            if let Some(size) = size {
                s.set_len(ino.0, size)?;
            }
            let i = s.get_mut(ino.0)?;
            let when = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            if let Some(mode) = mode {
                i.perm = (mode & 0o7777) as u16;
            }
            i.uid = uid.unwrap_or(i.uid);
            i.gid = gid.unwrap_or(i.gid);
            i.atime = atime.map_or(i.atime, when);
            i.mtime = mtime.map_or(i.mtime, when);
            i.ctime = SystemTime::now();
            s.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut s = self.state();
        match s.make(parent.0, name, true, perm(mode, umask), req).and_then(|ino| s.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.state().rename(parent.0, name, newparent.0, newname, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.state();
        match s.get(ino.0).map(Inode::is_dir) {
            Ok(false) => match s.open(ino.0) {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(e),
            },
            Ok(true) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        let result = (|| {
            let ino = match s.lookup(parent.0, name) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Ok(ino) if s.get(ino)?.is_dir() => return Err(Errno::EISDIR),
                Ok(ino) => {
                    if flags & libc::O_TRUNC != 0 {
                        s.set_len(ino, 0)?;
                    }
                    ino
                }
                Err(_) => s.make(parent.0, name, false, perm(mode, umask), req)?,
            };
            let fh = s.open(ino)?;
            Ok((s.attr(ino)?, fh))
        })();
        match result {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match &self.state().get(ino.0).map(|i| &i.node) {
            Ok(Node::File { cur, .. }) => reply.data(&cur.read(offset, size as usize)),
            Ok(Node::Dir { .. }) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(*e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().write(ino.0, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().release(ino.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.state();
        if let Some(held) = &mut s.held {
            return held.push((ino.0, false, reply));
        }
        match s.sync_file(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().entries(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let s = self.state();
        let (entries, parent) = match s.get(ino.0).map(|i| &i.node) {
            Ok(Node::Dir { cur, parent, .. }) => (cur, *parent),
            Ok(Node::File { .. }) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let dots =
            [(ino.0, FileType::Directory, OsStr::new(".")), (parent, FileType::Directory, OsStr::new(".."))];
        let children = entries.iter().map(|(name, child)| {
            let dir = s.inodes.get(child).is_some_and(Inode::is_dir);
            (*child, if dir { FileType::Directory } else { FileType::RegularFile }, name.as_os_str())
        });
        for (n, (child, kind, name)) in dots.into_iter().chain(children).enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), n as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.state();
        if let Some(held) = &mut s.held {
            return held.push((ino.0, true, reply));
        }
        match s.sync_dir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.state();
        let used = s.bytes_held().div_ceil(BLOCK);
        let free = BLOCKS.saturating_sub(used);
        reply.statfs(
            BLOCKS,
            free,
            free,
            1 << 24,
            (1 << 24) - s.inodes.len() as u64,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.state().get(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut s = self.state();
        let result = s.file_mut(ino.0).map(|c| c.size).and_then(|size| {
            let end = offset + length;
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > size {
                s.set_len(ino.0, end)?;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// Panics, saying why, unless this process can mount FUSE filesystems.
pub fn require_fuse() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "power-cut tests mount a FUSE filesystem and need root (euid is {euid}); CI runs them as root"
    );
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        panic!("power-cut tests need /dev/fuse ({e}); load the fuse module or give the container the device");
    }
}

/// Syncs held by [`LazyFs::hold_syncs`], answered when this goes.
pub struct HeldSyncs<'a>(&'a LazyFs);

impl HeldSyncs<'_> {
    /// Answers the held syncs now; how many there were.
    pub fn resume(&self) -> usize {
        self.0.resume_syncs()
    }
}

impl Drop for HeldSyncs<'_> {
    fn drop(&mut self) {
        self.0.resume_syncs();
    }
}

/// A mounted LazyFS on a fresh temporary directory.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    _dir: tempfile::TempDir,
}

impl LazyFs {
    pub fn mount() -> LazyFs {
        require_fuse();
        let dir = tempfile::Builder::new().prefix("lazyfs").tempdir().unwrap();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let mut fs = LazyFs { state: Default::default(), mountpoint, session: None, _dir: dir };
        fs.attach();
        fs
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on every sync waits, unanswered, until [`HeldSyncs::resume`]
    /// or the guard is dropped: a disk that stops answering without an
    /// error. Drop the guard before the daemon: a process cannot finish
    /// exiting while one of its syncs waits.
    pub fn hold_syncs(&self) -> HeldSyncs<'_> {
        self.state().held.get_or_insert_with(Vec::new);
        HeldSyncs(self)
    }

    /// Carries out and answers the held syncs; later ones run at once again.
    /// Returns how many were held.
    fn resume_syncs(&self) -> usize {
        let mut s = self.state();
        let held = s.held.take().unwrap_or_default();
        let n = held.len();
        for (ino, dir, reply) in held {
            match if dir { s.sync_dir(ino) } else { s.sync_file(ino) } {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        }
        n
    }

    /// Drops everything that was not made durable. Nothing may have a file
    /// or directory open on the mount (kill whoever used it first).
    pub fn power_cut(&mut self) -> CutReport {
        self.detach().unwrap_or_else(|e| panic!("power cut: {e}"));
        let report = self.state().power_cut();
        self.attach();
        report
    }

    fn attach(&mut self) {
        let mut config = fuser::Config::default();
        config.mount_options = vec![MountOption::FSName("lazyfs".into()), MountOption::NoAtime];
        config.n_threads = Some(1);
        let session = fuser::spawn_mount(Ops(self.state.clone()), &self.mountpoint, &config)
            .unwrap_or_else(|e| panic!("cannot mount LazyFS on {}: {e}", self.mountpoint.display()));
        self.session = Some(session);
    }

    /// Unmounts and waits for the session to end; a mount still in use is
    /// retried for a few seconds, then reported with who holds it.
    fn detach(&mut self) -> Result<(), String> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // SAFETY: `path` is a valid C string.
            if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EBUSY) || Instant::now() > deadline {
                // Detach it anyway, so that the test does not leave a mount behind.
                // SAFETY: as above.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                return Err(format!(
                    "cannot unmount {}: {err}; still using it: {}",
                    self.mountpoint.display(),
                    holders(&self.mountpoint)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match session.join() {
            // After an unmount, reading /dev/fuse fails with ENODEV (the
            // session's normal end) or, if it raced the teardown, ECONNABORTED.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            r => r.map_err(|e| format!("LazyFS session ended badly: {e}")),
        }
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("LazyFS: {e}");
        }
    }
}

/// Processes with a file, directory or working directory under `path`.
fn holders(path: &Path) -> String {
    let mut out = Vec::new();
    for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = proc_dir.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let fds =
            std::fs::read_dir(proc_dir.path().join("fd")).into_iter().flatten().flatten().map(|f| f.path());
        let uses = fds
            .chain([proc_dir.path().join("cwd")])
            .filter_map(|l| std::fs::read_link(l).ok())
            .any(|target| target.starts_with(path));
        if uses {
            let comm = std::fs::read_to_string(proc_dir.path().join("comm")).unwrap_or_default();
            out.push(format!("{pid} ({})", comm.trim()));
        }
    }
    if out.is_empty() {
        "nobody found".into()
    } else {
        out.join(", ")
    }
}
