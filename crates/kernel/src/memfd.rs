//! Creating a memfd: `memfd_create(2)` by its system call number. glibc
//! wraps it only since 2.27, and a call through the wrapper would tie the
//! binaries and the Python wheel to that glibc; the system call itself is
//! in every kernel sealpass runs on (3.17 and later).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::libc;
pub use nix::sys::memfd::MFdFlags;

/// A new memfd named `name` (the kernel shows `memfd:NAME`), made with
/// `flags`. A name with a NUL byte is `EINVAL`, as the kernel says of a
/// name it cannot take.
pub fn memfd_create(name: &str, flags: MFdFlags) -> Result<OwnedFd, Errno> {
    let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
    // SAFETY: memfd_create takes a NUL-terminated string, which `name` is
    // and which outlives the call, and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_create, name.as_ptr(), flags.bits()) };
    let fd = Errno::result(fd)?;
    let fd = i32::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned `fd`, new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name reaches the kernel as given, and a name it cannot take is
    /// refused.
    #[test]
    fn a_memfd_has_the_name_it_was_made_with() {
        let fd =
            memfd_create("probe", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .unwrap();
        assert_eq!(link.to_string_lossy(), "/memfd:probe (deleted)");
        for (name, expected) in [
            ("nul\0inside", Errno::EINVAL),
            (&"x".repeat(300), Errno::EINVAL),
        ] {
            assert_eq!(
                memfd_create(name, MFdFlags::MFD_CLOEXEC).unwrap_err(),
                expected,
                "{name:?}"
            );
        }
    }
}
