//! A connection to a receiver: send a transfer, wait for its verdict.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sealpass_kernel::fdpass::{self, Op, ReceiveBatch, TransportError};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::metadata::Fields;
use sealpass_proto::{Message, codec, decode};

use crate::memfd::SealedSegment;
pub use crate::verdict::{SendError, Verdict};

/// How long [`Sender::connect_with_retry`] waits between attempts.
pub(crate) const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// Whether connecting failed because the receiver is not up yet (no socket,
/// or nobody accepting), which a retry waits out.
pub(crate) fn receiver_starting(error: &TransportError) -> bool {
    matches!(error.errno(), Some(Errno::ENOENT | Errno::ECONNREFUSED))
}

/// Whether a send failed because the receiver closed the connection (or
/// stopped reading): answers it sent before may still be queued.
pub(crate) fn closed_by_peer(error: &TransportError) -> bool {
    matches!(error.errno(), Some(Errno::EPIPE | Errno::ECONNRESET))
}

impl AsFd for Sender {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

pub(crate) fn connect_error(path: &Path, source: TransportError) -> SendError {
    SendError::Connect {
        path: path.to_owned(),
        source,
    }
}

/// A connection to a receiver. Ids count up from 1.
///
/// [`send`](Sender::send) hands over one transfer and waits for its
/// verdict. To keep several in flight on one connection,
/// [`submit`](Sender::submit) transfers and take their verdicts, oldest
/// first, with [`next_verdict`](Sender::next_verdict): the receiver answers
/// in order, so each answer is matched to the oldest unanswered id. While the
/// receiver's queue is full, `submit` reads answers as they come instead of
/// blocking, so sender and receiver never wait on each other.
///
/// When the receiver closes the connection, what it answered before still
/// counts: a send that meets `EPIPE` or a read that meets `ECONNRESET` reads
/// every answer still queued. A transfer refused before the receiver read
/// anything (`TooManyConnections`, `NotAllowed`, `Timeout`) gets that
/// `Reject`, id 0, as its verdict.
///
/// After an error other than a `Reject`, the connection's state is unknown:
/// drop the sender.
///
/// ```
/// use sealpass_sender::{Seals, SealedSegment, Sender, Verdict};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("doc.sock");
/// # let listener = sealpass_receiver::Listener::bind(&socket)?;
/// # let receiver = std::thread::spawn(move || -> Result<(), sealpass_receiver::ServeError> {
/// #     let mut connection = listener.accept()?;
/// #     while let Some(transfer) = connection.receive()? { transfer.accept()?; }
/// #     Ok(())
/// # });
/// let mut sender = Sender::connect(&socket)?;
/// // One at a time:
/// let first = SealedSegment::from_bytes("first", b"one", Seals::SENDER_DEFAULT)?;
/// assert_eq!(sender.send(&[first])?, Verdict::Accepted { id: 1 });
/// // Pipelined: 16 in flight, verdicts oldest first.
/// for n in 0..16 {
///     let frame = SealedSegment::filled(&format!("frame-{n}"), n, 4096, Seals::SENDER_DEFAULT)?;
///     sender.submit(&[frame])?;
/// }
/// let mut expected = 2;
/// while sender.in_flight() > 0 {
///     assert_eq!(sender.next_verdict()?, Verdict::Accepted { id: expected });
///     expected += 1;
/// }
/// # drop(sender);
/// # receiver.join().expect("receiver")?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Sender {
    socket: OwnedFd,
    answer_timeout: Option<Duration>,
    /// Answers read and not yet judged. Answers come in bursts (a receiver
    /// answers a batch at once): once more than one transfer is in flight,
    /// one `recvmmsg` takes what is queued, and each is judged when its turn
    /// comes, as if read then.
    answers: ReceiveBatch,
    pipeline: Pipeline,
}

