//! Which browser pages may talk to keel: the `allowedOrigins` list, the WebSocket upgrade
//! check, and CORS.
//!
//! A browser attaches `Origin` to every WebSocket upgrade and to every cross-origin request;
//! curl, Node and other non-browser clients send none. The rule, one list for everything:
//! a request without `Origin`, or from the server's own origin (its `Host`), is allowed; any
//! other origin must be listed. Action bodies must be JSON or CBOR (checked in `http`), so
//! a browser has to preflight every cross-origin action call, and only a listed origin gets
//! a preflight answer. Listed origins get CORS headers on every response; `*` lets any page
//! read responses, but never with credentials.
//!
//! The rules live here, below every floor, since the configuration names the list; the CORS
//! layer that applies them to each response is the server's (`server/http.rs`).

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::error::{Error, Result};

/// An HTTP response as keel produces it.
type Response = axum::http::Response<axum::body::Body>;

/// How long a browser may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE_SECS: &str = "600";

/// The origins whose pages may open WebSockets and read responses cross-origin. Empty by
/// default: only same-origin pages and non-browser clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    /// `*` was listed: any origin, without credentials.
    any: bool,
    /// Exact origins (lowercase, default port left out): these get credentials.
    exact: Vec<String>,
}

/// What a listed origin is granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// Listed by name: its own origin echoed back, with credentials.
    Exact,
    /// Allowed through `*`: `Access-Control-Allow-Origin: *`, never with credentials.
    Any,
}

impl AllowedOrigins {
    /// Parses the configured list: each entry is `*` or an origin such as
    /// `https://app.example` or `http://localhost:3000` (a scheme, `://`, a host and an
    /// optional port; no path, no trailing slash).
    pub fn parse<S: AsRef<str>>(entries: impl IntoIterator<Item = S>) -> Result<AllowedOrigins> {
        let mut allowed = AllowedOrigins::default();
        for entry in entries {
            let entry = entry.as_ref();
            if entry == "*" {
                allowed.any = true;
                continue;
            }
            let origin = normalize(entry).ok_or_else(|| {
                Error::config(format!(
                    "allowedOrigins entries must be \"*\" or an origin such as \
                     \"https://app.example\" (scheme, host and optional port, no path), \
                     not {entry:?}"
                ))
            })?;
            if !allowed.exact.contains(&origin) {
                allowed.exact.push(origin);
            }
        }
        Ok(allowed)
    }

    /// Whether nothing is listed.
    pub fn is_empty(&self) -> bool {
        !self.any && self.exact.is_empty()
    }

    /// What `origin` (as a browser sent it) is granted, if it is listed.
    pub(crate) fn grant(&self, origin: &str) -> Option<Grant> {
        let listed = normalize(origin).is_some_and(|origin| self.exact.contains(&origin));
        if listed {
            Some(Grant::Exact)
        } else if self.any {
            Some(Grant::Any)
        } else {
            None
        }
    }
}

/// An origin in the form keel compares: `scheme://host[:port]`, lowercase, with the scheme's
/// default port left out. `None` if `value` is not an origin.
fn normalize(value: &str) -> Option<String> {
    let (scheme, authority) = value.split_once("://")?;
    let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid_scheme {
        return None;
    }
    let scheme = scheme.to_ascii_lowercase();
    let authority = authority_without_default_port(&authority.to_ascii_lowercase(), &scheme)?;
    Some(format!("{scheme}://{authority}"))
}

/// A `host[:port]` authority, checked, with the default port of `scheme` left out.
fn authority_without_default_port(authority: &str, scheme: &str) -> Option<String> {
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 literal has colons of its own; its port follows the closing bracket.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    };
    if !host_ok {
        return None;
    }
    let port = match port {
        None => None,
        Some(port) => Some(port.parse::<u16>().ok()?),
    };
    let default_port = match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Some(match port {
        Some(port) if Some(port) != default_port => format!("{host}:{port}"),
        _ => host.to_string(),
    })
}

/// Whether `origin` names the server the request was sent to, by its `Host` header.
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(origin) = normalize(origin) else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    authority_without_default_port(&host.to_ascii_lowercase(), scheme)
        .is_some_and(|host| host == authority)
}

/// The request's `Origin` header, if it has one. A value that is not text counts as an
/// origin that matches nothing.
pub(crate) fn origin_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::ORIGIN)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// Checks a WebSocket upgrade before it is accepted: no `Origin` (not a browser), the
/// server's own origin, or a listed one. Anything else is `auth.origin_not_allowed`.
pub(crate) fn check_upgrade(allowed: &AllowedOrigins, headers: &HeaderMap) -> Result<()> {
    match origin_of(headers) {
        None => Ok(()),
        Some(origin) if same_origin(&origin, headers) || allowed.grant(&origin).is_some() => Ok(()),
        Some(origin) => Err(Error::OriginNotAllowed { origin }),
    }
}

