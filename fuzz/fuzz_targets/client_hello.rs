//! ClientHello peek: never panics, and a decision, once made, does not change with more bytes.
//!
//! The agent calls `parse_client_hello` on a growing prefix and acts on the first answer that is
//! not `NeedMore`; a later byte changing that answer would mean a different decision for the
//! same connection depending on how TCP segmented it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_policy::{Peek, ServerName, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    if let Peek::Tls(info) = &whole {
        assert!(info.stream_len <= data.len(), "stream_len past the input");
        assert!(
            info.stream_len >= 5,
            "a hello spans at least one record header"
        );
        // The hello ends where it says: the same answer from exactly its bytes.
        assert_eq!(parse_client_hello(&data[..info.stream_len]), whole);
        if let Some(sni) = &info.sni {
            assert!(!info.sni_invalid);
            assert_eq!(
                ServerName::parse(sni.as_str()).as_ref(),
                Ok(sni),
                "SNI not normal"
            );
        }
    }
    // Every prefix either asks for more or already gives the final answer.
    let mut cut = 0;
    let step = (data.len() / 64).max(1);
    while cut < data.len() {
        match parse_client_hello(&data[..cut]) {
            Peek::NeedMore => {}
            early => assert_eq!(early, whole, "answer changed after {cut} bytes"),
        }
        cut += step;
    }
});
