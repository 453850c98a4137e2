//! Section 6, steps 7 to 10: the fds, what the kernel says of them, and
//! what mapping them costs.
#![allow(unused_imports)]
use std::path::Path;

use sealpass_kernel::fdpass;
use sealpass_proto::limits::{MAX_BODY_LEN, MAX_MESSAGE_LEN, MAX_NAME_LEN, MAX_SEGMENTS};
use sealpass_proto::{Ack, Message, RejectReason as R, Seals, encode};

use super::fixtures::*;
use super::*;

/// One fd per segment, and each a memfd with the declared name, size and
/// seals: pipes, sockets, devices, directories, files on disk and on tmpfs.
pub(crate) fn cases(scratch: &Path) -> Vec<Case> {
    let disk_file = scratch.join("a-regular-file");
    let _ = std::fs::write(&disk_file, [0u8; 4096]);
    let dev_shm_file = Path::new("/dev/shm")
        .exists()
        .then(|| scratch.join("shm-file"));
    let mut cases: Vec<(String, Script)> = vec![
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
            // Step 8.8: holes a reader would pay for, 1 GiB of them.
            "malformed/sparse".into(),
            probe(|| {
                let size = 1 << 30;
                Ok(Probe {
                    payload: transfer_bytes(HOSTILE_ID, vec![segment("holes", size, SEALED)])?,
                    fds: vec![memfd_with_holes("holes", size, SEALED, true)?],
                    expect: Expect::Reject(HOSTILE_ID, &[R::Sparse]),
                })
            }),
        ),
        (
            // Allocated past its size (a whole page for 10 bytes): not sparse.
            "valid/allocated-past-its-size".into(),
            probe(|| {
                Ok(Probe {
                    payload: transfer_bytes(1, vec![segment("tail", 10, SEALED)])?,
                    fds: vec![memfd("tail", 10, SEALED)?],
                    expect: Expect::Ack(1),
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
    ];
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

    cases
        .into_iter()
        .map(|(name, script)| Case { name, script })
        .collect()
}

/// Steps 9 and 10: a transfer no address space can map.
pub(crate) fn memory_cases() -> Vec<Case> {
    let entries: Vec<(String, Script)> = vec![(
        "malformed/beyond-the-address-space".into(),
        probe(|| {
            // 192 TiB: sealed and sparse, so it is cheap to make, but no
            // 47-bit address space can map it, and no receiver need accept
            // its holes.
            let size = 3 << 46;
            Ok(Probe {
                payload: transfer_bytes(HOSTILE_ID, vec![segment("huge", size, SEALED)])?,
                fds: vec![memfd_with_holes("huge", size, SEALED, true)?],
                expect: Expect::Reject(
                    HOSTILE_ID,
                    &[
                        R::Sparse,
                        R::ResourceExhausted,
                        R::MapFailed,
                        R::MemoryLimit,
                    ],
                ),
            })
        }),
    )];
    entries
        .into_iter()
        .map(|(name, script)| Case { name, script })
        .collect()
}
