use super::fill::*;
use super::*;
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::ftruncate;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

fn read_all(segment: &SealedSegment) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = File::from(segment.fd().try_clone_to_owned().unwrap());
    let mut out = vec![0; segment.size() as usize];
    file.read_exact_at(&mut out, 0).unwrap();
    out
}

/// A transient `EBUSY` from `F_ADD_SEALS` is waited out a few times;
/// one that stays is the error it is, and the fd is closed with it.
#[test]
fn a_busy_seal_is_retried_a_few_times_then_reported() {
    for (busy_answers, expect_ok) in [(1, true), (3, true), (4, false), (100, false)] {
        let fd = create("busy").unwrap();
        let mut calls = 0;
        let result =
            SealedSegment::seal_with("busy".into(), fd, 0, Seals::SENDER_DEFAULT, |fd, flags| {
                calls += 1;
                if calls <= busy_answers {
                    Err(Errno::EBUSY)
                } else {
                    fcntl(fd, FcntlArg::F_ADD_SEALS(flags)).map(drop)
                }
            });
        match result {
            Ok(segment) => {
                assert!(expect_ok, "{busy_answers} EBUSY answers");
                assert!(segment.seals().contains(Seals::SENDER_DEFAULT));
            }
            Err(SegmentError::Seal { errno, .. }) => {
                assert!(!expect_ok, "{busy_answers} EBUSY answers");
                assert_eq!(errno, Errno::EBUSY);
                assert_eq!(calls, 4, "the first try and three retries");
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
}

/// Each huge page mode takes its own path for 2 MiB and more (a
/// mapping that asks for huge pages; a memfd sized before `pwrite`);
/// whatever pages the kernel then gives, the bytes and seals are the
/// same.
#[test]
fn every_huge_page_mode_yields_the_same_bytes_and_seals() {
    let seals = Seals::SENDER_DEFAULT;
    let huge = sealpass_kernel::host::HUGE_PAGE as usize;
    for mode in [
        ShmemHugePages::Never,
        ShmemHugePages::Advise,
        ShmemHugePages::Always,
    ] {
        for size in [4096, huge, huge + 1] {
            let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let shared = Source::Shared {
                start: bytes.as_ptr(),
                len: bytes.len(),
            };
            for source in [Source::Slice(&bytes), shared] {
                let copied = SealedSegment::from_bytes_for("b", source, seals, mode).unwrap();
                assert_eq!(
                    (copied.size(), read_all(&copied)),
                    (size as u64, bytes.clone()),
                    "{mode:?} {size}"
                );
                assert!(copied.seals().contains(seals));
            }
            let mut file = tempfile::NamedTempFile::new().unwrap();
            file.write_all(&bytes).unwrap();
            let from_file = SealedSegment::from_file_for("d", file.path(), seals, mode).unwrap();
            assert_eq!(
                (from_file.size(), read_all(&from_file)),
                (size as u64, bytes),
                "{mode:?} {size} from a file"
            );
            assert!(from_file.seals().contains(seals));
            for byte in [0, b'f'] {
                let filled =
                    SealedSegment::filled_for("f", byte, size as u64, seals, mode).unwrap();
                assert_eq!(
                    read_all(&filled),
                    vec![byte; size],
                    "{mode:?} {size} {byte}"
                );
                assert!(filled.seals().contains(seals));
            }
        }
    }
}

/// Sources whose length is not known up front are refused (from_file)
/// or read up to a bound (from_reader); a signal ends a read.
#[test]
fn unbounded_sources_are_refused_or_bounded_and_signals_end_them() {
    let seals = Seals::SENDER_DEFAULT;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // A FIFO with no writer: refused at once, not waited on.
    for (path, found) in [
        (fifo.as_path(), "a FIFO"),
        (Path::new("/dev/zero"), "a character device"),
        (dir.path(), "a directory"),
    ] {
        for result in [
            SealedSegment::from_file("s", path, seals),
            SealedSegment::builder("s")
                .seals(seals)
                .pages(Pages::HugeTlb)
                .file(path),
        ] {
            match result {
                Err(error @ SegmentError::NotAFile { .. }) => {
                    let text = error.to_string();
                    assert!(text.contains(found) && text.contains("--stdin"), "{text}");
                }
                other => panic!("{}: expected NotAFile, got {other:?}", path.display()),
            }
        }
    }
    // An endless stream stops at the bound, with advice.
    let mut zeros = File::open("/dev/zero").unwrap();
    match SealedSegment::builder("z")
        .seals(seals)
        .stream_limit(1 << 20)
        .reader(&mut zeros)
    {
        Err(error @ SegmentError::TooLong { limit: 1048576, .. }) => {
            assert!(error.to_string().contains("--max-stream-size"), "{error}");
        }
        other => panic!("expected TooLong, got {other:?}"),
    }
    // Exactly the bound is taken.
    let exact = SealedSegment::builder("x")
        .seals(seals)
        .stream_limit(4096)
        .reader(&mut Read::by_ref(&mut zeros).take(4096))
        .unwrap();
    assert_eq!(exact.size(), 4096);
    // A read a signal interrupts ends the fill.
    struct Interrupting;
    impl Read for Interrupting {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::Interrupted.into())
        }
    }
    assert!(matches!(
        SealedSegment::from_reader("i", &mut Interrupting, seals),
        Err(SegmentError::Interrupted { copied: 0, .. })
    ));
}

/// A reader that yields more or less than expected (a file that grew
/// or shrank while it was copied) gives a segment of what it yielded,
/// on every huge page path.
#[test]
fn a_segment_holds_what_the_reader_yielded_whatever_was_expected() {
    let huge = sealpass_kernel::host::HUGE_PAGE;
    let check = |mode: ShmemHugePages, yielded: u64, expected: u64| {
        let bytes: Vec<u8> = (0..yielded).map(|i| (i % 253) as u8).collect();
        let segment = SealedSegment::from_file_expecting(
            "r",
            &mut io::Cursor::new(&bytes),
            expected,
            Seals::SENDER_DEFAULT,
            mode,
        )
        .unwrap();
        // The memfd's own size, which a receiver checks against the
        // declared one.
        let kernel_size = File::from(segment.fd().try_clone_to_owned().unwrap())
            .metadata()
            .unwrap()
            .len();
        assert_eq!(
            (segment.size(), kernel_size, read_all(&segment)),
            (yielded, yielded, bytes),
            "{mode:?}: {yielded} bytes yielded, {expected} expected"
        );
    };
    for mode in [
        ShmemHugePages::Never,
        ShmemHugePages::Advise,
        ShmemHugePages::Always,
    ] {
        for (yielded, expected) in [
            (huge, huge),
            (huge - 1, huge),
            (huge + 4097, huge),
            (0, huge),
            (1, huge),
            (3 * huge, huge),
            (4096, 0),
        ] {
            check(mode, yielded, expected);
        }
    }
}

/// Huge pages of the hugetlb pool free for a new reservation, and their
/// size in bytes (0 without hugetlbfs).
fn hugetlb_room() -> (u64, u64) {
    sealpass_kernel::host::HugeTlbPool::read().map_or((0, 0), |pool| (pool.room(), pool.page_bytes))
}

/// `Pages::HugeTlb` is honoured exactly when the machine can: a size of
/// whole huge pages and a pool with room for it; otherwise the segment
/// is made in shmem. Either way the bytes and seals are right. On a
/// machine without a pool every case falls back; `cargo xtask vm` boots
/// its kernels with one, where the eligible cases take it.
#[test]
fn hugetlb_is_taken_where_the_pool_has_room_and_falls_back_otherwise() {
    let seals = Seals::SENDER_DEFAULT;
    let (_, huge) = hugetlb_room();
    let huge = if huge == 0 { 2 << 20 } else { huge };
    let mut source = tempfile::NamedTempFile::new().unwrap();
    let pattern = |size: u64| (0..size).map(|i| (i % 253) as u8).collect::<Vec<u8>>();
    source.write_all(&pattern(2 * huge)).unwrap();
    type Make = Box<dyn Fn() -> Result<(SealedSegment, Vec<u8>), SegmentError>>;
    let path = source.path().to_owned();
    let cases: Vec<(&str, u64, Make)> = vec![
        (
            "bytes, one huge page",
            huge,
            Box::new(move || {
                let bytes = pattern(huge);
                Ok((
                    SealedSegment::builder("h1")
                        .seals(seals)
                        .pages(Pages::HugeTlb)
                        .bytes(&bytes)?,
                    bytes,
                ))
            }),
        ),
        (
            "filled, two huge pages",
            2 * huge,
            Box::new(move || {
                let segment = SealedSegment::builder("h2")
                    .seals(seals)
                    .pages(Pages::HugeTlb)
                    .filled(b'H', 2 * huge)?;
                Ok((segment, vec![b'H'; 2 * huge as usize]))
            }),
        ),
        (
            "zeros, reserved, not written",
            huge,
            Box::new(move || {
                let segment = SealedSegment::builder("h0")
                    .seals(seals)
                    .pages(Pages::HugeTlb)
                    .filled(0, huge)?;
                Ok((segment, vec![0; huge as usize]))
            }),
        ),
        (
            "a file of two huge pages",
            2 * huge,
            Box::new(move || {
                let segment = SealedSegment::builder("hf")
                    .seals(seals)
                    .pages(Pages::HugeTlb)
                    .file(&path)?;
                Ok((segment, pattern(2 * huge)))
            }),
        ),
        (
            "not whole pages",
            huge + 4096,
            Box::new(move || {
                let segment = SealedSegment::builder("hx")
                    .seals(seals)
                    .pages(Pages::HugeTlb)
                    .filled(b'x', huge + 4096)?;
                Ok((segment, vec![b'x'; huge as usize + 4096]))
            }),
        ),
        (
            "small",
            4096,
            Box::new(move || {
                let bytes = pattern(4096);
                Ok((
                    SealedSegment::builder("hs")
                        .seals(seals)
                        .pages(Pages::HugeTlb)
                        .bytes(&bytes)?,
                    bytes,
                ))
            }),
        ),
        (
            "empty",
            0,
            Box::new(move || {
                Ok((
                    SealedSegment::builder("he")
                        .seals(seals)
                        .pages(Pages::HugeTlb)
                        .filled(b'e', 0)?,
                    Vec::new(),
                ))
            }),
        ),
    ];
    for (case, size, make) in cases {
        let (room, _) = hugetlb_room();
        let expected = if size > 0 && size % huge == 0 && room >= size / huge {
            Pages::HugeTlb
        } else {
            Pages::Shmem
        };
        let (segment, bytes) = make().unwrap();
        assert_eq!(segment.pages(), expected, "{case}: pool room {room}");
        assert_eq!(segment.size(), size, "{case}");
        assert_eq!(read_all(&segment), bytes, "{case}");
        assert!(
            segment.seals().contains(seals),
            "{case}: {}",
            segment.seals()
        );
    }
    // The writer reports what it got, and a plain request never uses the pool.
    let writer = SealedSegment::builder("w")
        .pages(Pages::Shmem)
        .writer(huge)
        .unwrap();
    assert_eq!(writer.pages(), Pages::Shmem);
}

#[test]
fn every_fill_path_yields_the_bytes_and_the_seals() {
    let seals = Seals::SENDER_DEFAULT;
    let mut source = tempfile::NamedTempFile::new().unwrap();
    source.write_all(b"from a file").unwrap();
    let cases = [
        (
            SealedSegment::from_bytes("a", b"bytes", seals).unwrap(),
            b"bytes".to_vec(),
        ),
        (
            SealedSegment::filled("b", b'B', 3, seals).unwrap(),
            b"BBB".to_vec(),
        ),
        (
            SealedSegment::from_reader("c", &mut &b"stream"[..], seals).unwrap(),
            b"stream".to_vec(),
        ),
        (
            SealedSegment::from_file("d", source.path(), seals).unwrap(),
            b"from a file".to_vec(),
        ),
        (
            SealedSegment::filled("e", b'x', 0, seals).unwrap(),
            Vec::new(),
        ),
        // Past one pwrite chunk, and not a multiple of it.
        (
            SealedSegment::filled("f", b'z', (3 << 20) + 5, seals).unwrap(),
            vec![b'z'; (3 << 20) + 5],
        ),
        (
            SealedSegment::filled("sparse", 0, 1 << 20, seals).unwrap(),
            vec![0; 1 << 20],
        ),
    ];
    for (segment, expected) in cases {
        assert_eq!(read_all(&segment), expected, "{}", segment.name());
        assert_eq!(segment.size(), expected.len() as u64);
        assert!(segment.seals().contains(seals), "{}", segment.seals());
        assert_fully_backed(&segment);
    }
}

/// What a receiver checks before it maps: no holes.
fn assert_fully_backed(segment: &SealedSegment) {
    let stat = nix::sys::stat::fstat(segment.fd()).unwrap();
    assert!(
        stat.st_blocks as u64 * 512 >= segment.size(),
        "{}: {} of {} bytes allocated",
        segment.name(),
        stat.st_blocks * 512,
        segment.size()
    );
}

#[test]
fn no_segment_is_sealed_with_holes() {
    let seals = Seals::SENDER_DEFAULT;
    let size = 4 << 20;
    // A mapping the fill touches only at its ends, a writer that writes
    // nothing, and a sparse memfd sealed elsewhere, then forwarded.
    let touched_at_ends = SealedSegment::with_mapping("ends", size, seals, |bytes| {
        bytes[0] = 1;
        bytes[bytes.len() - 1] = 2;
        Ok::<(), io::Error>(())
    })
    .unwrap();
    let untouched = SegmentWriter::new("untouched", size)
        .unwrap()
        .seal(seals)
        .unwrap();
    let sealed_sparse = create("forwarded").unwrap();
    resize("forwarded", &sealed_sparse, size).unwrap();
    fcntl(
        &sealed_sparse,
        FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(seals.bits() as i32)),
    )
    .unwrap();
    let forwarded = SealedSegment::from_sealed_fd(sealed_sparse, seals).unwrap();
    for segment in [&touched_at_ends, &untouched, &forwarded] {
        assert_fully_backed(segment);
    }
    let mut expected = vec![0; size as usize];
    expected[0] = 1;
    expected[size as usize - 1] = 2;
    assert_eq!(read_all(&touched_at_ends), expected);
    assert_eq!(read_all(&forwarded), vec![0; size as usize]);
}

