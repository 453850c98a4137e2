//! What a send ends in: the receiver's verdict, or why there is none.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use sealpass_kernel::fdpass::TransportError;
use sealpass_proto::{DecodeError, EncodeError, RejectReason};

use crate::client::receiver_starting;

/// What the receiver answered. A `Rejected` verdict is no error of the
/// call: ignoring it would ignore a refusal, hence `#[must_use]`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "a Verdict may be a rejection"]
pub enum Verdict {
    /// `Ack`: every segment was verified and consumed.
    Accepted {
        /// The transfer's id.
        id: u64,
    },
    /// `Reject`: the receiver refused the transfer and closed its fds.
    Rejected {
        /// The transfer's id (0 if the receiver could not read it).
        id: u64,
        /// The reason code.
        reason: RejectReason,
        /// The receiver's explanation.
        message: String,
    },
}

impl Verdict {
    /// Whether the transfer was accepted.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Verdict::Accepted { .. })
    }
}

/// Why a send did not end in a verdict.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Connecting to the receiver failed.
    #[error("connecting to the receiver at {} failed", path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The failure.
        source: TransportError,
    },
    /// Setting the socket's answer timeout failed.
    #[error("setting the answer timeout failed")]
    SetTimeout(#[source] TransportError),
    /// Making a segment failed.
    #[error("making the segment failed")]
    Segment(#[from] crate::memfd::SegmentError),
    /// The transfer breaks a protocol rule.
    #[error("the transfer breaks a protocol rule")]
    Encode(#[from] EncodeError),
    /// `sendmsg` failed: the receiver did not get the transfer.
    #[error("sending the transfer failed (not delivered)")]
    Send(#[source] TransportError),
    /// The receiver closed the connection after the transfer was sent and
    /// before it answered: whether it consumed the transfer (and each later
    /// one in flight) is unknown.
    #[error(
        "receiver closed the connection before answering transfer {id} ({in_flight} in flight): delivery unknown"
    )]
    DeliveryUnknown {
        /// The oldest unanswered transfer's id.
        id: u64,
        /// Transfers sent and not answered, this one included.
        in_flight: usize,
    },
    /// No answer came within the answer timeout.
    #[error("no answer to transfer {id} within {timeout:?}: delivery unknown")]
    AnswerTimedOut {
        /// The transfer's id.
        id: u64,
        /// The timeout.
        timeout: Duration,
    },
    /// Reading the answer failed.
    #[error("reading the answer to transfer {id} failed")]
    Receive {
        /// The transfer's id.
        id: u64,
        /// The failure.
        source: TransportError,
    },
    /// The answer is not a valid message.
    #[error("the answer to transfer {id} is not a valid message")]
    BadAnswer {
        /// The transfer's id.
        id: u64,
        /// Why it does not decode.
        source: DecodeError,
    },
    /// The answer is valid but not an answer to this transfer.
    #[error("expected Ack or Reject for transfer {id}; got {kind} for id {got_id}")]
    UnexpectedAnswer {
        /// The transfer's id.
        id: u64,
        /// The message kind received.
        kind: &'static str,
        /// The id it carried.
        got_id: u64,
    },
    /// [`Sender::send`](crate::Sender::send) was called while submitted transfers await their
    /// verdicts; their answers would come first.
    #[error("{count} submitted transfers await their verdicts; take them with next_verdict first")]
    VerdictsPending {
        /// Transfers in flight.
        count: usize,
    },
    /// [`Sender::next_verdict`](crate::Sender::next_verdict) was called with no transfer in flight.
    #[error("no transfer in flight: nothing to wait for")]
    NothingInFlight,
}

impl SendError {
    /// Whether connecting failed because the receiver is not up yet (no
    /// socket, or nobody accepting): a retry may succeed.
    pub fn receiver_not_up(&self) -> bool {
        matches!(self, SendError::Connect { source, .. } if receiver_starting(source))
    }
}
