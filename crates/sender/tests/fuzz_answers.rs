//! The `answers` fuzz target's property (`sealpass_sender::fuzzing`), run
//! briefly on random input and on every input kept in `fuzz/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use proptest::prelude::*;
use sealpass_sender::fuzzing;

#[test]
fn every_kept_input_holds() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut checked = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join("answers")) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            assert!(
                std::panic::catch_unwind(|| fuzzing::answers(&input)).is_ok(),
                "{} breaks the property",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "the seeds are kept in fuzz/seeds/answers");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn answers_hold_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzzing::answers(&bytes);
    }
}
