//! Tests of [`ScrubBody`]: codings, chunkings, bounds, twice-compressed bodies, policy changes.
use std::collections::VecDeque;
use std::convert::Infallible;

use async_compression::tokio::write::{BrotliEncoder, GzipEncoder, ZlibEncoder};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use veil_link::{SandboxState, SecretState, SecretValue};
use veil_policy::MountedSecret;

use super::*;

const VALUE: &str = "sk-real/0123456789+abc";
const PLACEHOLDER: &str = "veil_ph_0123456789abcdef";

/// A body that yields the given frames, each ready at once.
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }
}

fn policy(values: &[&str]) -> Arc<SandboxPolicy> {
    let secrets = values
        .iter()
        .enumerate()
        .map(|(i, v)| MountedSecret {
            previous: Vec::new(),
            retired: false,
            id: format!("sec_{i}"),
            name: format!("K{i}"),
            placeholder: format!("{PLACEHOLDER}{i}"),
            hosts: vec![],
            value: SecretValue::new((*v).into()),
            body_substitution: false,
            wrong_host: Default::default(),
        })
        .collect();
    Arc::new(SandboxPolicy::new(secrets).unwrap())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

async fn encode(coding: ContentCoding, data: &[u8]) -> Vec<u8> {
    match coding {
        ContentCoding::Identity => data.to_vec(),
        ContentCoding::Gzip => {
            let mut e = GzipEncoder::new(Vec::new());
            e.write_all(data).await.unwrap();
            e.shutdown().await.unwrap();
            e.into_inner()
        }
        ContentCoding::Deflate => {
            let mut e = ZlibEncoder::new(Vec::new());
            e.write_all(data).await.unwrap();
            e.shutdown().await.unwrap();
            e.into_inner()
        }
        ContentCoding::Brotli => {
            let mut e = BrotliEncoder::new(Vec::new());
            e.write_all(data).await.unwrap();
            e.shutdown().await.unwrap();
            e.into_inner()
        }
    }
}

/// Splits `data` at the given cut points.
fn split(data: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts {
        out.push(Bytes::copy_from_slice(&data[prev..c]));
        prev = c;
    }
    out.push(Bytes::copy_from_slice(&data[prev..]));
    out
}

/// Runs `wire` (cut into `chunks`, then `trailers`) through a [`ScrubBody`]; returns the
/// data, the trailers, and what `Stats::scrubbed` counted.
async fn run(
    policy: &Arc<SandboxPolicy>,
    coding: ContentCoding,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
) -> Result<(Vec<u8>, Option<HeaderMap>, u64), BoxError> {
    let mut frames: VecDeque<Frame<Bytes>> = chunks.into_iter().map(Frame::data).collect();
    if let Some(t) = trailers {
        frames.push_back(Frame::trailers(t));
    }
    let stats = Arc::new(Stats::default());
    let body = ScrubBody::new(Frames(frames), coding, policy.clone(), stats.clone(), false);
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes().to_vec();
    Ok((data, trailers, stats.scrubbed.load(Ordering::Relaxed)))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn every_coding_is_decoded_and_scrubbed_with_trailers() {
    let p = policy(&[VALUE]);
    let doc = format!("{{\"echo\":\"{VALUE}\"}} and again {VALUE}\n").repeat(50);
    let want = p.scrub_patterns().scrub_all(doc.as_bytes()).unwrap();
    rt().block_on(async {
        for coding in [
            ContentCoding::Identity,
            ContentCoding::Gzip,
            ContentCoding::Deflate,
            ContentCoding::Brotli,
        ] {
            let wire = encode(coding, doc.as_bytes()).await;
            let mut t = HeaderMap::new();
            t.insert("x-trailer", VALUE.parse().unwrap());
            t.insert("grpc-status", "0".parse().unwrap());
            let (data, trailers, n) = run(&p, coding, split(&wire, &[3, 17, 400]), Some(t))
                .await
                .unwrap();
            assert!(
                data == want,
                "{coding:?}: output differs from whole-buffer scrub"
            );
            let t = trailers.expect("trailers kept");
            assert_eq!(t["x-trailer"], format!("{PLACEHOLDER}0").as_str());
            assert_eq!(t["grpc-status"], "0");
            assert_eq!(n, 101, "{coding:?}");
        }
    });
}

#[test]
fn gzip_members_concatenated() {
    let p = policy(&[VALUE]);
    rt().block_on(async {
        let mut wire = encode(ContentCoding::Gzip, b"first sk-real/0123").await;
        wire.extend(encode(ContentCoding::Gzip, b"456789+abc second").await);
        let (data, _, n) = run(&p, ContentCoding::Gzip, vec![Bytes::from(wire)], None)
            .await
            .unwrap();
        assert_eq!(data, format!("first {PLACEHOLDER}0 second").as_bytes());
        assert_eq!(n, 1);
    });
}

#[test]
fn corrupt_compressed_body_is_an_error_without_content() {
    let p = policy(&[VALUE]);
    rt().block_on(async {
        for coding in [
            ContentCoding::Gzip,
            ContentCoding::Deflate,
            ContentCoding::Brotli,
        ] {
            let garbage = format!("not compressed at all: {VALUE}").repeat(20);
            let result = run(&p, coding, vec![Bytes::from(garbage)], None).await;
            let err = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("does not decode"), "{coding:?}: {err}");
            assert!(!err.contains("sk-real"));
        }
    });
}

#[test]
fn decoding_a_bomb_stays_bounded_per_frame() {
    // 16 MiB of zeros compress to ~16 KiB; each frame out is at most DECODE_BUF plus what
    // the scrubber held back.
    let p = policy(&[VALUE]);
    rt().block_on(async {
        let zeros = vec![0u8; 16 << 20];
        let wire = encode(ContentCoding::Gzip, &zeros).await;
        drop(zeros);
        let frames: VecDeque<Frame<Bytes>> = VecDeque::from([Frame::data(Bytes::from(wire))]);
        let stats = Arc::new(Stats::default());
        let mut body = ScrubBody::new(Frames(frames), ContentCoding::Gzip, p.clone(), stats, false);
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= DECODE_BUF + p.scrub_patterns().max_len());
            total += data.len();
        }
        assert_eq!(total, 16 << 20);
    });
}