/// The sender's protocol state without I/O: ids, the transfers in flight,
/// the answers read ahead, and the rules that match each answer to its
/// transfer. The blocking [`Sender`] and the async one drive it alike.
#[derive(Debug, Default)]
pub(crate) struct Pipeline {
    next_id: u64,
    outgoing: Vec<u8>,
    /// Sent, no answer read yet; oldest first.
    unanswered: VecDeque<u64>,
    /// Answers read while waiting to send, not yet taken; oldest first.
    answered: VecDeque<Verdict>,
}

impl Pipeline {
    pub(crate) fn new() -> Pipeline {
        Pipeline {
            next_id: 1,
            ..Pipeline::default()
        }
    }

    /// Transfers submitted whose verdict has not been taken yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.unanswered.len() + self.answered.len()
    }

    /// `send` waits for its own verdict: nothing else may be in flight.
    pub(crate) fn check_idle(&self) -> Result<(), SendError> {
        match self.in_flight() {
            0 => Ok(()),
            count => Err(SendError::VerdictsPending { count }),
        }
    }

    /// Encodes the next transfer of `segments`; returns its id. Nothing is
    /// in flight until [`Pipeline::sent`].
    pub(crate) fn encode(
        &mut self,
        segments: &[SealedSegment],
        metadata: &(impl Fields + ?Sized),
    ) -> Result<u64, SendError> {
        let id = self.next_id;
        codec::encode_transfer_into(
            id,
            segments.iter().map(SealedSegment::declaration),
            metadata.entries(),
            &mut self.outgoing,
        )?;
        Ok(id)
    }

    /// The encoded transfer.
    pub(crate) fn outgoing(&self) -> &[u8] {
        &self.outgoing
    }

    /// The encoded transfer `id` went out whole.
    pub(crate) fn sent(&mut self, id: u64) {
        self.next_id = id + 1;
        self.unanswered.push_back(id);
    }

    /// Whether any sent transfer awaits its answer on the wire.
    pub(crate) fn awaits_answers(&self) -> bool {
        !self.unanswered.is_empty()
    }

    /// How many sent transfers await their answer on the wire.
    pub(crate) fn awaiting(&self) -> usize {
        self.unanswered.len()
    }

    /// The sending of `id` failed with `error` and the receiver is gone or
    /// going; the caller then reads every answer still queued
    /// ([`Pipeline::on_answer`]) until the end. Afterwards,
    /// [`Pipeline::settle_unsent`] says whether one of them was for `id`.
    pub(crate) fn unsent_but_maybe_answered(&mut self, id: u64) {
        self.sent(id);
    }

    /// After reading what was queued: `Ok(id)` if the receiver answered the
    /// transfer that could not be sent (a refusal at connect), else the send
    /// error stands and `id` is not in flight.
    pub(crate) fn settle_unsent(
        &mut self,
        id: u64,
        error: TransportError,
    ) -> Result<u64, SendError> {
        if self.unanswered.back() == Some(&id) {
            self.unanswered.pop_back();
            return Err(SendError::Send(error));
        }
        Ok(id)
    }

    /// The next verdict already read, if any.
    pub(crate) fn take_answered(&mut self) -> Option<Verdict> {
        self.answered.pop_front()
    }

    /// Keeps a verdict read ahead, for a later `next_verdict`.
    pub(crate) fn keep_answered(&mut self, verdict: Verdict) {
        self.answered.push_back(verdict);
    }

    /// `next_verdict` with nothing in flight.
    pub(crate) fn nothing_in_flight(&self) -> Option<SendError> {
        (self.in_flight() == 0).then_some(SendError::NothingInFlight)
    }

    /// The transfer the next answer belongs to (0 if none).
    pub(crate) fn oldest(&self) -> u64 {
        self.unanswered.front().copied().unwrap_or(0)
    }

    /// The connection ended before the oldest transfer's answer came.
    pub(crate) fn delivery_unknown(&self) -> SendError {
        SendError::DeliveryUnknown {
            id: self.oldest(),
            in_flight: self.unanswered.len(),
        }
    }

    /// Judges one answer read from the wire: it belongs to the oldest
    /// unanswered transfer, and an `Ack` must name it; a `Reject` names it or
    /// 0 (PROTOCOL.md section 4.1). Anything else is a protocol error.
    pub(crate) fn on_answer(&mut self, bytes: &[u8]) -> Result<Verdict, SendError> {
        let id = self.oldest();
        let answer = decode(bytes)
            .map_err(|source| SendError::BadAnswer { id, source })?
            .message;
        // With nothing in flight no answer is owed: an `Ack` or `Reject` of
        // id 0 would otherwise match the "oldest" of none.
        if self.unanswered.is_empty() {
            return Err(SendError::UnexpectedAnswer {
                id,
                kind: answer.kind(),
                got_id: answer.id(),
            });
        }
        let verdict = match answer {
            Message::Ack(ack) if ack.id == id => Verdict::Accepted { id },
            Message::Reject(reject) if reject.id == id || reject.id == 0 => Verdict::Rejected {
                id: reject.id,
                reason: reject.reason,
                message: reject.message,
            },
            other => {
                return Err(SendError::UnexpectedAnswer {
                    id,
                    kind: other.kind(),
                    got_id: other.id(),
                });
            }
        };
        self.unanswered.pop_front();
        Ok(verdict)
    }
}

