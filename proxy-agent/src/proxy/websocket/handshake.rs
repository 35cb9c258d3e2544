//! Opening a WebSocket (issue 20): which requests open one (h1 `Upgrade`, h2 extended
//! CONNECT), the headers of the forwarded opening and of its acceptance (no extension
//! negotiated), and how an h2 upstream's refusal of extended CONNECT is told to the client.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Version};

/// The header that offers and negotiates extensions.
const EXTENSIONS: &str = "sec-websocket-extensions";

/// How a request opens a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// HTTP/1.1 `GET` with `Upgrade: websocket`; the upstream switches with 101.
    Upgrade,
    /// h2 extended CONNECT with `:protocol websocket` (RFC 8441); the upstream accepts with 200.
    ExtendedConnect,
}

impl Opening {
    /// Whether `status` is the upstream accepting this opening.
    pub fn accepted(self, status: StatusCode) -> bool {
        match self {
            Self::Upgrade => status == StatusCode::SWITCHING_PROTOCOLS,
            // hyper hands over the h2 stream only on exactly 200 (RFC 8441 §5 allows any 2xx).
            Self::ExtendedConnect => status == StatusCode::OK,
        }
    }
}

/// How `req` opens a WebSocket veil relays, if it does.
pub fn opening<B>(req: &Request<B>) -> Option<Opening> {
    if req.method() == Method::CONNECT {
        let protocol = req.extensions().get::<hyper::ext::Protocol>()?;
        return protocol
            .as_str()
            .eq_ignore_ascii_case("websocket")
            .then_some(Opening::ExtendedConnect);
    }
    let upgrade = req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && req.headers().get_all(header::UPGRADE).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
        });
    upgrade.then_some(Opening::Upgrade)
}

/// Sets the upgrade headers of the upstream request (after hop-by-hop headers were removed)
/// and removes the client's extension offer. h2 has no connection headers: the method and
/// `:protocol` say it all.
pub fn prepare_request(headers: &mut HeaderMap, opening: Opening) {
    headers.remove(EXTENSIONS);
    if opening == Opening::Upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

/// Checks the upstream's acceptance and sets its upgrade headers for the client; `Err` names
/// why the switch is refused.
pub fn prepare_response(headers: &mut HeaderMap, opening: Opening) -> Result<(), &'static str> {
    if headers.contains_key(EXTENSIONS) {
        return Err("the upstream negotiated a WebSocket extension veil did not offer");
    }
    if opening == Opening::Upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    Ok(())
}

/// Whether an upstream's failure to answer an extended CONNECT says it does not support it: h2
/// resets the stream with `PROTOCOL_ERROR` when `:protocol` arrives without
/// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 §3), or a proxy-aware one asks for HTTP/1.1.
pub fn refused_extended_connect(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return matches!(
                h2.reason(),
                Some(h2::Reason::PROTOCOL_ERROR | h2::Reason::HTTP_1_1_REQUIRED)
            );
        }
        cur = err.source();
    }
    false
}

/// The client's answer when the upstream cannot take an extended CONNECT: its stream reset
/// with `HTTP_1_1_REQUIRED` (RFC 9113 §7), on which browsers and other clients retry the
/// WebSocket over HTTP/1.1 — veil relays that too.
pub fn fall_back_to_h1() -> h2::Error {
    h2::Error::from(h2::Reason::HTTP_1_1_REQUIRED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_upgrades_are_recognised() {
        let req = |method: Method, version: Version, upgrade: &str| {
            Request::builder()
                .method(method)
                .version(version)
                .uri("/")
                .header(header::UPGRADE, upgrade)
                .body(())
                .unwrap()
        };
        let ws = |r: &Request<()>| opening(r) == Some(Opening::Upgrade);
        assert!(ws(&req(Method::GET, Version::HTTP_11, "WebSocket")));
        assert!(ws(&req(Method::GET, Version::HTTP_11, "foo, websocket")));
        assert!(!ws(&req(Method::GET, Version::HTTP_11, "h2c")));
        assert!(!ws(&req(Method::POST, Version::HTTP_11, "websocket")));
        assert!(!ws(&req(Method::GET, Version::HTTP_10, "websocket")));
    }

    #[test]
    fn extended_connect_opens_a_websocket_only_for_the_websocket_protocol() {
        let connect = |protocol: Option<&'static str>| {
            let mut r = Request::builder()
                .method(Method::CONNECT)
                .version(Version::HTTP_2)
                .uri("https://api.test/ws")
                .body(())
                .unwrap();
            if let Some(p) = protocol {
                r.extensions_mut()
                    .insert(hyper::ext::Protocol::from_static(p));
            }
            r
        };
        assert_eq!(
            opening(&connect(Some("websocket"))),
            Some(Opening::ExtendedConnect)
        );
        assert_eq!(opening(&connect(Some("connect-udp"))), None);
        assert_eq!(opening(&connect(None)), None);
        assert!(Opening::ExtendedConnect.accepted(StatusCode::OK));
        assert!(!Opening::ExtendedConnect.accepted(StatusCode::SWITCHING_PROTOCOLS));
        assert!(Opening::Upgrade.accepted(StatusCode::SWITCHING_PROTOCOLS));
    }

    #[test]
    fn the_extension_offer_is_removed_and_a_negotiated_one_refused() {
        let mut h = HeaderMap::new();
        h.insert(EXTENSIONS, HeaderValue::from_static("permessage-deflate"));
        prepare_request(&mut h, Opening::Upgrade);
        assert!(!h.contains_key(EXTENSIONS));
        assert_eq!(h[header::UPGRADE], "websocket");
        let mut resp = HeaderMap::new();
        assert!(prepare_response(&mut resp, Opening::Upgrade).is_ok());
        assert_eq!(resp[header::CONNECTION], "upgrade");
        resp.insert(EXTENSIONS, HeaderValue::from_static("permessage-deflate"));
        assert!(prepare_response(&mut resp, Opening::Upgrade).is_err());

        // h2: no connection headers either way.
        let mut h = HeaderMap::new();
        h.insert(EXTENSIONS, HeaderValue::from_static("permessage-deflate"));
        prepare_request(&mut h, Opening::ExtendedConnect);
        assert!(h.is_empty());
        let mut resp = HeaderMap::new();
        assert!(prepare_response(&mut resp, Opening::ExtendedConnect).is_ok());
        assert!(resp.is_empty());
    }

    #[test]
    fn an_h2_refusal_of_extended_connect_is_recognised() {
        let refused = h2::Error::from(h2::Reason::PROTOCOL_ERROR);
        assert!(refused_extended_connect(&refused));
        let other = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert!(!refused_extended_connect(&other));
        let io = std::io::Error::other("gone");
        assert!(!refused_extended_connect(&io));
        assert_eq!(
            fall_back_to_h1().reason(),
            Some(h2::Reason::HTTP_1_1_REQUIRED)
        );
    }
}
