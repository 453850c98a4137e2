//! What `--json` prints: one line per accepted transfer (its connection,
//! id, version, peer, segments and metadata) or per batch of bare fds.

use std::borrow::Cow;

use sealpass_proto::PeerCredentials;
use sealpass_receiver::{IncomingTransfer, Metadata};
use serde::Serialize;

#[derive(Serialize)]
pub(crate) struct TransferLine<'a> {
    /// The connection's number (from 1, in accept order): with `id` it
    /// names the transfer uniquely for the life of the receiver.
    connection: u64,
    id: u64,
    version: String,
    peer: PeerLine,
    segments: Vec<SegmentLine<'a>>,
    /// The sender's own fields (protocol 1.1), in order; empty when none.
    metadata: Vec<MetadataLine<'a>>,
}

/// One metadata entry: its value as text where it is UTF-8, otherwise as
/// lowercase hex, and which of the two `encoding` says.
#[derive(Serialize)]
pub(crate) struct MetadataLine<'a> {
    key: &'a str,
    value: Cow<'a, str>,
    /// `utf-8` or `hex`.
    encoding: &'static str,
}

/// The metadata of a transfer as JSON lines describe it.
pub(crate) fn metadata_lines(metadata: &Metadata) -> Vec<MetadataLine<'_>> {
    metadata
        .iter()
        .map(|(key, value)| match std::str::from_utf8(value) {
            Ok(text) => MetadataLine {
                key,
                value: text.into(),
                encoding: "utf-8",
            },
            Err(_) => MetadataLine {
                key,
                value: value
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
                    .into(),
                encoding: "hex",
            },
        })
        .collect()
}

/// Where `--out` stores a transfer's metadata, beside its segments.
pub(crate) const METADATA_FILE: &str = "sealpass-metadata.json";

#[derive(Serialize)]
pub(crate) struct PeerLine {
    pid: i32,
    uid: u32,
    gid: u32,
    /// Whether the receiver holds a pidfd for the peer (Linux 6.5+): the
    /// pid then names the process that connected, not a later one.
    pidfd: bool,
}

#[derive(Serialize)]
pub(crate) struct SegmentLine<'a> {
    name: &'a str,
    size: u64,
    seals: String,
    /// The first bytes, as hex, so a reader can eyeball the content.
    head: String,
}

pub(crate) fn describe<'a>(
    transfer: &'a IncomingTransfer,
    peer: &PeerCredentials,
    connection: u64,
) -> TransferLine<'a> {
    TransferLine {
        connection,
        id: transfer.id(),
        version: transfer.version().to_string(),
        peer: PeerLine {
            pid: peer.pid,
            uid: peer.uid,
            gid: peer.gid,
            pidfd: transfer.peer_pidfd().is_some(),
        },
        segments: transfer
            .segments()
            .iter()
            .map(|segment| SegmentLine {
                name: segment.name(),
                size: segment.size(),
                seals: segment.seals().to_string(),
                head: segment
                    .bytes()
                    .iter()
                    .take(16)
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            })
            .collect(),
        metadata: metadata_lines(transfer.metadata()),
    }
}

/// The JSON line for a batch of bare fds.
#[derive(Serialize)]
pub(crate) struct BareLine<'a> {
    pub(crate) compat: bool,
    pub(crate) segments: Vec<BareSegmentLine<'a>>,
}

#[derive(Serialize)]
pub(crate) struct BareSegmentLine<'a> {
    pub(crate) name: &'a str,
    pub(crate) size: u64,
    pub(crate) seals: String,
}
