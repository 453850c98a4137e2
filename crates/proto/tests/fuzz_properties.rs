//! The fuzz targets' properties (`sealpass_proto::fuzzing`), run briefly on
//! random input and on every seed and regression kept in `fuzz/`, so that
//! `cargo xtask test` checks what `cargo xtask soak` fuzzes for longer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use proptest::prelude::*;
use sealpass_proto::fuzzing;

/// Runs `property` on every file under `fuzz/seeds/TARGET` and
/// `fuzz/regressions/TARGET`; returns how many.
fn check_kept_inputs(target: &str, property: fn(&[u8])) -> usize {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut checked = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| property(&input));
            assert!(outcome.is_ok(), "{} breaks the property", path.display());
            checked += 1;
        }
    }
    checked
}

#[test]
fn every_kept_input_holds() {
    assert!(
        check_kept_inputs("codec", fuzzing::codec) >= 3,
        "the golden vectors are seeds"
    );
    assert!(check_kept_inputs("session", fuzzing::session) >= 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn the_codec_holds_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::codec(&bytes);
    }

    #[test]
    fn the_session_holds_on_any_script(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        fuzzing::session(&bytes);
    }
}
