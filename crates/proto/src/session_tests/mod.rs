//! Every rule of PROTOCOL.md section 6 and every timeout, against the state
//! machine alone: no sockets, no fds, no sleeps. Time is simulated.

use std::collections::BTreeSet;
use std::io;
use std::time::Duration;

use super::*;
use crate::codec::encode;
use crate::config::{Access, PeerCredentials};
use crate::limits::{MAX_BODY_LEN, MAX_SEGMENTS};
use crate::message::{Segment, Transfer};

const SEALED: Seals = Seals::SENDER_DEFAULT;

fn segment(name: &str, size: u64) -> Segment {
    Segment::new(name, size, SEALED)
}

fn transfer(id: u64, segments: Vec<Segment>) -> Vec<u8> {
    encode(&Message::Transfer(Transfer::new(id, segments))).unwrap()
}

/// A hand-made transfer the encoder would refuse.
fn raw_transfer(id: u64, names: &[&[u8]]) -> Vec<u8> {
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&id.to_le_bytes());
    body.extend_from_slice(&(names.len() as u64).to_le_bytes());
    for name in names {
        body.extend_from_slice(&(name.len() as u64).to_le_bytes());
        body.extend_from_slice(name);
        body.extend_from_slice(&4096u64.to_le_bytes());
        body.extend_from_slice(&SEALED.bits().to_le_bytes());
    }
    framed(1, 0, &body)
}

