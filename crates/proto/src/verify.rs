//! The receiver's decision rules: given what the kernel reported about each
//! fd, is it the memfd the header declares, sealed as the receiver requires?
//!
//! No I/O happens here. The receiver gathers [`FdFacts`] with `F_GET_SEALS`,
//! `fstat` and a `readlink` of `/proc/self/fd/N`, in that order: once SHRINK
//! and GROW are read as set, the size read after them is final.
#![forbid(unsafe_code)]

use crate::config::{Config, PeerCredentials};
use crate::message::{Reject, RejectReason, Segment};
use crate::seals::Seals;

/// The type of file an fd refers to, from `fstat`'s `st_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileKind {
    /// `S_IFREG`: what a memfd is.
    Regular,
    /// `S_IFDIR`.
    Directory,
    /// `S_IFIFO`: a pipe.
    Fifo,
    /// `S_IFSOCK`.
    Socket,
    /// `S_IFCHR`, such as `/dev/null`.
    CharDevice,
    /// `S_IFBLK`.
    BlockDevice,
    /// `S_IFLNK` (only through `O_PATH`).
    Symlink,
    /// Anything else, such as an anonymous inode (eventfd, epoll).
    Other,
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileKind::Regular => "regular file",
            FileKind::Directory => "directory",
            FileKind::Fifo => "pipe",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "character device",
            FileKind::BlockDevice => "block device",
            FileKind::Symlink => "symbolic link",
            FileKind::Other => "special file",
        })
    }
}

/// What the kernel reported about one received fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdFacts {
    /// From `fstat`.
    pub kind: FileKind,
    /// From `F_GET_SEALS`; `None` where it failed (the file does not support sealing).
    pub seals: Option<Seals>,
    /// From `fstat`, read after the seals.
    pub size: u64,
    /// Bytes the file has allocated (`st_blocks` × 512, from the same
    /// `fstat`): fewer than `size` means it has holes, which reading
    /// allocates, charged to the reader.
    pub allocated: u64,
    /// The target of `/proc/self/fd/N`; for a memfd, `/memfd:NAME (deleted)`.
    pub link: Vec<u8>,
}

/// What the kernel says a memfd link looks like: `/memfd:` + name + ` (deleted)`.
const MEMFD_LINK_PREFIX: &[u8] = b"/memfd:";
const MEMFD_LINK_SUFFIX: &[u8] = b" (deleted)";

impl FdFacts {
    /// The memfd name in the link, if the link is a memfd's.
    pub fn memfd_name(&self) -> Option<&[u8]> {
        self.link
            .strip_prefix(MEMFD_LINK_PREFIX)?
            .strip_suffix(MEMFD_LINK_SUFFIX)
    }
}

/// What a receiver requires of every segment beyond what it declares: seals,
/// and, unless told otherwise, no holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    required: Seals,
    refuse_sparse: bool,
}

impl Policy {
    /// A policy requiring `required` plus [`Seals::MAPPING_FLOOR`], which no
    /// policy can drop: the receiver hands out `&[u8]` over the mapping.
    /// Sparse memfds are refused.
    pub fn new(required: Seals) -> Policy {
        Policy {
            required: required | Seals::MAPPING_FLOOR,
            refuse_sparse: true,
        }
    }

    /// This policy, refusing (`true`, the default) or accepting sparse
    /// memfds: those with fewer bytes allocated than their size
    /// ([`RejectReason::Sparse`]).
    ///
    /// Accepting them is a risk: reading a hole allocates a page charged to
    /// the reader, and it stays charged for as long as the sender keeps the
    /// memfd, so a sender can make the receiver pay for memory it was never
    /// handed (a 512 MiB hole read by a receiver in a 64 MiB memory cgroup
    /// gets it killed). The mapped-bytes limits count whole sizes, not what
    /// is allocated, but they do not bound the receiver's own memory.
    #[must_use]
    pub fn with_refuse_sparse(self, refuse_sparse: bool) -> Policy {
        Policy {
            refuse_sparse,
            ..self
        }
    }

    /// The seals every segment must carry.
    pub fn required(&self) -> Seals {
        self.required
    }

    /// Whether sparse memfds are refused.
    pub fn refuses_sparse(&self) -> bool {
        self.refuse_sparse
    }
}

impl Default for Policy {
    /// SHRINK, GROW and WRITE.
    fn default() -> Policy {
        Policy::new(Seals::RECEIVER_DEFAULT)
    }
}

