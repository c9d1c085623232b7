//! The last hour, minute by minute: how many events were accepted and how
//! many deliveries ended delivered or failed, for the console's overview.
//!
//! Minutes are counted on a monotonic clock the caller reads (minutes
//! since the daemon started), so a step of the wall clock neither empties
//! nor doubles the hour. Kept in memory only: a restart starts it again.

/// Minutes kept: one hour.
pub const MINUTES: usize = 60;

/// What one minute saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    pub accepted: u64,
    pub delivered: u64,
    pub failed: u64,
}

/// Something to count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Accepted,
    Delivered,
    Failed,
}

/// A ring of [`MINUTES`] minutes; slot `m % MINUTES` holds minute `m` when
/// its tag says so, and is stale otherwise.
#[derive(Debug)]
pub struct Recent {
    slots: [(u64, Minute); MINUTES],
}

impl Default for Recent {
    fn default() -> Recent {
        // Tag u64::MAX: no minute yet.
        Recent { slots: [(u64::MAX, Minute::default()); MINUTES] }
    }
}

impl Recent {
    /// Counts `seen` in minute `minute`.
    pub fn add(&mut self, minute: u64, seen: Seen) {
        let (tag, m) = &mut self.slots[(minute % MINUTES as u64) as usize];
        if *tag != minute {
            *tag = minute;
            *m = Minute::default();
        }
        match seen {
            Seen::Accepted => m.accepted += 1,
            Seen::Delivered => m.delivered += 1,
            Seen::Failed => m.failed += 1,
        }
    }

    /// The hour up to and including minute `now`, oldest minute first
    /// (minutes before the first one counted are empty).
    pub fn hour(&self, now: u64) -> [Minute; MINUTES] {
        let mut out = [Minute::default(); MINUTES];
        for (i, slot) in out.iter_mut().enumerate() {
            let Some(minute) = (now + 1 + i as u64).checked_sub(MINUTES as u64) else { continue };
            let (tag, m) = self.slots[(minute % MINUTES as u64) as usize];
            if tag == minute {
                *slot = m;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_minute_and_age_out_after_an_hour() {
        let mut r = Recent::default();
        r.add(0, Seen::Accepted);
        r.add(0, Seen::Accepted);
        r.add(0, Seen::Delivered);
        r.add(59, Seen::Failed);
        let hour = r.hour(59);
        assert_eq!(hour[0], Minute { accepted: 2, delivered: 1, failed: 0 });
        assert_eq!(hour[59], Minute { accepted: 0, delivered: 0, failed: 1 });
        assert!(hour[1..59].iter().all(|m| *m == Minute::default()));
        // Early on, the minutes before the start are empty, the last is now.
        assert_eq!(r.hour(0)[59], hour[0]);
        assert_eq!(r.hour(0)[58], Minute::default());
        // Minute 60 takes minute 0's slot; minute 0 is out of the hour.
        r.add(60, Seen::Delivered);
        let hour = r.hour(60);
        assert_eq!(hour[58], Minute { accepted: 0, delivered: 0, failed: 1 });
        assert_eq!(hour[59], Minute { accepted: 0, delivered: 1, failed: 0 });
        assert_eq!(hour.iter().map(|m| m.accepted).sum::<u64>(), 0);
        // A quiet stretch longer than the hour leaves nothing.
        assert!(r.hour(200).iter().all(|m| *m == Minute::default()));
    }
}
