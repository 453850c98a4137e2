//! The codec on arbitrary bytes: `sealpass_proto::fuzzing::codec`.
fn main() {
    afl::fuzz!(|data: &[u8]| sealpass_proto::fuzzing::codec(data));
}
