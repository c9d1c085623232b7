//! The integration tests, as one test binary with a module per area: one
//! compile and link of axum, tokio and ureq instead of one per file. Each
//! test starts the real daemon binary on loopback, with real HTTP
//! receivers and a real sled directory in a temp dir (see `common`);
//! `powercut` and `disk_full` need root (FUSE, tmpfs), which CI has.

mod common;
mod lazyfs;

mod console;
mod crash;
mod delivery;
mod disk_full;
mod egress;
mod faults;
mod health;
mod ingest;
mod operations;
mod powercut;
mod receiver_tools;
mod security;
mod storage;
mod systemd;
