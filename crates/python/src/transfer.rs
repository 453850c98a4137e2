//! A received transfer, as Python holds it: its verified segments, its
//! metadata, the array convention, and its answer.

use std::os::fd::RawFd;
use std::sync::Mutex;

use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use sealpass_proto::Metadata;
use sealpass_receiver::{IncomingTransfer, PeerCredentials, Responder};

use crate::receive::{Peer, ReceivedSegment, peer};
use crate::{Error, lock};

/// A transfer whose every segment the kernel vouched for. Index it by
/// segment name, or iterate over its segments. Answer it with `ack()` or
/// `reject(message)`; as a context manager it answers on exit (ack, or
/// reject with the exception that escaped), then releases every segment (a
/// segment with open views goes with its last view). Dropped unanswered, it
/// is rejected.
#[pyclass(module = "sealpass", frozen)]
pub(crate) struct Transfer {
    id: u64,
    version: (u16, u16),
    peer: Option<PeerCredentials>,
    /// The peer's pidfd, duplicated from the connection's (Linux 6.5+);
    /// closed with the transfer (`close`, the end of its `with` block).
    peer_pidfd: Mutex<Option<std::os::fd::OwnedFd>>,
    segments: Vec<Py<ReceivedSegment>>,
    /// The sender's own fields (protocol 1.1), in the order sent.
    metadata: Metadata,
    responder: Mutex<Option<Responder>>,
}

impl Transfer {
    pub(crate) fn new(py: Python<'_>, transfer: IncomingTransfer) -> PyResult<Transfer> {
        let (id, version, peer) = (transfer.id(), transfer.version(), transfer.peer());
        // Its own fd, so that it outlives the transfer's parts; a failed dup
        // (out of fds) only loses the pidfd.
        let peer_pidfd = transfer
            .peer_pidfd()
            .and_then(|pidfd| pidfd.try_clone_to_owned().ok());
        let mut transfer = transfer;
        let metadata = transfer.take_metadata();
        let (segments, responder) = transfer.into_parts();
        let segments = segments
            .into_iter()
            .map(|segment| Py::new(py, ReceivedSegment::new(segment)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Transfer {
            id,
            version: (version.major, version.minor),
            peer: Some(peer),
            peer_pidfd: Mutex::new(peer_pidfd),
            segments,
            metadata,
            responder: Mutex::new(Some(responder)),
        })
    }

    fn answer(&self, py: Python<'_>, verdict: Result<(), String>) -> PyResult<()> {
        // (An unanswered transfer is rejected when dropped: see `Drop`.)
        let responder = lock(&self.responder).take().ok_or_else(|| {
            PyValueError::new_err(format!("transfer {} was answered already", self.id))
        })?;
        let sent = py.detach(|| match verdict {
            Ok(()) => responder.accept(),
            Err(why) => responder.reject(why),
        });
        sent.map_err(|error| Error(error).into())
    }
}

impl Drop for Transfer {
    /// A transfer dropped unanswered is rejected, which sends a `Reject` and
    /// can wait (up to the idle timeout) on a sender that does not read:
    /// that wait happens with the GIL released, so no other Python thread
    /// stops for it.
    fn drop(&mut self) {
        let responder = lock(&self.responder).take();
        if responder.is_some() {
            Python::attach(|py| py.detach(|| drop(responder)));
        }
    }
}

#[pymethods]
impl Transfer {
    /// The sender's id for it (unique on its connection).
    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// The protocol version the sender wrote, as (major, minor).
    #[getter]
    fn version(&self) -> (u16, u16) {
        self.version
    }

    /// The sender's own fields (protocol 1.1) as a new dict of str keys to
    /// bytes values, in the order sent (empty from a 1.0 sender). A value
    /// sent as str arrives as its UTF-8 bytes: `.decode()` it.
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (key, value) in self.metadata.iter() {
            dict.set_item(key, PyBytes::new(py, value))?;
        }
        Ok(dict)
    }

    /// The sender, as the kernel recorded it at connect; None if unknown.
    #[getter]
    fn peer(&self) -> Option<Peer> {
        peer(self.peer)
    }

    /// A new pidfd for the sending process (Linux 6.5+; None before, and
    /// after `close`), which the caller owns and closes (`os.close`). It names the process that
    /// connected even after its pid is reused: it polls readable once that
    /// process has exited, and `signal.pidfd_send_signal` reaches only it.
    fn peer_pidfd(&self) -> PyResult<Option<RawFd>> {
        use std::os::fd::IntoRawFd;
        lock(&self.peer_pidfd)
            .as_ref()
            .map(|pidfd| {
                pidfd
                    .try_clone()
                    .map(IntoRawFd::into_raw_fd)
                    .map_err(|error| {
                        crate::SealpassError::new_err(format!("duplicating the pidfd: {error}"))
                    })
            })
            .transpose()
    }

