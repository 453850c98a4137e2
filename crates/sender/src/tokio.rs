//! The sender on tokio (feature `tokio`): the same protocol state as the
//! blocking [`crate::Sender`] (the crate's `Pipeline`: ids, transfers in
//! flight, how an answer is matched), driven by the runtime's reactor
//! through [`AsyncFd`] on a non-blocking socket. tokio cannot pass fds or
//! speak `SOCK_SEQPACKET` itself; the `sendmsg`/`recvmsg` calls are
//! `sealpass_kernel::fdpass`'s, made only when the socket is ready.
//!
//! Cancellation: every future here may be dropped at any `.await`. A
//! transfer is sent whole by one `sendmsg` or not at all (`SOCK_SEQPACKET`
//! keeps records whole), and it counts as in flight from the same poll in
//! which that call succeeded. So a dropped [`Sender::submit`] or
//! [`Sender::send`] either sent its transfer (its verdict is then the next
//! [`Sender::next_verdict`]'s) or did not send it at all; a dropped
//! [`Sender::next_verdict`] consumed no answer. The connection stays usable.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use sealpass_kernel::fdpass::{self, ReceiveBatch, TransportError};
use sealpass_proto::metadata::Fields;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::client::{
    CONNECT_RETRY, Pipeline, SendError, Verdict, answer_buffer, closed_by_peer, connect_error,
    judge_next_answer, receiver_starting, widen_for_bursts,
};
use crate::memfd::SealedSegment;

/// A connection to a receiver, on tokio. Ids count up from 1; verdicts come
/// oldest first, as with the blocking [`crate::Sender`].
///
/// ```
/// use sealpass_sender::{Seals, SealedSegment, Verdict};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("doc.sock");
/// # let listener = sealpass_receiver::Listener::bind(&socket)?;
/// # let receiver = std::thread::spawn(move || -> Result<(), sealpass_receiver::ServeError> {
/// #     let mut connection = listener.accept()?;
/// #     while let Some(transfer) = connection.receive()? { transfer.accept()?; }
/// #     Ok(())
/// # });
/// let mut sender = sealpass_sender::tokio::Sender::connect(&socket).await?;
/// let frame = SealedSegment::from_bytes("frame", &[0x80; 4096], Seals::SENDER_DEFAULT)?;
/// assert_eq!(sender.send(&[frame]).await?, Verdict::Accepted { id: 1 });
/// // Pipelined: submit many, take the verdicts oldest first.
/// for n in 0..8 {
///     sender.submit(&[SealedSegment::filled("tile", n, 4096, Seals::SENDER_DEFAULT)?]).await?;
/// }
/// while sender.in_flight() > 0 {
///     assert!(sender.next_verdict().await?.is_accepted());
/// }
/// # drop(sender);
/// # receiver.join().expect("receiver")?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Sender {
    socket: AsyncFd<OwnedFd>,
    answer_timeout: Option<Duration>,
    /// Answers read by one `recvmmsg`, each judged when its turn comes, as
    /// the blocking sender does.
    answers: ReceiveBatch,
    pipeline: Pipeline,
}

/// What one read of the socket brought.
enum Read {
    Verdict(Verdict),
    Nothing,
}

