//! What one outgoing transfer is made of, from Python: its segments
//! (buffers copied into memfds, or `Segment`s), its metadata, and the
//! description of each numpy array among them; checked against the
//! protocol's rules before anything is sent.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMapping, PyString};
use sealpass_proto::{Metadata, Seals};
use sealpass_sender::{Pages, SealedSegment};

use crate::send::Segment;
use crate::writer::Writer;
use crate::{Error, buffers};

/// `metadata` as given to `send`: a mapping of str keys to str (sent as
/// UTF-8) or bytes-like values, or None.
pub(crate) fn metadata_from(metadata: Option<&Bound<'_, PyAny>>) -> PyResult<Metadata> {
    let Some(metadata) = metadata.filter(|value| !value.is_none()) else {
        return Ok(Metadata::new());
    };
    let mapping = metadata.cast::<PyMapping>().map_err(|_| {
        PyTypeError::new_err("metadata: expected a mapping of str keys to str or bytes values")
    })?;
    let mut out = Metadata::new();
    for item in mapping.items()?.iter() {
        let (key, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
        let key: String = key
            .extract()
            .map_err(|_| PyTypeError::new_err(format!("metadata key {key}: expected a str")))?;
        let value: Vec<u8> = if let Ok(text) = value.cast::<PyString>() {
            text.to_str()?.as_bytes().to_vec()
        } else if let Ok(bytes) = value.cast::<PyBytes>() {
            bytes.as_bytes().to_vec()
        } else if buffers::Borrowed::get(&value).is_ok() {
            // Any other bytes-like object (bytearray, memoryview, an array):
            // its bytes, as bytes() reads them.
            let builtins = value.py().import("builtins")?;
            let copied = builtins.getattr("bytes")?.call1((&value,))?;
            copied.cast::<PyBytes>()?.as_bytes().to_vec()
        } else {
            return Err(PyTypeError::new_err(format!(
                "metadata value of {key:?}: expected str or a bytes-like object; got {}",
                value.get_type()
            )));
        };
        out.insert(key, value);
    }
    Ok(out)
}

/// An array's description under the array convention of PROTOCOL.md
/// section 4.3 (`NAME.dtype`, `NAME.shape`), added to `metadata` unless the
/// caller set those keys; a structured dtype is refused. Anything that is
/// not an array (no `dtype` and `shape`) adds nothing.
fn describe_array(name: &str, value: &Bound<'_, PyAny>, metadata: &mut Metadata) -> PyResult<()> {
    let (Ok(dtype), Ok(shape)) = (value.getattr("dtype"), value.getattr("shape")) else {
        return Ok(());
    };
    if !dtype.getattr("fields")?.is_none() {
        return Err(PyTypeError::new_err(format!(
            "segment {name:?}: a structured dtype ({}) has no description in the array \
             convention; send each field as an array of its own, or the bytes \
             (array.view('u1')) with your own metadata",
            dtype.str()?
        )));
    }
    let typestr: String = dtype.getattr("str")?.extract()?;
    let dims: Vec<usize> = shape.extract()?;
    let shape = dims
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    for (key, value) in [
        (format!("{name}.dtype"), typestr),
        (format!("{name}.shape"), shape),
    ] {
        if metadata.get(&key).is_none() {
            metadata.insert(key, value);
        }
    }
    Ok(())
}

/// The segments of one transfer, from Python: a mapping of names to buffers
/// (copied into new memfds) or to `Segment`s, an iterable of `Segment`s, or
/// one `Segment`. A `Segment` is sent through a second fd, so it stays the
/// caller's to send again.
pub(crate) fn transfer_segments(
    py: Python<'_>,
    segments: Option<&Bound<'_, PyAny>>,
    seals: Seals,
    metadata: &mut Metadata,
) -> PyResult<Vec<SealedSegment>> {
    let Some(segments) = segments.filter(|value| !value.is_none()) else {
        check_transfer(&[], metadata)?;
        return Ok(Vec::new());
    };
    if let Ok(segment) = segments.cast::<Segment>() {
        let made = vec![segment.get().duplicate()?];
        check_transfer(&made, metadata)?;
        return Ok(made);
    }
    enum Source {
        Ready(SealedSegment),
        Copy(String, buffers::Borrowed),
    }
    let mut sources = Vec::new();
    if let Ok(mapping) = segments.cast::<PyMapping>() {
        for item in mapping.items()?.iter() {
            let (name, value): (String, Bound<'_, PyAny>) = item.extract()?;
            if let Ok(segment) = value.cast::<Segment>() {
                let segment = segment.get().duplicate()?;
                if segment.name() != name {
                    return Err(PyValueError::new_err(format!(
                        "key {name:?} maps to a Segment named {:?}; a segment's name is \
                         its memfd's and cannot change",
                        segment.name()
                    )));
                }
                sources.push(Source::Ready(segment));
            } else {
                // The buffer first: what it refuses (pointers) it says first.
                let borrowed = buffers::Borrowed::get(&value)?;
                describe_array(&name, &value, metadata)?;
                // All the pages of a `sealpass.empty` array: sealed in
                // place, not copied. A writer lends its pages writable, so
                // a read-only buffer (bytes) is not looked through.
                let writer = borrowed.writable().then(|| Writer::behind(&value));
                let in_place = match writer.flatten() {
                    Some(writer) => {
                        writer
                            .get()
                            .seal_for_transfer(py, &name, borrowed.span(), seals)?
                    }
                    None => None,
                };
                sources.push(match in_place {
                    Some(segment) => Source::Ready(segment),
                    None => Source::Copy(name, borrowed),
                });
            }
        }
    } else {
        let not_segments = || {
            PyTypeError::new_err(
                "expected a mapping of names to buffers or Segments, an iterable of \
                 Segments, or a Segment",
            )
        };
        for item in segments.try_iter().map_err(|_| not_segments())? {
            let item = item?;
            let segment = item.cast::<Segment>().map_err(|_| not_segments())?;
            sources.push(Source::Ready(segment.get().duplicate()?));
        }
    }
    let made = py.detach(|| {
        sources
            .into_iter()
            .map(|source| match source {
                Source::Ready(segment) => Ok(segment),
                // The copy runs without the GIL; the view is released with it
                // (Borrowed::drop takes the GIL back).
                Source::Copy(name, borrowed) => {
                    borrowed.copy_to_segment(&name, seals, Pages::Shmem)
                }
            })
            .collect::<Result<Vec<_>, _>>()
    });
    let made = made.map_err(Error)?;
    check_transfer(&made, metadata)?;
    Ok(made)
}

/// The protocol's rules on the whole transfer (names and keys unique, at
/// most 253 segments, a segment or an entry at least, the metadata's
/// size), checked before anything is sent; the id is the sender's.
fn check_transfer(made: &[SealedSegment], metadata: &Metadata) -> PyResult<()> {
    sealpass_proto::message::validate_transfer(
        1,
        made.iter().map(SealedSegment::declaration),
        metadata.iter(),
    )
    .map_err(|error| crate::sealpass_error(&error))
}
