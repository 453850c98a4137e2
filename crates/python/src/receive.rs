//! Receiving: the listener, its connections, the transfers they deliver and
//! their verified segments, whose mappings Python reads without a copy.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFrozenSet, PyTuple};
use sealpass_proto::Seals;
use sealpass_receiver::{
    Config, Connection, Listener, PeerCredentials, ServeError, VerifiedSegment,
};

use crate::send::Segment;
use crate::shared::Slot;
use crate::transfer::Transfer;
use crate::{Error, buffers, lock, seals_from, seals_to, timed_out, timeout_from};

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Peer>()?;
    module.add_class::<ReceivedSegment>()?;
    module.add_class::<Transfer>()?;
    module.add_class::<PyConnection>()?;
    module.add_class::<PyListener>()?;
    Ok(())
}

/// The sending process, as the kernel recorded it at `connect`
/// (`SO_PEERCRED`).
#[pyclass(module = "sealpass", frozen, get_all)]
pub(crate) struct Peer {
    /// Its process id.
    pid: i32,
    /// Its effective user id.
    uid: u32,
    /// Its effective group id.
    gid: u32,
}

#[pymethods]
impl Peer {
    fn __repr__(&self) -> String {
        format!("Peer(pid={}, uid={}, gid={})", self.pid, self.uid, self.gid)
    }
}

pub(crate) fn peer(credentials: Option<PeerCredentials>) -> Option<Peer> {
    credentials.map(|c| Peer {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    })
}

/// One verified segment: a sealed memfd the kernel vouched for, mapped
/// read-only. It exports its pages through the buffer protocol, read-only
/// and without a copy: `memoryview(segment)`, `numpy.frombuffer(segment,
/// dtype)`, `bytes(segment)` (that one copies). The mapping, and its share of
/// the receiver's memory budget, live until the segment is released and
/// every view of it is gone.
#[pyclass(module = "sealpass", frozen)]
pub(crate) struct ReceivedSegment {
    pub(crate) name: String,
    pub(crate) size: u64,
    seals: Seals,
    state: Mutex<SegmentState>,
}

struct SegmentState {
    segment: Option<VerifiedSegment>,
    /// Views of the pages that Python has not released.
    exports: usize,
    /// Released while views were open: the last view to go unmaps.
    release_pending: bool,
}

impl ReceivedSegment {
    pub(crate) fn new(segment: VerifiedSegment) -> ReceivedSegment {
        ReceivedSegment {
            name: segment.name().to_owned(),
            size: segment.size(),
            seals: segment.seals(),
            state: Mutex::new(SegmentState {
                segment: Some(segment),
                exports: 0,
                release_pending: false,
            }),
        }
    }

    fn released_error(&self) -> PyErr {
        PyValueError::new_err(format!("segment {:?} was released", self.name))
    }

    /// Unmaps now, or, while views are open, when the last one goes.
    pub(crate) fn release_when_unviewed(&self) {
        let mut state = lock(&self.state);
        if state.exports > 0 {
            state.release_pending = true;
        } else {
            drop(state.segment.take());
        }
    }
}