/// Why one fd is not the segment its header declares. Each variant keeps
/// what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FdCheckError {
    /// Not a regular file, so not a memfd.
    #[error("segment {index} ({name:?}): fd is a {found}; expected a memfd")]
    NotRegularFile {
        /// The segment's position.
        index: usize,
        /// The declared name.
        name: String,
        /// What the fd is.
        found: FileKind,
    },
    /// A regular file that does not support seals: not a memfd.
    #[error(
        "segment {index} ({name:?}): fd is a regular file without seal support; expected a memfd"
    )]
    NotSealable {
        /// The segment's position.
        index: usize,
        /// The declared name.
        name: String,
    },
    /// A sealable file whose link is not a memfd's (a file on tmpfs, say).
    #[error("segment {index} ({name:?}): fd is {link:?}; expected a memfd")]
    NotMemfdLink {
        /// The segment's position.
        index: usize,
        /// The declared name.
        name: String,
        /// The link as read.
        link: String,
    },
    /// The memfd's name differs from the declared one.
    #[error("segment {index}: memfd is named {found:?}; header declares {declared:?}")]
    NameMismatch {
        /// The segment's position.
        index: usize,
        /// The declared name.
        declared: String,
        /// The name the kernel reports.
        found: String,
    },
    /// The memfd's size differs from the declared one.
    #[error("segment {index} ({name:?}): memfd is {found} bytes; header declares {declared}")]
    SizeMismatch {
        /// The segment's position.
        index: usize,
        /// The declared name.
        name: String,
        /// The declared size.
        declared: u64,
        /// The size the kernel reports.
        found: u64,
    },
    /// The memfd lacks seals it must carry.
    #[error(
        "segment {index} ({name:?}): memfd is sealed {found}; missing {missing} \
         (declared {declared}, receiver requires {required})"
    )]
    MissingSeals {
        /// The segment's position.
        index: usize,
        /// The declared name.
        name: String,
        /// The declared seals.
        declared: Seals,
        /// The receiver's required seals.
        required: Seals,
        /// The seals the kernel reports.
        found: Seals,
        /// Required or declared, but absent.
        missing: Seals,
    },
    /// The memfd has holes and the receiver refuses sparse memfds.
    #[error(
        "segment {index} ({name:?}): memfd has {allocated} of its {size} bytes allocated; \
         this receiver refuses sparse memfds, whose holes would be allocated on read"
    )]
    Sparse {
        /// The segment's position.
        index: usize,
        /// The declared name.
        name: String,
        /// Its size.
        size: u64,
        /// Bytes allocated (`st_blocks` × 512).
        allocated: u64,
    },
}

impl FdCheckError {
    /// The reason a receiver gives for this failure.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            FdCheckError::NotRegularFile { .. }
            | FdCheckError::NotSealable { .. }
            | FdCheckError::NotMemfdLink { .. } => RejectReason::NotMemfd,
            FdCheckError::NameMismatch { .. } => RejectReason::NameMismatch,
            FdCheckError::SizeMismatch { .. } => RejectReason::SizeMismatch,
            FdCheckError::MissingSeals { .. } => RejectReason::MissingSeals,
            FdCheckError::Sparse { .. } => RejectReason::Sparse,
        }
    }
}

/// The checks that make an fd a memfd: a regular file, sealable, with a
/// memfd's link. Returns its seals and the name in its link. `label` names
/// the fd in errors.
fn check_memfd<'f>(
    index: usize,
    label: &str,
    facts: &'f FdFacts,
) -> Result<(Seals, &'f [u8]), FdCheckError> {
    if facts.kind != FileKind::Regular {
        return Err(FdCheckError::NotRegularFile {
            index,
            name: label.to_owned(),
            found: facts.kind,
        });
    }
    let Some(seals) = facts.seals else {
        return Err(FdCheckError::NotSealable {
            index,
            name: label.to_owned(),
        });
    };
    let Some(name) = facts.memfd_name() else {
        return Err(FdCheckError::NotMemfdLink {
            index,
            name: label.to_owned(),
            link: String::from_utf8_lossy(&facts.link).into_owned(),
        });
    };
    Ok((seals, name))
}

/// Judges one fd against its declared segment, checking in this order: it
/// is a regular file; it supports seals; its link is a memfd's; the name; the
/// size; the seals (actual ⊇ declared ∪ required, never equality: a memfd
/// made with `MFD_NOEXEC_SEAL` also carries `F_SEAL_EXEC`).
pub fn check_segment(
    index: usize,
    declared: &Segment,
    facts: &FdFacts,
    policy: &Policy,
) -> Result<(), FdCheckError> {
    let name = || declared.name.clone();
    let (found_seals, found_name) = check_memfd(index, &declared.name, facts)?;
    if found_name != declared.name.as_bytes() {
        return Err(FdCheckError::NameMismatch {
            index,
            declared: name(),
            found: String::from_utf8_lossy(found_name).into_owned(),
        });
    }
    if facts.size != declared.size {
        return Err(FdCheckError::SizeMismatch {
            index,
            name: name(),
            declared: declared.size,
            found: facts.size,
        });
    }
    let missing = (declared.seals | policy.required()) - found_seals;
    if !missing.is_empty() {
        return Err(FdCheckError::MissingSeals {
            index,
            name: name(),
            declared: declared.seals,
            required: policy.required(),
            found: found_seals,
            missing,
        });
    }
    if policy.refuses_sparse() && facts.allocated < facts.size {
        return Err(FdCheckError::Sparse {
            index,
            name: name(),
            size: facts.size,
            allocated: facts.allocated,
        });
    }
    Ok(())
}

