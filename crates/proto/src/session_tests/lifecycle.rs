//! The session over a connection's life: the order of answers, the
//! first-message deadline and the idle timeout, versions that close, peers
//! that close, failed answers, budgets, and the fds a verified transfer
//! holds. Time is simulated.

use super::*;

#[test]
fn answers_keep_the_order_of_the_messages_whatever_order_they_are_given_in() {
    let now = Instant::now();
    let mut session = Session::new(Arc::new(Config::default()), None, now);
    let mut tickets = Vec::new();
    for id in 1..=3 {
        let delivered = offer(
            &mut session,
            now,
            &transfer(id, vec![segment("s", 1)]),
            &[Some(memfd("s", 1))],
        )
        .unwrap();
        tickets.push(delivered.ticket);
        if id == 2 {
            // A refusal between deliveries takes its place in the order.
            let reject = expect_rejected(offer(&mut session, now, b"garbage", &[]));
            assert_eq!(reject.reason, RejectReason::Truncated);
        }
    }
    let [one, two, three] = <[Ticket; 3]>::try_from(tickets).unwrap();
    session.answer(three, Ok(()), now);
    assert_eq!(session.poll_transmit(), None, "3 waits for 1 and 2");
    session.answer(one, Ok(()), now);
    assert_eq!(transmitted(&mut session).message, Message::Ack(Ack::new(1)));
    assert_eq!(session.poll_transmit(), None, "2 is still owed");
    session.answer(two, Err("no".into()), now);
    let order: Vec<(u64, &'static str)> = std::iter::from_fn(|| session.poll_transmit())
        .map(|t| (t.message.id(), t.message.kind()))
        .collect();
    assert_eq!(order, [(2, "Reject"), (0, "Reject"), (3, "Ack")]);
    assert_eq!(session.owed(), 0);
}

#[test]
fn the_first_message_deadline_and_the_idle_timeout() {
    let start = Instant::now();
    let timeouts = config(|c| {
        c.first_message_deadline(Some(Duration::from_secs(10)))
            .idle_timeout(Some(Duration::from_secs(30)))
    });
    let at = |secs: u64| start + Duration::from_secs(secs);

    // Silent from the start: the deadline, then Timeout with id 0, closing.
    let mut silent = Session::new(Arc::clone(&timeouts), None, start);
    assert_eq!(silent.poll_timeout(), Some(at(10)));
    assert_eq!(silent.handle_timeout(at(9)), None, "not yet");
    let reject = silent.handle_timeout(at(10)).unwrap();
    assert_eq!((reject.id, reject.reason), (0, RejectReason::Timeout));
    assert!(
        reject
            .message
            .contains("no complete first message within 10s"),
        "{}",
        reject.message
    );
    let answer = transmitted(&mut silent);
    assert!(answer.closes);
    assert!(silent.is_done() && !silent.wants_to_read());
    assert_eq!(silent.poll_timeout(), None);

    // A first message (even a refused one) turns the deadline into the
    // idle timeout, counted from that message.
    let mut talker = Session::new(Arc::clone(&timeouts), None, start);
    let _ = expect_rejected(offer(&mut talker, at(5), b"garbage", &[]));
    let _ = talker.poll_transmit();
    assert_eq!(talker.poll_timeout(), Some(at(35)));
    assert_eq!(
        talker.handle_timeout(at(10)),
        None,
        "the first deadline is gone"
    );
    let reject = talker.handle_timeout(at(35)).unwrap();
    assert!(
        reject.message.contains("no message within 30s"),
        "{}",
        reject.message
    );

    // While the application owes an answer, silence is not the peer's:
    // nothing times out; the clock restarts from the answer.
    let mut waiting = Session::new(Arc::clone(&timeouts), None, start);
    let delivered = offer(
        &mut waiting,
        at(1),
        &transfer(1, vec![segment("s", 1)]),
        &[Some(memfd("s", 1))],
    )
    .unwrap();
    assert_eq!(waiting.poll_timeout(), None);
    assert_eq!(waiting.handle_timeout(at(1000)), None);
    waiting.answer(delivered.ticket, Ok(()), at(1000));
    assert_eq!(waiting.poll_timeout(), Some(at(1030)));

    // No timeouts configured: nothing ever times out.
    let forever = config(|c| c.timeouts(None));
    let mut patient = Session::new(forever, None, start);
    assert_eq!(patient.poll_timeout(), None);
    assert_eq!(patient.handle_timeout(at(1 << 30)), None);

    // Without a first-message deadline, the idle timeout stands in for it.
    let idle_only = config(|c| c.first_message_deadline(None));
    assert_eq!(
        Session::new(idle_only, None, start).poll_timeout(),
        Some(at(30))
    );
}

#[test]
fn an_unsupported_version_closes_after_its_answer_and_earlier_answers_go_first() {
    let now = Instant::now();
    let mut session = Session::new(Arc::new(Config::default()), None, now);
    let delivered = offer(
        &mut session,
        now,
        &transfer(1, vec![segment("s", 1)]),
        &[Some(memfd("s", 1))],
    )
    .unwrap();
    let mut newer = transfer(2, vec![segment("s", 1)]);
    newer[4] = 2;
    let reject = expect_rejected(offer(&mut session, now, &newer, &[Some(memfd("s", 1))]));
    assert_eq!(reject.reason, RejectReason::UnsupportedVersion);
    assert!(
        reject.message.contains("this side speaks 1.x"),
        "{}",
        reject.message
    );
    assert!(!session.wants_to_read());
    assert!(!session.is_done(), "the first transfer's answer is owed");
    assert_eq!(session.poll_transmit(), None);
    session.answer(delivered.ticket, Ok(()), now);
    assert_eq!(transmitted(&mut session).message, Message::Ack(Ack::new(1)));
    assert!(transmitted(&mut session).closes);
    assert!(session.is_done());
}

#[test]
fn a_peer_that_closes_is_still_answered_then_done() {
    let now = Instant::now();
    let mut session = Session::new(Arc::new(Config::default()), None, now);
    let delivered = offer(
        &mut session,
        now,
        &transfer(1, vec![segment("s", 1)]),
        &[Some(memfd("s", 1))],
    )
    .unwrap();
    assert!(matches!(
        session.handle_datagram(now, &datagram(&[], 0)),
        Received::End
    ));
    assert!(!session.wants_to_read());
    assert!(!session.is_done());
    session.answer(delivered.ticket, Ok(()), now);
    assert_eq!(transmitted(&mut session).message, Message::Ack(Ack::new(1)));
    assert!(session.is_done());
}

#[test]
fn a_failed_answer_ends_the_connection() {
    let now = Instant::now();
    let mut session = Session::new(Arc::new(Config::default()), None, now);
    let _ = expect_rejected(offer(&mut session, now, b"x", &[]));
    session.abort();
    assert!(session.is_done());
    assert_eq!(session.poll_transmit(), None);
}

#[test]
fn a_session_without_a_shared_budget_still_holds_max_mapped_total() {
    let now = Instant::now();
    let config = Config::builder()
        .max_mapped_per_connection(1 << 30)
        .max_mapped_total(10_000)
        .build()
        .unwrap();
    let mut alone = Session::new(Arc::new(config), None, now);
    let reject = expect_rejected(offer(
        &mut alone,
        now,
        &transfer(1, vec![segment("a", 6000), segment("b", 6000)]),
        &[Some(memfd("a", 6000)), Some(memfd("b", 6000))],
    ));
    assert_eq!((reject.id, reject.reason), (1, RejectReason::MemoryLimit));
    assert!(
        reject
            .message
            .contains("0 of 10000 bytes already mapped by all connections"),
        "{}",
        reject.message
    );
}

#[test]
fn a_verified_transfer_holds_exactly_the_fds_it_was_judged_from() {
    let now = Instant::now();
    let bytes = transfer(3, vec![segment("a", 4096), segment("b", 4096)]);
    for (given, expected) in [
        (2, Ok(vec![10, 11])),
        (1, Err(RejectReason::FdCountMismatch)),
        (3, Err(RejectReason::FdCountMismatch)),
    ] {
        let mut session = Session::new(Arc::new(Config::default()), None, now);
        let Received::Inspect(unverified) = session.handle_datagram(now, &datagram(&bytes, 2))
        else {
            panic!("valid header")
        };
        let mut fds: Vec<u32> = (10..10 + given).collect();
        let judged = session.judge(
            unverified,
            &mut fds,
            &mut unknown_fd_facts(),
            |index, into| {
                *into = memfd(["a", "b"][index.min(1)], 4096);
                Ok::<(), &str>(())
            },
        );
        let got = judged
            .map(|verified| {
                verified
                    .grants()
                    .map(|grant| *grant.fd())
                    .collect::<Vec<_>>()
            })
            .map_err(|reject| reject.reason);
        assert_eq!(got, expected, "{given} fds given for 2 segments");
        assert!(fds.is_empty(), "taken when verified, closed when refused");
    }
}
