//! A segment filled in place from Python: `SegmentWriter`, whose pages
//! Python writes through the buffer protocol (and `sealpass.empty`'s
//! arrays over them), sealed by `seal()` or, for an array sent whole, in
//! place.

use std::sync::Mutex;

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use sealpass_proto::Seals;
use sealpass_sender::{Pages, SealedPages, SealedSegment, SegmentWriter};

use crate::send::{Segment, pages};
use crate::{Error, buffers, lock, seals_from};

/// A memfd being filled in place: its pages exported to Python as one
/// writable buffer (`memoryview(writer)`, `numpy.frombuffer(writer, ...)`),
/// zeroed to start with. `seal()` unmaps them and seals the memfd; it raises
/// `BufferError` while any view of the pages is still open, so the seal can
/// never fail on a writable mapping nor leave a view that writes under the
/// receiver. Closing (or leaving the `with` block) without sealing discards
/// the memfd.
#[pyclass(module = "sealpass", name = "SegmentWriter", frozen)]
pub(crate) struct Writer {
    name: String,
    size: u64,
    /// Whether the pages came from the hugetlb pool.
    hugetlb: bool,
    state: Mutex<WriterState>,
}

struct WriterState {
    writer: Option<SegmentWriter>,
    /// Views of the pages that Python has not released.
    exports: usize,
    /// After a seal in place, the pages the views still show, copy-on-write,
    /// kept until the last view is released.
    sealed_pages: Option<SealedPages>,
}

impl Writer {
    /// The writer whose pages `value` shows, if any: an array of
    /// `sealpass.empty`, or any view of a writer, followed through numpy's
    /// `base` and memoryview's `obj`.
    pub(crate) fn behind<'py>(value: &Bound<'py, PyAny>) -> Option<Bound<'py, Writer>> {
        /// More bases than any chain of views Python code makes.
        const DEPTH: usize = 32;
        let mut current = value.clone();
        for _ in 0..DEPTH {
            if let Ok(writer) = current.cast::<Writer>() {
                return Some(writer.clone());
            }
            let next = current
                .getattr("base")
                .or_else(|_| current.getattr("obj"))
                .ok()
                .filter(|next| !next.is_none())?;
            current = next;
        }
        None
    }

    /// Seals the memfd in place for a transfer that sends `span` (address,
    /// length) under `key`, when `span` is all of its pages: the views stay
    /// and turn copy-on-write (`SegmentWriter::seal_in_place`). `None` when
    /// `span` is a part of them or the writer is sealed already: the caller
    /// copies the bytes, as for any buffer.
    pub(crate) fn seal_for_transfer(
        &self,
        py: Python<'_>,
        key: &str,
        span: (usize, usize),
        seals: Seals,
    ) -> PyResult<Option<SealedSegment>> {
        let writer = {
            let mut state = lock(&self.state);
            let Some(writer) = state.writer.as_mut() else {
                return Ok(None);
            };
            let whole = (
                writer.as_mut_ptr().addr(),
                usize::try_from(writer.size()).ok(),
            );
            if whole != (span.0, Some(span.1)) {
                return Ok(None);
            }
            if key != self.name {
                return Err(PyValueError::new_err(format!(
                    "key {key:?} maps to the pages of segment {:?} (sealpass.empty(name=...)); \
                     a segment's name is its memfd's and cannot change",
                    self.name
                )));
            }
            if self.hugetlb {
                // Hugetlb pages are sealed in place only without views
                // (`seal()`); the caller copies them.
                return Ok(None);
            }
            // Out of the lock while it seals: a thread asking for a view
            // meanwhile is told the pages are sealed.
            state.writer.take()
        };
        let Some(writer) = writer else {
            return Ok(None);
        };
        match py.detach(|| writer.seal_in_place(seals)) {
            Ok((segment, pages)) => {
                let mut state = lock(&self.state);
                if state.exports > 0 {
                    state.sealed_pages = Some(pages);
                }
                Ok(Some(segment))
            }
            Err(failed) => {
                let error = crate::sealpass_error(failed.error());
                lock(&self.state).writer = failed.into_writer();
                Err(error)
            }
        }
    }

    fn open_views(&self, state: &WriterState, doing: &str) -> PyResult<()> {
        match state.exports {
            0 => Ok(()),
            views => Err(PyBufferError::new_err(format!(
                "cannot {doing} segment {:?}: {views} view(s) of its pages are still open; \
                 release them first (del the array or memoryview, or memoryview.release())",
                self.name
            ))),
        }
    }
}