/// What the kernel vouches for about a bare fd: one that came without a
/// header, from a peer that speaks no sealpass (compat mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BareMemfd {
    /// The memfd's name, from its link (lossy where it is not UTF-8).
    pub name: String,
    /// Its size when inspected. Without SHRINK it may shrink afterwards.
    pub size: u64,
    /// Its seals.
    pub seals: Seals,
}

/// Judges a bare fd: every check of [`check_segment`] that needs no header.
/// It must be a memfd and carry at least `required`, which may be empty:
/// a compat receiver copies bytes out rather than mapping them.
pub fn check_bare_fd(
    index: usize,
    facts: &FdFacts,
    required: Seals,
) -> Result<BareMemfd, FdCheckError> {
    let (seals, name) = check_memfd(index, &format!("fd {index}"), facts)?;
    let name = String::from_utf8_lossy(name).into_owned();
    let missing = required - seals;
    if !missing.is_empty() {
        return Err(FdCheckError::MissingSeals {
            index,
            name,
            declared: Seals::empty(),
            required,
            found: seals,
            missing,
        });
    }
    Ok(BareMemfd {
        name,
        size: facts.size,
        seals,
    })
}

/// The number of fds must equal the number of segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message carries {fds} fds for {segments} declared segments; expected one fd per segment")]
pub struct FdCountMismatch {
    /// Fds received.
    pub fds: usize,
    /// Segments declared.
    pub segments: usize,
}

/// Checks that a transfer brought exactly one fd per segment.
pub fn check_fd_count(fds: usize, segments: usize) -> Result<(), FdCountMismatch> {
    if fds == segments {
        Ok(())
    } else {
        Err(FdCountMismatch { fds, segments })
    }
}

