//! A delivery's identity and state as every part of the daemon names them:
//! which event goes to which webhook ([`DeliveryKey`]), when it is due
//! ([`Due`], ordered as the store's due index), and where it stands
//! ([`Status`]).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    Pending,
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
    /// Waiting for its webhook, which a reload removed or disabled: not
    /// attempted, never given up on. It is due again if the webhook comes
    /// back; an operator may cancel it; retention prunes it like a final one.
    Held,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Pending,
        Status::Retrying,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
        Status::Held,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Retrying => "retrying",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Held => "held",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether no attempt will be made without an operator's redelivery.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }

    /// Whether nothing is attempted until something changes: final, or held.
    /// Retention prunes events whose deliveries are all settled.
    pub fn is_settled(self) -> bool {
        self.is_final() || self == Status::Held
    }

    /// Its position in per-status tables.
    pub fn index(self) -> usize {
        self as usize
    }
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
        Due { at_ms, key: DeliveryKey { seq: 0, webhook: Uuid::nil() } }
    }

    /// The smallest entry after this one in key order: a range bound.
    pub fn successor(self) -> Due {
        let w = u128::from_be_bytes(*self.key.webhook.as_bytes());
        let (webhook, carry) = w.overflowing_add(1);
        let (seq, carry) = if carry { self.key.seq.overflowing_add(1) } else { (self.key.seq, false) };
        let at_ms = if carry { self.at_ms + 1 } else { self.at_ms };
        Due { at_ms, key: DeliveryKey { seq, webhook: Uuid::from_bytes(webhook.to_be_bytes()) } }
    }
}