/// The buffer a new sender reads its answers into: one at a time, as a
/// sender with one transfer in flight gets them.
pub(crate) fn answer_buffer() -> ReceiveBatch {
    ReceiveBatch::single(MAX_MESSAGE_LEN)
}

/// Before reading answers: a sender with more than one transfer awaiting
/// its answer may get them in a burst (a receiver answers a batch at once),
/// so from then on it reads as many as one receiver's batch per call,
/// within this process's fd limit (an answer may carry fds, which are
/// closed). Called only when none read is left untaken.
pub(crate) fn widen_for_bursts(answers: &mut ReceiveBatch, pipeline: &Pipeline) {
    if answers.slots() == 1 && answers.untaken() == 0 && pipeline.awaiting() > 1 {
        *answers = ReceiveBatch::new(fdpass::batch_slots(), MAX_MESSAGE_LEN);
    }
}

/// Judges the next answer of `answers` for `pipeline`, as if it were read
/// from the socket now: `None` if none is left. Any fds it carried are
/// closed; the end of the stream is "delivery unknown".
pub(crate) fn judge_next_answer(
    answers: &mut ReceiveBatch,
    pipeline: &mut Pipeline,
) -> Option<Result<Verdict, SendError>> {
    let (received, bytes) = answers.take_next()?;
    if received.is_end_of_stream() {
        return Some(Err(pipeline.delivery_unknown()));
    }
    // Answers carry no fds; any that came are closed with `received`.
    Some(pipeline.on_answer(bytes))
}

