//! The sender's judging of answers: `sealpass_sender::fuzzing::answers`.
fn main() {
    afl::fuzz!(|data: &[u8]| sealpass_sender::fuzzing::answers(data));
}
