//! `sealpass` for Python: the Rust sender and receiver behind a small
//! Python API. Every protocol rule and every kernel check is the Rust
//! crates'; this crate converts arguments, releases the GIL while it waits,
//! and lends verified mappings to Python through the buffer protocol.
//!
//! Blocking calls wait in slices of 100 ms, with the GIL released, and
//! run Python's signal handlers between slices: Ctrl-C interrupts a blocked
//! `accept`, `receive` or verdict wait with `KeyboardInterrupt`.

mod buffers;
mod outgoing;
mod receive;
mod send;
mod shared;
mod transfer;
mod writer;

use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyFrozenSet, PyString};
use sealpass_proto::{RejectReason, Seals};
use sealpass_receiver::ErrorChain;

pyo3::create_exception!(
    sealpass,
    SealpassError,
    pyo3::exceptions::PyException,
    "Anything sealpass could not do: connecting, sending, receiving, making a segment."
);
pyo3::create_exception!(
    sealpass,
    Rejected,
    SealpassError,
    "The receiver refused the transfer. Attributes: `id` (0 if the receiver could not \
     read it), `reason` (the reason's name, as in PROTOCOL.md), `code` (its number) and \
     `message` (the receiver's explanation)."
);
pyo3::create_exception!(
    sealpass,
    DeliveryUnknown,
    SealpassError,
    "The receiver closed the connection after the transfer was sent and before it \
     answered: whether it consumed the transfer is unknown. Attribute: `id`."
);

/// How long a blocking call waits with the GIL released before it runs
/// Python's signal handlers and waits again.
const SLICE: Duration = Duration::from_millis(100);

/// Runs `step` with the GIL released, in slices of at most [`SLICE`], until
/// it returns something or `timeout` passes (`Ok(None)`); between slices
/// Python's signal handlers run, so Ctrl-C raises `KeyboardInterrupt`, and
/// `stopped` is asked whether the object was closed from another thread
/// (its error is raised).
fn wait_in_slices<T, E>(
    py: Python<'_>,
    timeout: Option<Duration>,
    stopped: &dyn Fn() -> Option<PyErr>,
    mut step: impl FnMut(Duration) -> Result<Option<T>, E> + Send,
) -> PyResult<Option<T>>
where
    T: Send,
    E: std::error::Error + Send,
    PyErr: From<Error<E>>,
{
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    loop {
        let slice = match deadline {
            Some(deadline) => deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), SLICE),
            None => SLICE,
        };
        let stepped = py.detach(|| step(slice));
        // Closed from another thread meanwhile: that explains an error too.
        if let Some(error) = stopped() {
            return Err(error);
        }
        match stepped {
            Ok(Some(done)) => return Ok(Some(done)),
            Ok(None) => {}
            Err(error) => return Err(Error(error).into()),
        }
        py.check_signals()?;
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Ok(None);
        }
    }
}

/// Locks `mutex`, whether or not a thread panicked while holding it: the
/// states kept behind these locks stay consistent at every step.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A Rust error on its way to becoming a Python exception.
struct Error<E>(E);

