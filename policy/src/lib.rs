//! veil's pure policy: everything the agent decides about a connection or a request, free of I/O.
//!
//! - [`host`]: host allowlist patterns and validated SNIs;
//! - [`client_hello`]: peek a TLS ClientHello from a stream prefix (SNI, ALPN);
//! - [`sandbox`]: one sandbox's policy, built once from its secrets and the agent's modes;
//! - [`decide`]: intercept or pass a connection through;
//! - [`substitute`]: swap placeholders for values in a request;
//! - [`body`]: the same in JSON, form and text request bodies, for secrets that turn it on;
//! - [`scrub`]: swap values back to placeholders in a response stream.
//! - [`websocket`]: the same for WebSocket messages, both ways.
//!
//! Secret values never reach a `Debug` output, an error or a panic message from this crate.
//!
//! The agent's data path, per sandbox and connection:
//!
//! ```
//! use veil_link::proto::SecretValue;
//! use veil_policy::{Decision, HostPattern, MountedSecret, Peek, RequestView, SandboxPolicy, Scrubber};
//!
//! // Once per sandbox (and whenever its mounts change).
//! let policy = SandboxPolicy::new(vec![MountedSecret {
//!     id: "sec_1".into(),
//!     name: "OPENAI_API_KEY".into(),
//!     placeholder: "veil_ph_0123".into(),
//!     hosts: vec![HostPattern::parse("*.allowed.test").unwrap()],
//!     value: SecretValue::new("sk-real".into()),
//!     body_substitution: false,
//!     wrong_host: Default::default(),
//!     previous: Vec::new(),
//!     retired: false,
//! }])
//! .unwrap();
//!
//! // Per connection: peek the ClientHello (read more while NeedMore), then decide; an
//! // intercepted connection is served under the server name the decision carries.
//! # let first_bytes: &[u8] = include_bytes!("../testdata/curl_http2.bin");
//! let Peek::Tls(hello) = veil_policy::parse_client_hello(first_bytes) else { panic!() };
//! let Decision::Intercept(intercept) = policy.decide(hello) else { panic!() };
//! let sni = intercept.server_name;
//!
//! // Per request on an intercepted connection (to port 443, the original destination's): the
//! // Host must name the SNI; a value is written raw into headers, encoded into the target.
//! let headers: [(&[u8], &[u8]); 2] =
//!     [(b"host", b"api.allowed.test"), (b"authorization", b"Bearer veil_ph_0123")];
//! let target = "/v1/models?key=veil_ph_0123";
//! let view = RequestView { target, authority: None, headers: &headers };
//! let change = policy.substitute(&sni, 443, &view).unwrap();
//! assert_eq!(change.headers[0].1.as_bytes(), b"Bearer sk-real");
//! assert_eq!(change.target.unwrap().as_str(), "/v1/models?key=sk-real");
//!
//! // Per response body: values go back to placeholders.
//! let mut scrubber = Scrubber::new(policy.scrub_patterns());
//! let mut out = Vec::new();
//! scrubber.push(b"you sent sk-", &mut out);
//! scrubber.push(b"real", &mut out);
//! scrubber.finish(&mut out);
//! assert_eq!(out, b"you sent veil_ph_0123");
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod body;
pub mod client_hello;
pub mod decide;
mod encode;
pub mod grpc;
pub mod host;
pub mod sandbox;
pub mod scrub;
pub mod secret;
pub mod substitute;
pub mod websocket;

pub use body::{BodyKind, BodySubstitution, merge_hits};
pub use client_hello::{ClientHelloInfo, NotTlsReason, Peek, parse_client_hello};
pub use decide::{Decision, Intercept, PassthroughReason};
pub use host::{HostPattern, HostPatternError, ServerName};
pub use sandbox::SandboxPolicy;
pub use scrub::{ScrubPatterns, Scrubber};
pub use secret::{ModeOverrides, MountedSecret, PolicyError};
pub use secret::{Redacted, RedactedString};
pub use substitute::{RequestSubstitution, RequestView, SecretHit, SubstituteError, Substitution};
pub use veil_link::proto::WrongHost;