/// The fallback a kernel before 6.3 takes, by fault injection: it
/// refuses `MFD_NOEXEC_SEAL` with EINVAL once; the memfd is made
/// without it, and later ones do not ask again.
#[test]
fn an_einval_for_noexec_seal_falls_back_once_and_is_remembered() {
    let supported = AtomicBool::new(true);
    let mut calls = Vec::new();
    let mut kernel_6_1 = |name: &str, flags: MFdFlags| {
        calls.push(flags.contains(MFD_NOEXEC_SEAL));
        if flags.contains(MFD_NOEXEC_SEAL) {
            Err(Errno::EINVAL)
        } else {
            memfd_create(name, flags)
        }
    };
    let first = create_with("old-kernel", &supported, &mut kernel_6_1).unwrap();
    let second = create_with("old-kernel", &supported, &mut kernel_6_1).unwrap();
    assert_eq!(calls, [true, false, false], "asked once, then never again");
    assert!(!supported.load(Ordering::Relaxed));
    // What was made is a sealable memfd all the same.
    for fd in [first, second] {
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).unwrap();
        assert_eq!(seals & nix::libc::F_SEAL_SEAL, 0, "sealing is allowed");
    }
    // Any other error is reported as it is.
    let error = create_with("full", &AtomicBool::new(true), |_, _| Err(Errno::EMFILE));
    assert!(matches!(
        error,
        Err(SegmentError::Create {
            errno: Errno::EMFILE,
            ..
        })
    ));
}

