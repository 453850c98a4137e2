//! Limits of protocol v1. Both sides enforce every one of them: a sender
//! refuses to encode past them and a receiver rejects a message that breaks
//! them before acting on it.
#![forbid(unsafe_code)]

/// Length of the fixed preamble that starts every message.
pub const PREAMBLE_LEN: usize = 12;

/// Most segments (and so fds) one `Transfer` may carry. This is the kernel's
/// `SCM_MAX_FD`: `sendmsg` fails with `EINVAL` past it.
pub const MAX_SEGMENTS: usize = 253;

/// Longest memfd name in bytes. The kernel limits the name given to
/// `memfd_create` to 249 bytes (`NAME_MAX` less the 6 of its `memfd:` prefix).
pub const MAX_NAME_LEN: usize = 249;

/// Longest human-readable message in a `Reject`, in bytes.
pub const MAX_REJECT_MESSAGE_LEN: usize = 1024;

/// Most bytes of one message on the wire (preamble and body). 253 segments
/// carrying the longest name take 68,077 bytes of body, 68,089 with the
/// preamble (PROTOCOL.md section 5); the rest is room for fields a newer
/// minor version may append.
pub const MAX_MESSAGE_LEN: usize = 128 * 1024;

/// Most messages a receiver reads with one `recvmmsg` or answers with one
/// `sendmmsg`: not a rule of the protocol, the size of a driver's batch.
pub const MAX_BATCH: usize = 32;

/// Longest metadata key in bytes (protocol 1.1).
pub const MAX_METADATA_KEY_LEN: usize = 255;

/// Most bytes a transfer's metadata takes on the wire, its entry count
/// included (protocol 1.1): a transfer at every other limit (68,089 bytes
/// with its preamble) still fits [`MAX_METADATA_LEN`] of metadata within
/// [`MAX_MESSAGE_LEN`], with 1,543 bytes to spare for later fields.
pub const MAX_METADATA_LEN: usize = 60 * 1024;

/// Most bytes of the body, after the preamble.
pub const MAX_BODY_LEN: usize = MAX_MESSAGE_LEN - PREAMBLE_LEN;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_v1_transfer_fits_the_message_limit() {
        // id + segment count + per segment (name length + name + size + seals)
        let largest_body = 4 + 8 + 8 + MAX_SEGMENTS * (8 + MAX_NAME_LEN + 8 + 4);
        assert_eq!(largest_body, 68_077);
        assert_eq!(PREAMBLE_LEN + largest_body, 68_089);
        assert!(largest_body <= MAX_BODY_LEN);
    }
}