impl Sender {
    /// Connects to the receiver listening at `path`. The `connect` call runs
    /// on the blocking pool: a unix socket's connect waits while the
    /// receiver's backlog is full.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Sender, SendError> {
        let path = path.as_ref().to_owned();
        let socket = connect_blocking(path.clone()).await?;
        Sender::from_socket(socket).map_err(|source| connect_error(&path, source))
    }

    /// Connects, retrying while the socket is absent or refuses connections
    /// (the receiver is starting), for at most `patience`.
    pub async fn connect_with_retry(
        path: impl AsRef<Path>,
        patience: Duration,
    ) -> Result<Sender, SendError> {
        let path = path.as_ref().to_owned();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match connect_blocking(path.clone()).await {
                Ok(socket) => {
                    return Sender::from_socket(socket).map_err(|e| connect_error(&path, e));
                }
                Err(SendError::Connect { source, .. })
                    if receiver_starting(&source) && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket, making it non-blocking and
    /// registering it with the runtime (call it within one).
    pub fn from_socket(socket: OwnedFd) -> Result<Sender, TransportError> {
        fdpass::set_nonblocking(socket.as_fd())?;
        let socket = register(socket).map_err(|error| io_to_transport(&error, fdpass::Op::Poll))?;
        Ok(Sender {
            socket,
            answer_timeout: None,
            answers: answer_buffer(),
            pipeline: Pipeline::new(),
        })
    }

    /// How long to wait for each answer (`None`: forever, the default); also
    /// how long [`Sender::submit`] waits for room in the receiver's queue.
    /// The same signature as the blocking sender's, which sets socket
    /// options and can fail; this one waits on the runtime's timer and
    /// always returns `Ok`.
    pub fn set_answer_timeout(&mut self, timeout: Option<Duration>) -> Result<(), SendError> {
        self.answer_timeout = timeout;
        Ok(())
    }

    /// Transfers submitted whose verdict has not been taken yet.
    pub fn in_flight(&self) -> usize {
        self.pipeline.in_flight()
    }

    /// Sends `segments` as one transfer and waits for the receiver's verdict.
    /// Nothing may be in flight: take earlier verdicts first.
    pub async fn send(&mut self, segments: &[SealedSegment]) -> Result<Verdict, SendError> {
        self.send_with(segments, &()).await
    }

    /// [`Sender::send`] with metadata, as the blocking
    /// [`Sender::send_with`](crate::Sender::send_with) takes it.
    pub async fn send_with(
        &mut self,
        segments: &[SealedSegment],
        metadata: &(impl Fields + ?Sized),
    ) -> Result<Verdict, SendError> {
        self.pipeline.check_idle()?;
        self.submit_with(segments, metadata).await?;
        self.next_verdict().await
    }

    /// Sends `segments` as one transfer without waiting for its verdict and
    /// returns its id. While the receiver's queue is full it reads answers
    /// (kept for [`Sender::next_verdict`]), so the two sides never wait on
    /// each other.
    pub async fn submit(&mut self, segments: &[SealedSegment]) -> Result<u64, SendError> {
        self.submit_with(segments, &()).await
    }

    /// [`Sender::submit`] with metadata.
    pub async fn submit_with(
        &mut self,
        segments: &[SealedSegment],
        metadata: &(impl Fields + ?Sized),
    ) -> Result<u64, SendError> {
        let id = self.pipeline.encode(segments, metadata)?;
        let sent = match self.answer_timeout {
            Some(timeout) => tokio::time::timeout(timeout, self.send_encoded(segments))
                .await
                .unwrap_or(Err(SendError::Send(TransportError::TimedOut {
                    op: fdpass::Op::Send,
                }))),
            None => self.send_encoded(segments).await,
        };
        match sent {
            Ok(()) => {
                self.pipeline.sent(id);
                Ok(id)
            }
            Err(SendError::Send(error)) if closed_by_peer(&error) => {
                // As the blocking sender does: what the receiver answered
                // before it closed is still queued here.
                self.pipeline.unsent_but_maybe_answered(id);
                self.read_queued_answers().await;
                self.pipeline.settle_unsent(id, error)
            }
            Err(error) => Err(error),
        }
    }

    /// The verdict on the oldest transfer in flight, waiting for it if it has
    /// not come yet.
    pub async fn next_verdict(&mut self) -> Result<Verdict, SendError> {
        if let Some(verdict) = self.pipeline.take_answered() {
            return Ok(verdict);
        }
        if let Some(error) = self.pipeline.nothing_in_flight() {
            return Err(error);
        }
        let id = self.pipeline.oldest();
        match self.answer_timeout {
            Some(timeout) => tokio::time::timeout(timeout, self.read_answer())
                .await
                .unwrap_or(Err(SendError::AnswerTimedOut { id, timeout })),
            None => self.read_answer().await,
        }
    }

    /// Sends the encoded transfer once the socket takes it, reading answers
    /// meanwhile if any are due.
    async fn send_encoded(&mut self, segments: &[SealedSegment]) -> Result<(), SendError> {
        let Sender {
            socket,
            answers,
            pipeline,
            ..
        } = self;
        loop {
            let reading = pipeline.awaits_answers();
            let interest = if reading {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::WRITABLE
            };
            let mut ready = socket
                .ready(interest)
                .await
                .map_err(|error| SendError::Send(io_to_transport(&error, fdpass::Op::Poll)))?;
            if ready.ready().is_writable() {
                let fds = segments.iter().map(SealedSegment::fd);
                match fdpass::try_send_each(socket.get_ref().as_fd(), pipeline.outgoing(), fds) {
                    Ok(true) => return Ok(()),
                    // Readiness is cleared only once a call found none.
                    Ok(false) => ready.clear_ready_matching(::tokio::io::Ready::WRITABLE),
                    Err(error) => return Err(SendError::Send(error)),
                }
            }
            if reading && ready.ready().is_readable() {
                match try_read_answer(socket, answers, pipeline)? {
                    Read::Verdict(verdict) => pipeline.keep_answered(verdict),
                    Read::Nothing => ready.clear_ready_matching(::tokio::io::Ready::READABLE),
                }
            }
        }
    }

    /// After the receiver closed: reads what it sent before, to the end.
    async fn read_queued_answers(&mut self) {
        while self.pipeline.awaits_answers() {
            match self.read_answer().await {
                Ok(verdict) => self.pipeline.keep_answered(verdict),
                Err(_) => break,
            }
        }
    }

    /// Waits for and reads one answer, the oldest unanswered transfer's.
    async fn read_answer(&mut self) -> Result<Verdict, SendError> {
        let Sender {
            socket,
            answers,
            pipeline,
            ..
        } = self;
        // Answers already read come first: no readiness would announce them.
        if let Some(verdict) = judge_next_answer(answers, pipeline) {
            return verdict;
        }
        loop {
            let mut ready = socket
                .readable()
                .await
                .map_err(|error| SendError::Receive {
                    id: pipeline.oldest(),
                    source: io_to_transport(&error, fdpass::Op::Poll),
                })?;
            match try_read_answer(socket, answers, pipeline)? {
                Read::Verdict(verdict) => return Ok(verdict),
                // Cleared only once a read found nothing: answers queued
                // behind this one raise no new readiness edge.
                Read::Nothing => ready.clear_ready(),
            }
        }
    }
}

/// Reads one answer if one is queued, without waiting: the next of the
/// last batch, or else what one `recvmmsg` brings. Follows the rules the
/// blocking sender follows: after `ECONNRESET` read again; the end of the
/// stream is "delivery unknown".
fn try_read_answer(
    socket: &AsyncFd<OwnedFd>,
    answers: &mut ReceiveBatch,
    pipeline: &mut Pipeline,
) -> Result<Read, SendError> {
    if answers.untaken() == 0 {
        widen_for_bursts(answers, pipeline);
        let mut resets = 0;
        loop {
            match fdpass::try_receive_batch(socket.get_ref().as_fd(), answers) {
                Ok(Some(_)) => break,
                Ok(None) => return Ok(Read::Nothing),
                Err(error) if error.errno() == Some(Errno::ECONNRESET) && resets == 0 => {
                    resets += 1;
                }
                Err(error) if error.errno() == Some(Errno::ECONNRESET) => {
                    return Err(pipeline.delivery_unknown());
                }
                Err(source) => {
                    return Err(SendError::Receive {
                        id: pipeline.oldest(),
                        source,
                    });
                }
            }
        }
    }
    match judge_next_answer(answers, pipeline) {
        Some(verdict) => verdict.map(Read::Verdict),
        None => Ok(Read::Nothing),
    }
}

impl AsFd for Sender {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.get_ref().as_fd()
    }
}

