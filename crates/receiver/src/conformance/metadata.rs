//! Section 4.3 (protocol 1.1's metadata) and section 8 (how 1.0 and 1.1
//! meet): transfers with metadata, with metadata alone, and each of its
//! rules broken.
use sealpass_proto::RejectReason as R;
use sealpass_proto::limits::{MAX_METADATA_KEY_LEN, MAX_METADATA_LEN};

use super::fixtures::*;
use super::*;

/// The body of a 1.1 transfer of `id` declaring one `seg` of 4096 bytes per
/// fd (`segments` of them), then `entries` encoded by hand, so that keys
/// the encoder refuses can be sent.
fn body_with_metadata(id: u64, segments: usize, entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let names: Vec<Vec<u8>> = (0..segments)
        .map(|i| format!("seg{i}").into_bytes())
        .collect();
    let names: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
    let mut body = raw_transfer_body(id, &names, 4096, SEALED);
    body.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (key, value) in entries {
        body.extend_from_slice(&(key.len() as u64).to_le_bytes());
        body.extend_from_slice(key);
        body.extend_from_slice(&(value.len() as u64).to_le_bytes());
        body.extend_from_slice(value);
    }
    body
}

/// A 1.1 transfer with `segments` sealed memfds and `entries`, expecting
/// `expect`.
fn with_metadata(
    segments: usize,
    entries: impl Fn() -> Vec<(Vec<u8>, Vec<u8>)> + 'static,
    minor: u16,
    suffix: &'static [u8],
    expect: Expect,
) -> Script {
    probe(move || {
        let entries = entries();
        let pairs: Vec<(&[u8], &[u8])> = entries
            .iter()
            .map(|(key, value)| (key.as_slice(), value.as_slice()))
            .collect();
        let mut body = body_with_metadata(HOSTILE_ID, segments, &pairs);
        body.extend_from_slice(suffix);
        let fds = (0..segments)
            .map(|i| memfd(&format!("seg{i}"), 4096, SEALED))
            .collect::<Fallible<Vec<_>>>()?;
        Ok(Probe {
            payload: framed_exact(1, minor, &body),
            fds,
            expect: expect.clone(),
        })
    })
}

