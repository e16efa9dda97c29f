//! Webhook URLs: their rules and the SSRF policy. Used where a URL is configured (the store checks
//! it when it is set) and where it is used (delivery's connector checks every address it connects
//! to), so it sits below both.
//!
//! A webhook URL must be `http` or `https`, at most 2048 characters, with a host and no user
//! credentials. Unless the server allows private targets, every address the host resolves to must
//! be public: loopback, private (RFC 1918, ULA), link-local, CGNAT, unspecified, multicast,
//! broadcast, documentation and benchmarking ranges, and cloud metadata addresses are refused, also
//! when embedded in IPv6 (v4-mapped, NAT64). The check runs when the URL is configured and again at
//! every delivery, on the address actually connected to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use crate::config::{RESOLVE_TIMEOUT, URL_CHARS_MAX};

/// A parsed webhook URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// The URL as configured.
    pub text: String,
    /// `https`?
    pub tls: bool,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port, defaulted by scheme.
    pub port: u16,
    /// Path and query, at least `/`.
    pub path_and_query: String,
}

/// Parse and check the shape of a webhook URL.
pub fn parse_url(text: &str) -> Result<WebhookUrl, String> {
    if text.chars().count() > URL_CHARS_MAX {
        return Err(format!(
            "webhook_url must be at most {URL_CHARS_MAX} characters"
        ));
    }
    // A URL as a browser shows it (`https://bücher.example/ü`) is one a browser has not yet
    // encoded: IDNA and percent-encoding are the sender's to apply (IDNA needs Unicode tables
    // this binary does not carry), so say what to do, not only that it is not a URL.
    if !text.is_ascii() {
        return Err(
            "webhook_url has characters outside ASCII: write an internationalized host \
                    name in its ASCII form (xn--…, as IDNA has it) and percent-encode the rest \
                    (%C3%BC for ü)"
                .into(),
        );
    }
    let uri: http::Uri = text
        .parse()
        .map_err(|_| "webhook_url is not a valid absolute URL".to_string())?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        Some(other) => return Err(format!("webhook_url must use http or https, not {other}")),
        None => return Err("webhook_url must be an absolute http(s) URL".into()),
    };
    let authority = uri.authority().ok_or("webhook_url has no host")?;
    if authority.as_str().contains('@') {
        return Err("webhook_url must not contain credentials; verify signatures instead".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err("webhook_url has no host".into());
    }
    // The port as written: the `http` crate reads a port that does not fit 16 bits as no port at
    // all, which would send the delivery to port 80. Refuse it instead.
    let port = match written_port(authority.as_str()) {
        None if tls => 443,
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err("webhook_url port must be 1 to 65535".into()),
        },
    };
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Ok(WebhookUrl {
        text: text.to_string(),
        tls,
        host: host.to_ascii_lowercase(),
        port,
        path_and_query: if path_and_query.is_empty() {
            "/".into()
        } else {
            path_and_query.into()
        },
    })
}

/// The port written in an authority (`host:port`, `[v6]:port`), if one is.
fn written_port(authority: &str) -> Option<&str> {
    let after_host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(_, rest)| rest),
        None => authority.find(':').map_or("", |i| &authority[i..]),
    };
    after_host.strip_prefix(':')
}

/// Why an address may not be a webhook target, or `None` when it may.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        // Includes 169.254.169.254, the metadata service of most clouds.
        Some("link-local")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        // Includes 100.100.100.200, Alibaba Cloud's metadata service.
        Some("CGNAT")
    } else if o[0] == 0 || ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        Some("reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        // IETF protocol assignments, including 192.0.0.192 (Oracle Cloud metadata).
        Some("reserved")
    } else if ip.is_documentation() || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) {
        Some("reserved")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || ip.is_multicast() {
        Some("reserved")
    } else if s[0] & 0xfe00 == 0xfc00 {
        // Unique local, including fd00:ec2::254 (AWS metadata over IPv6).
        Some("private")
    } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
        Some("link-local")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64: judge the IPv4 address inside.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        forbidden_v4(v4)
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("reserved")
    } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
        // IPv4-compatible (deprecated) addresses.
        Some("reserved")
    } else {
        None
    }
}

/// Why a webhook host gave no address that may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// The client's: the host does not exist or has no address (or, unless private targets are
    /// allowed, one that is not public). A 422 when the URL is configured.
    Refused(String),
    /// Nobody's answer yet: the resolver failed for now (a temporary failure, a SERVFAIL, no
    /// answer within [`RESOLVE_TIMEOUT`]). The server's trouble, or the host's DNS servers': a
    /// 503 with `Retry-After` when the URL is configured, never a 422.
    ResolverDown(String),
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unresolved::Refused(m) | Unresolved::ResolverDown(m) => f.write_str(m),
        }
    }
}

/// Whether a lookup's failure is the host's own answer (it has no address: the client's to fix)
/// rather than a failure to get an answer (the resolver's, for now).
pub fn host_has_no_address(kind: dns_lookup::LookupErrorKind) -> bool {
    use dns_lookup::LookupErrorKind as K;
    matches!(kind, K::NoName | K::NoData | K::Family)
}

/// Why a lookup of a host found no address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupFailed {
    /// The host's own answer: it does not exist or has no address (the client's to fix).
    NoAddress,
    /// No answer for now: the resolver failed, or did not answer in time (the server's trouble,
    /// or the host's DNS servers').
    ResolverDown,
}

