//! Whole exchanges in one call: one transfer to one receiver
//! ([`send_bytes`], [`send_metadata`]), or one set of segments to many
//! ([`fan_out`]).
#![forbid(unsafe_code)]

use std::path::Path;

use sealpass_proto::Seals;
use sealpass_proto::metadata::Fields;

use crate::client::Sender;
use crate::memfd::SealedSegment;
use crate::verdict::{SendError, Verdict};

/// Sends one buffer in one call: copies `bytes` into a memfd named `name`,
/// seals it ([`Seals::SENDER_DEFAULT`]), connects to the receiver at
/// `socket`, hands it over and waits for the verdict.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("doc.sock");
/// # let listener = sealpass_receiver::Listener::bind(&socket)?;
/// # let receiver = std::thread::spawn(move || -> Result<(), sealpass_receiver::ServeError> {
/// #     let transfer = listener.accept()?.receive()?.expect("a transfer");
/// #     assert_eq!(transfer.segments()[0].bytes().len(), 1 << 20);
/// #     Ok(transfer.accept()?)
/// # });
/// let frame = vec![0x80u8; 1 << 20];
/// let verdict = sealpass_sender::send_bytes(&socket, "frame", &frame)?;
/// assert!(verdict.is_accepted(), "{verdict:?}");
/// # receiver.join().expect("receiver")?;
/// # Ok(())
/// # }
/// ```
pub fn send_bytes(
    socket: impl AsRef<Path>,
    name: &str,
    bytes: &[u8],
) -> Result<Verdict, SendError> {
    let segment = SealedSegment::from_bytes(name, bytes, Seals::SENDER_DEFAULT)?;
    Sender::connect(socket)?.send(&[segment])
}

/// Connects to the receiver at `socket`, sends `metadata` as a transfer of
/// its own (no segment, no memfd: protocol 1.1), and waits for the verdict.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("meta.sock");
/// # let listener = sealpass_receiver::Listener::bind(&socket)?;
/// # let receiver = std::thread::spawn(move || -> Result<(), sealpass_receiver::ServeError> {
/// #     let transfer = listener.accept()?.receive()?.expect("a transfer");
/// #     assert_eq!(transfer.metadata().get_str("command"), Some("flush"));
/// #     Ok(transfer.accept()?)
/// # });
/// let verdict = sealpass_sender::send_metadata(&socket, &[("command", "flush")])?;
/// assert!(verdict.is_accepted(), "{verdict:?}");
/// # receiver.join().expect("receiver")?;
/// # Ok(())
/// # }
/// ```
pub fn send_metadata(
    socket: impl AsRef<Path>,
    metadata: &(impl Fields + ?Sized),
) -> Result<Verdict, SendError> {
    Sender::connect(socket)?.send_with(&[], metadata)
}

/// What one receiver of a [`fan_out`] made of the transfer.
#[derive(Debug)]
#[non_exhaustive]
pub struct FanOutVerdict<'p> {
    /// The receiver's socket, as given.
    pub socket: &'p Path,
    /// Its verdict, or why there is none (it could not be reached, it
    /// vanished, or it did not answer within the patience given).
    pub verdict: Result<Verdict, SendError>,
}

/// Sends one set of sealed segments (and `metadata`) to many receivers,
/// one connection each: every transfer goes out first, then the verdicts
/// are collected. The memfds are made once and shared: each receiver maps
/// the same pages, read-only, and no receiver can change what another
/// sees. Each receiver's verdict is its own: a refusal, a slow reader or a
/// dead receiver affects only its entry, and no wait for an answer lasts
/// past `patience` from the start of the collection (a receiver that has
/// not answered by then is [`SendError::AnswerTimedOut`]: delivery
/// unknown). The verdicts come in the order of `sockets`.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// use sealpass_sender::{SealedSegment, Seals};
/// let sockets: Vec<_> = (0..3).map(|i| dir.path().join(format!("consumer-{i}.sock"))).collect();
/// # let consumers: Vec<_> = sockets.iter().map(|socket| {
/// #     let listener = sealpass_receiver::Listener::bind(socket).unwrap();
/// #     std::thread::spawn(move || {
/// #         let transfer = listener.accept().unwrap().receive().unwrap().expect("a transfer");
/// #         assert_eq!(transfer.segments()[0].bytes(), b"one copy in memory");
/// #         transfer.accept().unwrap();
/// #     })
/// # }).collect();
/// let frame = SealedSegment::from_bytes("frame", b"one copy in memory", Seals::SENDER_DEFAULT)?;
/// let verdicts = sealpass_sender::fan_out(&sockets, &[frame], &(), std::time::Duration::from_secs(10));
/// for each in &verdicts {
///     assert!(matches!(&each.verdict, Ok(verdict) if verdict.is_accepted()), "{each:?}");
/// }
/// # for consumer in consumers { consumer.join().unwrap(); }
/// # Ok(())
/// # }
/// ```
pub fn fan_out<'p, P: AsRef<Path>>(
    sockets: &'p [P],
    segments: &[SealedSegment],
    metadata: &(impl Fields + ?Sized),
    patience: std::time::Duration,
) -> Vec<FanOutVerdict<'p>> {
    // Every transfer first: no receiver waits on another's answer.
    let sent: Vec<Result<Sender, SendError>> = sockets
        .iter()
        .map(|socket| {
            let mut sender = Sender::connect(socket)?;
            // A receiver that does not read cannot hold the others up.
            sender.set_answer_timeout(Some(patience))?;
            sender.submit_with(segments, metadata)?;
            Ok(sender)
        })
        .collect();
    let deadline = std::time::Instant::now() + patience;
    sockets
        .iter()
        .zip(sent)
        .map(|(socket, sender)| {
            let verdict = sender.and_then(|mut sender| {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                sender
                    .next_verdict_within(left)?
                    .ok_or(SendError::AnswerTimedOut {
                        id: 1,
                        timeout: patience,
                    })
            });
            FanOutVerdict {
                socket: socket.as_ref(),
                verdict,
            }
        })
        .collect()
}
