"""Shared helpers for the sealpass Python tests.

`cargo xtask test` builds the package into a fresh virtual environment and
runs this suite with SEALPASS_BIN pointing at the directory that holds the
`sealpass-recv` and `sealpass-send` binaries.
"""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# A child started from a shell without job control inherits SIGINT ignored,
# and Python then installs no handler for it: give it back.
CHILD_PRELUDE = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


@pytest.fixture
def socket_path(tmp_path):
    return str(tmp_path / "sealpass.sock")


@pytest.fixture
def bin_dir():
    path = os.environ.get("SEALPASS_BIN")
    assert path, "set SEALPASS_BIN to the directory of sealpass-recv and sealpass-send"
    return pathlib.Path(path)


def python_child(code, *args, **popen):
    """Runs `code` in a new Python process (this interpreter, this venv)."""
    source = CHILD_PRELUDE + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", source, *args], **popen)


def wait_for_socket(path, process=None, patience=20.0):
    deadline = time.monotonic() + patience
    while not os.path.exists(path):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) before listening")
        assert time.monotonic() < deadline, f"nothing listened at {path}"
        time.sleep(0.01)


def finish(process, timeout=30):
    """Waits for `process`, killing it if it overstays; returns its status."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def interrupt(process):
    process.send_signal(signal.SIGINT)