#[pymethods]
impl ReceivedSegment {
    /// The memfd's name, as the kernel reports it.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Its size in bytes, as the kernel reports it.
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }

    /// The seals the kernel reports, as a frozenset of names.
    #[getter]
    fn seals<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyFrozenSet>> {
        seals_to(py, self.seals)
    }

    /// The segment as numpy's array interface describes memory: its bytes,
    /// read-only, one dimension of `size` unsigned bytes. `numpy.asarray`
    /// takes it without a copy (and keeps the segment alive); the array
    /// cannot write. `Transfer.array` gives the dtype and shape the sender
    /// recorded instead.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let address = self.address()?;
        let interface = PyDict::new(py);
        interface.set_item("version", 3)?;
        interface.set_item("shape", (self.size,))?;
        interface.set_item("typestr", "|u1")?;
        interface.set_item("data", (address, true))?;
        Ok(interface)
    }

    /// The address of the read-only mapping (0 for an empty segment): a
    /// view's buffer lies in `[address, address + size)`.
    #[getter]
    fn address(&self) -> PyResult<usize> {
        let state = lock(&self.state);
        let segment = state
            .segment
            .as_ref()
            .ok_or_else(|| self.released_error())?;
        let bytes = segment.bytes();
        Ok(if bytes.is_empty() {
            0
        } else {
            bytes.as_ptr() as usize
        })
    }

    /// Whether the mapping was released.
    #[getter]
    fn released(&self) -> bool {
        lock(&self.state).segment.is_none()
    }

    /// The sealed memfd's fd (still this segment's: do not close it; pass
    /// it on with `socket.send_fds`, or `Segment.from_sealed_fd`).
    fn fileno(&self) -> PyResult<RawFd> {
        let state = lock(&self.state);
        let segment = state
            .segment
            .as_ref()
            .ok_or_else(|| self.released_error())?;
        Ok(segment.as_fd().as_raw_fd())
    }

    /// The same sealed memfd as a `Segment`, to forward to another receiver
    /// without touching its bytes (the fd is duplicated; this segment stays
    /// as it is).
    fn to_segment(&self) -> PyResult<Segment> {
        let fd = {
            let state = lock(&self.state);
            let segment = state
                .segment
                .as_ref()
                .ok_or_else(|| self.released_error())?;
            segment.as_fd().try_clone_to_owned().map_err(|error| {
                crate::SealpassError::new_err(format!("duplicating the fd: {error}"))
            })?
        };
        let segment =
            sealpass_sender::SealedSegment::from_sealed_fd(fd, Seals::empty()).map_err(Error)?;
        Ok(Segment::new(segment))
    }

    /// Unmaps the pages and closes the fd now, giving back their share of
    /// the memory budget. Raises `BufferError` while a view is open.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        let segment = {
            let mut state = lock(&self.state);
            if state.exports > 0 {
                return Err(PyBufferError::new_err(format!(
                    "cannot release segment {:?}: {} view(s) of it are still open",
                    self.name, state.exports
                )));
            }
            state.segment.take()
        };
        // Unmapping many resident pages takes milliseconds: not under the GIL.
        py.detach(|| drop(segment));
        Ok(())
    }

    fn __len__(&self) -> usize {
        usize::try_from(self.size).unwrap_or(usize::MAX)
    }

    fn __repr__(&self) -> String {
        let released = if self.released() { ", released" } else { "" };
        format!(
            "ReceivedSegment(name={:?}, size={}, seals={}{released})",
            self.name, self.size, self.seals
        )
    }

    /// # Safety
    ///
    /// Called by Python with a valid `view`.
    // The buffer protocol's slots are unsafe by signature; what they rely on
    // is `buffers::export`'s contract, kept by the export count.
    #[allow(unsafe_code)]
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::ffi::c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        let mut state = lock(&this.state);
        let segment = state
            .segment
            .as_ref()
            .ok_or_else(|| this.released_error())?;
        let bytes = segment.bytes();
        let (start, len) = (bytes.as_ptr(), bytes.len());
        // SAFETY: Python passed `view`. The mapping stays while `exports`
        // counts this view (`release` refuses, and the view's reference
        // keeps this object, so the mapping, alive), and it is read-only:
        // `export` refuses writable requests.
        unsafe { buffers::export(slf.as_any(), view, flags, start, len, false)? };
        state.exports += 1;
        Ok(())
    }

    /// # Safety
    ///
    /// Called by Python with a view this object filled.
    #[allow(unsafe_code)]
    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {
        let mut state = lock(&self.state);
        state.exports = state.exports.saturating_sub(1);
        if state.exports == 0 && state.release_pending {
            drop(state.segment.take());
        }
    }
}

/// A sender's connection, served by this process: `receive()` (or
/// iterating) yields its transfers until the sender closes. One call at a
/// time uses it; `close()` may come from any thread, and wakes a call
/// waiting on another.
#[pyclass(module = "sealpass", name = "Connection", frozen)]
pub(crate) struct PyConnection {
    inner: Slot<Connection>,
    peer: Option<PeerCredentials>,
    refused: AtomicU64,
}

impl PyConnection {
    fn new(connection: Connection) -> PyConnection {
        let socket = connection.as_fd().try_clone_to_owned().ok();
        PyConnection {
            peer: Some(connection.peer()),
            inner: Slot::new("connection", connection, socket.as_ref()),
            refused: AtomicU64::new(0),
        }
    }
}