/// Connects on the blocking pool (a unix connect waits while the backlog is
/// full); returns the connected socket.
async fn connect_blocking(path: std::path::PathBuf) -> Result<OwnedFd, SendError> {
    let attempt = path.clone();
    tokio::task::spawn_blocking(move || fdpass::connect(&attempt))
        .await
        .map_err(|_| {
            connect_error(
                &path,
                TransportError::Sys {
                    op: fdpass::Op::Connect,
                    errno: Errno::EINTR,
                },
            )
        })?
        .map_err(|source| connect_error(&path, source))
}

fn io_to_transport(error: &std::io::Error, op: fdpass::Op) -> TransportError {
    TransportError::Sys {
        op,
        errno: error.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
    }
}

/// Registers `socket` with the runtime's reactor, for reading and writing.
#[allow(unsafe_code)]
fn register(socket: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `register_with_interest` asks that the fd stay open and the same
    // for the AsyncFd's life. It owns the `OwnedFd`, which closes the fd only
    // when dropped (after deregistration) and always returns the same fd.
    unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE | Interest::WRITABLE) }
        .map_err(std::io::Error::from)
}

/// [`crate::fan_out`] on tokio: one set of sealed segments to many
/// receivers, one connection each, all transfers first, then each verdict
/// on its own, none waited for past `patience` (on the runtime's timer).
pub async fn fan_out<'p, P: AsRef<Path>>(
    sockets: &'p [P],
    segments: &[SealedSegment],
    metadata: &(impl Fields + ?Sized),
    patience: Duration,
) -> Vec<crate::FanOutVerdict<'p>> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut sent = Vec::with_capacity(sockets.len());
    for socket in sockets {
        let submitted = tokio::time::timeout_at(deadline, async {
            let mut sender = Sender::connect(socket).await?;
            sender.submit_with(segments, metadata).await?;
            Ok::<Sender, SendError>(sender)
        })
        .await
        .unwrap_or(Err(SendError::Send(TransportError::TimedOut {
            op: fdpass::Op::Send,
        })));
        sent.push(submitted);
    }
    let mut verdicts = Vec::with_capacity(sockets.len());
    for (socket, sender) in sockets.iter().zip(sent) {
        let verdict = match sender {
            Ok(mut sender) => tokio::time::timeout_at(deadline, sender.next_verdict())
                .await
                .unwrap_or(Err(SendError::AnswerTimedOut {
                    id: 1,
                    timeout: patience,
                })),
            Err(error) => Err(error),
        };
        verdicts.push(crate::FanOutVerdict {
            socket: socket.as_ref(),
            verdict,
        });
    }
    verdicts
}
