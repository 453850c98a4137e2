//! A connection to a receiver: send a transfer, wait for its verdict.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use sealpass_proto::fdpass::{self, ControlBuffer, TransportError};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::{DecodeError, EncodeError, Message, RejectReason, Transfer, codec, decode};

use crate::memfd::SealedSegment;

/// What the receiver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    #[error("connecting to the receiver failed: {0}")]
    Connect(#[source] TransportError),
    /// The transfer breaks a protocol rule.
    #[error("transfer cannot be encoded: {0}")]
    Encode(#[from] EncodeError),
    /// `sendmsg` failed: the receiver did not get the transfer.
    #[error("sending the transfer failed (not delivered): {0}")]
    Send(#[source] TransportError),
    /// The receiver closed the connection after the transfer was sent and
    /// before it answered: whether it consumed the transfer is unknown.
    #[error("receiver closed the connection before answering transfer {id}: delivery unknown")]
    DeliveryUnknown {
        /// The transfer's id.
        id: u64,
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
    #[error("reading the answer to transfer {id} failed: {source}")]
    Receive {
        /// The transfer's id.
        id: u64,
        /// The failure.
        source: TransportError,
    },
    /// The answer is not a valid message.
    #[error("answer to transfer {id} is not a valid message: {source}")]
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
}

/// The filler bytes a bare send carries: plain fd-passing receivers read a
/// fixed-size payload beside the fds.
pub const BARE_PAYLOAD_LEN: usize = 256;

/// Sends `segments` the way plain fd-passing programs do, for receivers that
/// speak no sealpass (compat mode): over `SOCK_STREAM`, with
/// [`BARE_PAYLOAD_LEN`] zero bytes and no header, and no answer awaited.
/// Each memfd's file offset is 0, so a receiver that `read()`s it gets the
/// bytes from the start.
pub fn send_bare(path: &Path, segments: &[SealedSegment]) -> Result<(), SendError> {
    let socket = fdpass::connect_stream(path).map_err(SendError::Connect)?;
    let fds: Vec<BorrowedFd<'_>> = segments.iter().map(SealedSegment::fd).collect();
    fdpass::send(socket.as_fd(), &[0; BARE_PAYLOAD_LEN], &fds).map_err(SendError::Send)
}

/// A connection to a receiver. Transfers go one at a time; ids count up from 1.
#[derive(Debug)]
pub struct Sender {
    socket: OwnedFd,
    next_id: u64,
    answer_timeout: Option<Duration>,
    outgoing: Vec<u8>,
    incoming: Vec<u8>,
    control: Box<ControlBuffer>,
}

impl Sender {
    /// Connects to the receiver listening at `path`.
    pub fn connect(path: &Path) -> Result<Sender, SendError> {
        fdpass::connect(path)
            .map(Sender::from_socket)
            .map_err(SendError::Connect)
    }

    /// Connects, retrying while the socket is absent or refuses connections
    /// (the receiver is starting), for at most `patience`.
    pub fn connect_with_retry(path: &Path, patience: Duration) -> Result<Sender, SendError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match fdpass::connect(path) {
                Ok(socket) => return Ok(Sender::from_socket(socket)),
                Err(error) => {
                    let retry = matches!(error.errno(), Some(Errno::ENOENT | Errno::ECONNREFUSED));
                    if !retry || std::time::Instant::now() >= deadline {
                        return Err(SendError::Connect(error));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn from_socket(socket: OwnedFd) -> Sender {
        Sender {
            socket,
            next_id: 1,
            answer_timeout: None,
            outgoing: Vec::new(),
            incoming: vec![0; MAX_MESSAGE_LEN],
            control: ControlBuffer::new(),
        }
    }

    /// How long to wait for each answer (`None`: forever, the default).
    pub fn set_answer_timeout(&mut self, timeout: Option<Duration>) -> Result<(), SendError> {
        fdpass::set_timeouts(self.socket.as_fd(), timeout, None).map_err(SendError::Connect)?;
        self.answer_timeout = timeout;
        Ok(())
    }

    /// The socket.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Sends `segments` as one transfer and waits for the receiver's verdict.
    pub fn send(&mut self, segments: &[SealedSegment]) -> Result<Verdict, SendError> {
        let id = self.next_id;
        let message = Message::Transfer(Transfer {
            id,
            segments: segments.iter().map(|s| s.declaration().clone()).collect(),
        });
        codec::encode_into(&message, &mut self.outgoing)?;
        let fds: Vec<BorrowedFd<'_>> = segments.iter().map(SealedSegment::fd).collect();
        fdpass::send(self.socket.as_fd(), &self.outgoing, &fds).map_err(SendError::Send)?;
        self.next_id += 1;
        self.await_verdict(id)
    }

    fn await_verdict(&mut self, id: u64) -> Result<Verdict, SendError> {
        let received =
            match fdpass::receive(self.socket.as_fd(), &mut self.incoming, &mut self.control) {
                Ok(received) => received,
                Err(TransportError::TimedOut { .. }) => {
                    return Err(SendError::AnswerTimedOut {
                        id,
                        timeout: self.answer_timeout.unwrap_or_default(),
                    });
                }
                Err(error) if error.errno() == Some(Errno::ECONNRESET) => {
                    return Err(SendError::DeliveryUnknown { id });
                }
                Err(source) => return Err(SendError::Receive { id, source }),
            };
        if received.is_end_of_stream() {
            return Err(SendError::DeliveryUnknown { id });
        }
        // Answers carry no fds; any that came are closed with `received`.
        let bytes = self.incoming.get(..received.len).unwrap_or_default();
        let answer = decode(bytes)
            .map_err(|source| SendError::BadAnswer { id, source })?
            .message;
        match answer {
            Message::Ack(ack) if ack.id == id => Ok(Verdict::Accepted { id }),
            Message::Reject(reject) if reject.id == id || reject.id == 0 => Ok(Verdict::Rejected {
                id: reject.id,
                reason: reject.reason,
                message: reject.message,
            }),
            other => Err(SendError::UnexpectedAnswer {
                id,
                kind: other.kind(),
                got_id: other.id(),
            }),
        }
    }
}