#[pymethods]
impl PyConnection {
    /// The next verified transfer, or None once the sender closed. Messages
    /// refused on the way are answered (with the reason PROTOCOL.md gives)
    /// and counted in `refused`. Raises `TimeoutError` after `timeout`
    /// seconds; Ctrl-C raises `KeyboardInterrupt`; `ValueError` when the
    /// connection is closed, from another thread meanwhile included.
    #[pyo3(signature = (timeout = None))]
    fn receive(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Transfer>> {
        let timeout = timeout_from(timeout)?;
        let mut connection = self.inner.lend("receive()")?;
        let stopped = || {
            self.inner
                .is_closed()
                .then(|| self.inner.closed_error("receive()"))
        };
        let received = crate::wait_in_slices(py, timeout, &stopped, |slice| {
            match connection.receive_within(slice) {
                Ok(received) => Ok(Some(received)),
                Err(ServeError::NothingWithin(_)) => Ok(None),
                Err(error) => Err(error),
            }
        });
        self.refused.store(connection.refused(), Ordering::Relaxed);
        drop(connection);
        match received? {
            Some(Some(transfer)) => Ok(Some(Transfer::new(py, transfer)?)),
            Some(None) => Ok(None),
            None => Err(timed_out("no transfer came", timeout)),
        }
    }

    /// Messages refused on this connection so far.
    #[getter]
    fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether more transfers may come (true while a call on another
    /// thread waits for one).
    #[getter]
    fn is_open(&self) -> bool {
        !self.inner.is_closed() && self.inner.peek(Connection::is_open).unwrap_or(true)
    }

    /// Bytes this connection's segments hold mapped right now (0 once
    /// closed, and while a call on another thread has the connection).
    #[getter]
    fn mapped(&self) -> u64 {
        self.inner.peek(Connection::mapped).unwrap_or(0)
    }

    /// The sender, as the kernel recorded it at connect; None if unknown.
    #[getter]
    fn peer(&self) -> Option<Peer> {
        peer(self.peer)
    }

    /// The connection's fd (still the connection's: do not close it).
    fn fileno(&self) -> PyResult<RawFd> {
        self.inner
            .peek(|connection| connection.as_fd().as_raw_fd())
            .ok_or_else(|| self.inner.closed_error("fileno()"))
    }

    /// Closes the connection once every transfer it delivered is answered.
    /// From another thread, it wakes a `receive()` waiting there, which
    /// raises `ValueError` (the connection is closed).
    fn close(&self, py: Python<'_>) {
        let closed = self.inner.close();
        py.detach(|| drop(closed));
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) {
        self.close(py);
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Transfer>> {
        self.receive(py, None)
    }
}

/// Listens at a socket path (owner-only, 0600), removing a stale socket
/// left there and refusing to touch anything else. Iterating yields
/// connections for ever. Closing removes the socket file; `close()` may
/// come from any thread, and ends an `accept()` waiting on another.
#[pyclass(module = "sealpass", name = "Listener", frozen)]
pub(crate) struct PyListener {
    /// Shared with the calls that wait on it: closing takes it out, and the
    /// socket goes when the last of them lets go.
    inner: Mutex<Option<Arc<Listener>>>,
}

impl PyListener {
    fn listener(&self) -> PyResult<Arc<Listener>> {
        lock(&self.inner)
            .clone()
            .ok_or_else(|| PyValueError::new_err("the listener is closed"))
    }
}

#[pymethods]
impl PyListener {
    /// Listens at `path`. The limits are the receiver's (see docs/cli.md):
    /// `required_seals` (default SHRINK, GROW, WRITE; EXEC may be added),
    /// `max_segments`, `max_mapped` (bytes one connection may hold mapped),
    /// `idle_timeout` (seconds a connection may stay silent; None: for
    /// ever), `refuse_sparse` (refuse memfds with holes, `Reject(Sparse)`:
    /// the default; `False` accepts them, at a risk: reading a hole
    /// allocates a page charged to this process, so a sender can exhaust
    /// its memory).
    #[new]
    #[pyo3(signature = (path, *, required_seals = None, max_segments = None, max_mapped = None, idle_timeout = None, refuse_sparse = true))]
    fn new(
        path: std::path::PathBuf,
        required_seals: Option<&Bound<'_, PyAny>>,
        max_segments: Option<usize>,
        max_mapped: Option<u64>,
        idle_timeout: Option<f64>,
        refuse_sparse: bool,
    ) -> PyResult<PyListener> {
        let mut builder = Config::builder()
            .required_seals(seals_from(required_seals, Seals::RECEIVER_DEFAULT)?)
            .refuse_sparse(refuse_sparse);
        if let Some(max) = max_segments {
            builder = builder.max_segments(max);
        }
        if let Some(bytes) = max_mapped {
            builder = builder.max_mapped_per_connection(bytes);
        }
        if let Some(seconds) = idle_timeout {
            builder = builder.idle_timeout(timeout_from(Some(seconds))?);
        }
        let config = builder.build().map_err(Error)?;
        let mut listener = Listener::bind(&path).map_err(Error)?;
        listener.set_config(config);
        Ok(PyListener {
            inner: Mutex::new(Some(Arc::new(listener))),
        })
    }

    /// The socket's path.
    #[getter]
    fn path(&self) -> PyResult<std::path::PathBuf> {
        Ok(self.listener()?.path().to_owned())
    }

    /// Waits for the next sender and returns its `Connection`. Raises
    /// `TimeoutError` after `timeout` seconds; Ctrl-C raises
    /// `KeyboardInterrupt`.
    #[pyo3(signature = (timeout = None))]
    fn accept(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyConnection> {
        let timeout = timeout_from(timeout)?;
        let listener = self.listener()?;
        let stopped = || {
            lock(&self.inner).is_none().then(|| {
                PyValueError::new_err("the listener is closed (closed while accept() waited)")
            })
        };
        let accepted =
            crate::wait_in_slices(py, timeout, &stopped, |slice| listener.accept_within(slice));
        // Closed meanwhile: the socket goes with this last reference.
        py.detach(|| drop(listener));
        match accepted? {
            Some(connection) => Ok(PyConnection::new(connection)),
            None => Err(timed_out("no sender connected", timeout)),
        }
    }

    /// The listening socket's fd (still the listener's).
    fn fileno(&self) -> PyResult<RawFd> {
        Ok(self.listener()?.as_fd().as_raw_fd())
    }

    /// Stops listening and removes the socket file. From another thread, it
    /// ends an `accept()` waiting there, which raises `ValueError` (the
    /// listener is closed).
    fn close(&self, py: Python<'_>) {
        let closed = lock(&self.inner).take();
        py.detach(|| drop(closed));
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) {
        self.close(py);
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<PyConnection> {
        self.accept(py, None)
    }
}
