//! Transfers a receiver must accept (sections 4, 6.1 and 8).
#![allow(unused_imports)]
use std::path::Path;

use sealpass_kernel::fdpass;
use sealpass_proto::limits::{MAX_BODY_LEN, MAX_MESSAGE_LEN, MAX_NAME_LEN, MAX_SEGMENTS};
use sealpass_proto::{Ack, Message, RejectReason as R, Seals, encode};

use super::fixtures::*;
use super::*;

/// Valid transfers: sizes, names, seal sets, a newer minor, several on one
/// connection, pipelined.
pub(crate) fn cases() -> Vec<Case> {
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
                // 1.1's metadata (none), then what 1.2 to 1.7 appended.
                body.extend_from_slice(&0u64.to_le_bytes());
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
            Box::new(|target: &dyn Target| {
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
            Box::new(|target: &dyn Target| {
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
    // Seals beyond what is declared and required, each a superset the
    // receiver must accept. EXEC exists from Linux 6.3 on; before, a memfd
    // cannot carry it, so those cases are not made.
    let exec = kernel_knows_exec_seal();
    for extra in [
        Seals::empty(),
        Seals::SEAL,
        Seals::FUTURE_WRITE,
        Seals::EXEC,
        Seals::SEAL | Seals::FUTURE_WRITE,
        Seals::SEAL | Seals::EXEC,
        Seals::FUTURE_WRITE | Seals::EXEC,
        Seals::SEAL | Seals::FUTURE_WRITE | Seals::EXEC,
    ]
    .into_iter()
    .filter(|extra| exec || !extra.contains(Seals::EXEC))
    {
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

    cases
        .into_iter()
        .map(|(name, script)| Case { name, script })
        .collect()
}

/// Whether this kernel knows `F_SEAL_EXEC` (Linux 6.3+).
fn kernel_knows_exec_seal() -> bool {
    memfd("exec-probe", 0, Seals::EXEC).is_ok()
}
