//! Sending: sealed segments, a segment filled in place, the sender.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyFrozenSet, PyTuple};
use sealpass_proto::{Metadata, Seals};
use sealpass_sender::{Pages, SealedSegment, Sender, Verdict};

use crate::outgoing::{metadata_from, transfer_segments};
use crate::shared::Slot;
use crate::{Error, buffers, lock, rejected, seals_from, seals_to, timed_out, timeout_from};

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Segment>()?;
    module.add_class::<crate::writer::Writer>()?;
    module.add_class::<PySender>()?;
    module.add_function(wrap_pyfunction!(send, module)?)?;
    module.add_function(wrap_pyfunction!(fan_out, module)?)?;
    Ok(())
}

/// The pages a Python caller asked for.
pub(crate) fn pages(hugetlb: bool) -> Pages {
    if hugetlb {
        Pages::HugeTlb
    } else {
        Pages::Shmem
    }
}

/// A memfd, filled and sealed, ready to send (any number of times, on any
/// number of connections). `close()` closes its fd; so does dropping it.
#[pyclass(module = "sealpass", frozen)]
pub(crate) struct Segment {
    inner: Mutex<Option<SealedSegment>>,
}

impl Segment {
    pub(crate) fn new(segment: SealedSegment) -> Segment {
        Segment {
            inner: Mutex::new(Some(segment)),
        }
    }

    fn with<T>(&self, read: impl FnOnce(&SealedSegment) -> T) -> PyResult<T> {
        lock(&self.inner)
            .as_ref()
            .map(read)
            .ok_or_else(|| PyValueError::new_err("the segment is closed"))
    }

    /// A second fd for the same sealed memfd, to send in a transfer.
    pub(crate) fn duplicate(&self) -> PyResult<SealedSegment> {
        self.with(SealedSegment::try_clone)?
            .map_err(|error| crate::SealpassError::new_err(format!("duplicating the fd: {error}")))
    }
}

#[pymethods]
impl Segment {
    /// A segment holding a copy of `data` (bytes, bytearray, memoryview, a
    /// C-contiguous numpy array: anything with the buffer protocol), copied
    /// into a new memfd with `pwrite` without the GIL, then sealed with
    /// `seals` (default: SEAL, SHRINK, GROW, WRITE). With `hugetlb=True`,
    /// from the hugetlb pool where the machine can (see `hugetlb`).
    #[staticmethod]
    #[pyo3(signature = (name, data, seals = None, *, hugetlb = false))]
    fn from_buffer(
        py: Python<'_>,
        name: &str,
        data: &Bound<'_, PyAny>,
        seals: Option<&Bound<'_, PyAny>>,
        hugetlb: bool,
    ) -> PyResult<Segment> {
        let seals = seals_from(seals, Seals::SENDER_DEFAULT)?;
        let borrowed = buffers::Borrowed::get(data)?;
        let segment = py
            .detach(|| borrowed.copy_to_segment(name, seals, pages(hugetlb)))
            .map_err(Error)?;
        drop(borrowed);
        Ok(Segment::new(segment))
    }

    /// A segment holding the bytes of the file at `path`, copied without
    /// the GIL as `SealedSegment::from_file` copies it, then sealed. With
    /// `hugetlb=True`, read into hugetlb pages where the machine can.
    #[staticmethod]
    #[pyo3(signature = (name, path, seals = None, *, hugetlb = false))]
    fn from_file(
        py: Python<'_>,
        name: &str,
        path: std::path::PathBuf,
        seals: Option<&Bound<'_, PyAny>>,
        hugetlb: bool,
    ) -> PyResult<Segment> {
        let seals = seals_from(seals, Seals::SENDER_DEFAULT)?;
        let segment = py
            .detach(|| {
                SealedSegment::builder(name)
                    .seals(seals)
                    .pages(pages(hugetlb))
                    .file(&path)
            })
            .map_err(Error)?;
        Ok(Segment::new(segment))
    }

