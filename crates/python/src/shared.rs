//! An object that one call uses at a time, and that any thread may close,
//! even while a call on another thread waits with the GIL released.
//!
//! A blocking call takes the object out of its slot ([`Slot::lend`]) for
//! the length of the call, so no lock is held while it waits, and puts it
//! back when done. `close()` marks the slot closed and shuts the socket
//! down both ways (through a duplicate kept for it), which wakes a call
//! blocked in the kernel at once; a call that waits in slices sees the
//! mark at its next slice. Either way the call raises a clear exception,
//! and the object is dropped when the call gives it back.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::PyResult;
use pyo3::exceptions::PyValueError;

use crate::lock;

/// The slot of an object of type `T`, named `what` in errors.
pub(crate) struct Slot<T> {
    what: &'static str,
    value: Mutex<Option<T>>,
    closed: AtomicBool,
    /// A duplicate of the object's socket, to shut it down when it is
    /// closed while lent out; closed by `close` either way, so it never
    /// keeps the connection open. `None` when none could be had (the slice
    /// check still ends the call).
    waker: Mutex<Option<OwnedFd>>,
}

impl<T> Slot<T> {
    /// A slot holding `value`, whose socket is `socket`.
    pub(crate) fn new(what: &'static str, value: T, socket: Option<&impl AsFd>) -> Slot<T> {
        Slot {
            what,
            value: Mutex::new(Some(value)),
            closed: AtomicBool::new(false),
            waker: Mutex::new(socket.and_then(|socket| socket.as_fd().try_clone_to_owned().ok())),
        }
    }

    /// Whether `close()` was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The error of a call made on, or waiting on, a closed object.
    pub(crate) fn closed_error(&self, call: &str) -> pyo3::PyErr {
        PyValueError::new_err(format!("the {} is closed ({call})", self.what))
    }

    /// Takes the object for one call; given back when the loan drops.
    pub(crate) fn lend(&self, call: &str) -> PyResult<Loan<'_, T>> {
        if self.is_closed() {
            return Err(self.closed_error(call));
        }
        match lock(&self.value).take() {
            Some(value) => Ok(Loan {
                slot: self,
                value: Some(value),
            }),
            None if self.is_closed() => Err(self.closed_error(call)),
            None => Err(PyValueError::new_err(format!(
                "the {} is in use by another thread ({call} waits for one call at a time)",
                self.what
            ))),
        }
    }

    /// `f` on the object, when it is in its slot (not closed, not lent).
    pub(crate) fn peek<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        lock(&self.value).as_ref().map(f)
    }

    /// Closes the object: dropped now if it is in its slot, or when the call
    /// that has it gives it back, which its socket being shut down wakes.
    /// Returns what was in the slot, for the caller to drop where it likes.
    pub(crate) fn close(&self) -> Option<T> {
        self.closed.store(true, Ordering::Release);
        let value = lock(&self.value).take();
        let waker = lock(&self.waker).take();
        if let (None, Some(waker)) = (&value, &waker) {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(waker),
                nix::sys::socket::Shutdown::Both,
            );
        }
        value
    }
}

/// An object lent to one call.
pub(crate) struct Loan<'a, T> {
    slot: &'a Slot<T>,
    value: Option<T>,
}

impl<T> std::ops::Deref for Loan<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // Present from `lend` until `drop`.
        self.value.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl<T> std::ops::DerefMut for Loan<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl<T> Drop for Loan<'_, T> {
    fn drop(&mut self) {
        let value = self.value.take();
        // Checked under the lock: `close` marks the slot before it takes
        // the lock, so a value put back here is one it will still take.
        let mut slot = lock(&self.slot.value);
        if !self.slot.is_closed() {
            *slot = value;
            return;
        }
        drop(slot);
        // Closed meanwhile: `value` drops here, outside the lock.
        drop(value);
    }
}
