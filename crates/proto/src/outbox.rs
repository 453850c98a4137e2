//! A session's answers on their way out: encoded in the order the messages
//! came, held back while a batch is served so they leave together, sent in
//! runs of at most [`MAX_BATCH`], and kept in order across partial sends.
//! The driver only moves the bytes:
//!
//! ```text
//! loop {
//!     let due = session.poll_send()?;          // encoded answers, in order
//!     if due.is_empty() { break }              // nothing due, or held
//!     match send(due) {                        // one sendmmsg
//!         Ok(count) => if !session.sent(count) { wait for room }
//!         Err(_) => { session.send_failed(); break }
//!     }
//! }
//! ```
#![forbid(unsafe_code)]

use std::ops::Range;

use crate::codec::{EncodeError, encode_into};
use crate::limits::MAX_BATCH;
use crate::session::Session;

/// An answer the session made could not be encoded. It never happens for
/// an answer this crate made (a bug), and ends the connection rather than
/// skip an answer.
#[derive(Debug, thiserror::Error)]
#[error("encoding the {answer} failed")]
pub struct UnencodableAnswer {
    /// `Ack` or `Reject`.
    pub answer: &'static str,
    /// Why.
    #[source]
    pub source: EncodeError,
}

/// The encoded answers of a session: reused buffers, of which `unsent` are
/// still to go out, in order.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    encoded: Vec<Vec<u8>>,
    /// `Ack` or `Reject`, for each of `encoded`.
    kinds: Vec<&'static str>,
    unsent: Range<usize>,
    /// While set, due answers wait: a batch is being served.
    held: bool,
}

impl Outbox {
    pub(crate) fn is_empty(&self) -> bool {
        self.unsent.is_empty()
    }

    /// Drops the unsent answers: the connection is over.
    pub(crate) fn clear(&mut self) {
        self.unsent = 0..0;
    }
}

impl Session {
    /// Holds every answer back until [`Session::release_answers`]: a driver
    /// serving messages it read together answers them together, waking the
    /// sender once. Answers stay in order meanwhile.
    pub fn hold_answers(&mut self) {
        self.outbox.held = true;
    }

    /// Ends [`Session::hold_answers`]; what is due goes out at the next
    /// [`Session::poll_send`].
    pub fn release_answers(&mut self) {
        self.outbox.held = false;
    }

    /// Whether answers are held back.
    pub fn answers_held(&self) -> bool {
        self.outbox.held
    }

    /// The answers to send now, encoded, in the order the messages came: at
    /// most [`MAX_BATCH`] (one `sendmmsg`), the rest of a run that went out
    /// in part first. Empty when nothing is due, while answers are held, or
    /// once the connection is closed. Report what was sent with
    /// [`Session::sent`] or [`Session::send_failed`], then ask again.
    pub fn poll_send(&mut self) -> Result<&[Vec<u8>], UnencodableAnswer> {
        if self.outbox.held {
            return Ok(&[]);
        }
        if self.outbox.unsent.is_empty() {
            self.encode_due()?;
        }
        let outbox = &self.outbox;
        Ok(outbox
            .encoded
            .get(outbox.unsent.clone())
            .unwrap_or_default())
    }

    /// `count` of the answers [`Session::poll_send`] gave went out, the
    /// first ones. Returns whether all of them did; if not, the peer had no
    /// room for the rest: wait until it has, then ask again (the rest comes
    /// first, in order).
    pub fn sent(&mut self, count: usize) -> bool {
        let unsent = &mut self.outbox.unsent;
        unsent.start = unsent.start.saturating_add(count).min(unsent.end);
        unsent.start >= unsent.end
    }

    /// Sending failed: the peer is gone or does not read. The connection is
    /// over; returns what was being sent (`Ack`, `Reject`, or `Ack or
    /// Reject`), for the error.
    pub fn send_failed(&mut self) -> &'static str {
        let answer = self.unsent_kind();
        self.abort();
        answer
    }

    /// Whether answers given to [`Session::poll_send`] did not all go out
    /// yet: they wait for room in the peer's queue.
    pub fn has_unsent(&self) -> bool {
        !self.outbox.unsent.is_empty()
    }

    /// Takes up to [`MAX_BATCH`] due answers and encodes them, reusing the
    /// buffers, as the next `unsent`.
    fn encode_due(&mut self) -> Result<(), UnencodableAnswer> {
        let mut count = 0;
        while count < MAX_BATCH {
            let Some(transmit) = self.poll_transmit() else {
                break;
            };
            let answer = transmit.message.kind();
            let outbox = &mut self.outbox;
            if outbox.encoded.len() <= count {
                outbox.encoded.push(Vec::new());
                outbox.kinds.push(answer);
            }
            if let (Some(buffer), Some(kind)) =
                (outbox.encoded.get_mut(count), outbox.kinds.get_mut(count))
            {
                if let Err(source) = encode_into(&transmit.message, buffer) {
                    self.abort();
                    return Err(UnencodableAnswer { answer, source });
                }
                *kind = answer;
                count += 1;
            }
        }
        self.outbox.unsent = 0..count;
        Ok(())
    }

    /// What the unsent answers are: `Ack`, `Reject`, or both.
    fn unsent_kind(&self) -> &'static str {
        let outbox = &self.outbox;
        let mut kinds = outbox
            .kinds
            .get(outbox.unsent.clone())
            .unwrap_or_default()
            .iter();
        let first = kinds.next().copied().unwrap_or("answer");
        if kinds.all(|kind| *kind == first) {
            first
        } else {
            "Ack or Reject"
        }
    }
}

#[cfg(test)]
#[path = "outbox_tests.rs"]
mod tests;