fn framed(major: u16, minor: u16, body: &[u8]) -> Vec<u8> {
    let mut out = crate::codec::MAGIC.to_vec();
    out.extend_from_slice(&major.to_le_bytes());
    out.extend_from_slice(&minor.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// What the kernel says of a sealed, fully written memfd.
fn memfd(name: &str, size: u64) -> FdFacts {
    FdFacts {
        kind: FileKind::Regular,
        seals: Some(SEALED),
        size,
        allocated: size,
        link: format!("/memfd:{name} (deleted)").into_bytes(),
    }
}

fn datagram(bytes: &[u8], fds: usize) -> Datagram<'_> {
    Datagram {
        bytes,
        fds,
        payload_truncated: false,
        control_truncated: false,
    }
}

fn config(build: impl FnOnce(crate::ConfigBuilder) -> crate::ConfigBuilder) -> Arc<Config> {
    Arc::new(build(Config::builder()).build().unwrap())
}

/// A message through the session as a driver would take it: datagram, then
/// each fd's facts, then delivery. Facts of `None` fail to inspect.
fn offer(
    session: &mut Session,
    now: Instant,
    bytes: &[u8],
    facts: &[Option<FdFacts>],
) -> Result<Delivered<()>, Reject> {
    let unverified = match session.handle_datagram(now, &datagram(bytes, facts.len())) {
        Received::Inspect(unverified) => unverified,
        Received::Refused(reject) => return Err(reject),
        Received::End => panic!("unexpected end"),
    };
    let mut scratch = unknown_fd_facts();
    let mut fds = vec![(); facts.len()];
    let verified = session.judge(
        unverified,
        &mut fds,
        &mut scratch,
        |index, into| match &facts[index] {
            Some(facts) => {
                *into = facts.clone();
                Ok(())
            }
            None => Err("EBADF: Bad file descriptor"),
        },
    )?;
    Ok(session.deliver(verified))
}

fn expect_rejected(result: Result<Delivered<()>, Reject>) -> Reject {
    match result {
        Err(reject) => reject,
        Ok(delivered) => panic!("expected a reject, got delivery of {}", delivered.id),
    }
}

/// The next answer on the wire.
fn transmitted(session: &mut Session) -> Transmit {
    session.poll_transmit().expect("an answer to transmit")
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    facts: Vec<Option<FdFacts>>,
    config: Arc<Config>,
    expected: (u64, RejectReason),
    closes: bool,
}

fn case(
    name: &'static str,
    bytes: Vec<u8>,
    facts: Vec<Option<FdFacts>>,
    expected: (u64, RejectReason),
) -> Case {
    Case {
        name,
        bytes,
        facts,
        config: Arc::new(Config::default()),
        expected,
        closes: false,
    }
}

fn header_cases() -> Vec<Case> {
    use RejectReason::*;
    let one = || transfer(9, vec![segment("seg", 4096)]);
    let good = || vec![Some(memfd("seg", 4096))];
    let mut bad_magic = one();
    bad_magic[..4].copy_from_slice(b"SLPX");
    let mut short_body = one();
    short_body.pop();
    let mut long_body = one();
    long_body.push(0);
    let mut over_limit = one();
    over_limit[8..12].copy_from_slice(&(MAX_BODY_LEN as u32 + 1).to_le_bytes());
    let mut trailing_in_body = one()[12..].to_vec();
    trailing_in_body.push(7);
    let mut bad_utf8 = raw_transfer(9, &[b"se\xff"]);
    bad_utf8.truncate(bad_utf8.len());
    let unknown_kind = framed(1, 0, &[7, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
    let ack = encode(&Message::Ack(Ack::new(9))).unwrap();
    let mut unsupported = case("major 2", one(), good(), (0, UnsupportedVersion));
    unsupported.bytes[4] = 2;
    unsupported.closes = true;
    let mut config_limit = case(
        "over the configured segment limit",
        transfer(9, vec![segment("a", 1), segment("b", 1)]),
        vec![Some(memfd("a", 1)), Some(memfd("b", 1))],
        (9, TooManySegments),
    );
    config_limit.config = config(|c| c.max_segments(1));
    let names: Vec<Vec<u8>> = (0..=MAX_SEGMENTS)
        .map(|i| format!("s{i}").into_bytes())
        .collect();
    let names: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
    vec![
        case("bad magic", bad_magic, good(), (0, BadMagic)),
        unsupported,
        case(
            "shorter than a preamble",
            one()[..7].to_vec(),
            good(),
            (0, Truncated),
        ),
        case(
            "body shorter than declared",
            short_body,
            good(),
            (0, Truncated),
        ),
        case(
            "body longer than declared",
            long_body,
            good(),
            (0, TrailingBytes),
        ),
        case(
            "declared body over the limit",
            over_limit,
            good(),
            (0, TooLarge),
        ),
        case(
            "trailing bytes in a same-minor body",
            framed(1, 0, &trailing_in_body),
            good(),
            (0, Malformed),
        ),
        case("a name not UTF-8", bad_utf8, good(), (0, Malformed)),
        case(
            "an unknown message kind",
            unknown_kind,
            vec![],
            (0, Malformed),
        ),
        case(
            "an Ack sent to the receiver",
            ack,
            vec![],
            (9, UnexpectedMessage),
        ),
        case(
            "254 segments",
            raw_transfer(9, &names),
            vec![],
            (9, TooManySegments),
        ),
        config_limit,
        case(
            "transfer id 0",
            raw_transfer(0, &[b"seg"]),
            good(),
            (0, InvalidField),
        ),
        case(
            "no segments",
            raw_transfer(9, &[]),
            vec![],
            (9, InvalidField),
        ),
        case(
            "a name with NUL",
            raw_transfer(9, &[b"s\0g"]),
            good(),
            (9, InvalidField),
        ),
        case(
            "a 250-byte name",
            raw_transfer(9, &[&[b'n'; 250]]),
            good(),
            (9, InvalidField),
        ),
        case(
            "two segments of one name",
            raw_transfer(9, &[b"dup", b"dup"]),
            vec![Some(memfd("dup", 4096)), Some(memfd("dup", 4096))],
            (9, InvalidField),
        ),
        case("header but no fds", one(), vec![], (9, FdCountMismatch)),
        case(
            "more fds than segments",
            one(),
            vec![Some(memfd("seg", 4096)), Some(memfd("seg", 4096))],
            (9, FdCountMismatch),
        ),
    ]
}

fn fd_cases() -> Vec<Case> {
    use RejectReason::*;
    let one = || transfer(9, vec![segment("seg", 4096)]);
    let with = |change: fn(&mut FdFacts)| {
        let mut facts = memfd("seg", 4096);
        change(&mut facts);
        vec![Some(facts)]
    };
    let mut sparse = case(
        "holes, refused by policy",
        one(),
        with(|f| f.allocated = 0),
        (9, Sparse),
    );
    sparse.config = config(|c| c.refuse_sparse(true));
    let mut over_connection = case(
        "over the per-connection budget",
        one(),
        vec![Some(memfd("seg", 4096))],
        (9, MemoryLimit),
    );
    over_connection.config = config(|c| c.max_mapped_per_connection(4095));
    vec![
        case(
            "a pipe",
            one(),
            with(|f| f.kind = FileKind::Fifo),
            (9, NotMemfd),
        ),
        case(
            "not sealable",
            one(),
            with(|f| f.seals = None),
            (9, NotMemfd),
        ),
        case(
            "a tmpfs file",
            one(),
            with(|f| f.link = b"/dev/shm/seg (deleted)".to_vec()),
            (9, NotMemfd),
        ),
        case(
            "an fd that cannot be inspected",
            one(),
            vec![None],
            (9, NotMemfd),
        ),
        case(
            "another name",
            one(),
            with(|f| f.link = b"/memfd:other (deleted)".to_vec()),
            (9, NameMismatch),
        ),
        case(
            "another size",
            one(),
            with(|f| f.size = 4095),
            (9, SizeMismatch),
        ),
        case(
            "no WRITE",
            one(),
            with(|f| f.seals = Some(Seals::SHRINK | Seals::GROW | Seals::SEAL)),
            (9, MissingSeals),
        ),
        case(
            "FUTURE_WRITE instead of WRITE",
            one(),
            with(|f| {
                f.seals = Some(Seals::SHRINK | Seals::GROW | Seals::SEAL | Seals::FUTURE_WRITE)
            }),
            (9, MissingSeals),
        ),
        case(
            "second of two bad",
            transfer(9, vec![segment("a", 1), segment("b", 2)]),
            vec![Some(memfd("a", 1)), Some(memfd("b", 3))],
            (9, SizeMismatch),
        ),
        sparse,
        over_connection,
    ]
}

/// Runs every case on a fresh session; returns the reasons seen.
fn run_cases(cases: Vec<Case>) -> BTreeSet<u16> {
    let now = Instant::now();
    let mut seen = BTreeSet::new();
    for case in cases {
        let mut session = Session::new(case.config, None, now);
        let reject = expect_rejected(offer(&mut session, now, &case.bytes, &case.facts));
        assert_eq!(
            (reject.id, reject.reason),
            case.expected,
            "{}: {}",
            case.name,
            reject.message
        );
        let answer = transmitted(&mut session);
        assert_eq!(answer.message, Message::Reject(reject), "{}", case.name);
        assert_eq!(answer.closes, case.closes, "{}", case.name);
        assert_eq!(session.wants_to_read(), !case.closes, "{}", case.name);
        assert_eq!(session.mapped(), 0, "{}: nothing stays reserved", case.name);
        seen.insert(case.expected.1.code());
    }
    seen
}

#[test]
fn every_reason_code_comes_from_the_state_machine() {
    use RejectReason::*;
    let mut seen = run_cases(header_cases());
    seen.extend(run_cases(fd_cases()));
    let now = Instant::now();

    // Step 2: the kernel cut the data or the control data.
    for (payload_truncated, control_truncated, reason) in
        [(true, false, TooLarge), (false, true, ControlTruncated)]
    {
        let mut session = Session::new(Arc::new(Config::default()), None, now);
        let bytes = transfer(9, vec![segment("seg", 1)]);
        let received = session.handle_datagram(
            now,
            &Datagram {
                bytes: &bytes,
                fds: 1,
                payload_truncated,
                control_truncated,
            },
        );
        let Received::Refused(reject) = received else {
            panic!("expected a refusal, got {received:?}")
        };
        assert_eq!((reject.id, reject.reason), (0, reason));
        seen.insert(reason.code());
    }

    // Step 10: mapping fails, for want of memory or otherwise.
    for (error, reason) in [
        (
            io::Error::from(io::ErrorKind::OutOfMemory),
            ResourceExhausted,
        ),
        (
            io::Error::new(io::ErrorKind::OutOfMemory, "address space"),
            ResourceExhausted,
        ),
        (io::Error::from(io::ErrorKind::InvalidInput), MapFailed),
    ] {
        let mut session = Session::new(Arc::new(Config::default()), None, now);
        let bytes = transfer(9, vec![segment("seg", 4096)]);
        let Received::Inspect(unverified) = session.handle_datagram(now, &datagram(&bytes, 1))
        else {
            panic!("valid")
        };
        let verified = session
            .judge(
                unverified,
                &mut vec![()],
                &mut unknown_fd_facts(),
                |_, into| {
                    *into = memfd("seg", 4096);
                    Ok::<(), &str>(())
                },
            )
            .unwrap();
        assert_eq!(session.mapped(), 4096, "reserved before mapping");
        assert_eq!(
            verified
                .grants()
                .map(|grant| grant.size())
                .collect::<Vec<_>>(),
            [4096]
        );
        let reject = session.map_failed(verified, 0, &error);
        assert_eq!(
            (reject.id, reject.reason),
            (9, reason),
            "{}",
            reject.message
        );
        assert_eq!(session.mapped(), 0, "given back after the failure");
        assert_eq!(transmitted(&mut session).message, Message::Reject(reject));
        seen.insert(reason.code());
    }

    // Step 11: the application refuses.
    let mut session = Session::new(Arc::new(Config::default()), None, now);
    let delivered = offer(
        &mut session,
        now,
        &transfer(9, vec![segment("seg", 1)]),
        &[Some(memfd("seg", 1))],
    )
    .unwrap();
    session.answer(delivered.ticket, Err("no room for it".into()), now);
    match transmitted(&mut session).message {
        Message::Reject(reject) => {
            assert_eq!((reject.id, reject.reason), (9, ApplicationRejected));
            assert_eq!(reject.message, "no room for it");
        }
        other => panic!("{other:?}"),
    }
    seen.insert(ApplicationRejected.code());

    // Before any message: the connection itself.
    let peer = PeerCredentials {
        pid: 1,
        uid: 1000,
        gid: 1000,
    };
    let only_uid_7 = Config::builder()
        .access(Access::anyone().allow_uid(7))
        .max_connections(2)
        .build()
        .unwrap();
    for (config, peer, active, expected) in [
        (&only_uid_7, Some(&peer), 0, Some(NotAllowed)),
        (&only_uid_7, None, 0, Some(NotAllowed)),
        (&Config::default(), Some(&peer), 127, None),
        (
            &Config::default(),
            Some(&peer),
            128,
            Some(TooManyConnections),
        ),
    ] {
        let result = admit(config, peer, active);
        assert_eq!(
            result.as_ref().err().map(|r| r.reason),
            expected,
            "{result:?}"
        );
        if let Err(reject) = result {
            assert_eq!(reject.id, 0);
            seen.insert(reject.reason.code());
        }
    }

    // Budgets shared by all connections, and the deadlines, have their own
    // tests below; they produce these two.
    seen.insert(MemoryLimit.code());
    seen.insert(Timeout.code());
    let every: BTreeSet<u16> = RejectReason::ALL.iter().map(|r| r.code()).collect();
    assert_eq!(seen, every, "every reason this version knows is produced");
}

#[test]
fn the_budget_shared_by_all_connections_counts_every_live_mapping() {
    let now = Instant::now();
    let total = MappedBudget::new(10_000);
    // Sparse memfds accepted, to show they count whole.
    let config = Arc::new(Config::builder().refuse_sparse(false).build().unwrap());
    let mut first = Session::new(Arc::clone(&config), Some(Arc::clone(&total)), now);
    let mut second = Session::new(config, Some(Arc::clone(&total)), now);
    let held = offer(
        &mut first,
        now,
        &transfer(1, vec![segment("a", 6000)]),
        &[Some(memfd("a", 6000))],
    )
    .unwrap();
    assert_eq!(total.in_use(), 6000);
    let reject = expect_rejected(offer(
        &mut second,
        now,
        &transfer(1, vec![segment("b", 5000)]),
        &[Some(memfd("b", 5000))],
    ));
    assert_eq!((reject.id, reject.reason), (1, RejectReason::MemoryLimit));
    assert!(
        reject
            .message
            .contains("6000 of 10000 bytes already mapped by all connections"),
        "{}",
        reject.message
    );
    assert_eq!(second.mapped(), 0, "the refused one holds nothing");
    // Each segment's share is given back when that segment's mapping goes,
    // whether or not the transfer was answered yet.
    let Delivered {
        ticket,
        reservation,
        ..
    } = held;
    assert_eq!(first.mapped(), 6000);
    drop(reservation);
    assert_eq!((total.in_use(), first.mapped()), (0, 0));
    first.answer(ticket, Ok(()), now);
    let _held = offer(
        &mut second,
        now,
        &transfer(2, vec![segment("b", 5000)]),
        &[Some(memfd("b", 5000))],
    )
    .unwrap();
    assert_eq!(total.in_use(), 5000);
    // A sparse memfd, where accepted, counts its whole size: reading a
    // hole allocates.
    let mut sparse = memfd("s", 5001);
    sparse.allocated = 0;
    let reject = expect_rejected(offer(
        &mut first,
        now,
        &transfer(2, vec![segment("s", 5001)]),
        &[Some(sparse)],
    ));
    assert_eq!(reject.reason, RejectReason::MemoryLimit);
}

#[test]
fn segments_reserve_separately_and_give_back_separately() {
    let now = Instant::now();
    let mut session = Session::new(Arc::new(Config::default()), None, now);
    let delivered = offer(
        &mut session,
        now,
        &transfer(
            3,
            vec![segment("a", 100), segment("b", 0), segment("c", 900)],
        ),
        &[
            Some(memfd("a", 100)),
            Some(memfd("b", 0)),
            Some(memfd("c", 900)),
        ],
    )
    .unwrap();
    let sizes: Vec<u64> = delivered.segments.iter().map(|s| s.size).collect();
    assert_eq!(sizes, [100, 0, 900]);
    let mut whole = delivered.reservation;
    let a = whole.split_off(100);
    assert_eq!((a.bytes(), whole.bytes()), (100, 900));
    assert_eq!(session.mapped(), 1000);
    drop(a);
    assert_eq!(session.mapped(), 900);
    drop(whole);
    assert_eq!(session.mapped(), 0);
    session.answer(delivered.ticket, Ok(()), now);
}

#[test]
fn confirmed_segments_carry_what_the_kernel_reports() {
    let now = Instant::now();
    let mut session = Session::new(Arc::new(Config::default()), None, now);
    let mut facts = memfd("seg", 64);
    facts.seals = Some(SEALED | Seals::EXEC);
    let bytes = transfer(
        1,
        vec![Segment::new("seg", 64, Seals::SHRINK | Seals::WRITE)],
    );
    let delivered = offer(&mut session, now, &bytes, &[Some(facts)]).unwrap();
    assert_eq!(delivered.segments[0].seals, SEALED | Seals::EXEC);
    session.answer(delivered.ticket, Ok(()), now);
}

/// Answers, timeouts, endings, the shared budget.
mod lifecycle;
