//! The buffer protocol, both ways: exporting a mapping's pages to Python
//! (read-only for received segments, writable for a segment being filled),
//! and borrowing the bytes of any Python object that exports them. This is
//! the binding's only unsafe code; the rest of it is plain pyo3.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_void};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::prelude::*;
use pyo3::{PyErr, ffi};
use sealpass_sender::{Pages, SealedSegment, Seals, SegmentError};

/// Fills `view` to export `len` bytes at `start`, owned by `owner`, which
/// the view keeps alive (a new reference) until Python releases it.
/// `PyBuffer_FillInfo` refuses a writable request on read-only bytes with
/// `BufferError`, and answers any request for format or shape as one
/// dimension of unsigned bytes.
///
/// # Safety
///
/// `view` comes from Python's `getbufferproc` (valid, writable). The `len`
/// bytes at `start` stay valid, and stay mapped, until the matching
/// `__releasebuffer__` (the owner counts its exports and keeps its pages
/// while any is open). If `writable`, they may be written through the view.
pub(crate) unsafe fn export(
    owner: &Bound<'_, PyAny>,
    view: *mut ffi::Py_buffer,
    flags: c_int,
    start: *const u8,
    len: usize,
    writable: bool,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("no buffer view to fill"));
    }
    let len = isize::try_from(len)
        .map_err(|_| PyBufferError::new_err(format!("{len} bytes do not fit a Py_ssize_t")))?;
    // SAFETY: the caller vouches for `view` and for the bytes (see above);
    // `owner` is a live object, whose reference count FillInfo raises for
    // the view it fills.
    let filled = unsafe {
        ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            start.cast_mut().cast::<c_void>(),
            len,
            c_int::from(!writable),
            flags,
        )
    };
    if filled == 0 {
        Ok(())
    } else {
        Err(PyErr::fetch(owner.py()))
    }
}

/// The bytes of a Python object that exports the buffer protocol (bytes,
/// bytearray, memoryview, a C-contiguous numpy array), borrowed until this
/// drops. While it lives the exporter keeps the memory where it is (a
/// bytearray cannot be resized, for one). Other threads may still write
/// them (a bytearray, a numpy array), so no Rust reference to them is ever
/// made: they are handed on as a pointer and a length.
pub(crate) struct Borrowed {
    view: ffi::Py_buffer,
}

impl Borrowed {
    /// Asks `object` for its bytes as one C-contiguous run, with their
    /// format: an object that cannot give them so (a strided numpy view)
    /// raises `BufferError`, and so does one without the buffer protocol.
    /// Bytes that hold pointers (format `O`, `P` or `&`: a numpy array of
    /// objects, say) raise `TypeError`: they are addresses in this process,
    /// which mean nothing to the receiver and would show it this process's
    /// memory layout.
    pub(crate) fn get(object: &Bound<'_, PyAny>) -> PyResult<Borrowed> {
        let mut view = ffi::Py_buffer::new();
        // SAFETY: `object` is a live object and `view` a zeroed Py_buffer
        // that GetBuffer fills; on failure it leaves nothing to release.
        let got = unsafe {
            ffi::PyObject_GetBuffer(
                object.as_ptr(),
                &mut view,
                ffi::PyBUF_C_CONTIGUOUS | ffi::PyBUF_FORMAT,
            )
        };
        if got != 0 {
            return Err(PyErr::fetch(object.py()));
        }
        let borrowed = Borrowed { view };
        let format = if borrowed.view.format.is_null() {
            "B".to_owned()
        } else {
            // SAFETY: a view filled with PyBUF_FORMAT has a NUL-terminated
            // format string, valid until the view is released (after this).
            unsafe { std::ffi::CStr::from_ptr(borrowed.view.format) }
                .to_string_lossy()
                .into_owned()
        };
        if holds_pointers(&format) {
            return Err(PyTypeError::new_err(format!(
                "a buffer of format {format:?} holds pointers (Python objects or addresses), \
                 which mean nothing in another process; expected plain data (bytes, numbers, \
                 structs of them)"
            )));
        }
        Ok(borrowed)
    }

    /// Whether the exporter lent the bytes writable (a `SegmentWriter`'s
    /// pages are; bytes objects are not).
    pub(crate) fn writable(&self) -> bool {
        self.view.readonly == 0
    }

    /// Where the bytes are: their address and length.
    pub(crate) fn span(&self) -> (usize, usize) {
        let len = usize::try_from(self.view.len).unwrap_or(0);
        (self.view.buf.addr(), len)
    }

    /// A new sealed segment holding a copy of the bytes, made without the
    /// GIL: other threads may write them while they are copied.
    pub(crate) fn copy_to_segment(
        &self,
        name: &str,
        seals: Seals,
        pages: Pages,
    ) -> Result<SealedSegment, SegmentError> {
        let len = if self.view.buf.is_null() {
            0
        } else {
            usize::try_from(self.view.len).unwrap_or(0)
        };
        let start = self.view.buf.cast::<u8>().cast_const();
        // SAFETY: the view keeps its `len` bytes at `start` allocated and in
        // place until it is released (`drop`, after this returns); other
        // threads may write them meanwhile, which `shared_bytes` allows: it
        // reads them only through the kernel and `copy_nonoverlapping`,
        // never through a reference.
        unsafe {
            SealedSegment::builder(name)
                .seals(seals)
                .pages(pages)
                .shared_bytes(start, len)
        }
    }
}

/// Whether a buffer format (PEP 3118, the `struct` module's codes) holds
/// pointers: `O` (a Python object), `P` (`void *`) or `&` (a pointer to the
/// type after it). Field names (`:name:`) are skipped.
pub(crate) fn holds_pointers(format: &str) -> bool {
    format
        .split(':')
        .step_by(2)
        .any(|codes| codes.contains(['O', 'P', '&']))
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        // Releasing a view calls back into its exporter: it needs the GIL.
        Python::attach(|_| {
            // SAFETY: `view` was filled by a successful PyObject_GetBuffer
            // and is released exactly once, here.
            unsafe { ffi::PyBuffer_Release(&mut self.view) }
        });
    }
}

// SAFETY: off the thread that holds the GIL, only the view's pointer and
// length are read (`copy_to_segment`), and the bytes behind them only by the
// kernel or `copy_nonoverlapping` (`from_shared_bytes_in`), while the
// exporter keeps them in place; it is released with the GIL held (`drop`).
unsafe impl Send for Borrowed {}
// SAFETY: as above: shared access only reads the pointer and the length.
unsafe impl Sync for Borrowed {}

/// A new fd (close-on-exec) for the file behind the number `fd` that Python
/// code handed in, which stays the caller's.
pub(crate) fn duplicate_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(9)); // EBADF
    }
    // SAFETY: the borrow lasts for one fcntl(F_DUPFD_CLOEXEC) and closes
    // nothing; a number that is not open fails that call with EBADF.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned()
}