    /// A segment from a sealed memfd received elsewhere (a received
    /// segment's `fileno()`, say), to forward it untouched. The fd is
    /// duplicated: the caller keeps its own. Its seals must include
    /// `required` (default: SHRINK, GROW, WRITE).
    #[staticmethod]
    #[pyo3(signature = (fd, required = None))]
    fn from_sealed_fd(fd: RawFd, required: Option<&Bound<'_, PyAny>>) -> PyResult<Segment> {
        let required = seals_from(required, Seals::RECEIVER_DEFAULT)?;
        let fd = buffers::duplicate_fd(fd).map_err(|error| {
            PyValueError::new_err(format!("expected an open fd; got {fd}: {error}"))
        })?;
        let segment = SealedSegment::from_sealed_fd(fd, required).map_err(Error)?;
        Ok(Segment::new(segment))
    }

    /// The memfd's name, as the header declares it.
    #[getter]
    fn name(&self) -> PyResult<String> {
        self.with(|segment| segment.name().to_owned())
    }

    /// Its size in bytes.
    #[getter]
    fn size(&self) -> PyResult<u64> {
        self.with(SealedSegment::size)
    }

    /// Whether its pages come from the hugetlb pool (`MFD_HUGETLB`), as
    /// the kernel reports it.
    #[getter]
    fn hugetlb(&self) -> PyResult<bool> {
        self.with(|segment| segment.pages() == Pages::HugeTlb)
    }

    /// The seals the kernel reports, as a frozenset of names.
    #[getter]
    fn seals<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyFrozenSet>> {
        seals_to(py, self.with(SealedSegment::seals)?)
    }

    /// The memfd's fd (still this segment's: do not close it).
    fn fileno(&self) -> PyResult<RawFd> {
        self.with(|segment| segment.fd().as_raw_fd())
    }

    /// Closes the memfd. A closed segment cannot be sent.
    fn close(&self) {
        drop(lock(&self.inner).take());
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, PyTuple>) {
        self.close();
    }

    fn __repr__(&self) -> String {
        match lock(&self.inner).as_ref() {
            Some(segment) => format!(
                "Segment(name={:?}, size={}, seals={})",
                segment.name(),
                segment.size(),
                segment.seals()
            ),
            None => "Segment(closed)".to_owned(),
        }
    }
}

/// A connection to a receiver. Transfer ids count up from 1. One call at a
/// time uses it; `close()` may come from any thread, and wakes a call
/// waiting on another.
#[pyclass(module = "sealpass", name = "Sender", frozen)]
pub(crate) struct PySender {
    inner: Slot<Sender>,
    answer_timeout: Option<Duration>,
    /// Transfers in flight, as of the last call: readable while a call on
    /// another thread has the sender.
    in_flight: AtomicUsize,
}

impl PySender {
    /// Connects to `path`, retrying for `patience` while the receiver is not
    /// up yet (no socket, or nobody accepting).
    fn connect(
        py: Python<'_>,
        path: &std::path::Path,
        patience: Option<Duration>,
    ) -> PyResult<Sender> {
        let Some(patience) = patience else {
            return Ok(py.detach(|| Sender::connect(path)).map_err(Error)?);
        };
        let connected =
            crate::wait_in_slices(
                py,
                Some(patience),
                &|| None,
                |slice| match Sender::connect(path) {
                    Ok(sender) => Ok(Some(sender)),
                    Err(error) if error.receiver_not_up() => {
                        std::thread::sleep(slice.min(Duration::from_millis(20)));
                        Ok(None)
                    }
                    Err(error) => Err(error),
                },
            )?;
        match connected {
            Some(sender) => Ok(sender),
            // The last attempt's error says why.
            None => Ok(py.detach(|| Sender::connect(path)).map_err(Error)?),
        }
    }