#[pymethods]
impl Writer {
    /// A new memfd named `name` of `size` zero bytes, mapped for writing.
    /// With `hugetlb=True`, from the hugetlb pool where the machine can: a
    /// size of whole huge pages (2 MiB) and room in the pool
    /// (`vm.nr_hugepages`); otherwise a plain memfd, as without it.
    #[new]
    #[pyo3(signature = (name, size, *, hugetlb = false))]
    fn new(py: Python<'_>, name: &str, size: u64, hugetlb: bool) -> PyResult<Writer> {
        let writer = py
            .detach(|| {
                SealedSegment::builder(name)
                    .pages(pages(hugetlb))
                    .writer(size)
            })
            .map_err(Error)?;
        let hugetlb = writer.pages() == Pages::HugeTlb;
        Ok(Writer {
            name: name.to_owned(),
            size,
            hugetlb,
            state: Mutex::new(WriterState {
                writer: Some(writer),
                exports: 0,
                sealed_pages: None,
            }),
        })
    }

    /// The memfd's name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Its size in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }

    /// Whether its pages come from the hugetlb pool.
    #[getter]
    fn hugetlb(&self) -> bool {
        self.hugetlb
    }

    /// Unmaps the pages and seals the memfd with `seals` (default: SEAL,
    /// SHRINK, GROW, WRITE); returns the `Segment` to send.
    #[pyo3(signature = (seals = None))]
    fn seal(&self, py: Python<'_>, seals: Option<&Bound<'_, PyAny>>) -> PyResult<Segment> {
        let seals = seals_from(seals, Seals::SENDER_DEFAULT)?;
        let writer = {
            let mut state = lock(&self.state);
            self.open_views(&state, "seal")?;
            state.writer.take().ok_or_else(|| {
                PyValueError::new_err(format!(
                    "segment {:?} is sealed or closed already",
                    self.name
                ))
            })?
        };
        let segment = py.detach(|| writer.seal(seals)).map_err(Error)?;
        Ok(Segment::new(segment))
    }

    /// Discards the memfd unsealed; nothing to do once sealed.
    fn close(&self) -> PyResult<()> {
        let mut state = lock(&self.state);
        if state.writer.is_some() {
            self.open_views(&state, "close")?;
        }
        drop(state.writer.take());
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Discards the memfd if it was not sealed; with views still open the
    /// pages stay until the last one goes.
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, PyTuple>) {
        let mut state = lock(&self.state);
        if state.exports == 0 {
            drop(state.writer.take());
        }
    }

    fn __len__(&self) -> usize {
        usize::try_from(self.size).unwrap_or(usize::MAX)
    }

    fn __repr__(&self) -> String {
        let sealed = lock(&self.state).writer.is_none();
        let state = if sealed { ", sealed or closed" } else { "" };
        format!(
            "SegmentWriter(name={:?}, size={}{state})",
            self.name, self.size
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
        let Some(writer) = state.writer.as_mut() else {
            return Err(PyValueError::new_err(format!(
                "segment {:?} is sealed or closed: no new view of its pages can be made",
                this.name
            )));
        };
        // No `&mut` to the pages: views exported before may be writing them.
        let len = usize::try_from(writer.size()).unwrap_or(0);
        let start = writer.as_mut_ptr().cast_const();
        // SAFETY: Python passed `view`; the pages stay mapped while
        // `exports` counts this view, because `seal` and `close` refuse to
        // unmap them then, and the view holds a reference to this writer.
        unsafe { buffers::export(slf.as_any(), view, flags, start, len, true)? };
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
        if state.exports == 0 {
            // The last view of pages sealed in place is gone: unmap them.
            drop(state.sealed_pages.take());
        }
    }
}
