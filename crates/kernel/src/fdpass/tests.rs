use super::*;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// The kernel's version, `(major, minor)`.
fn kernel() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[test]
fn a_socket_that_refuses_fds_never_receives_one_where_the_kernel_can() {
    let (answers, receiver) = pair().unwrap();
    let refused = refuse_fds(answers.as_fd()).unwrap();
    // SO_PASSRIGHTS came with Linux 6.16: on it and later the kernel
    // must refuse; before, the option is unknown and fds still come.
    assert_eq!(refused, kernel() >= (6, 16), "kernel {:?}", kernel());
    let (stray, _) = nix::unistd::pipe().unwrap();
    let mut buffer = [0u8; 16];
    let mut control = ControlBuffer::new();
    if refused {
        assert_eq!(passes_fds(answers.as_fd()).unwrap(), Some(false));
        let error = send(receiver.as_fd(), b"ack", &[stray.as_fd()]).unwrap_err();
        assert_eq!(error.errno(), Some(Errno::EPERM), "{error}");
        send(receiver.as_fd(), b"ack", &[]).unwrap();
        let got = receive(answers.as_fd(), &mut buffer, &mut control).unwrap();
        assert_eq!((&buffer[..got.len], got.fds.len()), (&b"ack"[..], 0));
    } else {
        assert_eq!(passes_fds(answers.as_fd()).unwrap(), None);
        send(receiver.as_fd(), b"ack", &[stray.as_fd()]).unwrap();
        let got = receive(answers.as_fd(), &mut buffer, &mut control).unwrap();
        assert_eq!(got.fds.len(), 1, "an old kernel lets it through, owned");
    }
    // A socket left alone passes fds, on kernels that know the option.
    let (plain, _) = pair().unwrap();
    assert_ne!(passes_fds(plain.as_fd()).unwrap(), Some(false));
}

#[test]
fn a_kernel_without_so_passrights_costs_one_failed_call() {
    let (sock, _) = pair().unwrap();
    let known = AtomicBool::new(true);
    // An option number no kernel knows: setsockopt says ENOPROTOOPT,
    // as a kernel before 6.16 says for SO_PASSRIGHTS.
    let unknown = 0x7fff;
    assert!(!refuse_fds_with(sock.as_fd(), &known, unknown).unwrap());
    assert!(!known.load(Ordering::Relaxed), "remembered");
    assert!(!refuse_fds_with(sock.as_fd(), &known, SO_PASSRIGHTS).unwrap());
}

