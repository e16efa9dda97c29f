//! The connector under the delivery client: it resolves the host itself, applies the SSRF policy
//! to every address it would use, and connects only to an allowed one.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::hosts::{Hosts, Use};
use crate::url_policy::{parse_url, Unresolved};

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
        let url = parse_url(&uri.to_string()).map_err(|msg| {
            ConnectError::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                msg,
            ))
        })?;
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
        // `addrs` are what the policy just judged (`url_policy::allowed`, at every connection,
        // on kept addresses too): the ones connected to, not just what DNS said earlier.
        match first_to_connect(
            interleave(addrs),
            self.connect_timeout,
            CONNECTION_ATTEMPT_DELAY,
        )
        .await
        {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Err((e, true)) => Err(ConnectError::Unsent(format!(
                "could not connect: {e} (the server's trouble; nothing was sent)"
            ))),
            Err((e, false)) => Err(ConnectError::Io(e)),
        }
    }
}

/// How long a connection attempt to one address has before the next address is tried beside it
/// (RFC 8305's "Connection Attempt Delay", its recommended value).
pub const CONNECTION_ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// `addrs` in the resolver's order, the families alternating from the first's (RFC 8305 4): a
/// host whose addresses of one family are all unreachable costs one attempt delay, not one per
/// address.
fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (first, other): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(first.len() + other.len());
    let (mut first, mut other) = (first.into_iter(), other.into_iter());
    loop {
        match (first.next(), other.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Attempts of one connection in flight at once: the one that has had its head start and the
/// next. More would let one host with many dead addresses hold that many sockets per connection
/// (its endpoint's 32 connections at once, for the attempt's whole time), out of the descriptors
/// the node keeps for deliveries and its database ([`crate::config::Config::descriptors_reserved`]
/// counts one more per delivery in flight for the raced one).
pub const ATTEMPTS_RACING_MAX: usize = 2;

/// One connection attempt.
type Attempt = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;

/// The first of `addrs` to take a connection, as RFC 8305 ("Happy Eyeballs") races them: an
/// attempt to each in turn, the next one started `delay` after the last or at once when an
/// attempt fails (at most [`ATTEMPTS_RACING_MAX`] at once), every attempt given `timeout`; the
/// others are dropped once one connects. So a
/// host with an address that drops connections (a broken IPv6 route, a dead server behind one
/// of its A records) is reached through another within `delay`, where attempts one after the
/// other spent the whole attempt's time on the dead one. When all fail: the last failure, and
/// whether every failure was this machine's ([`is_local`]).
async fn first_to_connect(
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    delay: Duration,
) -> Result<TcpStream, (std::io::Error, bool)> {
    let mut waiting = addrs.into_iter();
    let mut racing: Vec<Attempt> = Vec::new();
    let mut head_start = Box::pin(tokio::time::sleep(delay));
    let (mut last, mut all_local) = (None, true);
    std::future::poll_fn(|cx| loop {
        let mut failed = false;
        let mut i = 0;
        while i < racing.len() {
            match racing[i].as_mut().poll(cx) {
                Poll::Ready(Ok(stream)) => return Poll::Ready(Ok(stream)),
                Poll::Ready(Err(e)) => {
                    all_local &= is_local(&e);
                    last = Some(e);
                    drop(racing.swap_remove(i));
                    failed = true;
                }
                Poll::Pending => i += 1,
            }
        }
        if racing.is_empty()
            || (racing.len() < ATTEMPTS_RACING_MAX
                && (failed || head_start.as_mut().poll(cx).is_ready()))
        {
            match waiting.next() {
                Some(addr) => {
                    racing.push(Box::pin(async move {
                        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                            Ok(connected) => connected,
                            Err(_) => Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("connect to {addr} timed out"),
                            )),
                        }
                    }));
                    head_start
                        .as_mut()
                        .reset(tokio::time::Instant::now() + delay);
                    continue;
                }
                None if racing.is_empty() => {
                    return Poll::Ready(Err(match last.take() {
                        Some(e) => (e, all_local),
                        None => (std::io::Error::other("no address to connect to"), false),
                    }));
                }
                None => {}
            }
        }
        return Poll::Pending;
    })
    .await
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

    #[test]
    fn the_families_alternate_from_the_first_ones() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let (v6a, v6b, v4a, v4b, v4c) = (
            a("[2001:db8::1]:1"),
            a("[2001:db8::2]:1"),
            a("192.0.2.1:1"),
            a("192.0.2.2:1"),
            a("192.0.2.3:1"),
        );
        assert_eq!(
            interleave(vec![v6a, v6b, v4a, v4b, v4c]),
            [v6a, v4a, v6b, v4b, v4c]
        );
        assert_eq!(interleave(vec![v4a, v4b, v6a]), [v4a, v6a, v4b]);
        assert_eq!(interleave(vec![v4a, v4b]), [v4a, v4b]);
        assert_eq!(interleave(vec![]), []);
    }

    /// A real address that drops connections: a listener whose accept queue is full (backlog 0,
    /// one connection never accepted), so the kernel drops every further SYN, as a dead route
    /// or a firewall does.
    async fn black_hole() -> (tokio::net::TcpListener, std::net::TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        // The queue is full once a connect gets no answer.
        let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr));
        assert!(probe.await.is_err(), "the accept queue took more");
        (listener, queued)
    }

    #[tokio::test]
    async fn an_address_that_drops_connections_costs_one_attempt_delay() {
        let (hole, _queued) = black_hole().await;
        let hole = hole.local_addr().unwrap();
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let delay = Duration::from_millis(250);
        // The dead address first: the next one is tried beside it after the delay.
        let started = std::time::Instant::now();
        let stream = first_to_connect(vec![hole, good_addr], Duration::from_secs(10), delay)
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(stream.peer_addr().unwrap(), good_addr);
        assert!(took >= delay && took < Duration::from_secs(3), "{took:?}");
        // A refused address: the next one at once, without waiting for the delay.
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let started = std::time::Instant::now();
        let stream = first_to_connect(vec![refused, good_addr], Duration::from_secs(10), delay)
            .await
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good_addr);
        assert!(started.elapsed() < delay, "{:?}", started.elapsed());
        // Two dead addresses ahead: the third waits for a place in the race (a timeout).
        let started = std::time::Instant::now();
        let stream = first_to_connect(
            vec![hole, hole, good_addr],
            Duration::from_millis(600),
            delay,
        )
        .await
        .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good_addr);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(600) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // Only dead addresses: each attempt's timeout, then the last failure, not this machine's.
        let (e, local) = first_to_connect(vec![hole, refused], Duration::from_millis(400), delay)
            .await
            .unwrap_err();
        assert!(!local);
        assert!(e.to_string().contains("timed out"), "{e}");
        drop(good);
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
