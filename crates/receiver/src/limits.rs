//! What a receiver allows one peer, and all peers together.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sealpass_proto::limits::MAX_SEGMENTS;

/// Every limit of a receiving service. Each has a safe default and its own
/// reject reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; one more is refused with `TooManyConnections`.
    pub max_connections: usize,
    /// Segments per message, at most the protocol's 253; more is `TooManySegments`.
    pub max_segments: usize,
    /// Bytes one connection may hold mapped (one transfer's total); more is `MemoryLimit`.
    pub max_mapped_per_connection: u64,
    /// Bytes all connections together may hold mapped; more is `MemoryLimit`.
    pub max_mapped_total: u64,
    /// Time a new connection has to send its first complete message; then `Timeout`.
    pub first_message_deadline: Option<Duration>,
    /// Silence allowed between messages, and time an answer may wait for
    /// room in the peer's queue; then `Timeout`.
    pub idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 128,
            max_segments: MAX_SEGMENTS,
            max_mapped_per_connection: 8 << 30,
            max_mapped_total: 64 << 30,
            first_message_deadline: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// A count of mapped bytes shared by every connection of a service.
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

    /// Bytes mapped right now.
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
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .ok()?;
        Some(Reservation {
            budget: Arc::clone(self),
            bytes,
        })
    }
}

/// Bytes held from a [`MappedBudget`]; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MappedBudget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.in_use.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_given_back() {
        let budget = MappedBudget::new(100);
        let a = budget.reserve(60).unwrap();
        assert!(budget.reserve(41).is_none());
        let b = budget.reserve(40).unwrap();
        assert_eq!(budget.in_use(), 100);
        drop(a);
        assert_eq!(budget.in_use(), 40);
        drop(b);
        assert_eq!(budget.in_use(), 0);
        assert!(budget.reserve(u64::MAX).is_none());
    }
}
