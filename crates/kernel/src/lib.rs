//! sealpass's door to the kernel, used by the sender and the receiver
//! alike: the only crate of the protocol's that makes the system calls both
//! sides share, and the home of their `unsafe` (each block with its
//! `// SAFETY:` reason). `sealpass-proto` stays the protocol alone, without
//! I/O.
//!
//! - [`fdpass`]: sockets, `sendmsg`/`recvmsg` with `SCM_RIGHTS`, batches
//!   (`recvmmsg`, `sendmmsg`), peer credentials and pidfds, closing a
//!   connection after its last answer.
//! - [`host`]: what the machine offers sealpass (kernel, memfd flags, huge
//!   pages, fd and mapping limits), read from `/proc` and `/sys`.
//! - [`memfd`]: `memfd_create`, by its system call number (no glibc 2.27
//!   wrapper needed).

pub mod fdpass;
pub mod host;
pub mod memfd;