fn entries(list: &[(&[u8], &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
    list.iter()
        .map(|(key, value)| (key.to_vec(), value.to_vec()))
        .collect()
}

/// One entry whose value brings the metadata to `len` bytes encoded.
fn sized(len: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![(b"v".to_vec(), vec![0xa5; len - 8 - 16 - 1])]
}

/// Metadata the receiver must accept, and each of its rules broken.
pub(crate) fn cases() -> Vec<Case> {
    let ack = Expect::Ack(HOSTILE_ID);
    let invalid = Expect::Reject(HOSTILE_ID, &[R::InvalidField]);
    let malformed = Expect::Reject(0, &[R::Malformed]);
    let entries: Vec<(String, Script)> = vec![
        (
            "valid/metadata-with-segments".into(),
            with_metadata(
                2,
                || entries(&[(b"frame", b"42"), (b"dtype", b"<f4")]),
                1,
                b"",
                ack.clone(),
            ),
        ),
        (
            "valid/metadata-alone".into(),
            with_metadata(
                0,
                || entries(&[(b"command", b"flush")]),
                1,
                b"",
                ack.clone(),
            ),
        ),
        (
            "valid/metadata-value-not-utf8".into(),
            with_metadata(
                1,
                || entries(&[(b"raw", b"\x00\xff\xfe")]),
                1,
                b"",
                ack.clone(),
            ),
        ),
        (
            "valid/metadata-empty-value".into(),
            with_metadata(1, || entries(&[(b"flag", b"")]), 1, b"", ack.clone()),
        ),
        (
            "valid/metadata-longest-key".into(),
            with_metadata(
                1,
                || vec![(vec![b'k'; MAX_METADATA_KEY_LEN], b"x".to_vec())],
                1,
                b"",
                ack.clone(),
            ),
        ),
        (
            "valid/metadata-at-its-limit".into(),
            with_metadata(1, || sized(MAX_METADATA_LEN), 1, b"", ack.clone()),
        ),
        (
            "valid/metadata-none-at-minor-1".into(),
            with_metadata(1, Vec::new, 1, b"", ack.clone()),
        ),
        (
            "valid/metadata-then-fields-of-a-newer-minor".into(),
            with_metadata(
                1,
                || entries(&[(b"frame", b"1")]),
                2,
                b"a later field",
                ack.clone(),
            ),
        ),
        (
            "malformed/metadata-empty-key".into(),
            with_metadata(1, || entries(&[(b"", b"x")]), 1, b"", invalid.clone()),
        ),
        (
            "malformed/metadata-key-too-long".into(),
            with_metadata(
                1,
                || vec![(vec![b'k'; MAX_METADATA_KEY_LEN + 1], b"x".to_vec())],
                1,
                b"",
                invalid.clone(),
            ),
        ),
        (
            "malformed/metadata-key-with-nul".into(),
            with_metadata(1, || entries(&[(b"a\0b", b"x")]), 1, b"", invalid.clone()),
        ),
        (
            "malformed/metadata-duplicate-key".into(),
            with_metadata(
                1,
                || entries(&[(b"frame", b"1"), (b"other", b"2"), (b"frame", b"3")]),
                1,
                b"",
                invalid.clone(),
            ),
        ),
        (
            "malformed/metadata-over-its-limit".into(),
            with_metadata(0, || sized(MAX_METADATA_LEN + 1), 1, b"", invalid.clone()),
        ),
        (
            "malformed/no-segments-no-metadata".into(),
            with_metadata(0, Vec::new, 1, b"", invalid.clone()),
        ),
        (
            "malformed/no-segments-at-minor-0".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(1, 0, &raw_transfer_body(HOSTILE_ID, &[], 0, SEALED)),
                    fds: Vec::new(),
                    expect: Expect::Reject(HOSTILE_ID, &[R::InvalidField]),
                })
            }),
        ),
        (
            "malformed/metadata-key-not-utf8".into(),
            with_metadata(
                1,
                || entries(&[(b"k\xff", b"x")]),
                1,
                b"",
                malformed.clone(),
            ),
        ),
        (
            "malformed/metadata-trailing-bytes-same-minor".into(),
            with_metadata(1, || entries(&[(b"k", b"x")]), 1, b"\0", malformed.clone()),
        ),
        (
            "malformed/metadata-count-past-the-body".into(),
            probe(|| {
                let mut body = raw_transfer_body(HOSTILE_ID, &[b"seg0"], 4096, SEALED);
                body.extend_from_slice(&u64::MAX.to_le_bytes());
                Ok(Probe {
                    payload: framed_exact(1, 1, &body),
                    fds: vec![memfd("seg0", 4096, SEALED)?],
                    expect: Expect::Reject(0, &[R::Malformed]),
                })
            }),
        ),
        (
            "malformed/metadata-value-past-the-body".into(),
            probe(|| {
                let mut body = raw_transfer_body(HOSTILE_ID, &[b"seg0"], 4096, SEALED);
                body.extend_from_slice(&1u64.to_le_bytes());
                body.extend_from_slice(&1u64.to_le_bytes());
                body.push(b'k');
                body.extend_from_slice(&(1u64 << 40).to_le_bytes());
                Ok(Probe {
                    payload: framed_exact(1, 1, &body),
                    fds: vec![memfd("seg0", 4096, SEALED)?],
                    expect: Expect::Reject(0, &[R::Malformed]),
                })
            }),
        ),
        (
            "malformed/fds-beside-metadata-alone".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(
                        1,
                        1,
                        &body_with_metadata(HOSTILE_ID, 0, &[(b"k", b"v")]),
                    ),
                    fds: vec![memfd("stray", 4096, SEALED)?],
                    expect: Expect::Reject(HOSTILE_ID, &[R::FdCountMismatch]),
                })
            }),
        ),
    ];
    entries
        .into_iter()
        .map(|(name, script)| Case { name, script })
        .collect()
}
