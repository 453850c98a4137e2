//! What both drivers share to take a message through the session: admission,
//! the three phases of judging (header, facts, delivery) with the system
//! calls between them, and answering a transfer by a handler's verdict.
#![forbid(unsafe_code)]

use std::fmt::Display;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use sealpass_kernel::fdpass::{self, PeerCredentials, ReceiveBatch, TransportError};
use sealpass_proto::session::{Datagram, Received, Unverified, Verified, admit, unknown_fd_facts};
use sealpass_proto::verify::FdFacts;
use sealpass_proto::{Config, Reject, RejectReason, Session};

use crate::listener::{Admission, AdmissionTicket, out_of_fds, refuse};
use crate::transfer::{IncomingTransfer, Responder, VerifiedSegment};
use crate::{inspect, mapping};

use super::link::AnswerHold;
use super::{Event, Link, Outcome, ServeError, Socket};

/// An admitted connection's parts, its session begun: what either driver
/// builds its link from.
pub(crate) struct Opened {
    pub(crate) socket: OwnedFd,
    pub(crate) session: Session,
    pub(crate) config: Arc<Config>,
    pub(crate) peer: PeerCredentials,
    pub(crate) admission: Option<AdmissionTicket>,
}

impl From<Admission> for Opened {
    fn from(admission: Admission) -> Opened {
        // Before the connection serves anything: the name checks read there.
        inspect::open_proc_fd_dir();
        Opened {
            session: Session::new(
                Arc::clone(&admission.config),
                admission.budget,
                Instant::now(),
            ),
            socket: admission.socket,
            config: admission.config,
            peer: admission.peer,
            admission: admission.ticket,
        }
    }
}

/// Admits a connection served on its own ([`Connection::new`]) under
/// `config`'s access rules: a peer they refuse is answered and closed.
pub(crate) fn admit_alone(socket: OwnedFd, config: Config) -> Result<Admission, ServeError> {
    let peer = fdpass::peer_credentials(socket.as_fd()).ok();
    match (admit(&config, peer.as_ref(), 0), peer) {
        (Ok(()), Some(peer)) => Ok(Admission {
            socket,
            peer,
            config: Arc::new(config),
            budget: None,
            ticket: None,
        }),
        (Err(reject), _) => {
            refuse(socket, &reject);
            Err(ServeError::Refused(reject))
        }
        (Ok(()), None) => {
            let reject = out_of_fds();
            refuse(socket, &reject);
            Err(ServeError::Refused(reject))
        }
    }
}

/// What a driver needs to take messages through the session, whatever it
/// waits with: the link, the buffers it reuses, the kernel-facts scratch.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) link: Arc<Link>,
    pub(crate) config: Arc<Config>,
    pub(crate) peer: PeerCredentials,
    /// The peer's pidfd (`SO_PEERPIDFD`, Linux 6.5+), shared with the
    /// transfers it delivers.
    pub(crate) peer_pidfd: Option<Arc<OwnedFd>>,
    // Reused from message to message, so serving one allocates only what the
    // transfer it delivers owns.
    pub(crate) spare_fds: Vec<OwnedFd>,
    pub(crate) spare_mappings: Vec<Option<mapping::Mapping>>,
    scratch: FdFacts,
    /// What the kernel said of each fd of the message being judged, asked
    /// before the session's lock is taken; reused from message to message.
    pub(crate) gathered: Gathered,
    /// The messages of the last `recvmmsg` (`serve_batch`), with its
    /// buffers; made by the first batch, or lent per batch by its driver.
    pub(crate) batch: Option<ReceiveBatch>,
    /// Messages refused on this connection so far (each answered with its
    /// reason), for an application that only sees the transfers.
    pub(crate) refused: u64,
    /// Where big mappings are released, off the async runtime's threads.
    #[cfg(feature = "tokio")]
    pub(crate) release: Option<tokio::runtime::Handle>,
}

impl Core {
    /// A core for `link`'s connection.
    pub(crate) fn new(link: Arc<Link>, config: Arc<Config>, peer: PeerCredentials) -> Core {
        let peer_pidfd = match fdpass::peer_pidfd(link.socket.fd()) {
            Ok(pidfd) => pidfd.map(Arc::new),
            Err(error) => {
                // Out of fds, or the peer is gone already: the credentials
                // still stand, and the connection is served without it.
                tracing::debug!("no pidfd for the peer: {error}");
                None
            }
        };
        Core {
            link,
            config,
            peer,
            peer_pidfd,
            spare_fds: Vec::new(),
            spare_mappings: Vec::new(),
            scratch: unknown_fd_facts(),
            gathered: Vec::new(),
            batch: None,
            refused: 0,
            #[cfg(feature = "tokio")]
            release: None,
        }
    }