/// The addresses of `host` from the system's resolver (getaddrinfo, as the standard library's
/// lookup does, but keeping its error code: a host that does not exist and a resolver that did
/// not answer are told apart). Blocks: call it on a blocking thread.
pub fn lookup_blocking(host: &str) -> Result<Vec<IpAddr>, LookupFailed> {
    let hints = dns_lookup::AddrInfoHints {
        socktype: libc::SOCK_STREAM,
        ..Default::default()
    };
    match dns_lookup::getaddrinfo(Some(host), None, Some(hints)) {
        Ok(found) => Ok(found
            .filter_map(Result::ok)
            .map(|a| a.sockaddr.ip())
            .collect()),
        Err(e) if host_has_no_address(e.kind()) => Err(LookupFailed::NoAddress),
        Err(_) => Err(LookupFailed::ResolverDown),
    }
}

/// The addresses of `url` from `ips` (its host's, as found, through [`crate::hosts`]), if the
/// policy allows every one.
///
/// Unless private targets are allowed, a refusal says neither which address the host resolved
/// to nor whether it resolved at all: either would make the server an oracle for internal DNS.
/// A resolver that fails for now is said as such ([`Unresolved::ResolverDown`]): that tells
/// nothing about the host.
pub fn allowed(
    url: &WebhookUrl,
    ips: &[IpAddr],
    allow_private: bool,
) -> Result<Vec<SocketAddr>, Unresolved> {
    if ips.is_empty() || (!allow_private && ips.iter().any(|ip| forbidden_reason(*ip).is_some())) {
        return Err(unresolved(url, LookupFailed::NoAddress, allow_private));
    }
    Ok(ips
        .iter()
        .map(|ip| SocketAddr::new(*ip, url.port))
        .collect())
}

/// What a lookup of `url`'s host that `failed` means for it.
pub fn unresolved(url: &WebhookUrl, failed: LookupFailed, allow_private: bool) -> Unresolved {
    match failed {
        LookupFailed::NoAddress if allow_private => {
            Unresolved::Refused(format!("webhook host {} does not resolve", url.host))
        }
        LookupFailed::NoAddress => Unresolved::Refused(format!(
            "webhook host {} does not resolve to a public address; private, loopback, \
             link-local and metadata addresses are not allowed",
            url.host
        )),
        LookupFailed::ResolverDown => Unresolved::ResolverDown(format!(
            "webhook host {} could not be looked up now: the DNS resolver failed or did \
             not answer within {} s",
            url.host,
            RESOLVE_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> Option<&'static str> {
        forbidden_reason(s.parse().unwrap())
    }

    #[test]
    fn parses_http_and_https_urls() {
        let u = parse_url("https://Hooks.Example.com/in?x=1").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "hooks.example.com", 443)
        );
        assert_eq!(u.path_and_query, "/in?x=1");
        let u = parse_url("http://[2606:4700::1]:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path_and_query.as_str()),
            ("2606:4700::1", 8080, "/")
        );
    }

    #[test]
    fn refuses_bad_urls_with_reasons() {
        assert!(parse_url("ftp://example.com/")
            .unwrap_err()
            .contains("http or https"));
        assert!(parse_url("example.com/hook").is_err());
        assert!(parse_url("not a url").is_err());
        assert!(parse_url("https://user:pw@example.com/")
            .unwrap_err()
            .contains("credentials"));
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert!(parse_url(&long).unwrap_err().contains("2048"));
        for port in ["0", "65536", "99999", "4294967297"] {
            let e = parse_url(&format!("http://127.0.0.1:{port}/hook")).unwrap_err();
            assert!(e.contains("1 to 65535"), "{port}: {e}");
        }
        assert_eq!(parse_url("http://127.0.0.1:65535/").unwrap().port, 65535);
        for unicode in [
            "https://bücher.example/x",
            "https://example.com/ü",
            "https://例え.jp/",
        ] {
            let e = parse_url(unicode).unwrap_err();
            assert!(
                e.contains("outside ASCII") && e.contains("xn--"),
                "{unicode}: {e}"
            );
        }
        let encoded = parse_url("https://xn--bcher-kva.example/%C3%BC").unwrap();
        assert_eq!(encoded.host, "xn--bcher-kva.example");
    }

    #[test]
    fn private_ranges_are_forbidden() {
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "CGNAT"),
            ("100.100.100.200", "CGNAT"),
            ("0.0.0.0", "reserved"),
            ("224.0.0.1", "reserved"),
            ("192.0.0.192", "reserved"),
            ("::1", "loopback"),
            ("fd00:ec2::254", "private"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::a00:1", "private"),
            ("::", "reserved"),
        ] {
            assert_eq!(forbidden(ip), Some(why), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(forbidden(ip), None, "{ip}");
        }
    }

    #[test]
    fn only_a_host_without_an_address_is_the_clients_fault() {
        use dns_lookup::LookupErrorKind as K;
        for kind in [K::NoName, K::NoData, K::Family] {
            assert!(host_has_no_address(kind), "{kind:?}");
        }
        // A temporary failure (SERVFAIL too), a resolver that fails for good, the system's own
        // trouble: no answer about the host yet.
        for kind in [K::Again, K::Fail, K::Memory, K::System, K::IO, K::Unknown] {
            assert!(!host_has_no_address(kind), "{kind:?}");
        }
    }
}
