//! nexor-webhookd's pure core: what an event is and how it is enveloped
//! and signed, how a delivery is named and where it stands, which
//! addresses a webhook may not reach, what is attempted next and when, and
//! how time is written.
//!
//! Nothing here does I/O — no files, sockets, threads of its own or
//! runtime — so every rule in it is a plain function a unit test can call.
//! The crate's dependencies and its `clippy.toml` hold that line.

#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod delivery;
pub mod event;
pub mod lanes;
pub mod recent;
pub mod schedule;
pub mod sign;
pub mod target;