impl Sender {
    /// Connects to the receiver listening at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Sender, SendError> {
        let path = path.as_ref();
        fdpass::connect(path)
            .map(Sender::from_socket)
            .map_err(|source| connect_error(path, source))
    }

    /// Connects, retrying while the socket is absent or refuses connections
    /// (the receiver is starting), for at most `patience`.
    pub fn connect_with_retry(
        path: impl AsRef<Path>,
        patience: Duration,
    ) -> Result<Sender, SendError> {
        let path = path.as_ref();
        let deadline = std::time::Instant::now() + patience;
        loop {
            match fdpass::connect(path) {
                Ok(socket) => return Ok(Sender::from_socket(socket)),
                Err(error) => {
                    if !receiver_starting(&error) || std::time::Instant::now() >= deadline {
                        return Err(connect_error(path, error));
                    }
                    std::thread::sleep(CONNECT_RETRY);
                }
            }
        }
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn from_socket(socket: OwnedFd) -> Sender {
        Sender {
            socket,
            answer_timeout: None,
            answers: answer_buffer(),
            pipeline: Pipeline::new(),
        }
    }

    /// How long to wait for each answer (`None`: forever, the default); also
    /// how long [`submit`](Sender::submit) waits for room in the receiver's
    /// queue.
    pub fn set_answer_timeout(&mut self, timeout: Option<Duration>) -> Result<(), SendError> {
        fdpass::set_timeouts(self.socket.as_fd(), timeout, None).map_err(SendError::SetTimeout)?;
        self.answer_timeout = timeout;
        Ok(())
    }

    /// Transfers submitted whose verdict has not been taken yet.
    pub fn in_flight(&self) -> usize {
        self.pipeline.in_flight()
    }

    /// Sends `segments` as one transfer and waits for the receiver's verdict.
    /// Nothing may be in flight: take earlier verdicts first.
    pub fn send(&mut self, segments: &[SealedSegment]) -> Result<Verdict, SendError> {
        self.send_with(segments, &())
    }

    /// [`Sender::send`] with the application's own fields (protocol 1.1):
    /// a [`Metadata`](crate::Metadata), or borrowed pairs such as
    /// `&[("frame", b"42")]`, each value copied once, into the message.
    /// `segments` may be empty when there is metadata: small data then
    /// travels without a memfd. A 1.0 receiver ignores the metadata of a
    /// transfer that has segments, and the sender cannot tell; it refuses
    /// one without segments (PROTOCOL.md section 8).
    pub fn send_with(
        &mut self,
        segments: &[SealedSegment],
        metadata: &(impl Fields + ?Sized),
    ) -> Result<Verdict, SendError> {
        self.pipeline.check_idle()?;
        self.submit_with(segments, metadata)?;
        self.next_verdict()
    }

    /// Sends `segments` as one transfer without waiting for its verdict and
    /// returns its id. Once sent, the fds are the receiver's to keep or
    /// close; the segments may be dropped. The caller bounds how many it
    /// keeps in flight (the kernel also caps fds in flight per user).
    pub fn submit(&mut self, segments: &[SealedSegment]) -> Result<u64, SendError> {
        self.submit_with(segments, &())
    }

    /// [`Sender::submit`] with metadata, as [`Sender::send_with`] takes it.
    pub fn submit_with(
        &mut self,
        segments: &[SealedSegment],
        metadata: &(impl Fields + ?Sized),
    ) -> Result<u64, SendError> {
        let id = self.pipeline.encode(segments, metadata)?;
        match self.send_encoded(segments) {
            Ok(()) => {
                self.pipeline.sent(id);
                Ok(id)
            }
            Err(SendError::Send(error)) if closed_by_peer(&error) => {
                // The receiver is gone or going, and it may have said why
                // before it closed (a Reject at connect, a timeout): what it
                // sent is still queued here. Read every answer up to its
                // end; if one answers this transfer, that is its verdict.
                self.pipeline.unsent_but_maybe_answered(id);
                self.read_queued_answers();
                self.pipeline.settle_unsent(id, error)
            }
            Err(error) => Err(error),
        }
    }

    /// Sends the encoded transfer with the fds of `segments`, reading
    /// answers while the receiver's queue is full.
    fn send_encoded(&mut self, segments: &[SealedSegment]) -> Result<(), SendError> {
        loop {
            let fds = segments.iter().map(SealedSegment::fd);
            if !self.pipeline.awaits_answers() {
                // Nothing to read meanwhile: a plain blocking send.
                return fdpass::send_each(self.socket.as_fd(), self.pipeline.outgoing(), fds)
                    .map_err(SendError::Send);
            }
            if fdpass::try_send_each(self.socket.as_fd(), self.pipeline.outgoing(), fds)
                .map_err(SendError::Send)?
            {
                return Ok(());
            }
            // The receiver's queue is full; it may be blocked answering us.
            self.wait_for_room_or_answer()?;
        }
    }

    /// After the receiver closed (or stopped reading): reads the answers it
    /// sent before that, until its end of the connection or an error.
    fn read_queued_answers(&mut self) {
        while self.pipeline.awaits_answers() {
            match self.read_answer() {
                Ok(verdict) => self.pipeline.keep_answered(verdict),
                Err(_) => break,
            }
        }
    }

    /// The verdict on the oldest transfer in flight, waiting for it if it has
    /// not come yet.
    pub fn next_verdict(&mut self) -> Result<Verdict, SendError> {
        if let Some(verdict) = self.pipeline.take_answered() {
            return Ok(verdict);
        }
        if let Some(error) = self.pipeline.nothing_in_flight() {
            return Err(error);
        }
        self.read_answer()
    }

    /// [`Sender::next_verdict`], waiting at most `limit`: `Ok(None)` when no
    /// answer came within it, and the transfer is still in flight. A caller
    /// that must stay responsive (to a signal, a stop flag) waits in slices.
    pub fn next_verdict_within(&mut self, limit: Duration) -> Result<Option<Verdict>, SendError> {
        if let Some(verdict) = self.pipeline.take_answered() {
            return Ok(Some(verdict));
        }
        if let Some(error) = self.pipeline.nothing_in_flight() {
            return Err(error);
        }
        if self.answers.untaken() > 0 {
            return self.read_answer().map(Some);
        }
        let timeout = PollTimeout::try_from(limit).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            // A signal: the caller decides whether to wait again.
            Ok(0) | Err(Errno::EINTR) => Ok(None),
            Err(errno) => Err(SendError::Receive {
                id: self.pipeline.oldest(),
                source: TransportError::Sys {
                    op: Op::Poll,
                    errno,
                },
            }),
            // An answer, or the end of the connection: reading says which.
            Ok(_) => self.read_answer().map(Some),
        }
    }

    /// Waits until the socket takes another message or an answer arrives;
    /// reads the answer if one did.
    fn wait_for_room_or_answer(&mut self) -> Result<(), SendError> {
        if self.answers.untaken() > 0 {
            // Answers already read come first; the socket is polled once
            // they are taken.
            let verdict = self.read_answer()?;
            self.pipeline.keep_answered(verdict);
            return Ok(());
        }
        let timeout = match self.answer_timeout {
            None => PollTimeout::NONE,
            Some(timeout) => PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(
            self.socket.as_fd(),
            PollFlags::POLLIN | PollFlags::POLLOUT,
        )];
        let ready = loop {
            match poll(&mut fds, timeout) {
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    return Err(SendError::Send(TransportError::Sys {
                        op: Op::Poll,
                        errno,
                    }));
                }
                Ok(0) => {
                    return Err(SendError::Send(TransportError::TimedOut { op: Op::Send }));
                }
                Ok(_) => break fds[0].revents().unwrap_or(PollFlags::empty()),
            }
        };
        if ready.contains(PollFlags::POLLIN) {
            let verdict = self.read_answer()?;
            self.pipeline.keep_answered(verdict);
        }
        // POLLOUT, or POLLHUP/POLLERR: the next send says which.
        Ok(())
    }

    /// Reads one answer, the oldest unanswered transfer's: the next of the
    /// last batch, or else what one `recvmmsg` brings (waiting for the
    /// first, at most the answer timeout).
    fn read_answer(&mut self) -> Result<Verdict, SendError> {
        let id = self.pipeline.oldest();
        if self.answers.untaken() == 0 {
            widen_for_bursts(&mut self.answers, &self.pipeline);
            // ECONNRESET says the receiver closed with our messages unread;
            // the kernel reports it once, and what the receiver sent before
            // closing is still queued behind it, so read again.
            let mut resets = 0;
            loop {
                match fdpass::receive_batch(self.socket.as_fd(), &mut self.answers) {
                    Ok(_) => break,
                    Err(TransportError::TimedOut { .. }) => {
                        return Err(SendError::AnswerTimedOut {
                            id,
                            timeout: self.answer_timeout.unwrap_or_default(),
                        });
                    }
                    Err(error) if error.errno() == Some(Errno::ECONNRESET) && resets == 0 => {
                        resets += 1;
                    }
                    Err(error) if error.errno() == Some(Errno::ECONNRESET) => {
                        return Err(self.pipeline.delivery_unknown());
                    }
                    Err(source) => return Err(SendError::Receive { id, source }),
                }
            }
        }
        judge_next_answer(&mut self.answers, &mut self.pipeline)
            .unwrap_or_else(|| Err(self.pipeline.delivery_unknown()))
    }
}
