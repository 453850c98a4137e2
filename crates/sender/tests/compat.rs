//! `sealpass-send --compat` against a bare receiver written as plain programs
//! write one: accept on SOCK_STREAM, take the fds, `read()` each from its
//! current offset.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use sealpass_kernel::fdpass::{self, ControlBuffer};

/// Accepts one bare peer and returns its payload length and each fd's bytes.
fn bare_receiver(socket: &std::path::Path) -> std::thread::JoinHandle<(usize, Vec<Vec<u8>>)> {
    let listener = fdpass::listen_stream(socket, 1).unwrap();
    std::thread::spawn(move || {
        let connection = fdpass::accept(listener.as_fd()).unwrap();
        let mut payload = [0u8; 256];
        let received =
            fdpass::receive(connection.as_fd(), &mut payload, &mut ControlBuffer::new()).unwrap();
        let contents = received
            .fds
            .into_iter()
            .map(|fd| {
                let mut bytes = Vec::new();
                std::fs::File::from(fd).read_to_end(&mut bytes).unwrap();
                bytes
            })
            .collect();
        (received.len, contents)
    })
}

#[test]
fn a_bare_receiver_reads_every_source_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bare.sock");
    let file = dir.path().join("file.bin");
    std::fs::write(&file, b"from a file").unwrap();
    let receiver = bare_receiver(&socket);
    let file_spec = format!("f={}", file.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpass-send"))
        .arg("--socket")
        .arg(&socket)
        .args([
            "--compat",
            "--fill",
            "shma=A:4MiB",
            "--fill",
            "shmb=B:4MiB",
            "--file",
            &file_spec,
            "--stdin",
            "s",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("sent 4 bare memfds"));

    let (payload_len, contents) = receiver.join().unwrap();
    assert_eq!(payload_len, sealpass_sender::BARE_PAYLOAD_LEN);
    assert_eq!(contents.len(), 4);
    assert_eq!(contents[0], vec![b'A'; 4 << 20]);
    assert_eq!(contents[1], vec![b'B'; 4 << 20]);
    assert_eq!(contents[2], b"from a file");
    assert_eq!(contents[3], b"from stdin");
}
