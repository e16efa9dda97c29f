//! The connector under the delivery client: it resolves the host itself, applies the SSRF policy
//! to every address it would use, and connects only to an allowed one.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::url_policy::{forbidden_reason, parse_url, resolve, Unresolved};

/// Why no connection was made.
#[derive(Debug)]
pub enum ConnectError {
    /// The host could not be looked up now: the resolver failed or did not answer (the
    /// server's trouble, or the host's DNS servers'). Nothing was sent.
    LookupFailed(String),
    /// Anything else: the host has no (allowed) address, or the connection failed.
    Io(std::io::Error),
}

/// The connector under the delivery client: it resolves the host itself, applies the policy to
/// every address it would use, and connects only to an allowed one. The TCP connection (pooled for
/// keep-alive) stays pinned to that vetted address; DNS answers that change later cannot redirect
/// it. TLS, when the URL is https, is layered on top by the client with the host name for SNI.
#[derive(Clone)]
pub struct SafeConnector {
    /// Allow private, loopback, link-local and CGNAT targets.
    pub allow_private: bool,
    /// Longest a TCP connect may take.
    pub connect_timeout: Duration,
}

impl SafeConnector {
    /// A TCP connection to an allowed address of `uri`'s host (`TCP_NODELAY` set: a request is
    /// written whole, at once).
    pub async fn connect(&self, uri: &http::Uri) -> Result<TcpStream, ConnectError> {
        let refuse = |msg: String| {
            ConnectError::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                msg,
            ))
        };
        let url = parse_url(&uri.to_string()).map_err(refuse)?;
        let addrs = resolve(&url, self.allow_private)
            .await
            .map_err(|e| match e {
                Unresolved::ResolverDown(m) => ConnectError::LookupFailed(m),
                Unresolved::Refused(m) => {
                    ConnectError::Io(std::io::Error::new(std::io::ErrorKind::NotFound, m))
                }
            })?;
        let mut last = None;
        for addr in addrs {
            // The policy holds for the address connected to, not just for what DNS said earlier.
            if !self.allow_private && forbidden_reason(addr.ip()).is_some() {
                // No address and no reason in the message: the attempt log is the
                // organization's to read, and must not map internal networks.
                return Err(refuse(
                    "refused: the host does not resolve to a public address".into(),
                ));
            }
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect to {addr} timed out"),
                    ))
                }
            }
        }
        Err(ConnectError::Io(last.unwrap_or_else(|| {
            std::io::Error::other("no address to connect to")
        })))
    }
}
