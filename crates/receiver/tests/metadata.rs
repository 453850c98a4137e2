//! Protocol 1.1's metadata through the libraries: borrowed or owned, with
//! segments or alone, blocking and async, and looked up by key; segments
//! looked up by name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sealpass_receiver::{Listener, Metadata};
use sealpass_sender::{SealedSegment, Seals, Sender};

/// What a receiver saw of one transfer.
#[derive(Debug, PartialEq)]
struct Seen {
    version: String,
    segments: Vec<(String, Vec<u8>)>,
    metadata: Metadata,
}

fn seen(transfer: &sealpass_receiver::IncomingTransfer) -> Seen {
    Seen {
        version: transfer.version().to_string(),
        segments: transfer
            .segments()
            .iter()
            .map(|segment| (segment.name().to_owned(), segment.bytes().to_vec()))
            .collect(),
        metadata: transfer.metadata().clone(),
    }
}

#[test]
fn blocking_metadata_borrowed_owned_and_alone_arrives_intact() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("meta.sock");
    let listener = Listener::bind(&socket).unwrap();
    let receiver = std::thread::spawn(move || {
        let mut connection = listener.accept().unwrap();
        let mut all = Vec::new();
        while let Some(transfer) = connection.receive().unwrap() {
            let frame = transfer
                .segment("frame")
                .map(|segment| segment.bytes().to_vec());
            assert_eq!(transfer.segment("absent").map(|_| ()), None);
            all.push((seen(&transfer), frame));
            transfer.accept().unwrap();
        }
        all
    });
    let mut sender = Sender::connect(&socket).unwrap();
    let frame = SealedSegment::from_bytes("frame", b"pixels", Seals::SENDER_DEFAULT).unwrap();
    // Borrowed: values the caller holds, copied once, into the message.
    let sequence = 7u64.to_le_bytes();
    let borrowed: &[(&str, &[u8])] = &[("seq", &sequence), ("dtype", b"<f4")];
    assert!(
        sender
            .send_with(std::slice::from_ref(&frame), borrowed)
            .unwrap()
            .is_accepted()
    );
    // Owned: a Metadata built up and moved in.
    let owned = Metadata::new()
        .with("shape", "2,3")
        .with("raw", vec![0u8, 255]);
    assert!(sender.send_with(&[frame], &owned).unwrap().is_accepted());
    // Alone: no segment, no memfd.
    assert!(
        sender
            .send_with(&[], &[("command", "flush")])
            .unwrap()
            .is_accepted()
    );
    // Without: a 1.0 transfer, as before.
    let plain = SealedSegment::from_bytes("plain", b"x", Seals::SENDER_DEFAULT).unwrap();
    assert!(sender.send(&[plain]).unwrap().is_accepted());
    drop(sender);
    assert!(
        sealpass_sender::send_metadata(&socket, &[("late", "x")]).is_err(),
        "the receiver serves one connection"
    );
    let all = receiver.join().unwrap();
    let pixels = vec![("frame".to_owned(), b"pixels".to_vec())];
    assert_eq!(
        all,
        [
            (
                Seen {
                    version: "1.1".into(),
                    segments: pixels.clone(),
                    metadata: Metadata::new().with("seq", sequence).with("dtype", "<f4"),
                },
                Some(b"pixels".to_vec())
            ),
            (
                Seen {
                    version: "1.1".into(),
                    segments: pixels,
                    metadata: owned,
                },
                Some(b"pixels".to_vec())
            ),
            (
                Seen {
                    version: "1.1".into(),
                    segments: vec![],
                    metadata: Metadata::new().with("command", "flush"),
                },
                None
            ),
            (
                Seen {
                    version: "1.0".into(),
                    segments: vec![("plain".to_owned(), b"x".to_vec())],
                    metadata: Metadata::new(),
                },
                None
            ),
        ]
    );
}

#[test]
fn a_sender_refuses_metadata_that_breaks_a_rule_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("refuse.sock");
    let listener = Listener::bind(&socket).unwrap();
    let mut sender = Sender::connect(&socket).unwrap();
    let _connection = listener.accept().unwrap();
    for (fields, expected) in [
        (&[("k", "1"), ("k", "2")][..], "already the key of entry 0"),
        (&[("", "1")][..], "empty key"),
        (&[][..], "no segments and no metadata"),
    ] {
        let error = sender.send_with(&[], fields).unwrap_err();
        let chain = sealpass_receiver::ErrorChain(&error).to_string();
        assert!(chain.contains(expected), "{fields:?}: {chain}");
    }
    assert_eq!(sender.in_flight(), 0, "nothing went out");
}

#[test]
fn async_metadata_arrives_intact_through_the_async_service() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("async-meta.sock");
        let service = sealpass_receiver::tokio::Service::new(
            sealpass_receiver::tokio::Listener::bind(&socket).unwrap(),
        )
        .unwrap();
        let stop = service.shutdown_handle();
        let (tell, told) = tokio::sync::mpsc::unbounded_channel();
        let running = tokio::spawn(service.run(move |delivery| {
            let tell = tell.clone();
            async move {
                // By name, as a blocking delivery's transfer finds it.
                let frame = delivery.segment("frame").map(|s| s.bytes().to_vec());
                assert_eq!(frame.is_some(), !delivery.segments.is_empty());
                assert!(frame.is_none_or(|bytes| bytes == b"f"));
                assert!(delivery.segment("absent").is_none());
                tell.send((delivery.segments.len(), delivery.metadata))
                    .unwrap();
                Ok::<(), String>(())
            }
        }));
        let mut sender = sealpass_sender::tokio::Sender::connect_with_retry(
            &socket,
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();
        let frame = SealedSegment::from_bytes("frame", b"f", Seals::SENDER_DEFAULT).unwrap();
        let verdict = sender.send_with(&[frame], &[("seq", "1")]).await.unwrap();
        assert!(verdict.is_accepted(), "{verdict:?}");
        let verdict = sender.send_with(&[], &[("command", "stop")]).await.unwrap();
        assert!(verdict.is_accepted(), "{verdict:?}");
        let mut told = told;
        assert_eq!(
            told.recv().await.unwrap(),
            (1, Metadata::new().with("seq", "1"))
        );
        assert_eq!(
            told.recv().await.unwrap(),
            (0, Metadata::new().with("command", "stop"))
        );
        drop(sender);
        stop.shutdown();
        running.await.unwrap().unwrap();
    });
}
