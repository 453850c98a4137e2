//! Running `sealpass-recv` as a separate process for tests.
#![allow(dead_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sealpass_kernel::fdpass::{self, ControlBuffer};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::{Message, Seals, decode};
use sealpass_sender::{SealedSegment, Sender, Verdict};

/// How long a test waits for the receiver to settle before failing. Generous:
/// CI machines are slow and shared; passing tests never wait this long.
const SETTLE: Duration = Duration::from_secs(10);

pub(crate) struct RecvProcess {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    idle_fds: usize,
    log: std::sync::mpsc::Receiver<String>,
    started: String,
}

impl RecvProcess {
    pub(crate) fn start(extra: &[&str]) -> RecvProcess {
        Self::start_with(extra, Stdio::null())
    }

    /// Starts the receiver; returns once it logs that it is listening, with
    /// everything it holds while idle in place.
    pub(crate) fn start_with(extra: &[&str], stdout: Stdio) -> RecvProcess {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("recv.sock");
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_sealpass-recv")),
            dir,
            socket,
            extra,
            stdout,
        )
    }

    /// Starts the receiver with its fd limit at `nofile` (soft and hard,
    /// through prlimit), listening at `socket` in `dir`, which it keeps.
    pub(crate) fn start_limited(
        nofile: u32,
        dir: tempfile::TempDir,
        socket: PathBuf,
        extra: &[&str],
    ) -> RecvProcess {
        let mut prlimit = Command::new("prlimit");
        prlimit
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(env!("CARGO_BIN_EXE_sealpass-recv"));
        Self::spawn(prlimit, dir, socket, extra, Stdio::null())
    }

    fn spawn(
        mut command: Command,
        dir: tempfile::TempDir,
        socket: PathBuf,
        extra: &[&str],
        stdout: Stdio,
    ) -> RecvProcess {
        let mut child = command
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Echo the receiver's log into the test's output, and keep it readable.
        let (tx, log) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("{line}");
                let _ = tx.send(line);
            }
        });
        let mut process = RecvProcess {
            child,
            dir,
            socket,
            idle_fds: 0,
            log,
            started: String::new(),
        };
        process.wait_until_listening();
        // Before any connection: the count the receiver returns to when idle.
        process.idle_fds = process.open_fds();
        process
    }

    fn wait_until_listening(&mut self) {
        self.started = self.wait_for_log("listening on");
    }

    /// The log line that said the receiver listens.
    pub(crate) fn started_line(&self) -> &str {
        &self.started
    }

    /// Asks the receiver to stop, as an operator would (SIGTERM).
    pub(crate) fn stop(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    /// The log lines received so far and not yet waited for.
    pub(crate) fn drain_log(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Waits for a log line containing `text`; returns it.
    pub(crate) fn wait_for_log(&self, text: &str) -> String {
        self.log_until(text).pop().unwrap_or_default()
    }

    /// Waits for a log line containing `text`; returns every line logged
    /// until then, that one last.
    pub(crate) fn log_until(&self, text: &str) -> Vec<String> {
        let deadline = Instant::now() + SETTLE;
        let mut lines = Vec::new();
        loop {
            match self
                .log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let found = line.contains(text);
                    lines.push(line);
                    if found {
                        return lines;
                    }
                }
                Err(_) => panic!("sealpass-recv never logged {text:?}"),
            }
        }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Gives back the directory the socket is in, the receiver stopped.
    pub(crate) fn into_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let placeholder = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, placeholder)
    }

    pub(crate) fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The receiver's open fds when it serves no connection.
    pub(crate) fn idle_fds(&self) -> usize {
        self.idle_fds
    }

    /// The receiver's open fds, from /proc/PID/fd.
    pub(crate) fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// Waits until the receiver's open-fd count is `expected` (it closes a
    /// peer's socket only after seeing the peer close).
    pub(crate) fn wait_for_open_fds(&self, expected: usize, case: &str) {
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
pub(crate) fn send_valid(receiver: &RecvProcess) {
    let mut sender = Sender::connect(receiver.socket()).unwrap();
    let segment = SealedSegment::filled("valid", b'v', 4096, Seals::SENDER_DEFAULT).unwrap();
    let verdict = sender.send(&[segment]).unwrap();
    assert!(verdict.is_accepted(), "valid transfer refused: {verdict:?}");
    assert!(matches!(verdict, Verdict::Accepted { .. }));
}

/// The next message on `connection`, or `None` once it is closed.
pub(crate) fn answer_to(connection: &OwnedFd) -> Option<Message> {
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

/// Tests that count this process's own fds and mappings run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This process's open fds. The `/proc/self/fd` directory that name checks
/// read from is held for the life of the process once any receiver starts;
/// it is opened first so that it is in every count.
pub(crate) fn own_open_fds() -> usize {
    sealpass_receiver::inspect::open_proc_fd_dir();
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// This process's memfd mappings.
pub(crate) fn own_memfd_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|line| line.contains("/memfd:"))
        .count()
}

/// Whether the running kernel is `major.minor` or later.
pub(crate) fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (major, minor)
}