#[test]
fn a_body_still_compressed_after_decoding_is_refused() {
    let p = policy(&[VALUE]);
    rt().block_on(async {
        let text = format!("echo {VALUE}\n").repeat(20);
        for inner in [ContentCoding::Gzip, ContentCoding::Deflate] {
            let once = encode(inner, text.as_bytes()).await;
            let twice = encode(ContentCoding::Gzip, &once).await;
            // Before the head: check_start says so.
            let frames = VecDeque::from([Frame::data(Bytes::from(twice.clone()))]);
            let stats = Arc::new(Stats::default());
            let mut body = ScrubBody::new(
                Frames(frames),
                ContentCoding::Gzip,
                p.clone(),
                stats.clone(),
                false,
            );
            let err = body.check_start().await.unwrap_err().to_string();
            assert!(err.contains("still") && !err.contains("sk-real"), "{err}");
            assert_eq!(stats.scrub_withheld.load(Ordering::Relaxed), 1);
            // Streaming, cut into bytes: an error, never the compressed data.
            let chunks = split(&twice, &(1..twice.len()).collect::<Vec<_>>());
            let err = run(&p, ContentCoding::Gzip, chunks, None)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("still"), "{inner:?}");
        }
        // A body that only looks like a magic's first byte is plain.
        let wire = encode(ContentCoding::Gzip, b"\x1f is not enough").await;
        let (data, _, _) = run(&p, ContentCoding::Gzip, vec![Bytes::from(wire)], None)
            .await
            .unwrap();
        assert_eq!(data, b"\x1f is not enough");
    });
}

