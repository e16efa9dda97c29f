//! The connector under the delivery client: it resolves the host itself, applies the SSRF policy
//! to every address it would use, and connects only to an allowed one.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::hosts::{Hosts, Use};
use crate::url_policy::{forbidden_reason, parse_url, Unresolved};

/// Why no connection was made.
#[derive(Debug)]
pub enum ConnectError {
    /// The server's trouble, and nothing was sent: the host could not be looked up now (the
    /// resolver failed or did not answer: or the host's DNS servers did), or every address
    /// failed for want of a socket, a local port, memory or a route ([`is_local`]).
    Unsent(String),
    /// Anything else: the host has no (allowed) address, or the connection failed.
    Io(std::io::Error),
}

/// Whether a failure to connect is this machine's, not the receiver's: out of file descriptors
/// (`EMFILE`, `ENFILE`), local ports or addresses (`EADDRNOTAVAIL`: many connections closed
/// recently sit in TIME_WAIT), buffers or memory (`ENOBUFS`, `ENOMEM`), or no route to the
/// network (`ENETUNREACH`).
pub fn is_local(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::EADDRNOTAVAIL
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ENETUNREACH
        )
    )
}

/// The connector under the delivery client: it resolves the host itself (through [`Hosts`]),
/// applies the policy to every address it would use, and connects only to an allowed one. The TCP
/// connection (pooled for keep-alive) stays pinned to that vetted address; DNS answers that change
/// later cannot redirect it. TLS, when the URL is https, is layered on top by the client with the
/// host name for SNI.
#[derive(Clone)]
pub struct SafeConnector {
    /// Allow private, loopback, link-local and CGNAT targets.
    pub allow_private: bool,
    /// Longest a TCP connect may take.
    pub connect_timeout: Duration,
    /// Hosts' addresses, looked up once for many connections.
    pub hosts: Hosts,
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
        let addrs = self
            .hosts
            .resolve(&url, self.allow_private, Use::Connect)
            .await
            .map_err(|e| match e {
                Unresolved::ResolverDown(m) => ConnectError::Unsent(m),
                Unresolved::Refused(m) => {
                    ConnectError::Io(std::io::Error::new(std::io::ErrorKind::NotFound, m))
                }
            })?;
        let (mut last, mut all_local) = (None, true);
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
                Ok(Err(e)) => {
                    all_local &= is_local(&e);
                    last = Some(e);
                }
                Err(_) => {
                    all_local = false;
                    last = Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect to {addr} timed out"),
                    ))
                }
            }
        }
        match last {
            Some(e) if all_local => Err(ConnectError::Unsent(format!(
                "could not connect: {e} (the server's trouble; nothing was sent)"
            ))),
            Some(e) => Err(ConnectError::Io(e)),
            None => Err(ConnectError::Io(std::io::Error::other(
                "no address to connect to",
            ))),
        }
    }
}

#[cfg(test)]
impl SafeConnector {
    /// Connections to loopback allowed, as the tests' receivers are there; hosts kept 30 s.
    pub fn for_tests() -> SafeConnector {
        SafeConnector {
            allow_private: true,
            connect_timeout: Duration::from_secs(2),
            hosts: Hosts::new(
                Duration::from_secs(30),
                Duration::ZERO,
                crate::metrics::Metrics::new(&[("GET", "/")], 1),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_machines_shortages_are_local() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EADDRNOTAVAIL,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::ENETUNREACH,
        ] {
            assert!(
                is_local(&std::io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        // The receiver's side, or the path to it: a failed attempt.
        for errno in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::EHOSTUNREACH,
            libc::ETIMEDOUT,
        ] {
            assert!(
                !is_local(&std::io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(!is_local(&std::io::Error::other("no errno")));
    }

    /// A real shortage: with the process's file descriptors used up, the connect fails with
    /// `EMFILE` and says it was not sent.
    #[tokio::test]
    async fn a_connect_without_a_file_descriptor_is_unsent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri: http::Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let c = SafeConnector::for_tests();
        assert!(c.connect(&uri).await.is_ok());
        // In a process of its own: using up the descriptors here would starve the other tests.
        if std::env::var_os("TRIGGERS_EMFILE_CHILD").is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "delivery::connector::tests::a_connect_without_a_file_descriptor_is_unsent",
                    "--test-threads",
                    "1",
                ])
                .env("TRIGGERS_EMFILE_CHILD", "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        // A low limit, so that using it up is quick.
        let limit = libc::rlimit {
            rlim_cur: 256,
            rlim_max: libc::RLIM_INFINITY,
        };
        let mut old = limit;
        // SAFETY: plain system calls on a struct of ours.
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut old);
            assert_eq!(
                libc::setrlimit(
                    libc::RLIMIT_NOFILE,
                    &libc::rlimit {
                        rlim_max: old.rlim_max,
                        ..limit
                    }
                ),
                0
            );
        }
        let mut held = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            held.push(f);
        }
        match c.connect(&uri).await {
            Err(ConnectError::Unsent(m)) => assert!(m.contains("the server's trouble"), "{m}"),
            other => panic!("{other:?}"),
        }
        drop(held);
        assert!(c.connect(&uri).await.is_ok());
    }
}
