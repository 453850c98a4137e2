//! Running `sealpass-recv` as a separate process for tests.
#![allow(dead_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sealpass_proto::fdpass::{self, ControlBuffer};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::{Message, Seals, decode};
use sealpass_sender::{SealedSegment, Sender, Verdict};

/// How long a test waits for the receiver to settle before failing. Generous:
/// CI machines are slow and shared; passing tests never wait this long.
const SETTLE: Duration = Duration::from_secs(10);

pub struct RecvProcess {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    idle_fds: usize,
}

impl RecvProcess {
    pub fn start(extra: &[&str]) -> RecvProcess {
        Self::start_with(extra, Stdio::null())
    }

    pub fn start_with(extra: &[&str], stdout: Stdio) -> RecvProcess {
        Self::start_full(extra, stdout, Stdio::inherit())
    }

    pub fn start_full(extra: &[&str], stdout: Stdio, stderr: Stdio) -> RecvProcess {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("recv.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_sealpass-recv"))
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut process = RecvProcess {
            child,
            dir,
            socket,
            idle_fds: 0,
        };
        process.wait_until_listening();
        // Before any connection: the count the receiver returns to when idle.
        process.idle_fds = process.open_fds();
        process
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + SETTLE;
        while !self.socket.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("sealpass-recv exited early: {status}");
            }
            assert!(Instant::now() < deadline, "sealpass-recv never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The receiver's open fds when it serves no connection.
    pub fn idle_fds(&self) -> usize {
        self.idle_fds
    }

    /// The receiver's open fds, from /proc/PID/fd.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// Waits until the receiver's open-fd count is `expected` (it closes a
    /// peer's socket only after seeing the peer close).
    pub fn wait_for_open_fds(&self, expected: usize, case: &str) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let now = self.open_fds();
            if now == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{case}: receiver holds {now} fds; expected {expected} (leak)"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for RecvProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A valid transfer on a new connection must be accepted.
pub fn send_valid(receiver: &RecvProcess) {
    let mut sender = Sender::connect(receiver.socket()).unwrap();
    let segment = SealedSegment::filled("valid", b'v', 4096, Seals::SENDER_DEFAULT).unwrap();
    let verdict = sender.send(&[segment]).unwrap();
    assert!(verdict.is_accepted(), "valid transfer refused: {verdict:?}");
    assert!(matches!(verdict, Verdict::Accepted { .. }));
}

/// The next message on `connection`, or `None` once it is closed.
pub fn answer_to(connection: &OwnedFd) -> Option<Message> {
    fdpass::set_timeouts(connection.as_fd(), Some(SETTLE), None).unwrap();
    let mut buffer = vec![0; MAX_MESSAGE_LEN];
    let received =
        fdpass::receive(connection.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap();
    if received.is_end_of_stream() {
        return None;
    }
    assert!(received.fds.is_empty(), "answers carry no fds");
    Some(decode(&buffer[..received.len]).unwrap().message)
}
