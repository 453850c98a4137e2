//! Read-only mappings of verified memfds.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memmap2::{Mmap, MmapOptions};
use nix::errno::Errno;
use sealpass_kernel::host::ShmemHugePages;
use sealpass_proto::session::Grant;

/// A read-only mapping of a verified segment, counted against the
/// process's mapping budget until it is unmapped.
/// A verified segment's bytes: mapped read-only, or, for a small one, read
/// into memory of the receiver's own (`Config::copy_at_most`).
#[derive(Debug)]
pub(crate) enum Mapping {
    Mapped { pages: Mmap, _counted: Counted },
    Copied(Box<[u8]>),
}

impl std::ops::Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Mapping::Mapped { pages, .. } => pages,
            Mapping::Copied(bytes) => bytes,
        }
    }
}

/// Reads the `size` bytes of a verified memfd into a buffer of its own.
/// The memfd is sealed against shrinking (the grant proves it), so it holds
/// them all; a read that comes up short is an error, not a short segment.
fn copy_verified(fd: BorrowedFd<'_>, size: u64) -> io::Result<Mapping> {
    let length = usize::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "segment exceeds address space"))?;
    let mut bytes = vec![0u8; length].into_boxed_slice();
    let mut done = 0;
    while let Some(rest) = bytes.get_mut(done..).filter(|rest| !rest.is_empty()) {
        let offset = i64::try_from(done).map_err(io::Error::other)?;
        match nix::sys::uio::pread(fd, rest, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("read {done} of the {size} bytes of a memfd sealed against shrinking"),
                ));
            }
            Ok(read) => done += read,
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(Mapping::Copied(bytes))
}

/// How many mappings the process may make for received segments and
/// connection threads: `vm.max_map_count`, less those the process held when
/// it first asked (its program, libraries, heap) and [`SLACK`] for what
/// comes later (allocator arenas, the application's own). Past it mapping a
/// segment fails with `ENOMEM` (answered `ResourceExhausted`) and a
/// connection is refused before its thread is made, well before the kernel
/// itself would refuse: a thread whose stack or signal stack cannot be
/// mapped aborts the whole process.
struct Budget {
    limit: usize,
    held: AtomicUsize,
}

/// Mappings left for whatever the process does besides receiving.
const SLACK: usize = 256;

/// Mappings a thread takes: its stack and guard page, its signal stack and
/// guard page.
pub(crate) const THREAD_MAPPINGS: usize = 4;

fn budget() -> &'static Budget {
    static BUDGET: OnceLock<Budget> = OnceLock::new();
    BUDGET.get_or_init(|| {
        let max = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .unwrap_or(65530);
        let held_now =
            std::fs::read_to_string("/proc/self/maps").map_or(0, |maps| maps.lines().count());
        Budget {
            limit: max.saturating_sub(held_now).saturating_sub(SLACK),
            held: AtomicUsize::new(0),
        }
    })
}

/// `count` mappings of the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct Counted(usize);

impl Counted {
    /// Takes `count` mappings, or says how many are held and the limit.
    pub(crate) fn take(count: usize) -> Result<Counted, (usize, usize)> {
        let budget = budget();
        budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(count)
                    .filter(|&total| total <= budget.limit)
            })
            .map(|_| Counted(count))
            .map_err(|held| (held, budget.limit))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        budget().held.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// Whether this kernel maps a write-sealed memfd shared and read-only.
/// Kernels before 6.7 refuse it (`EPERM`: the mapping could be
/// `mprotect`ed writable), and a private read-only mapping, which sees the
/// same pages, stands in. Cleared at the first `EPERM`, so such a kernel
/// pays for the refused call once, not once per segment (as
/// `MFD_NOEXEC_SEAL` is remembered on the sending side).
static SHARED_READ_ONLY: AtomicBool = AtomicBool::new(true);

/// Maps a verified memfd read-only, `grant.size()` bytes; `None` for size 0,
/// which mmap refuses.
///
/// The [`Grant`] is the proof, and carries the fd: only `Session::judge`
/// makes one, from the fd it was given, after the kernel reported that the
/// memfd is that size and carries `F_SEAL_SHRINK` and `F_SEAL_WRITE`
/// ([`sealpass_proto::Seals::MAPPING_FLOOR`], which every policy includes).
/// With `populate`, the kernel faults every page in during the `mmap` call
/// (`MAP_POPULATE`): one batch instead of a fault per 4 KiB page on first
/// touch, for readers that read every byte.
pub(crate) fn map_verified(
    grant: Grant<'_, OwnedFd>,
    populate: bool,
    copy_at_most: u64,
) -> io::Result<Option<Mapping>> {
    let fd = grant.fd().as_fd();
    if grant.size() == 0 {
        return Ok(None);
    }
    if grant.size() <= copy_at_most {
        return copy_verified(fd, grant.size()).map(Some);
    }
    let counted = Counted::take(1).map_err(|(held, limit)| {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!(
                "the receiver holds {held} mappings, its limit under vm.max_map_count \
                 ({limit}; raise it with sysctl -w vm.max_map_count=N)"
            ),
        )
    })?;
    // A size no address space can map (EOVERFLOW) is out of memory too, as
    // the session classes failures by kind.
    let overflow = |error: io::Error| match error.raw_os_error() {
        Some(code) if code == Errno::EOVERFLOW as i32 => {
            io::Error::new(io::ErrorKind::OutOfMemory, error)
        }
        _ => error,
    };
    let pages = map_sealed(
        fd,
        grant.size(),
        populate,
        &SHARED_READ_ONLY,
        |options, fd| {
            // SAFETY: the memfd is sealed against shrinking and writing, as the
            // grant proves; seals are never removed. So no process, this one
            // included, can truncate it under the mapping (no SIGBUS) or change
            // the bytes behind the `&[u8]` we hand out, and it is exactly
            // `size` bytes long.
            unsafe { options.map(&fd) }
        },
    )
    .map_err(overflow)?;
    Ok(pages.map(|pages| Mapping::Mapped {
        pages,
        _counted: counted,
    }))
}