    /// The segments, in the order sent.
    #[getter]
    fn segments<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(
            py,
            self.segments.iter().map(|segment| segment.clone_ref(py)),
        )
    }

    /// The sum of the segment sizes.
    #[getter]
    fn total_bytes(&self, py: Python<'_>) -> u64 {
        self.segments
            .iter()
            .map(|segment| segment.bind(py).get().size)
            .sum()
    }

    /// Whether it was answered.
    #[getter]
    fn answered(&self) -> bool {
        lock(&self.responder).is_none()
    }

    /// Answers `Ack`: the transfer is the application's. The segments stay
    /// readable until released.
    fn ack(&self, py: Python<'_>) -> PyResult<()> {
        self.answer(py, Ok(()))
    }

    /// Answers `Reject(ApplicationRejected)` with `message` for the sender.
    fn reject(&self, py: Python<'_>, message: &str) -> PyResult<()> {
        self.answer(py, Err(message.to_owned()))
    }

    /// Releases every segment: at once if no view of it is open, else when
    /// its last view goes; closes the transfer's pidfd. Does not answer.
    fn close(&self, py: Python<'_>) {
        drop(lock(&self.peer_pidfd).take());
        for segment in &self.segments {
            segment.bind(py).get().release_when_unviewed();
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Answers if not answered yet (ack; reject if an exception escaped the
    /// block, with its text), then `close()`: the answer goes first, since
    /// an `Ack` promises nothing about the mappings (PROTOCOL.md section 6)
    /// and unmapping big segments takes milliseconds.
    #[pyo3(signature = (_kind, error, _traceback))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _kind: &Bound<'_, PyAny>,
        error: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let answered = if self.answered() {
            Ok(())
        } else if error.is_none() {
            self.answer(py, Ok(()))
        } else {
            let why = error.str().map_or_else(
                |_| "the receiving application raised an exception".to_owned(),
                |text| text.to_string(),
            );
            self.answer(py, Err(why))
        };
        self.close(py);
        answered
    }

    fn __len__(&self) -> usize {
        self.segments.len()
    }

    fn __getitem__(&self, py: Python<'_>, name: &str) -> PyResult<Py<ReceivedSegment>> {
        self.segments
            .iter()
            .find(|segment| segment.bind(py).get().name == name)
            .map(|segment| segment.clone_ref(py))
            .ok_or_else(|| PyKeyError::new_err(name.to_owned()))
    }

    /// Segment `name` as a read-only numpy array, without a copy, of the
    /// dtype and shape its sender recorded (`NAME.dtype`, `NAME.shape`: the
    /// array convention of PROTOCOL.md section 4.3, which `send` follows
    /// for numpy arrays). Raises `KeyError` when there is no such segment
    /// or no description, `ValueError` when the description does not fit
    /// the segment's size.
    fn array<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let segment = self.__getitem__(py, name)?;
        let described = |what: &str| {
            let key = format!("{name}.{what}");
            self.metadata
                .get_str(&key)
                .map(str::to_owned)
                .ok_or_else(|| {
                    PyKeyError::new_err(format!(
                        "{key}: the sender recorded no {what} for segment {name:?}"
                    ))
                })
        };
        let dtype = described("dtype")?;
        let shape_text = described("shape")?;
        let shape = shape_text
            .split(',')
            .filter(|dim| !dim.is_empty())
            .map(str::parse::<usize>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                PyValueError::new_err(format!(
                    "{name}.shape is {shape_text:?}; expected decimal dimensions joined by ','"
                ))
            })?;
        let numpy = py.import("numpy")?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("dtype", dtype)?;
        let flat = numpy.call_method("frombuffer", (segment,), Some(&kwargs))?;
        flat.call_method1("reshape", (PyTuple::new(py, shape)?,))
    }

    fn __contains__(&self, py: Python<'_>, name: &str) -> bool {
        self.segments
            .iter()
            .any(|segment| segment.bind(py).get().name == name)
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.segments(py)?.into_any().try_iter()?.into_any())
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let names: Vec<&str> = self
            .segments
            .iter()
            .map(|segment| segment.bind(py).get().name.as_str())
            .collect();
        format!("Transfer(id={}, segments={names:?})", self.id)
    }
}