    fn wait_verdict(&self, py: Python<'_>, timeout: Option<Duration>, call: &str) -> PyResult<u64> {
        let mut sender = self.inner.lend(call)?;
        let stopped = || {
            self.inner
                .is_closed()
                .then(|| self.inner.closed_error(call))
        };
        let verdict = crate::wait_in_slices(py, timeout, &stopped, |slice| {
            sender.next_verdict_within(slice)
        });
        self.in_flight.store(sender.in_flight(), Ordering::Release);
        match verdict? {
            Some(Verdict::Accepted { id }) => Ok(id),
            Some(Verdict::Rejected {
                id,
                reason,
                message,
            }) => Err(rejected(py, id, reason, message)),
            Some(_) => Err(crate::SealpassError::new_err(
                "an answer this version does not know",
            )),
            None => Err(timed_out("no answer from the receiver", timeout)),
        }
    }

    /// Sends segments already made, without waiting for the verdict.
    fn submit_made(
        &self,
        py: Python<'_>,
        made: &[SealedSegment],
        metadata: &Metadata,
        call: &str,
    ) -> PyResult<u64> {
        let mut sender = self.inner.lend(call)?;
        let sent = py.detach(|| sender.submit_with(made, metadata));
        self.in_flight.store(sender.in_flight(), Ordering::Release);
        if self.inner.is_closed() {
            return Err(self.inner.closed_error(call));
        }
        Ok(sent.map_err(Error)?)
    }
}