    /// Whether more messages may come.
    pub(crate) fn is_open(&self) -> bool {
        self.link.lock().wants_to_read()
    }

    /// Bytes the connection's transfers hold mapped.
    /// Bytes mapped now; on a blocking socket, once the releases under way
    /// of transfers already answered are done, as a message judged now
    /// would count them.
    pub(crate) fn mapped(&self) -> u64 {
        if matches!(self.link.socket, Socket::Blocking(_)) {
            self.link.wait_released();
        }
        self.link.lock().mapped()
    }

    /// The deadline to wait to (`Some(None)`: none), or `None` when nothing
    /// more is to be read.
    pub(crate) fn deadline(&self) -> Option<Option<Instant>> {
        let session = self.link.lock();
        session.wants_to_read().then(|| session.poll_timeout())
    }

    /// The deadline passed: the session may answer `Timeout` and close.
    pub(crate) fn timed_out(&mut self, now: Instant) -> Result<Option<Reject>, ServeError> {
        let mut session = self.link.lock();
        let reject = session.handle_timeout(now);
        if reject.is_some() {
            self.refused += 1;
            self.link.flush(&mut session)?;
        }
        Ok(reject)
    }

    /// Reading failed: the connection is over.
    pub(crate) fn receive_failed(&self, error: TransportError) -> ServeError {
        self.link.lock().abort();
        ServeError::Receive(error)
    }