#[test]
fn connecting_refuses_fds_where_the_kernel_can() {
    let dir = std::env::temp_dir().join(format!("sealpass-fdpass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("connect.sock");
    let _ = std::fs::remove_file(&path);
    let listener = listen(&path, 4).unwrap();
    let sender = connect(&path).unwrap();
    let expected = (kernel() >= (6, 16)).then_some(false);
    assert_eq!(passes_fds(sender.as_fd()).unwrap(), expected);
    drop(listener);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_peer_pidfd_names_the_connecting_process_where_the_kernel_has_it() {
    let (a, _b) = pair().unwrap();
    let pidfd = peer_pidfd(a.as_fd()).unwrap();
    // SO_PEERPIDFD came with Linux 6.5.
    assert_eq!(pidfd.is_some(), kernel() >= (6, 5), "kernel {:?}", kernel());
    if let Some(pidfd) = pidfd {
        let flags = nix::fcntl::fcntl(&pidfd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "a pidfd must be close-on-exec");
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap();
        let pid = info
            .lines()
            .find_map(|line| line.strip_prefix("Pid:"))
            .map(str::trim)
            .unwrap();
        assert_eq!(pid, std::process::id().to_string(), "{info}");
    }
}

#[test]
fn control_len_matches_libc() {
    assert_eq!(CONTROL_LEN, 16 + 1016);
}

#[test]
fn fds_and_payload_arrive_in_order() {
    let (a, b) = pair().unwrap();
    let (r1, w1) = nix::unistd::pipe().unwrap();
    send(a.as_fd(), b"hello", &[r1.as_fd(), w1.as_fd()]).unwrap();
    let mut buffer = [0u8; 64];
    let mut control = ControlBuffer::new();
    let got = receive(b.as_fd(), &mut buffer, &mut control).unwrap();
    assert_eq!(&buffer[..got.len], b"hello");
    assert_eq!(got.fds.len(), 2);
    assert!(!got.payload_truncated && !got.control_truncated);
    let flags = nix::fcntl::fcntl(&got.fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert_ne!(
        flags & libc::FD_CLOEXEC,
        0,
        "received fds must be close-on-exec"
    );
}

#[test]
fn the_most_fds_fit_and_are_all_closed_when_dropped() {
    let (a, b) = pair().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let fds = vec![r.as_fd(); MAX_SEGMENTS];
    assert!(matches!(
        send(a.as_fd(), b"x", &vec![r.as_fd(); MAX_SEGMENTS + 1]),
        Err(TransportError::TooManyFds { count: 254 })
    ));
    send(a.as_fd(), b"x", &fds).unwrap();
    let mut buffer = [0u8; 8];
    let got = receive(b.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap();
    assert_eq!(got.fds.len(), MAX_SEGMENTS);
    assert!(!got.control_truncated);
    // Every received fd is a reader of the pipe. Once they and the
    // original are dropped, no reader is left, whatever other tests in
    // this process are doing with their own fds.
    drop(got);
    drop(r);
    assert_eq!(nix::unistd::write(&w, b"x"), Err(Errno::EPIPE));
}

/// The reader of a pipe, and whether any reader of it is still open
/// anywhere in the process (a write fails `EPIPE` once none is).
fn pipe_with_reader_check() -> (OwnedFd, impl Fn() -> bool) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (r, move || nix::unistd::write(&w, b"x") != Err(Errno::EPIPE))
}

#[test]
fn a_batch_brings_every_queued_message_with_its_own_fds_and_bytes() {
    let (a, b) = pair().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    send(a.as_fd(), b"none", &[]).unwrap();
    send(a.as_fd(), b"one", &[r.as_fd()]).unwrap();
    send(a.as_fd(), b"two!", &[r.as_fd(), w.as_fd()]).unwrap();
    let mut batch = ReceiveBatch::new(8, 64);
    assert_eq!(receive_batch(b.as_fd(), &mut batch).unwrap(), 3);
    assert_eq!(batch.untaken(), 3);
    for (index, (payload, fds)) in [(&b"none"[..], 0), (b"one", 1), (b"two!", 2)]
        .into_iter()
        .enumerate()
    {
        let (got, bytes) = batch.take_next().unwrap();
        assert_eq!((bytes, got.fds.len()), (payload, fds), "message {index}");
        assert!(!got.payload_truncated && !got.control_truncated);
        for fd in &got.fds {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec");
        }
    }
    assert!(batch.take_next().is_none(), "each taken once");
    assert_eq!(batch.untaken(), 0);
}

#[test]
fn a_batch_waits_for_one_and_takes_no_more_than_its_slots() {
    let check = |queued: usize, slots: usize, expected: &[usize]| {
        let (a, b) = pair().unwrap();
        for index in 0..queued {
            send(a.as_fd(), &[index as u8 + 1], &[]).unwrap();
        }
        let mut batch = ReceiveBatch::new(slots, 8);
        let mut next = 1u8;
        for &count in expected {
            assert_eq!(receive_batch(b.as_fd(), &mut batch).unwrap(), count);
            for _ in 0..count {
                let (_, bytes) = batch.take_next().unwrap();
                assert_eq!(bytes, [next], "in order");
                next += 1;
            }
        }
        // Nothing left: the wait for the first runs into the timeout
        // (recvmsg's or recvmmsg's: see `after_single_messages_...`).
        set_timeouts(b.as_fd(), Some(Duration::from_millis(10)), None).unwrap();
        assert!(matches!(
            receive_batch(b.as_fd(), &mut batch),
            Err(TransportError::TimedOut {
                op: Op::ReceiveMany | Op::Receive
            })
        ));
    };
    check(1, 8, &[1]);
    check(5, 2, &[2, 2, 1]);
    check(MAX_BATCH + 4, 100, &[MAX_BATCH, 4]);
    check(3, 0, &[1, 1, 1]);
}

#[test]
fn a_batch_flags_truncation_and_the_end_of_stream() {
    let (a, b) = pair().unwrap();
    send(a.as_fd(), &[7; 100], &[]).unwrap();
    drop(a);
    let mut batch = ReceiveBatch::new(4, 10);
    let count = receive_batch(b.as_fd(), &mut batch).unwrap();
    let (got, bytes) = batch.take_next().unwrap();
    assert!(got.payload_truncated && !got.is_end_of_stream());
    assert_eq!(bytes, [7; 10]);
    if count == 1 {
        receive_batch(b.as_fd(), &mut batch).unwrap();
    }
    assert!(batch.take_next().unwrap().0.is_end_of_stream());
}

#[test]
fn fds_nobody_took_from_a_batch_are_closed_by_the_next_receive() {
    let (a, b) = pair().unwrap();
    let (reader, readers_left) = pipe_with_reader_check();
    send(a.as_fd(), b"x", &[reader.as_fd()]).unwrap();
    drop(reader);
    let mut batch = ReceiveBatch::new(4, 8);
    receive_batch(b.as_fd(), &mut batch).unwrap();
    assert!(readers_left(), "held in the batch");
    send(a.as_fd(), b"y", &[]).unwrap();
    receive_batch(b.as_fd(), &mut batch).unwrap();
    assert!(!readers_left(), "closed, never leaked");

    let (reader, readers_left) = pipe_with_reader_check();
    send(a.as_fd(), b"z", &[reader.as_fd()]).unwrap();
    drop(reader);
    receive_batch(b.as_fd(), &mut batch).unwrap();
    drop(batch);
    assert!(!readers_left(), "closed with the batch");
}

#[test]
fn a_batch_send_delivers_every_message_in_order() {
    let check = |count: usize| {
        let (a, b) = pair().unwrap();
        let payloads: Vec<Vec<u8>> = (0..count).map(|i| vec![i as u8; i + 1]).collect();
        send_batch(a.as_fd(), &payloads).unwrap();
        drop(a);
        let mut buffer = [0u8; 64];
        let mut control = ControlBuffer::new();
        for payload in &payloads {
            let got = receive(b.as_fd(), &mut buffer, &mut control).unwrap();
            assert_eq!(&buffer[..got.len], &payload[..]);
        }
        assert!(
            receive(b.as_fd(), &mut buffer, &mut control)
                .unwrap()
                .is_end_of_stream()
        );
    };
    for count in [0, 1, MAX_BATCH, MAX_BATCH + 1, 40] {
        check(count);
    }
}

#[test]
fn a_batch_send_to_a_vanished_peer_is_an_error_not_a_signal() {
    let (a, b) = pair().unwrap();
    drop(b);
    let error = send_batch(a.as_fd(), &[b"x"; 3]).unwrap_err();
    assert_eq!(error.errno(), Some(Errno::EPIPE), "{error}");
    assert_eq!(error.to_string(), "sendmmsg failed: EPIPE: Broken pipe");
    // One message goes through sendmsg, and says so.
    let error = send_batch(a.as_fd(), &[b"x"]).unwrap_err();
    assert_eq!(error.to_string(), "sendmsg failed: EPIPE: Broken pipe");
}

#[test]
fn batches_stay_within_half_the_fd_limit() {
    let check = |soft: u64, expected: usize| {
        assert_eq!(batch_slots_for(soft), expected, "soft limit {soft}");
    };
    for (soft, expected) in [
        (0, 1),
        (32, 1),
        (1011, 1),
        (1012, 2),
        (1024, 2),
        (4096, 8),
        (8096, 16),
        (16191, 31),
        (16192, MAX_BATCH),
        (1 << 20, MAX_BATCH),
        (u64::MAX, MAX_BATCH),
    ] {
        check(soft, expected);
    }
}

#[test]
fn non_blocking_batches_say_nothing_queued_and_no_room() {
    let (a, b) = pair().unwrap();
    let mut batch = ReceiveBatch::new(4, 8);
    assert_eq!(try_receive_batch(b.as_fd(), &mut batch), Ok(None));
    send(a.as_fd(), b"x", &[]).unwrap();
    assert_eq!(try_receive_batch(b.as_fd(), &mut batch), Ok(Some(1)));
    assert_eq!(
        batch.take_next().map(|(_, bytes)| bytes.to_vec()),
        Some(b"x".to_vec())
    );
    // Fill the peer's queue: a non-blocking batch send stops where it is
    // full and says how far it got, in order.
    let payload = vec![9u8; 4096];
    let mut sent = 0;
    loop {
        let got = try_send_batch(a.as_fd(), &[&payload[..]; 8]).unwrap();
        sent += got;
        if got < 8 {
            break;
        }
    }
    assert!(sent > 0);
    assert_eq!(try_send_batch(a.as_fd(), &[&payload[..]]), Ok(0), "full");
    let mut received = 0;
    while let Some(count) = try_receive_batch(b.as_fd(), &mut batch).unwrap() {
        received += count;
    }
    assert_eq!(received, sent, "every message sent arrived, none twice");
}

#[test]
fn a_batch_without_a_mapping_takes_one_message_at_a_time() {
    let (a, b) = pair().unwrap();
    for payload in [&b"one"[..], b"two", b"three"] {
        send(a.as_fd(), payload, &[]).unwrap();
    }
    let mut batch = ReceiveBatch::single(64);
    assert_eq!(batch.slots(), 1);
    for payload in [&b"one"[..], b"two", b"three"] {
        assert_eq!(receive_batch(b.as_fd(), &mut batch).unwrap(), 1);
        assert_eq!(
            batch.take_next().map(|(_, bytes)| bytes.to_vec()),
            Some(payload.to_vec())
        );
    }
    drop(a);
    assert_eq!(
        receive_batch(b.as_fd(), &mut batch).unwrap(),
        1,
        "the end is one"
    );
    assert!(batch.take_next().unwrap().0.is_end_of_stream());
}

#[test]
fn after_single_messages_a_batch_asks_for_one_for_a_while() {
    let (a, b) = pair().unwrap();
    let mut batch = ReceiveBatch::new(8, 8);
    // Each step: messages queued, then what each receive brings.
    let check = |batch: &mut ReceiveBatch, queued: usize, expected: &[usize]| {
        for _ in 0..queued {
            send(a.as_fd(), b"m", &[]).unwrap();
        }
        for &count in expected {
            assert_eq!(receive_batch(b.as_fd(), batch).unwrap(), count);
        }
    };
    check(&mut batch, 3, &[3]);
    // One found alone: the next receive asks for one.
    check(&mut batch, 1, &[1]);
    check(&mut batch, 3, &[1, 2]);
    // Two full-width singles in a row: two narrow receives follow.
    check(&mut batch, 1, &[1]);
    check(&mut batch, 1, &[1]);
    check(&mut batch, 1, &[1]);
    check(&mut batch, 4, &[1, 1, 2]);
    // However long the run, at most NARROW_AFTER_SINGLES narrow ones:
    // from a full-width single after a long run of them, exactly that.
    for _ in 0..100 {
        check(&mut batch, 1, &[1]);
    }
    while batch.narrow != NARROW_AFTER_SINGLES {
        check(&mut batch, 1, &[1]);
    }
    let narrow = NARROW_AFTER_SINGLES as usize;
    let mut expected = vec![1; narrow];
    expected.push(3);
    check(&mut batch, narrow + 3, &expected);
}

#[test]
fn truncated_payload_is_flagged() {
    let (a, b) = pair().unwrap();
    send(a.as_fd(), &[7; 100], &[]).unwrap();
    let mut buffer = [0u8; 10];
    let got = receive(b.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap();
    assert!(got.payload_truncated);
    assert_eq!(got.len, 10);
}

#[test]
fn end_of_stream_and_broken_pipe() {
    let (a, b) = pair().unwrap();
    drop(a);
    let mut buffer = [0u8; 8];
    let got = receive(b.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap();
    assert!(got.is_end_of_stream());
    // MSG_NOSIGNAL: an error, not a SIGPIPE that kills the test process.
    let error = send(b.as_fd(), b"x", &[]).unwrap_err();
    assert_eq!(error.errno(), Some(Errno::EPIPE));
}

#[test]
fn listening_sockets_are_owner_only_and_peers_are_known() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("sealpass-fdpass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mode.sock");
    let _ = std::fs::remove_file(&path);
    let listener = listen(&path, 1).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let _client = connect(&path).unwrap();
    let served = accept(listener.as_fd()).unwrap();
    let peer = peer_credentials(served.as_fd()).unwrap();
    assert_eq!(peer.pid, std::process::id() as i32);
    // /proc/self belongs to this process's effective uid.
    assert_eq!(
        peer.uid,
        std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shutting_down_reading_still_delivers_what_is_queued() {
    let (a, b) = pair().unwrap();
    send(a.as_fd(), b"queued", &[]).unwrap();
    shut_down_reading(b.as_fd()).unwrap();
    let mut buffer = [0u8; 16];
    let mut control = ControlBuffer::new();
    assert_eq!(
        receive(b.as_fd(), &mut buffer, &mut control).unwrap().len,
        6
    );
    assert!(
        receive(b.as_fd(), &mut buffer, &mut control)
            .unwrap()
            .is_end_of_stream()
    );
}

#[test]
fn receive_timeout_is_typed() {
    let (_a, b) = pair().unwrap();
    set_timeouts(b.as_fd(), Some(Duration::from_millis(20)), None).unwrap();
    let mut buffer = [0u8; 8];
    let error = receive(b.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap_err();
    assert_eq!(error, TransportError::TimedOut { op: Op::Receive });
}

#[test]
fn a_nul_in_a_socket_path_is_reported_as_such() {
    for (path, expected) in [
        ("/tmp/a\0b", "holds a NUL byte"),
        (&*format!("/tmp/{}", "x".repeat(200)), "too long"),
    ] {
        let error = connect(Path::new(path)).unwrap_err();
        assert!(error.to_string().contains(expected), "{path:?}: {error}");
    }
}