/// Decides whether to serve a new connection: the peer's credentials
/// against [`Config::access`] (`NotAllowed`), then the connections already
/// served against [`Config::max_connections`] (`TooManyConnections`).
/// `peer` is `None` where the kernel did not say who it is. A refusal is
/// the `Reject` to send before closing.
pub fn admit(config: &Config, peer: Option<&PeerCredentials>, active: usize) -> Result<(), Reject> {
    let Some(peer) = peer else {
        return Err(Reject::new(
            0,
            RejectReason::NotAllowed,
            "peer credentials unavailable; this receiver admits only peers it can identify",
        ));
    };
    if !config.access().allows(peer) {
        return Err(Reject::new(
            0,
            RejectReason::NotAllowed,
            format!("{peer} is not allowed to send to this receiver"),
        ));
    }
    if active >= config.max_connections() {
        return Err(Reject::new(
            0,
            RejectReason::TooManyConnections,
            format!(
                "the receiver serves its limit of {} connections; try again later",
                config.max_connections()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEALED: Seals = Seals::SENDER_DEFAULT;

    fn declared() -> Segment {
        Segment {
            name: "shma".into(),
            size: 4096,
            seals: SEALED,
        }
    }

    fn memfd_facts() -> FdFacts {
        FdFacts {
            kind: FileKind::Regular,
            seals: Some(SEALED | Seals::EXEC),
            size: 4096,
            allocated: 4096,
            link: b"/memfd:shma (deleted)".to_vec(),
        }
    }

    fn check(facts: FdFacts, policy: Policy, expected: Result<(), RejectReason>) {
        let result = check_segment(0, &declared(), &facts, &policy);
        assert_eq!(
            result.clone().map_err(|e| e.reject_reason()),
            expected,
            "{facts:?}: {result:?}"
        );
    }

    #[test]
    fn decision_table() {
        let ok = Ok(());
        let policy = Policy::default();
        check(memfd_facts(), policy, ok);

        // Holes: refused by default, accepted on request; a memfd allocated
        // past its size is whole.
        let sparse = FdFacts {
            allocated: 0,
            ..memfd_facts()
        };
        let refusing = Policy::default();
        let accepting = Policy::default().with_refuse_sparse(false);
        check(sparse.clone(), accepting, ok);
        check(sparse, refusing, Err(RejectReason::Sparse));
        check(
            FdFacts {
                allocated: 4095,
                ..memfd_facts()
            },
            refusing,
            Err(RejectReason::Sparse),
        );
        check(memfd_facts(), refusing, ok);
        check(
            FdFacts {
                allocated: 2 << 20,
                ..memfd_facts()
            },
            refusing,
            ok,
        );
        // The seals are judged before the holes.
        check(
            FdFacts {
                seals: Some(Seals::SHRINK),
                allocated: 0,
                ..memfd_facts()
            },
            refusing,
            Err(RejectReason::MissingSeals),
        );

        let not_memfd = Err(RejectReason::NotMemfd);
        for kind in [FileKind::Fifo, FileKind::CharDevice, FileKind::Directory] {
            check(
                FdFacts {
                    kind,
                    ..memfd_facts()
                },
                policy,
                not_memfd,
            );
        }
        check(
            FdFacts {
                seals: None,
                ..memfd_facts()
            },
            policy,
            not_memfd,
        );
        check(
            FdFacts {
                link: b"/dev/shm/shma (deleted)".to_vec(),
                ..memfd_facts()
            },
            policy,
            not_memfd,
        );
        check(
            FdFacts {
                link: b"/memfd:shmb (deleted)".to_vec(),
                ..memfd_facts()
            },
            policy,
            Err(RejectReason::NameMismatch),
        );
        check(
            FdFacts {
                size: 4095,
                ..memfd_facts()
            },
            policy,
            Err(RejectReason::SizeMismatch),
        );
        // Declared SEAL but the memfd lacks it.
        check(
            FdFacts {
                seals: Some(Seals::RECEIVER_DEFAULT),
                ..memfd_facts()
            },
            policy,
            Err(RejectReason::MissingSeals),
        );
        // FUTURE_WRITE does not stand in for WRITE.
        check(
            FdFacts {
                seals: Some(Seals::SHRINK | Seals::GROW | Seals::FUTURE_WRITE | Seals::SEAL),
                ..memfd_facts()
            },
            policy,
            Err(RejectReason::MissingSeals),
        );
    }

    #[test]
    fn policy_cannot_drop_the_mapping_floor() {
        assert_eq!(Policy::new(Seals::empty()).required(), Seals::MAPPING_FLOOR);
        assert_eq!(Policy::default().required(), Seals::RECEIVER_DEFAULT);
    }

    #[test]
    fn missing_seals_error_names_what_is_missing() {
        let facts = FdFacts {
            seals: Some(Seals::SHRINK | Seals::SEAL),
            ..memfd_facts()
        };
        let error = check_segment(3, &declared(), &facts, &Policy::default()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "segment 3 (\"shma\"): memfd is sealed SEAL|SHRINK; missing GROW|WRITE \
             (declared SEAL|SHRINK|GROW|WRITE, receiver requires SHRINK|GROW|WRITE)"
        );
    }

    #[test]
    fn names_with_the_suffix_inside_are_read_exactly() {
        let facts = FdFacts {
            link: b"/memfd:a (deleted) (deleted)".to_vec(),
            ..memfd_facts()
        };
        assert_eq!(facts.memfd_name(), Some(&b"a (deleted)"[..]));
    }

    #[test]
    fn bare_fds_are_judged_without_a_header() {
        let unsealed = FdFacts {
            seals: Some(Seals::empty()),
            ..memfd_facts()
        };
        assert_eq!(
            check_bare_fd(0, &unsealed, Seals::empty()),
            Ok(BareMemfd {
                name: "shma".into(),
                size: 4096,
                seals: Seals::empty()
            })
        );
        let check = |facts: &FdFacts, required| {
            check_bare_fd(0, facts, required).map_err(|e| e.reject_reason())
        };
        assert_eq!(
            check(&unsealed, Seals::WRITE),
            Err(RejectReason::MissingSeals)
        );
        let pipe = FdFacts {
            kind: FileKind::Fifo,
            ..memfd_facts()
        };
        assert_eq!(check(&pipe, Seals::empty()), Err(RejectReason::NotMemfd));
        let tmpfs = FdFacts {
            link: b"/dev/shm/x".to_vec(),
            ..memfd_facts()
        };
        assert_eq!(check(&tmpfs, Seals::empty()), Err(RejectReason::NotMemfd));
    }

    #[test]
    fn fd_count() {
        assert_eq!(check_fd_count(2, 2), Ok(()));
        assert_eq!(
            check_fd_count(3, 2).unwrap_err().to_string(),
            "message carries 3 fds for 2 declared segments; expected one fd per segment"
        );
    }
}