#[test]
fn sealed_memfds_refuse_writes_and_truncation() {
    let segment = SealedSegment::filled("w", b'A', 4096, Seals::SENDER_DEFAULT).unwrap();
    let file = File::from(segment.fd().try_clone_to_owned().unwrap());
    let write = FileExt::write_at(&file, b"x", 0).unwrap_err();
    assert_eq!(write.raw_os_error(), Some(Errno::EPERM as i32));
    assert_eq!(ftruncate(&file, 0), Err(Errno::EPERM));
}

#[test]
fn fill_errors_are_reported() {
    let error =
        SealedSegment::with_mapping("f", 10, Seals::empty(), |_| Err("disk on fire")).unwrap_err();
    // This level's words, then the cause as the source: each said once.
    assert_eq!(error.to_string(), "segment \"f\": filling failed");
    assert_eq!(
        std::error::Error::source(&error).map(ToString::to_string),
        Some("disk on fire".to_owned())
    );
    let error = SealedSegment::filled("a\0b", 1, 1, Seals::empty()).unwrap_err();
    assert!(matches!(error, SegmentError::InvalidName(_)), "{error}");
}

/// Sealed in place, a writer's pages stay mapped at the same addresses:
/// they read the sealed bytes, and a write there reaches neither the memfd
/// nor anyone who maps it (the seal holds). The cases: a size of 0, less
/// than a page, several pages, some never written (zeros).
#[test]
fn a_writer_sealed_in_place_keeps_its_pages_and_the_seal_holds() {
    for (size, written) in [(0, 0), (10, 10), (3 * 4096 + 5, 4096), (1 << 20, 1 << 20)] {
        let mut writer = SegmentWriter::new("in-place", size as u64).unwrap();
        let start = writer.as_mut_ptr();
        let pattern: Vec<u8> = (0..written).map(|at| (at % 251) as u8 + 1).collect();
        writer.bytes_mut()[..written].copy_from_slice(&pattern);
        let mut expected = pattern.clone();
        expected.resize(size, 0);
        let (segment, pages) = writer.seal_in_place(Seals::SENDER_DEFAULT).unwrap();
        assert!(segment.seals().contains(Seals::SENDER_DEFAULT), "{size}");
        assert_eq!(read_all(&segment), expected, "{size}: the memfd");
        assert_eq!((pages.len(), pages.is_empty()), (size, size == 0));
        if size == 0 {
            continue;
        }
        assert_eq!(
            pages.as_ptr(),
            start.cast_const(),
            "{size}: the same addresses"
        );
        // SAFETY: `pages` maps `size` bytes, read and written by this test
        // alone.
        let seen = unsafe { std::slice::from_raw_parts_mut(start, size) };
        assert_eq!(&seen[..], &expected[..], "{size}: the pages read");
        seen.fill(0xEE);
        assert_eq!(
            read_all(&segment),
            expected,
            "{size}: a write after the seal"
        );
        let mapped = segment.try_clone().unwrap();
        let file = File::from(mapped.into_fd());
        let mut again = vec![0; size];
        FileExt::read_exact_at(&file, &mut again, 0).unwrap();
        assert_eq!(again, expected, "{size}: read through another fd");
        drop(pages);
    }
}

