//! Mapped bytes counted against limits: a connection's, and the one all of a
//! listener's connections share.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A count of mapped bytes against a limit, shared by whoever maps under it
/// (one connection, or every connection of a service).
#[derive(Debug)]
pub struct MappedBudget {
    limit: u64,
    in_use: AtomicU64,
}

impl MappedBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<MappedBudget> {
        Arc::new(MappedBudget {
            limit,
            in_use: AtomicU64::new(0),
        })
    }

    /// Bytes held right now.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes `bytes` from the budget until the reservation drops, or `None`
    /// if they do not fit.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        self.take(bytes)?;
        Some(Reservation {
            budgets: [Some(Arc::clone(self)), None],
            bytes,
        })
    }

    pub(crate) fn take(&self, bytes: u64) -> Option<()> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .ok()
            .map(drop)
    }

    pub(crate) fn give_back(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Bytes held from one or two [`MappedBudget`]s; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    pub(crate) budgets: [Option<Arc<MappedBudget>>; 2],
    pub(crate) bytes: u64,
}

impl Reservation {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Moves `bytes` of this reservation (at most all of it) into a new
    /// one, from the same budgets, so parts can be given back separately.
    pub fn split_off(&mut self, bytes: u64) -> Reservation {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Reservation {
            budgets: self.budgets.clone(),
            bytes,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for budget in self.budgets.iter().flatten() {
            budget.give_back(self.bytes);
        }
    }
}