#[pymethods]
impl PySender {
    /// Connects to the receiver listening at `path`. With
    /// `connect_timeout` (seconds), retries while the receiver is not up
    /// yet. `answer_timeout` bounds each wait for a verdict (`TimeoutError`).
    #[new]
    #[pyo3(signature = (path, *, connect_timeout = None, answer_timeout = None))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        connect_timeout: Option<f64>,
        answer_timeout: Option<f64>,
    ) -> PyResult<PySender> {
        let patience = timeout_from(connect_timeout)?;
        let answer_timeout = timeout_from(answer_timeout)?;
        let sender = PySender::connect(py, &path, patience)?;
        let socket = sender.as_fd().try_clone_to_owned().ok();
        Ok(PySender {
            inner: Slot::new("sender", sender, socket.as_ref()),
            answer_timeout,
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Sends `segments` as one transfer and waits for the verdict: returns
    /// the transfer's id when accepted, raises `Rejected` when not. Buffers
    /// in `segments` are copied into memfds sealed with `seals`. `metadata`
    /// (protocol 1.1) maps str keys to str or bytes values sent with it;
    /// with metadata, `segments` may be None or empty. Nothing may be in
    /// flight (take earlier verdicts with `next_verdict` first).
    #[pyo3(signature = (segments = None, *, seals = None, metadata = None))]
    fn send(
        &self,
        py: Python<'_>,
        segments: Option<&Bound<'_, PyAny>>,
        seals: Option<&Bound<'_, PyAny>>,
        metadata: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        if in_flight > 0 {
            let error = sealpass_sender::SendError::VerdictsPending { count: in_flight };
            return Err(Error(error).into());
        }
        self.submit(py, segments, seals, metadata)?;
        self.wait_verdict(py, self.answer_timeout, "send()")
    }

    /// Sends `segments` (and `metadata`) as one transfer without waiting
    /// for its verdict; returns its id. Verdicts come back oldest first
    /// from `next_verdict`.
    #[pyo3(signature = (segments = None, *, seals = None, metadata = None))]
    fn submit(
        &self,
        py: Python<'_>,
        segments: Option<&Bound<'_, PyAny>>,
        seals: Option<&Bound<'_, PyAny>>,
        metadata: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let seals = seals_from(seals, Seals::SENDER_DEFAULT)?;
        let mut metadata = metadata_from(metadata)?;
        let segments = transfer_segments(py, segments, seals, &mut metadata)?;
        self.submit_made(py, &segments, &metadata, "submit()")
    }

    /// The verdict on the oldest transfer in flight: its id when accepted;
    /// `Rejected` when not; `TimeoutError` after `timeout` seconds (default:
    /// the answer timeout), the transfer still in flight.
    #[pyo3(signature = (timeout = None))]
    fn next_verdict(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<u64> {
        let timeout = timeout_from(timeout)?.or(self.answer_timeout);
        self.wait_verdict(py, timeout, "next_verdict()")
    }

    /// Transfers submitted whose verdict has not been taken yet.
    #[getter]
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The connection's fd (still the sender's: do not close it).
    fn fileno(&self) -> PyResult<RawFd> {
        self.inner
            .peek(|sender| sender.as_fd().as_raw_fd())
            .ok_or_else(|| self.inner.closed_error("fileno()"))
    }

    /// Closes the connection. Transfers in flight stay the receiver's. From
    /// another thread, it wakes a call waiting there, which raises
    /// `ValueError` (the sender is closed).
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
}

/// Sends `segments` to the receiver at `path` on a new connection and waits
/// for the verdict: returns the transfer's id when accepted, raises
/// `Rejected` when not. See `Sender` for the arguments.
#[pyfunction]
#[pyo3(signature = (path, segments = None, *, seals = None, metadata = None, connect_timeout = None, answer_timeout = None))]
fn send(
    py: Python<'_>,
    path: std::path::PathBuf,
    segments: Option<&Bound<'_, PyAny>>,
    seals: Option<&Bound<'_, PyAny>>,
    metadata: Option<&Bound<'_, PyAny>>,
    connect_timeout: Option<f64>,
    answer_timeout: Option<f64>,
) -> PyResult<u64> {
    // Made before connecting, so a bad buffer costs no connection.
    let seals_chosen = seals_from(seals, Seals::SENDER_DEFAULT)?;
    let mut metadata = metadata_from(metadata)?;
    let made = transfer_segments(py, segments, seals_chosen, &mut metadata)?;
    let sender = PySender::new(py, path, connect_timeout, answer_timeout)?;
    sender.submit_made(py, &made, &metadata, "send()")?;
    // Sent: the receiver holds the memfds now. Closing ours before the
    // verdict leaves freeing the pages to whoever lets go last.
    drop(made);
    sender.wait_verdict(py, sender.answer_timeout, "send()")
}

/// Sends the same segments (and metadata) to every receiver in `paths`, one
/// connection each, the memfds made once and shared; all transfers go out
/// first, then each verdict is collected, none waited for past `timeout`
/// seconds. Returns one entry per path, in order: the transfer's id when
/// that receiver accepted, otherwise the exception that says why (a
/// `Rejected`, a `SealpassError`), returned rather than raised so that one
/// receiver's refusal hides no other's verdict.
#[pyfunction]
#[pyo3(signature = (paths, segments = None, *, seals = None, metadata = None, timeout = 60.0))]
fn fan_out(
    py: Python<'_>,
    paths: Vec<std::path::PathBuf>,
    segments: Option<&Bound<'_, PyAny>>,
    seals: Option<&Bound<'_, PyAny>>,
    metadata: Option<&Bound<'_, PyAny>>,
    timeout: f64,
) -> PyResult<Vec<Py<PyAny>>> {
    let seals = seals_from(seals, Seals::SENDER_DEFAULT)?;
    let patience = timeout_from(Some(timeout))?.unwrap_or(Duration::from_secs(60));
    let mut metadata = metadata_from(metadata)?;
    let made = transfer_segments(py, segments, seals, &mut metadata)?;
    let verdicts = py.detach(|| {
        sealpass_sender::fan_out(&paths, &made, &metadata, patience)
            .into_iter()
            .map(|each| each.verdict)
            .collect::<Vec<_>>()
    });
    verdicts
        .into_iter()
        .map(|verdict| -> PyResult<Py<PyAny>> {
            Ok(match verdict {
                Ok(Verdict::Accepted { id }) => id.into_pyobject(py)?.into_any().unbind(),
                Ok(Verdict::Rejected {
                    id,
                    reason,
                    message,
                }) => rejected(py, id, reason, message).into_value(py).into_any(),
                Ok(_) => crate::SealpassError::new_err("an answer this version does not know")
                    .into_value(py)
                    .into_any(),
                Err(error) => PyErr::from(Error(error)).into_value(py).into_any(),
            })
        })
        .collect()
}
