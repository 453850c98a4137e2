//! The receiver's session on arbitrary scripts of datagrams, kernel facts,
//! verdicts and time: `sealpass_proto::fuzzing::session`.
fn main() {
    afl::fuzz!(|data: &[u8]| sealpass_proto::fuzzing::session(data));
}
