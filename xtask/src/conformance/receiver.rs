//! A receiver under test, against scripted senders.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sealpass_proto::fdpass;
use sealpass_proto::limits::{MAX_BODY_LEN, MAX_MESSAGE_LEN, MAX_NAME_LEN, MAX_SEGMENTS};
use sealpass_proto::{Ack, Message, RejectReason, Seals, encode};

use super::Report;
use super::fixtures::{
    Answer, Fallible, PATIENCE, SEALED, answer, framed, framed_exact, memfd, open,
    raw_transfer_body, segment, send, transfer_bytes, valid_transfer,
};

/// The receiver process, started with `--socket PATH` appended.
pub struct Target {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Target {
    pub fn start(command: &[String], scratch: &Path) -> anyhow::Result<Target> {
        let socket = scratch.join("receiver.sock");
        let log = scratch.join("receiver.log");
        let (program, args) = command
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("empty receiver command"))?;
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(program)
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {program}: {e}"))?;
        let mut target = Target { child, socket, log };
        let deadline = Instant::now() + PATIENCE;
        while fdpass::connect(&target.socket).is_err() {
            if let Some(status) = target.child.try_wait()? {
                anyhow::bail!(
                    "the receiver exited at start ({status}):\n{}",
                    target.log_tail()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the receiver never listened at {}",
                target.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(target)
    }

    fn connect(&self) -> Fallible<OwnedFd> {
        fdpass::connect(&self.socket).map_err(|e| format!("connecting: {e}"))
    }

    fn open_fds(&self) -> Option<usize> {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .ok()
            .map(Iterator::count)
    }

    /// The open-fd count once it has held still for a while (a receiver
    /// closes a connection only after it sees the peer's end).
    fn settled_fds(&self) -> Option<usize> {
        let deadline = Instant::now() + PATIENCE;
        let mut last = self.open_fds()?;
        let mut since = Instant::now();
        while since.elapsed() < Duration::from_millis(300) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            let now = self.open_fds()?;
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
        Some(last)
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn alive(&mut self) -> Fallible<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the receiver died ({status})")),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a probe must get back.
enum Expect {
    Ack(u64),
    /// A reject repeating `id` (0 where PROTOCOL.md section 4.1 says there
    /// is no id to repeat), for one of the reasons.
    Reject(u64, &'static [RejectReason]),
    /// A reject with id 0, then the receiver closes the connection.
    RejectAndClose(RejectReason),
}

/// One scripted message.
struct Probe {
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
    expect: Expect,
}

type Script = Box<dyn Fn(&Target) -> Fallible<()>>;

fn check_answer(got: Answer, expect: &Expect) -> Fallible<()> {
    match (got, expect) {
        (Answer::Message(Message::Ack(ack)), Expect::Ack(id)) if ack.id == *id => Ok(()),
        (Answer::Message(Message::Reject(reject)), Expect::Reject(id, reasons))
            if reasons.contains(&reject.reason) && reject.id == *id =>
        {
            Ok(())
        }
        (Answer::Message(Message::Reject(reject)), Expect::RejectAndClose(reason))
            if reject.reason == *reason && reject.id == 0 =>
        {
            Ok(())
        }
        (got, Expect::Ack(id)) => Err(format!("expected Ack({id}); got {}", describe(&got))),
        (got, Expect::Reject(id, reasons)) => Err(format!(
            "expected Reject({}) of transfer {id}; got {}",
            names(reasons),
            describe(&got)
        )),
        (got, Expect::RejectAndClose(reason)) => Err(format!(
            "expected Reject({reason}) of transfer 0; got {}",
            describe(&got)
        )),
    }
}

fn names(reasons: &[RejectReason]) -> String {
    reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

fn describe(answer: &Answer) -> String {
    match answer {
        Answer::Closed => "the connection closed".into(),
        Answer::Message(Message::Reject(reject)) => {
            format!(
                "Reject({} of {}: {})",
                reject.reason, reject.id, reject.message
            )
        }
        Answer::Message(other) => format!("{other:?}"),
    }
}

fn run_probe(target: &Target, probe: Probe) -> Fallible<()> {
    let connection = target.connect()?;
    send(&connection, &probe.payload, &probe.fds)?;
    drop(probe.fds);
    check_answer(answer(&connection)?, &probe.expect)?;
    if let Expect::RejectAndClose(_) = probe.expect {
        match answer(&connection)? {
            Answer::Closed => {}
            other => {
                return Err(format!(
                    "expected the connection to close; got {}",
                    describe(&other)
                ));
            }
        }
    }
    Ok(())
}

fn probe(build: impl Fn() -> Fallible<Probe> + 'static) -> Script {
    Box::new(move |target| run_probe(target, build()?))
}

fn valid(segments: &'static [(&'static str, u64)]) -> Script {
    probe(move || {
        let (payload, fds) = valid_transfer(1, segments)?;
        Ok(Probe {
            payload,
            fds,
            expect: Expect::Ack(1),
        })
    })
}

/// A one-segment transfer of a well-formed memfd, with `payload` in place
/// of its header; the reject must repeat `id` (PROTOCOL.md section 4.1).
fn hostile_header(
    payload: impl Fn() -> Fallible<Vec<u8>> + 'static,
    id: u64,
    expect: &'static [RejectReason],
) -> Script {
    probe(move || {
        Ok(Probe {
            payload: payload()?,
            fds: vec![memfd("seg", 4096, SEALED)?],
            expect: Expect::Reject(id, expect),
        })
    })
}

/// The id of every hostile transfer whose body decodes.
const HOSTILE_ID: u64 = 9;

/// A header declaring `seg`, 4096 bytes, fully sealed, with `fds` beside it.
fn hostile_fds(
    fds: impl Fn() -> Fallible<Vec<OwnedFd>> + 'static,
    expect: &'static [RejectReason],
) -> Script {
    probe(move || {
        Ok(Probe {
            payload: transfer_bytes(HOSTILE_ID, vec![segment("seg", 4096, SEALED)])?,
            fds: fds()?,
            expect: Expect::Reject(HOSTILE_ID, expect),
        })
    })
}

fn one_segment() -> Fallible<Vec<u8>> {
    transfer_bytes(HOSTILE_ID, vec![segment("seg", 4096, SEALED)])
}

fn patched(offset: usize, bytes: &'static [u8]) -> impl Fn() -> Fallible<Vec<u8>> {
    move || {
        let mut message = one_segment()?;
        let end = offset + bytes.len();
        message
            .get_mut(offset..end)
            .ok_or("short message")?
            .copy_from_slice(bytes);
        Ok(message)
    }
}

fn body_of_one_segment() -> Fallible<Vec<u8>> {
    Ok(one_segment()?.split_off(12))
}

use RejectReason as R;

fn cases(scratch: &Path) -> Vec<(String, Script)> {
    let mut cases: Vec<(String, Script)> = vec![
        ("valid/one-segment".into(), valid(&[("shma", 4 << 20)])),
        (
            "valid/two-segments".into(),
            valid(&[("shma", 4 << 20), ("shmb", 4 << 20)]),
        ),
        (
            "valid/size-zero".into(),
            valid(&[("empty", 0), ("after-empty", 1)]),
        ),
        (
            "valid/one-gib-sparse".into(),
            valid(&[("gibibyte", 1 << 30)]),
        ),
        (
            "valid/name-with-spaces".into(),
            valid(&[("a name with spaces", 10)]),
        ),
        ("valid/name-non-ascii".into(), valid(&[("日本語-ñ-😀", 10)])),
        (
            "valid/253-segments".into(),
            probe(|| {
                let names: Vec<String> = (0..MAX_SEGMENTS).map(|i| format!("seg-{i:03}")).collect();
                let segments: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 64)).collect();
                let (payload, fds) = valid_transfer(1, &segments)?;
                Ok(Probe {
                    payload,
                    fds,
                    expect: Expect::Ack(1),
                })
            }),
        ),
        (
            "valid/longest-name".into(),
            probe(|| {
                let name = "n".repeat(MAX_NAME_LEN);
                let (payload, fds) = valid_transfer(1, &[(name.as_str(), 8)])?;
                Ok(Probe {
                    payload,
                    fds,
                    expect: Expect::Ack(1),
                })
            }),
        ),
        (
            "valid/declares-fewer-seals-than-it-has".into(),
            probe(|| {
                Ok(Probe {
                    payload: transfer_bytes(
                        1,
                        vec![segment("s", 8, Seals::SHRINK | Seals::WRITE)],
                    )?,
                    fds: vec![memfd("s", 8, SEALED)?],
                    expect: Expect::Ack(1),
                })
            }),
        ),
        (
            "valid/newer-minor-with-appended-fields".into(),
            probe(|| {
                let mut body = body_of_one_segment()?;
                body.extend_from_slice(b"\x01\x02 a field from version 1.7");
                Ok(Probe {
                    payload: framed_exact(1, 7, &body),
                    fds: vec![memfd("seg", 4096, SEALED)?],
                    expect: Expect::Ack(9),
                })
            }),
        ),
        (
            "valid/three-transfers-on-one-connection".into(),
            Box::new(|target: &Target| {
                let connection = target.connect()?;
                for id in 1..=3 {
                    let (payload, fds) = valid_transfer(id, &[("again", 100)])?;
                    send(&connection, &payload, &fds)?;
                    check_answer(answer(&connection)?, &Expect::Ack(id))?;
                }
                Ok(())
            }),
        ),
        (
            // Pipelining (PROTOCOL.md section 2): eight transfers before any
            // answer is read, the fifth unsealed; answers come in order.
            "valid/eight-transfers-pipelined".into(),
            Box::new(|target: &Target| {
                let connection = target.connect()?;
                for id in 1..=8 {
                    if id == 5 {
                        let payload = transfer_bytes(id, vec![segment("loose", 64, SEALED)])?;
                        send(
                            &connection,
                            &payload,
                            &[memfd("loose", 64, Seals::empty())?],
                        )?;
                    } else {
                        let (payload, fds) = valid_transfer(id, &[("queued", 64)])?;
                        send(&connection, &payload, &fds)?;
                    }
                }
                for id in 1..=8 {
                    let expect = if id == 5 {
                        Expect::Reject(id, &[R::MissingSeals])
                    } else {
                        Expect::Ack(id)
                    };
                    check_answer(answer(&connection)?, &expect)?;
                }
                Ok(())
            }),
        ),
    ];
    for extra in [
        Seals::empty(),
        Seals::SEAL,
        Seals::FUTURE_WRITE,
        Seals::EXEC,
        Seals::SEAL | Seals::FUTURE_WRITE,
        Seals::SEAL | Seals::EXEC,
        Seals::FUTURE_WRITE | Seals::EXEC,
        Seals::SEAL | Seals::FUTURE_WRITE | Seals::EXEC,
    ] {
        let seals = Seals::RECEIVER_DEFAULT | extra;
        cases.push((
            format!("valid/seals-{}", seals.to_string().to_lowercase()),
            probe(move || {
                Ok(Probe {
                    payload: transfer_bytes(1, vec![segment("sealed", 4096, seals)])?,
                    fds: vec![memfd("sealed", 4096, seals)?],
                    expect: Expect::Ack(1),
                })
            }),
        ));
    }

    let disk_file = scratch.join("a-regular-file");
    let _ = std::fs::write(&disk_file, [0u8; 4096]);
    let dev_shm_file = Path::new("/dev/shm")
        .exists()
        .then(|| scratch.join("shm-file"));
    cases.extend::<Vec<(String, Script)>>(vec![
        (
            "malformed/bad-magic".into(),
            hostile_header(patched(0, b"SLPX"), 0, &[R::BadMagic]),
        ),
        (
            "malformed/unknown-major".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(2, 0, &body_of_one_segment()?),
                    fds: vec![memfd("seg", 4096, SEALED)?],
                    expect: Expect::RejectAndClose(R::UnsupportedVersion),
                })
            }),
        ),
        (
            "malformed/major-zero".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(0, 0, &body_of_one_segment()?),
                    fds: vec![memfd("seg", 4096, SEALED)?],
                    expect: Expect::RejectAndClose(R::UnsupportedVersion),
                })
            }),
        ),
        (
            "malformed/truncated-preamble".into(),
            hostile_header(
                || {
                    let mut message = one_segment()?;
                    message.truncate(7);
                    Ok(message)
                },
                0,
                &[R::Truncated],
            ),
        ),
        (
            "malformed/body-length-says-more".into(),
            hostile_header(
                || {
                    let body = body_of_one_segment()?;
                    Ok(framed(1, 0, body.len() as u32 + 1, &body))
                },
                0,
                &[R::Truncated],
            ),
        ),
        (
            "malformed/body-length-says-less".into(),
            hostile_header(
                || {
                    let body = body_of_one_segment()?;
                    Ok(framed(1, 0, body.len() as u32 - 1, &body))
                },
                0,
                &[R::TrailingBytes],
            ),
        ),
        (
            "malformed/body-length-over-limit".into(),
            hostile_header(
                || {
                    Ok(framed(
                        1,
                        0,
                        MAX_BODY_LEN as u32 + 1,
                        &body_of_one_segment()?,
                    ))
                },
                0,
                &[R::TooLarge],
            ),
        ),
        (
            "malformed/message-over-limit".into(),
            hostile_header(
                || {
                    let body = vec![0; MAX_MESSAGE_LEN];
                    Ok(framed_exact(1, 0, &body))
                },
                0,
                &[R::TooLarge],
            ),
        ),
        (
            "malformed/trailing-bytes-same-minor".into(),
            hostile_header(
                || {
                    let mut body = body_of_one_segment()?;
                    body.push(0);
                    Ok(framed_exact(1, 0, &body))
                },
                0,
                &[R::Malformed],
            ),
        ),
        (
            "malformed/unknown-message-kind".into(),
            hostile_header(
                || {
                    let mut body = 7u32.to_le_bytes().to_vec();
                    body.extend_from_slice(&9u64.to_le_bytes());
                    Ok(framed_exact(1, 0, &body))
                },
                0,
                &[R::Malformed],
            ),
        ),
        (
            "malformed/name-not-utf8".into(),
            hostile_header(
                || {
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[b"se\xff"], 4096, SEALED),
                    ))
                },
                0,
                &[R::Malformed],
            ),
        ),
        (
            "malformed/segment-count-past-the-body".into(),
            hostile_header(
                || {
                    let mut body = raw_transfer_body(HOSTILE_ID, &[], 0, SEALED);
                    body.truncate(12);
                    body.extend_from_slice(&u64::MAX.to_le_bytes());
                    Ok(framed_exact(1, 0, &body))
                },
                0,
                &[R::Malformed],
            ),
        ),
        (
            "malformed/transfer-id-zero".into(),
            hostile_header(
                || {
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(0, &[b"seg"], 4096, SEALED),
                    ))
                },
                0,
                &[R::InvalidField],
            ),
        ),
        (
            "malformed/name-too-long".into(),
            hostile_header(
                || {
                    let name = vec![b'n'; MAX_NAME_LEN + 1];
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[&name], 4096, SEALED),
                    ))
                },
                HOSTILE_ID,
                &[R::InvalidField],
            ),
        ),
        (
            "malformed/name-with-nul".into(),
            hostile_header(
                || {
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[b"se\0g"], 4096, SEALED),
                    ))
                },
                HOSTILE_ID,
                &[R::InvalidField],
            ),
        ),
        (
            "malformed/too-many-segments".into(),
            hostile_header(
                || {
                    let names = vec![&b"seg"[..]; MAX_SEGMENTS + 1];
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &names, 4096, SEALED),
                    ))
                },
                HOSTILE_ID,
                &[R::TooManySegments],
            ),
        ),
        (
            "malformed/a-thousand-segments".into(),
            hostile_header(
                || {
                    let names: Vec<Vec<u8>> =
                        (0..1000).map(|i| format!("seg-{i}").into_bytes()).collect();
                    let names: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &names, 4096, SEALED),
                    ))
                },
                HOSTILE_ID,
                &[R::TooManySegments],
            ),
        ),
        (
            // PROTOCOL.md section 6, step 5: a transfer hands over something.
            "malformed/no-segments".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(1, 0, &raw_transfer_body(HOSTILE_ID, &[], 0, SEALED)),
                    fds: Vec::new(),
                    expect: Expect::Reject(HOSTILE_ID, &[R::InvalidField]),
                })
            }),
        ),
        (
            // Names are unique within a transfer, even when each fd matches.
            "malformed/duplicate-names".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[b"dup", b"dup"], 64, SEALED),
                    ),
                    fds: vec![memfd("dup", 64, SEALED)?, memfd("dup", 64, SEALED)?],
                    expect: Expect::Reject(HOSTILE_ID, &[R::InvalidField]),
                })
            }),
        ),
        (
            "malformed/duplicate-names-apart".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[b"a", b"b", b"c", b"b"], 64, SEALED),
                    ),
                    fds: ["a", "b", "c", "b"]
                        .iter()
                        .map(|name| memfd(name, 64, SEALED))
                        .collect::<Fallible<_>>()?,
                    expect: Expect::Reject(HOSTILE_ID, &[R::InvalidField]),
                })
            }),
        ),
        (
            "malformed/ack-sent-to-the-receiver".into(),
            probe(|| {
                Ok(Probe {
                    payload: encode(&Message::Ack(Ack::new(HOSTILE_ID)))
                        .map_err(|e| e.to_string())?,
                    fds: Vec::new(),
                    expect: Expect::Reject(HOSTILE_ID, &[R::UnexpectedMessage]),
                })
            }),
        ),
        (
            "malformed/fds-but-no-header".into(),
            hostile_header(|| Ok(Vec::new()), 0, &[R::Truncated]),
        ),
        (
            "malformed/header-but-no-fds".into(),
            hostile_fds(|| Ok(Vec::new()), &[R::FdCountMismatch]),
        ),
        (
            "malformed/more-fds-than-segments".into(),
            hostile_fds(
                || {
                    Ok(vec![
                        memfd("seg", 4096, SEALED)?,
                        memfd("seg", 4096, SEALED)?,
                    ])
                },
                &[R::FdCountMismatch],
            ),
        ),
        (
            "malformed/fewer-fds-than-segments".into(),
            probe(|| {
                Ok(Probe {
                    payload: transfer_bytes(
                        HOSTILE_ID,
                        vec![segment("seg", 4096, SEALED), segment("seg2", 4096, SEALED)],
                    )?,
                    fds: vec![memfd("seg", 4096, SEALED)?],
                    expect: Expect::Reject(HOSTILE_ID, &[R::FdCountMismatch]),
                })
            }),
        ),
        (
            "malformed/fd-is-a-pipe".into(),
            hostile_fds(
                || {
                    let (read, _write) = nix::unistd::pipe().map_err(|e| e.to_string())?;
                    Ok(vec![read])
                },
                &[R::NotMemfd],
            ),
        ),
        (
            "malformed/fd-is-a-socket".into(),
            hostile_fds(
                || {
                    let (one, _other) = fdpass::pair().map_err(|e| e.to_string())?;
                    Ok(vec![one])
                },
                &[R::NotMemfd],
            ),
        ),
        (
            "malformed/fd-is-dev-null".into(),
            hostile_fds(|| Ok(vec![open(Path::new("/dev/null"))?]), &[R::NotMemfd]),
        ),
        (
            "malformed/fd-is-a-directory".into(),
            hostile_fds(|| Ok(vec![open(Path::new("/"))?]), &[R::NotMemfd]),
        ),
        (
            "malformed/fd-is-a-file-on-disk".into(),
            hostile_fds(move || Ok(vec![open(&disk_file)?]), &[R::NotMemfd]),
        ),
        (
            "malformed/missing-write".into(),
            hostile_fds(
                || {
                    Ok(vec![memfd(
                        "seg",
                        4096,
                        Seals::SHRINK | Seals::GROW | Seals::SEAL,
                    )?])
                },
                &[R::MissingSeals],
            ),
        ),
        (
            "malformed/missing-shrink".into(),
            probe(|| {
                Ok(Probe {
                    payload: transfer_bytes(HOSTILE_ID, vec![segment("seg", 4096, Seals::WRITE)])?,
                    fds: vec![memfd("seg", 4096, Seals::WRITE | Seals::GROW)?],
                    expect: Expect::Reject(HOSTILE_ID, &[R::MissingSeals]),
                })
            }),
        ),
        (
            "malformed/future-write-instead-of-write".into(),
            probe(|| {
                Ok(Probe {
                    payload: transfer_bytes(
                        HOSTILE_ID,
                        vec![segment("seg", 4096, Seals::SHRINK | Seals::GROW)],
                    )?,
                    fds: vec![memfd(
                        "seg",
                        4096,
                        Seals::SHRINK | Seals::GROW | Seals::FUTURE_WRITE,
                    )?],
                    expect: Expect::Reject(HOSTILE_ID, &[R::MissingSeals]),
                })
            }),
        ),
        (
            "malformed/declared-seal-absent".into(),
            hostile_fds(
                || {
                    Ok(vec![memfd(
                        "seg",
                        4096,
                        Seals::SHRINK | Seals::GROW | Seals::WRITE,
                    )?])
                },
                &[R::MissingSeals],
            ),
        ),
        (
            "malformed/wrong-name".into(),
            hostile_fds(|| Ok(vec![memfd("gse", 4096, SEALED)?]), &[R::NameMismatch]),
        ),
        (
            "malformed/name-prefix-only".into(),
            hostile_fds(|| Ok(vec![memfd("se", 4096, SEALED)?]), &[R::NameMismatch]),
        ),
        (
            "malformed/smaller-than-declared".into(),
            hostile_fds(|| Ok(vec![memfd("seg", 4095, SEALED)?]), &[R::SizeMismatch]),
        ),
        (
            "malformed/larger-than-declared".into(),
            hostile_fds(|| Ok(vec![memfd("seg", 8192, SEALED)?]), &[R::SizeMismatch]),
        ),
        (
            "malformed/second-segment-bad".into(),
            probe(|| {
                Ok(Probe {
                    payload: transfer_bytes(
                        HOSTILE_ID,
                        vec![segment("seg", 4096, SEALED), segment("seg2", 4096, SEALED)],
                    )?,
                    fds: vec![memfd("seg", 4096, SEALED)?, memfd("seg2", 1, SEALED)?],
                    expect: Expect::Reject(HOSTILE_ID, &[R::SizeMismatch]),
                })
            }),
        ),
        (
            "malformed/beyond-the-address-space".into(),
            probe(|| {
                // 192 TiB: sealed and sparse, so it is cheap to make, but no
                // 47-bit address space can map it.
                let size = 3 << 46;
                Ok(Probe {
                    payload: transfer_bytes(HOSTILE_ID, vec![segment("huge", size, SEALED)])?,
                    fds: vec![memfd("huge", size, SEALED)?],
                    expect: Expect::Reject(
                        HOSTILE_ID,
                        &[R::ResourceExhausted, R::MapFailed, R::MemoryLimit],
                    ),
                })
            }),
        ),
    ]);
    if let Some(path) = dev_shm_file {
        cases.push((
            "malformed/fd-is-a-tmpfs-file".into(),
            hostile_fds(
                move || {
                    std::fs::write(&path, [0u8; 4096]).map_err(|e| e.to_string())?;
                    let fd = open(&path);
                    let _ = std::fs::remove_file(&path);
                    Ok(vec![fd?])
                },
                &[R::NotMemfd],
            ),
        ));
    }

    cases.extend::<Vec<(String, Script)>>(vec![
        (
            "peers/connect-and-close".into(),
            Box::new(|target: &Target| {
                drop(target.connect()?);
                Ok(())
            }),
        ),
        (
            "peers/silent-then-close".into(),
            Box::new(|target: &Target| {
                let connection = target.connect()?;
                std::thread::sleep(Duration::from_millis(200));
                drop(connection);
                Ok(())
            }),
        ),
        (
            "peers/close-before-reading-the-answer".into(),
            Box::new(|target: &Target| {
                let connection = target.connect()?;
                let (payload, fds) = valid_transfer(1, &[("gone", 4096)])?;
                send(&connection, &payload, &fds)
            }),
        ),
        (
            "peers/shut-down-writing-then-read-the-answer".into(),
            Box::new(|target: &Target| {
                let connection = target.connect()?;
                let (payload, fds) = valid_transfer(1, &[("half", 4096)])?;
                send(&connection, &payload, &fds)?;
                nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(&connection),
                    nix::sys::socket::Shutdown::Write,
                )
                .map_err(|e| e.to_string())?;
                check_answer(answer(&connection)?, &Expect::Ack(1))
            }),
        ),
        (
            "peers/garbage-then-valid-on-one-connection".into(),
            Box::new(|target: &Target| {
                let connection = target.connect()?;
                send(&connection, b"garbage, not a message", &[])?;
                check_answer(
                    answer(&connection)?,
                    &Expect::Reject(0, &[R::Truncated, R::BadMagic]),
                )?;
                let (payload, fds) = valid_transfer(2, &[("after", 10)])?;
                send(&connection, &payload, &fds)?;
                check_answer(answer(&connection)?, &Expect::Ack(2))
            }),
        ),
    ]);
    cases
}

