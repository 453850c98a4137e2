//! The property the `answers` fuzz target in `fuzz/` and the property test
//! check on any input: the sender's judging of the answers it reads.
//! Feature `fuzzing`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use sealpass_proto::{Ack, Message, Reject, RejectReason, encode};

use crate::Verdict;
use crate::client::Pipeline;

/// Any sequence of answers, read with up to 7 transfers in flight: never a
/// panic; an answer taken as a verdict is for the oldest transfer in
/// flight (an `Ack` naming it, a `Reject` naming it or 0) and takes it out
/// of flight; anything else is an error that leaves the flight as it was.
pub fn answers(data: &[u8]) {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let mut pipeline = Pipeline::new();
    for id in 1..=u64::from(first % 8) {
        pipeline.sent(id);
    }
    while let Some((&choice, tail)) = rest.split_first() {
        rest = tail;
        let take = |rest: &mut &[u8]| {
            let (&byte, tail) = rest.split_first().unwrap_or((&0, &[]));
            *rest = tail;
            byte
        };
        let bytes = match choice % 3 {
            0 => encode(&Message::Ack(Ack::new(u64::from(take(&mut rest) % 9)))).unwrap(),
            1 => {
                let id = u64::from(take(&mut rest) % 9);
                let code = u16::from(take(&mut rest));
                encode(&Message::Reject(Reject::new(
                    id,
                    RejectReason::from_code(code),
                    "why",
                )))
                .unwrap()
            }
            _ => {
                let len = usize::from(take(&mut rest)).min(rest.len());
                let (raw, tail) = rest.split_at(len);
                rest = tail;
                raw.to_vec()
            }
        };
        let (oldest, before) = (pipeline.oldest(), pipeline.awaiting());
        match pipeline.on_answer(&bytes) {
            Ok(Verdict::Accepted { id }) => {
                assert_eq!(id, oldest, "an Ack is taken only for the oldest");
                assert_eq!(pipeline.awaiting(), before - 1);
            }
            Ok(Verdict::Rejected { id, .. }) => {
                assert!(id == oldest || id == 0, "Reject {id} taken for {oldest}");
                assert_eq!(pipeline.awaiting(), before - 1);
            }
            Err(_) => assert_eq!(pipeline.awaiting(), before, "an error takes nothing"),
        }
    }
}