/// A seal in place that fails gives the writer back as it was: its pages
/// are the memfd's again, shared and writable, and a plain seal then works.
#[test]
fn a_failed_seal_in_place_gives_the_writer_back_writable() {
    let mut writer = SegmentWriter::new("refused", 8192).unwrap();
    writer.bytes_mut()[..4].copy_from_slice(b"head");
    let failed = writer
        .seal_in_place_with(Seals::SENDER_DEFAULT, |_, _| Err(Errno::EPERM))
        .unwrap_err();
    assert!(
        matches!(
            failed.error(),
            SegmentError::Seal {
                errno: Errno::EPERM,
                ..
            }
        ),
        "{failed}"
    );
    let mut writer = failed.into_writer().expect("the writer comes back");
    writer.bytes_mut()[4..8].copy_from_slice(b"tail");
    let unsealed = writer.fd.try_clone().unwrap();
    let mut seen = [0; 8];
    FileExt::read_exact_at(&File::from(unsealed), &mut seen, 0).unwrap();
    assert_eq!(&seen, b"headtail", "writes reach the memfd again");
    let segment = writer.seal(Seals::SENDER_DEFAULT).unwrap();
    assert_eq!(&read_all(&segment)[..8], b"headtail");
}

/// A writer on 4 KiB pages has every page allocated, zeroed, before it is
/// written, and mapped.
#[test]
fn a_writer_on_small_pages_allocates_every_page_up_front() {
    for size in [1u64, 4096, 3 * 4096 + 5, 1 << 20] {
        let fd = create("up-front").unwrap();
        resize("up-front", &fd, size).unwrap();
        let writer =
            SegmentWriter::mapping("up-front", size, fd, writer::WriterPages::SmallUpFront)
                .unwrap();
        let stat = nix::sys::stat::fstat(&writer.fd).unwrap();
        assert!(
            stat.st_blocks as u64 * 512 >= size,
            "{size}: {} blocks",
            stat.st_blocks
        );
        assert!(
            writer.bytes().iter().all(|&byte| byte == 0),
            "{size}: zeroed"
        );
    }
}
