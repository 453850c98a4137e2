//! Protocol 1.1's metadata against what users did before it: the fields of
//! a 4 KiB message as metadata, against the same fields in an extra JSON
//! segment; 4 KiB of data as metadata alone, against a unix stream round
//! trip of 4 KiB; and what 200 bytes of metadata add to a 4 KiB handoff.
//! Each round trip makes its message's fields (and the JSON segment) anew,
//! as an application whose fields change with every message does; the
//! 4 KiB data segment is made once, as in the handoff rows.

use sealpass_sender::{Metadata, SealedSegment, Seals, Sender};

use crate::measure::{Peer, per_op, stream_copy_on};
use crate::report::{Regime, Report, Stat, Target};

/// The fields a media or array message carries: a sequence number, an
/// element type, a shape.
fn fields(seq: u64) -> Metadata {
    Metadata::new()
        .with("seq", seq.to_string())
        .with("dtype", "<f4")
        .with("shape", "32,32")
}

/// The same fields as a JSON document, for the extra-segment way.
fn json(seq: u64) -> Vec<u8> {
    format!(r#"{{"seq":{seq},"dtype":"<f4","shape":[32,32]}}"#).into_bytes()
}

/// Round trips against a `sealpass` peer (on `cpu`, if given), each made
/// by `send`.
fn round_trip(
    iterations: usize,
    cpu: Option<usize>,
    mut send: impl FnMut(&mut Sender, u64),
) -> f64 {
    let peer = Peer::start("sealpass", 0, cpu);
    let mut sender = Sender::connect(&peer.socket).unwrap();
    let mut seq = 0;
    let micros = per_op(iterations, || {
        seq += 1;
        send(&mut sender, seq);
    });
    drop(sender);
    peer.finish();
    micros
}

/// The rows in both regimes; the targets are judged on one CPU, where what
/// sealpass does is not hidden behind the cross-CPU wake-ups both sides of
/// each ratio pay (which on this shared machine vary from run to run by
/// more than the differences measured).
pub(crate) fn meta_rows(report: &mut Report, runs: usize, round_trips: usize) {
    let two = measure_regime(runs, round_trips, None);
    let cpu = crate::first_allowed_cpu();
    crate::pin_to_cpu(Some(cpu));
    let one = measure_regime(runs, round_trips, Some(cpu));
    crate::pin_to_cpu(None);
    for (regime, samples) in [(Regime::TwoCpus, &two), (Regime::OneCpu, &one)] {
        for (method, values) in METHODS.into_iter().zip(samples) {
            report.row(
                regime,
                method,
                Some(4096),
                "µs",
                Stat::of(values.clone()),
                None,
            );
        }
    }
    let [with_fields, with_json, alone, stream, annotated, plain] = &one;
    // Pair by pair within each run, then the median.
    let ratio =
        |a: &[f64], b: &[f64]| Stat::of(a.iter().zip(b).map(|(a, b)| a / b).collect()).median;
    report.line_with_id(
        "meta_4k_vs_extra_segment",
        "4 KiB round trip with its fields as metadata / with an extra JSON segment, 1 CPU",
        ratio(with_fields, with_json),
        Some(Target::AtMost(0.6)),
    );
    report.line_with_id(
        "meta_only_4k_vs_stream",
        "unix stream round trip of 4 KiB / 4 KiB as metadata alone, 1 CPU",
        ratio(stream, alone),
        Some(Target::AtLeast(0.8)),
    );
    report.line_with_id(
        "meta_overhead_4k",
        "4 KiB round trip with 200 bytes of metadata / without, 1 CPU",
        ratio(annotated, plain),
        Some(Target::AtMost(1.1)),
    );
}

const METHODS: [&str; 6] = [
    "4 KiB segment, fields as metadata",
    "4 KiB segment, fields in an extra JSON segment",
    "4 KiB as metadata alone, no segment",
    "unix stream round trip, 4 KiB",
    "4 KiB segment with 200 bytes of metadata",
    "4 KiB segment, no metadata",
];

/// Per run, the six round trips of [`METHODS`], peers on `cpu` if given.
fn measure_regime(runs: usize, round_trips: usize, cpu: Option<usize>) -> [Vec<f64>; 6] {
    let data = SealedSegment::filled("frame", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
    // The data segment, and room for the JSON one beside it.
    let mut both = vec![data];
    let data = both[0].try_clone().unwrap();
    let frame = std::slice::from_ref(&data);
    let payload = vec![b'd'; 4096];
    let annotation = vec![b'a'; 200 - 16 - "note".len() - 8];
    let mut samples: [Vec<f64>; 6] = Default::default();
    for _ in 0..runs {
        let with_fields = round_trip(round_trips, cpu, |sender, seq| {
            assert!(sender.send_with(frame, &fields(seq)).unwrap().is_accepted());
        });
        let with_json = round_trip(round_trips, cpu, |sender, seq| {
            let json =
                SealedSegment::from_bytes("fields", &json(seq), Seals::SENDER_DEFAULT).unwrap();
            both.push(json);
            assert!(sender.send(&both).unwrap().is_accepted());
            both.pop();
        });
        let alone = round_trip(round_trips, cpu, |sender, _| {
            let fields: &[(&str, &[u8])] = &[("data", &payload)];
            assert!(sender.send_with(&[], fields).unwrap().is_accepted());
        });
        let stream = stream_copy_on(round_trips, &payload, cpu);
        let annotated = round_trip(round_trips, cpu, |sender, _| {
            let fields: &[(&str, &[u8])] = &[("note", &annotation)];
            assert!(sender.send_with(frame, fields).unwrap().is_accepted());
        });
        let plain = round_trip(round_trips, cpu, |sender, _| {
            assert!(sender.send(frame).unwrap().is_accepted());
        });
        for (at, value) in [with_fields, with_json, alone, stream, annotated, plain]
            .into_iter()
            .enumerate()
        {
            samples[at].push(value);
        }
    }
    samples
}