/// `SealpassError`, saying every cause once.
fn sealpass_error(error: &(dyn std::error::Error + 'static)) -> PyErr {
    SealpassError::new_err(ErrorChain(error).to_string())
}

/// The exceptions that are a `SealpassError` and also the builtin that fits
/// (`except FileNotFoundError` catches a missing receiver), made once per
/// interpreter: a class with two bases is Python's to make.
static FITTING: pyo3::sync::PyOnceLock<Py<pyo3::types::PyDict>> = pyo3::sync::PyOnceLock::new();

/// The builtins a sealpass error may also be, by the name of its class.
const FITTING_CLASSES: &[(&str, &str)] = &[
    ("ReceiverNotFoundError", "FileNotFoundError"),
    ("ReceiverRefusedError", "ConnectionRefusedError"),
    ("SocketPermissionError", "PermissionError"),
    ("SealpassTimeoutError", "TimeoutError"),
];

fn fitting_classes(py: Python<'_>) -> PyResult<&Py<pyo3::types::PyDict>> {
    FITTING.get_or_try_init(py, || {
        let classes = pyo3::types::PyDict::new(py);
        let builtins = py.import("builtins")?;
        let type_ = builtins.getattr("type")?;
        for (name, builtin) in FITTING_CLASSES {
            let bases = (py.get_type::<SealpassError>(), builtins.getattr(*builtin)?);
            let namespace = pyo3::types::PyDict::new(py);
            namespace.set_item("__module__", "sealpass")?;
            namespace.set_item(
                "__doc__",
                format!("A SealpassError that is also a {builtin}."),
            )?;
            classes.set_item(*name, type_.call1((*name, bases, namespace))?)?;
        }
        Ok(classes.unbind())
    })
}

/// An exception of the fitting class `name` (see [`FITTING_CLASSES`]).
fn fitting_error(name: &str, message: String) -> PyErr {
    Python::attach(|py| {
        let class = fitting_classes(py).and_then(|classes| {
            classes
                .bind(py)
                .get_item(name)?
                .ok_or_else(|| SealpassError::new_err(format!("no class {name}")))
        });
        match class.and_then(|class| class.call1((message.clone(),))) {
            Ok(instance) => PyErr::from_value(instance),
            Err(_) => SealpassError::new_err(message),
        }
    })
}

impl From<Error<sealpass_sender::SendError>> for PyErr {
    fn from(Error(error): Error<sealpass_sender::SendError>) -> PyErr {
        match error {
            sealpass_sender::SendError::DeliveryUnknown { id, .. } => Python::attach(|py| {
                let raised = DeliveryUnknown::new_err(ErrorChain(&error).to_string());
                // Setting an attribute on a fresh exception cannot fail
                // short of memory; the message says the id either way.
                let _ = raised.value(py).setattr("id", id);
                raised
            }),
            sealpass_sender::SendError::Connect { ref source, .. } => {
                let message = ErrorChain(&error).to_string();
                match source.errno() {
                    Some(nix::errno::Errno::ENOENT) => {
                        fitting_error("ReceiverNotFoundError", message)
                    }
                    Some(nix::errno::Errno::ECONNREFUSED) => {
                        fitting_error("ReceiverRefusedError", message)
                    }
                    Some(nix::errno::Errno::EACCES | nix::errno::Errno::EPERM) => {
                        fitting_error("SocketPermissionError", message)
                    }
                    _ => sealpass_error(&error),
                }
            }
            sealpass_sender::SendError::AnswerTimedOut { .. } => {
                fitting_error("SealpassTimeoutError", ErrorChain(&error).to_string())
            }
            error => sealpass_error(&error),
        }
    }
}

/// Errors that become a plain `SealpassError`.
macro_rules! sealpass_errors {
    ($($error:ty),* $(,)?) => {$(
        impl From<Error<$error>> for PyErr {
            fn from(Error(error): Error<$error>) -> PyErr {
                sealpass_error(&error)
            }
        }
    )*};
}

sealpass_errors!(
    sealpass_sender::SegmentError,
    sealpass_receiver::ServeError,
    sealpass_receiver::AnswerError,
    sealpass_receiver::BindError,
);

impl From<Error<sealpass_receiver::ConfigError>> for PyErr {
    fn from(Error(error): Error<sealpass_receiver::ConfigError>) -> PyErr {
        PyValueError::new_err(ErrorChain(&error).to_string())
    }
}

/// `Rejected`, with the reject's fields as attributes.
fn rejected(py: Python<'_>, id: u64, reason: RejectReason, message: String) -> PyErr {
    let raised = Rejected::new_err(format!("transfer {id} rejected: {reason}: {message}"));
    let value = raised.value(py);
    // As above: cannot fail short of memory, and the text says it all.
    let _ = value.setattr("id", id);
    let _ = value.setattr("reason", reason.name());
    let _ = value.setattr("code", reason.code());
    let _ = value.setattr("message", message);
    raised
}

/// Seals from Python: `None` (the default), a string such as
/// `"shrink,grow,write"` or `"SHRINK|GROW"`, or an iterable of names.
fn seals_from(seals: Option<&Bound<'_, PyAny>>, default: Seals) -> PyResult<Seals> {
    let Some(seals) = seals else {
        return Ok(default);
    };
    let text = if let Ok(text) = seals.cast::<PyString>() {
        text.to_str()?.to_owned()
    } else {
        let mut names = Vec::new();
        for name in seals.try_iter()? {
            names.push(name?.extract::<String>()?);
        }
        names.join(",")
    };
    text.parse::<Seals>()
        .map_err(|error| PyValueError::new_err(error.to_string()))
}

/// Seals for Python: a frozenset of their names (`"SHRINK"`, `"WRITE"`, ...).
fn seals_to<'py>(py: Python<'py>, seals: Seals) -> PyResult<Bound<'py, PyFrozenSet>> {
    let names: Vec<&str> = seals.iter_names().map(|(name, _)| name).collect();
    PyFrozenSet::new(py, names)
}

/// A timeout in seconds from Python; `None` waits for ever.
fn timeout_from(seconds: Option<f64>) -> PyResult<Option<Duration>> {
    seconds
        .map(|seconds| {
            Duration::try_from_secs_f64(seconds).map_err(|_| {
                PyValueError::new_err(format!(
                    "a timeout is a number of seconds, 0 or more; got {seconds}"
                ))
            })
        })
        .transpose()
}

/// `TimeoutError`, saying what did not happen in time.
fn timed_out(what: &str, timeout: Option<Duration>) -> PyErr {
    let seconds = timeout.unwrap_or_default().as_secs_f64();
    fitting_error("SealpassTimeoutError", format!("{what} within {seconds} s"))
}

/// The module: `sealpass._sealpass`, re-exported by `sealpass`.
#[pymodule]
fn _sealpass(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    for (name, class) in fitting_classes(py)?.bind(py).iter() {
        module.add(name.extract::<String>()?, class)?;
    }
    module.add("SealpassError", py.get_type::<SealpassError>())?;
    module.add("Rejected", py.get_type::<Rejected>())?;
    module.add("DeliveryUnknown", py.get_type::<DeliveryUnknown>())?;
    module.add(
        "REJECT_REASONS",
        RejectReason::ALL
            .iter()
            .map(|reason| (reason.code(), reason.name()))
            .collect::<Vec<_>>(),
    )?;
    module.add("SENDER_DEFAULT_SEALS", seals_to(py, Seals::SENDER_DEFAULT)?)?;
    module.add(
        "RECEIVER_REQUIRED_SEALS",
        seals_to(py, Seals::RECEIVER_DEFAULT)?,
    )?;
    send::register(module)?;
    receive::register(module)?;
    Ok(())
}