fn state(value: &str, previous: &[&str]) -> SecretState {
    SecretState {
        id: "sec_r".parse().unwrap(),
        org: "org".parse().unwrap(),
        name: "ROTATED".into(),
        placeholder: PLACEHOLDER.into(),
        hosts: vec![],
        value: SecretValue::new(value.into()),
        revision: 1.into(),
        body_substitution: false,
        wrong_host: Default::default(),
        previous: previous
            .iter()
            .map(|v| SecretValue::new((*v).into()))
            .collect(),
        retired: false,
    }
}

#[test]
fn a_stream_scrubs_values_that_became_current_while_it_streams() {
    const NEW: &str = "sk-rotated/9876543210+xyz";
    const MOUNTED: &str = "mounted-later-0123456789";
    let store = SecretStore::default();
    let sandbox = SandboxState {
        id: "sb".parse().unwrap(),
        org: "org".parse().unwrap(),
        cgroup: "x".into(),
        netns: None,
        mounts: [("K".to_owned(), "sec_r".parse().unwrap())].into(),
        egress: Default::default(),
        cgroup_id: None,
    };
    store.replace(std::slice::from_ref(&sandbox), vec![state(VALUE, &[])]);
    let p1 = store.policy("sb").unwrap();
    rt().block_on(async {
        let filler = "x".repeat(2000);
        let frames = VecDeque::from([
            // The first frame ends inside the old value: held back, then scanned again
            // with the new patterns.
            Frame::data(Bytes::from(format!("{filler} first {}", &VALUE[..9]))),
            Frame::data(Bytes::from(format!(
                "{} then {NEW} and {MOUNTED} {filler}",
                &VALUE[9..]
            ))),
        ]);
        let stats = Arc::new(Stats::default());
        let watch = Watch {
            store: store.clone(),
            sandbox: "sb".into(),
            generation: store.generation(),
        };
        let mut body = ScrubBody::new(
            Frames(frames),
            ContentCoding::Identity,
            p1,
            stats.clone(),
            false,
        )
        .watching(watch, None);
        let mut out = Vec::new();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        out.extend_from_slice(&first);
        // Rotation, and a second secret mounted, while the response streams.
        store.put_secret(state(NEW, &[VALUE]));
        let mut later = state(MOUNTED, &[]);
        later.id = "sec_m".parse().unwrap();
        later.placeholder = "veil_ph_mounted".into();
        store.put_secret(later);
        let mut sandbox = sandbox.clone();
        sandbox.mounts.insert("M".into(), "sec_m".parse().unwrap());
        store.put_sandbox(&sandbox);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                out.extend_from_slice(&data);
            }
        }
        for v in [VALUE, NEW, MOUNTED] {
            assert!(!contains(&out, v.as_bytes()));
        }
        assert!(contains(&out, b"veil_ph_mounted"));
        assert_eq!(stats.scrub_policy_switched.load(Ordering::Relaxed), 1);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the chunking, and whatever the coding, the body equals the whole-buffer
    /// scrub of the decoded text.
    #[test]
    fn body_equals_whole_buffer_scrub(
        parts in prop::collection::vec(prop_oneof![
            "[a-z /+]{0,12}",
            Just(VALUE.to_owned()),
            Just("c2stcmVhbC8wMTIzNDU2Nzg5K2FiYw".to_owned()),
            Just("sk-real%2F0123456789%2Babc".to_owned()),
        ], 0..10),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        coding in prop_oneof![
            Just(ContentCoding::Identity),
            Just(ContentCoding::Gzip),
            Just(ContentCoding::Deflate),
            Just(ContentCoding::Brotli),
        ],
    ) {
        let p = policy(&[VALUE, "another-value-xyz"]);
        let doc = parts.concat().into_bytes();
        let want = p.scrub_patterns().scrub_all(&doc).unwrap_or_else(|| doc.clone());
        let (data, _, _) = rt().block_on(async {
            let wire = encode(coding, &doc).await;
            run(&p, coding, split(&wire, &cuts), None).await
        }).unwrap();
        prop_assert!(data == want);
        prop_assert!(!contains(&data, VALUE.as_bytes()));
    }
}