/// [`map_verified`], with the shared mapping made by `map_shared` (a test
/// injects `EPERM` there) and the kernel's answer remembered in `shared`.
fn map_sealed(
    fd: BorrowedFd<'_>,
    size: u64,
    populate: bool,
    shared: &AtomicBool,
    map_shared: impl FnOnce(&MmapOptions, BorrowedFd<'_>) -> io::Result<Mmap>,
) -> io::Result<Option<Mmap>> {
    if size == 0 {
        return Ok(None);
    }
    let length = usize::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "segment exceeds address space"))?;
    let mut options = MmapOptions::new();
    options.len(length);
    if populate {
        options.populate();
    }
    if shared.load(Ordering::Relaxed) {
        match map_shared(&options, fd) {
            Err(error) if error.raw_os_error() == Some(Errno::EPERM as i32) => {
                shared.store(false, Ordering::Relaxed);
            }
            other => {
                let mapping = other?;
                advise_huge_pages(&mapping, size);
                return Ok(Some(mapping));
            }
        }
    }
    // SAFETY: as in `map_verified`: the caller's memfd is sealed against
    // shrinking and writing. A private read-only mapping of it sees the same
    // pages and can never be written through.
    unsafe { options.map_copy_read_only(&fd) }.map(Some)
}

/// Asks for huge pages on a mapping of `size` bytes where the machine heeds
/// the request (`advise` and up) and the mapping holds one: the sender's
/// huge pages are then mapped 2 MiB at a time, one fault each. Only a hint;
/// the mode is read once per process.
fn advise_huge_pages(mapping: &Mmap, size: u64) {
    static MODE: OnceLock<ShmemHugePages> = OnceLock::new();
    if MODE.get_or_init(ShmemHugePages::read).advise_for(size) {
        let _ = mapping.advise(memmap2::Advice::HugePage);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// A memfd of `size` bytes of `byte`, sealed against writes and shrinking.
    fn sealed(size: usize, byte: u8) -> OwnedFd {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use std::os::unix::fs::FileExt;
        let fd = nix::sys::memfd::memfd_create(
            "mapping-test",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let file = std::fs::File::from(fd);
        file.write_all_at(&vec![byte; size], 0).unwrap();
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).unwrap();
        file.into()
    }

    /// The fallback a kernel before 6.7 takes, by fault injection: the shared
    /// mapping fails with EPERM once; the private one serves the same bytes,
    /// read-only; and the refusal is remembered, so later segments go
    /// straight to the private mapping.
    #[test]
    fn an_eperm_for_the_shared_mapping_falls_back_once_and_is_remembered() {
        let memfd = sealed(8192, b'q');
        let shared = AtomicBool::new(true);
        let mut attempts = 0;
        let mapping = map_sealed(memfd.as_fd(), 8192, false, &shared, |_, _| {
            attempts += 1;
            Err(io::Error::from_raw_os_error(Errno::EPERM as i32))
        })
        .unwrap()
        .unwrap();
        assert_eq!(attempts, 1);
        assert!(mapping.iter().all(|&b| b == b'q') && mapping.len() == 8192);
        assert!(!shared.load(Ordering::Relaxed), "the refusal is remembered");
        let again = map_sealed(memfd.as_fd(), 8192, true, &shared, |_, _| {
            panic!("the shared mapping is not tried again")
        })
        .unwrap()
        .unwrap();
        assert_eq!(&again[..4], b"qqqq");
        // Other errors are reported, not papered over, and change nothing.
        let fresh = AtomicBool::new(true);
        let error = map_sealed(memfd.as_fd(), 8192, false, &fresh, |_, _| {
            Err(io::Error::from_raw_os_error(Errno::ENOMEM as i32))
        })
        .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(Errno::ENOMEM as i32));
        assert!(fresh.load(Ordering::Relaxed));
    }

    #[test]
    fn this_kernel_maps_shared_or_falls_back_and_size_zero_maps_nothing() {
        let memfd = sealed(4096, b'z');
        let mapping = map_sealed(
            memfd.as_fd(),
            4096,
            true,
            &SHARED_READ_ONLY,
            |options, fd| {
                // SAFETY: the memfd above is sealed against shrinking and writing.
                unsafe { options.map(&fd) }
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(mapping[4095], b'z');
        let none = map_sealed(memfd.as_fd(), 0, false, &SHARED_READ_ONLY, |_, _| {
            panic!("size 0 is not mapped")
        })
        .unwrap();
        assert!(none.is_none());
    }
}