/// The answer to a preflight from a listed origin: the method and headers it asked for.
pub(crate) fn preflight_response(grant: Grant, origin: &str, request: &HeaderMap) -> Response {
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    allow(headers, grant, origin);
    for (asked, allowed) in [
        (
            header::ACCESS_CONTROL_REQUEST_METHOD,
            header::ACCESS_CONTROL_ALLOW_METHODS,
        ),
        (
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
        ),
    ] {
        if let Some(value) = request.get(&asked) {
            headers.insert(allowed, value.clone());
        }
    }
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECS),
    );
    headers.append(
        header::VARY,
        HeaderValue::from_static("access-control-request-method, access-control-request-headers"),
    );
    response
}

/// Adds the headers that let a page of `origin` read the response.
pub(crate) fn allow(headers: &mut HeaderMap, grant: Grant, origin: &str) {
    match grant {
        Grant::Exact => {
            let Ok(value) = HeaderValue::from_str(origin) else {
                return;
            };
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        Grant::Any => {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
    }
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn entries_are_origins_or_a_star() {
        let allowed = AllowedOrigins::parse([
            "https://App.Example",
            "http://localhost:3000",
            "https://x.example:443",
            "http://[::1]:8080",
            "*",
        ])
        .unwrap();
        assert_eq!(
            allowed.exact,
            [
                "https://app.example",
                "http://localhost:3000",
                "https://x.example",
                "http://[::1]:8080"
            ]
        );
        assert!(allowed.any);
        for bad in [
            "app.example",
            "https://app.example/",
            "https://app.example/path",
            "https://",
            "https://a b",
            "https://app.example:99999",
            "https://user@app.example",
            "null",
            "",
            "1http://x",
        ] {
            assert!(AllowedOrigins::parse([bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exact_origins_get_credentials_and_star_never_does() {
        let allowed = AllowedOrigins::parse(["https://app.example", "*"]).unwrap();
        assert_eq!(allowed.grant("https://app.example"), Some(Grant::Exact));
        assert_eq!(allowed.grant("https://app.example:443"), Some(Grant::Exact));
        assert_eq!(allowed.grant("https://other.example"), Some(Grant::Any));
        let exact = AllowedOrigins::parse(["https://app.example"]).unwrap();
        assert_eq!(exact.grant("http://app.example"), None, "the scheme counts");
        assert_eq!(exact.grant("https://app.example.evil"), None);
        assert_eq!(AllowedOrigins::default().grant("https://app.example"), None);
        let mut any = HeaderMap::new();
        allow(&mut any, Grant::Any, "https://other.example");
        assert_eq!(any[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(!any.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
    }

    #[test]
    fn upgrades_need_no_origin_the_same_origin_or_a_listed_one() {
        let none = AllowedOrigins::default();
        let listed = AllowedOrigins::parse(["http://app.example"]).unwrap();
        let host = ("host", "127.0.0.1:6420");
        assert!(check_upgrade(&none, &headers(&[host])).is_ok());
        assert!(check_upgrade(
            &none,
            &headers(&[host, ("origin", "http://127.0.0.1:6420")])
        )
        .is_ok());
        assert!(check_upgrade(
            &none,
            &headers(&[("host", "Keel.Example"), ("origin", "https://keel.example")])
        )
        .is_ok());
        assert!(check_upgrade(
            &none,
            &headers(&[
                ("host", "keel.example:80"),
                ("origin", "http://keel.example")
            ])
        )
        .is_ok());
        let evil = headers(&[host, ("origin", "http://evil.example")]);
        let err = check_upgrade(&none, &evil).unwrap_err();
        assert_eq!(
            (err.group(), err.code(), err.http_status()),
            ("auth", "origin_not_allowed", 403)
        );
        assert!(check_upgrade(&listed, &evil).is_err());
        assert!(
            check_upgrade(&listed, &headers(&[host, ("origin", "http://app.example")])).is_ok()
        );
        assert!(
            check_upgrade(
                &none,
                &headers(&[host, ("origin", "http://127.0.0.1:6421")])
            )
            .is_err(),
            "another port is another origin"
        );
        assert!(check_upgrade(&none, &headers(&[host, ("origin", "null")])).is_err());
    }
}