/// Reasons no scripted sender can provoke from any conforming receiver.
pub const NOT_PROVOKED: &[(RejectReason, &str)] = &[
    (
        R::ControlTruncated,
        "a receiver sized as PROTOCOL.md requires has room for every fd the kernel passes",
    ),
    (
        R::ApplicationRejected,
        "depends on the receiving application",
    ),
];

/// After a case: a fresh valid transfer is accepted and the fd count is back.
fn still_serves(target: &mut Target, baseline: Option<usize>) -> Fallible<()> {
    target.alive()?;
    let (payload, fds) = valid_transfer(1, &[("still-serving", 4096)])?;
    run_probe(
        target,
        Probe {
            payload,
            fds,
            expect: Expect::Ack(1),
        },
    )
    .map_err(|e| format!("afterwards a valid transfer failed: {e}"))?;
    let Some(baseline) = baseline else {
        return Ok(());
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        match target.open_fds() {
            Some(now) if now == baseline => return Ok(()),
            Some(now) if Instant::now() >= deadline => {
                return Err(format!(
                    "afterwards the receiver holds {now} fds; it held {baseline} before (leak)"
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

pub fn check(command: &[String], scratch: &Path, report: &mut Report) -> anyhow::Result<()> {
    let mut target = Target::start(command, scratch)?;
    still_serves(&mut target, None)
        .map_err(|e| anyhow::anyhow!("the receiver does not accept a valid transfer: {e}"))?;
    // After a first transfer (some receivers open files lazily) and once the
    // receiver has seen that connection close.
    let baseline = target.settled_fds();
    for (name, script) in cases(scratch) {
        let result = script(&target).and_then(|()| still_serves(&mut target, baseline));
        report.record(
            &format!("receiver/{name}"),
            result.map_err(|e| {
                let tail = target.log_tail();
                if tail.is_empty() {
                    e
                } else {
                    format!(
                        "{e}\n    receiver log:\n    {}",
                        tail.replace('\n', "\n    ")
                    )
                }
            }),
        );
    }
    Ok(())
}