    /// Takes one received message, whose payload is `bytes`, through the
    /// session: the three phases one after the other (header, each fd's
    /// facts, mapping and delivery), with the system calls between them
    /// made on this thread. Every fd of a refused message is closed before
    /// its `Reject` goes out.
    pub(crate) fn judge_bytes(
        &mut self,
        received: fdpass::Incoming,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Event, ServeError> {
        let inspecting = match self.judge_header(received, bytes, now) {
            Judging::Done(event) => return event,
            Judging::Inspect(inspecting) => inspecting,
        };
        gather_facts(&inspecting.fds, &mut self.gathered);
        let mapping = match self.judge_facts(inspecting) {
            Ok(mapping) => mapping,
            Err(event) => return event,
        };
        let mut mappings = std::mem::take(&mut self.spare_mappings);
        let failed = map_all(&mapping, &self.config, &mut mappings);
        self.judge_mapped(mapping, mappings, failed)
    }

    /// The first phase of judging a message: its header, through the
    /// session. The link's lock is taken for each phase, briefly, and never
    /// across a system call: the answers other threads give, and the async
    /// flusher, wait on it. Between the phases the kernel is asked about
    /// every fd ([`gather_facts`]) and the verified ones are mapped
    /// ([`map_all`]), on this thread or (async) off the runtime's.
    pub(crate) fn judge_header(
        &mut self,
        received: fdpass::Incoming,
        bytes: &[u8],
        now: Instant,
    ) -> Judging {
        let fds = received.fds;
        let datagram = Datagram {
            bytes,
            fds: fds.len(),
            payload_truncated: received.payload_truncated,
            control_truncated: received.control_truncated,
        };
        let link = Arc::clone(&self.link);
        let mut session = link.lock();
        let unverified = match session.handle_datagram(now, &datagram) {
            Received::End => return Judging::Done(Ok(Event::Closed)),
            Received::Refused(reject) => {
                return Judging::Done(self.refused(fds, &mut session, reject));
            }
            Received::Inspect(unverified) => unverified,
        };
        drop(session);
        // A transfer answered before this message was counted may still be
        // unmapping: this message is judged against budgets without it. (On
        // tokio, big ones are released on the blocking pool and stay
        // counted until that is done: the runtime never waits here.)
        if matches!(link.socket, Socket::Blocking(_)) {
            link.wait_released();
        }
        Judging::Inspect(Inspecting { fds, unverified })
    }

    /// The second phase: the session judges the facts gathered into
    /// `self.gathered`. A refusal is answered here.
    pub(crate) fn judge_facts(
        &mut self,
        inspecting: Inspecting,
    ) -> Result<Mapping, Result<Event, ServeError>> {
        let Inspecting {
            mut fds,
            unverified,
        } = inspecting;
        let gathered = &mut self.gathered;
        let link = Arc::clone(&self.link);
        let mut session = link.lock();
        let verified = session.judge(unverified, &mut fds, &mut self.scratch, |index, facts| {
            let (known, inspected) = gathered.get_mut(index).ok_or(nix::errno::Errno::EBADF)?;
            // Swapped, not cloned: no allocation for the link's bytes;
            // the next message's facts overwrite what is left here.
            std::mem::swap(facts, known);
            *inspected
        });
        match verified {
            Ok(verified) => Ok(Mapping { verified }),
            Err(reject) => Err(self.refused(fds, &mut session, reject)),
        }
    }

    /// The last phase: the mapped transfer goes to the application, or the
    /// mapping that failed refuses it.
    pub(crate) fn judge_mapped(
        &mut self,
        mapping: Mapping,
        mut mappings: Vec<Option<mapping::Mapping>>,
        failed: Option<(usize, std::io::Error)>,
    ) -> Result<Event, ServeError> {
        let Mapping { verified } = mapping;
        let link = Arc::clone(&self.link);
        let mut session = link.lock();
        if let Some((index, error)) = failed {
            mappings.clear();
            self.spare_mappings = mappings;
            // Closes the transfer's fds before the refusal is queued.
            let reject = session.map_failed(verified, index, &error);
            return self.refused(Vec::new(), &mut session, reject);
        }
        let delivered = session.deliver(verified);
        drop(session);
        let mut fds = delivered.fds;
        let mut reservation = delivered.reservation;
        let segments = delivered
            .segments
            .into_iter()
            .zip(mappings.drain(..))
            .zip(fds.drain(..))
            .map(|((confirmed, mapping), fd)| {
                let share = reservation.split_off(confirmed.size);
                let segment = VerifiedSegment::new(confirmed, mapping, fd, share);
                #[cfg(feature = "tokio")]
                let segment = segment.released_on(self.release.as_ref());
                segment
            })
            .collect();
        self.spare_mappings = mappings;
        self.spare_fds = fds;
        let responder = Responder::new(delivered.ticket, link);
        Ok(Event::Transfer(IncomingTransfer::new(
            delivered.version,
            self.peer,
            self.peer_pidfd.clone(),
            segments,
            delivered.metadata,
            responder,
        )))
    }

    /// Judges the next untaken message of the batch, if there is one. Once
    /// the connection stopped reading (the end, or an answer that closes
    /// it), the rest are discarded and their fds closed, as messages still
    /// queued are when the socket closes.
    pub(crate) fn judge_next_in_batch(&mut self) -> Option<Result<Event, ServeError>> {
        let mut batch = self.batch.take()?;
        let event = loop {
            let Some((received, bytes)) = batch.take_next() else {
                break None;
            };
            if !self.is_open() {
                batch.recycle(received.fds);
                continue;
            }
            let event = self.judge_bytes(received, bytes, Instant::now());
            batch.recycle(std::mem::take(&mut self.spare_fds));
            break Some(event);
        };
        self.batch = Some(batch);
        event
    }

    /// Whether a batch holds messages not yet judged.
    pub(crate) fn has_untaken(&self) -> bool {
        self.batch.as_ref().is_some_and(|batch| batch.untaken() > 0)
    }

    /// Takes every message of the batch through the session in order,
    /// `handler` deciding each valid transfer, with the answers held until
    /// the last and then sent together; appends the outcomes.
    pub(crate) fn serve_received<E: Display>(
        &mut self,
        mut handler: impl FnMut(&IncomingTransfer) -> Result<(), E>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<usize, ServeError> {
        let hold = AnswerHold::new(&self.link);
        let before = outcomes.len();
        // The last transfer's mappings, dropped before the next message is
        // judged (so it is judged against a budget that no longer counts
        // them) or, for the batch's last, after the answers went out: as
        // with `serve_one`, unmapping is not on the sender's path.
        let mut handled_last: Vec<VerifiedSegment> = Vec::new();
        while self.has_untaken() {
            handled_last.clear();
            let Some(event) = self.judge_next_in_batch() else {
                break;
            };
            outcomes.push(match event? {
                Event::Transfer(transfer) => {
                    let handled = handler(&transfer);
                    let (outcome, mappings) = answer_keeping_mappings(transfer, handled);
                    handled_last = mappings;
                    outcome?
                }
                Event::Refused(reject) => Outcome::refused(reject),
                Event::Closed => Outcome::Closed,
            });
        }
        hold.release()?;
        drop(handled_last);
        Ok(outcomes.len() - before)
    }

    /// Closes the fds of a refused message, then sends what is due.
    fn refused(
        &mut self,
        mut fds: Vec<OwnedFd>,
        session: &mut Session,
        reject: Reject,
    ) -> Result<Event, ServeError> {
        fds.clear();
        self.spare_fds = fds;
        self.refused += 1;
        self.link.flush(session)?;
        Ok(Event::Refused(reject))
    }
}

/// Answers a transfer by `handled` (`Ack` for `Ok`, otherwise
/// `Reject(ApplicationRejected)` with the error's text), handing back its
/// mappings for the caller to drop when it is time: after the answers went
/// out, or before the next message is judged. An `Ack` promises nothing
/// about the mappings (PROTOCOL.md section 6).
fn answer_keeping_mappings<E: Display>(
    transfer: IncomingTransfer,
    handled: Result<(), E>,
) -> (Result<Outcome, ServeError>, Vec<VerifiedSegment>) {
    let (id, segments, bytes) = (
        transfer.id(),
        transfer.segments().len(),
        transfer.total_bytes(),
    );
    let (mappings, responder) = transfer.into_parts();
    (answer(id, segments, bytes, responder, handled), mappings)
}

fn answer<E: Display>(
    id: u64,
    segments: usize,
    bytes: u64,
    responder: Responder,
    handled: Result<(), E>,
) -> Result<Outcome, ServeError> {
    match handled {
        Ok(()) => {
            responder.accept()?;
            Ok(Outcome::Accepted {
                id,
                segments,
                bytes,
            })
        }
        Err(error) => {
            let reject = Reject::new(id, RejectReason::ApplicationRejected, error.to_string());
            responder.reject(&reject.message)?;
            Ok(Outcome::Rejected {
                id,
                reason: reject.reason,
                message: reject.message,
            })
        }
    }
}

/// What the kernel said of each fd of a message, in order.
pub(crate) type Gathered = Vec<(FdFacts, Result<(), nix::errno::Errno>)>;

/// A message whose header the session took, its fds still to be asked
/// about ([`gather_facts`]).
#[derive(Debug)]
pub(crate) struct Inspecting {
    pub(crate) fds: Vec<OwnedFd>,
    unverified: Unverified,
}

/// A message whose fds the session verified, still to be mapped
/// ([`map_all`]).
#[derive(Debug)]
pub(crate) struct Mapping {
    /// Holds the fds: each grant carries the fd it was judged for.
    verified: Verified<OwnedFd>,
}

/// Where judging a message stands after its header.
#[derive(Debug)]
pub(crate) enum Judging {
    /// Decided already: refused, or the end.
    Done(Result<Event, ServeError>),
    /// Its fds are to be asked about.
    Inspect(Inspecting),
}

/// Asks the kernel about each of `fds`, in order, into `gathered`.
pub(crate) fn gather_facts(fds: &[OwnedFd], gathered: &mut Gathered) {
    gathered.resize_with(fds.len(), || (unknown_fd_facts(), Ok(())));
    for (fd, (facts, inspected)) in fds.iter().zip(gathered.iter_mut()) {
        *inspected = inspect::facts_into(fd.as_fd(), facts);
    }
}

/// Maps (or, up to `config`'s `copy_at_most`, copies) every verified
/// segment of `mapping` into `mappings` (emptied first), stopping at the
/// first that fails: its index and error.
pub(crate) fn map_all(
    mapping: &Mapping,
    config: &Config,
    mappings: &mut Vec<Option<mapping::Mapping>>,
) -> Option<(usize, std::io::Error)> {
    mappings.clear();
    for (index, grant) in mapping.verified.grants().enumerate() {
        match mapping::map_verified(grant, config.populate(), config.copy_at_most()) {
            Ok(mapped) => mappings.push(mapped),
            Err(error) => return Some((index, error)),
        }
    }
    None
}
