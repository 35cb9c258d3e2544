//! The substitution fast path does not allocate when no placeholder occurs.
//!
//! A counting global allocator needs `unsafe`, which the library forbids; this integration test
//! is its own crate and holds a single test, so no other thread allocates while it counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use veil_link::proto::SecretValue;
use veil_policy::{
    ClientHelloInfo, HostPattern, MountedSecret, RequestView, SandboxPolicy, ServerName,
};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn no_match_allocates_nothing() {
    let secrets = (0..4)
        .map(|i| MountedSecret {
            previous: Vec::new(),
            retired: false,
            id: format!("s{i}"),
            name: format!("S{i}"),
            placeholder: format!("veil_placeholder_{i}_0123456789abcdef"),
            hosts: vec![HostPattern::parse("*.allowed.test").unwrap()],
            value: SecretValue::new(format!("value-{i}")),
            body_substitution: false,
            wrong_host: Default::default(),
        })
        .collect();
    let policy = SandboxPolicy::new(secrets).unwrap();
    let sni = ServerName::parse("api.allowed.test").unwrap();
    let headers: [(&[u8], &[u8]); 4] = [
        (b"host", b"api.allowed.test"),
        (b"user-agent", b"curl/8"),
        (b"authorization", b"Bearer not-a-placeholder"),
        (b"accept", b"*/*"),
    ];
    let view = RequestView {
        target: "/v1/models?limit=10",
        authority: None,
        headers: &headers,
    };
    // Warm up lazily initialised state (the automaton's scratch space).
    let _ = policy.substitute(&sni, 443, &view).unwrap();
    // A hello offering an empty ALPN list: passed through (built before counting).
    let hello = ClientHelloInfo {
        sni: Some(sni.clone()),
        sni_invalid: false,
        alpn: Vec::new(),
        alpn_present: true,
        legacy_version: 0x0303,
        supported_versions: Vec::new(),
        stream_len: 0,
    };
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let result = policy.substitute(&sni, 443, &view).unwrap();
    let decision = policy.decide(hello);
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert!(!result.changed());
    assert!(matches!(decision, veil_policy::Decision::Passthrough(_)));
    assert_eq!(after - before, 0, "allocations on the no-match path");

    // The same request with a placeholder does allocate: the counter works.
    let headers: [(&[u8], &[u8]); 2] = [
        (b"host", b"api.allowed.test"),
        (b"x-key", b"veil_placeholder_1_0123456789abcdef"),
    ];
    let view = RequestView {
        headers: &headers,
        ..view
    };
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let result = policy.substitute(&sni, 443, &view).unwrap();
    assert!(ALLOCATIONS.load(Ordering::Relaxed) > before);
    assert!(result.changed());
}
