//! The delivery client: each endpoint keeps its own HTTP/1.1 connections, driven directly with
//! `hyper::client::conn::http1`: one task per connection (it reads and writes the socket), none
//! per request, and no pool-wide lock on the way to a connection.
//!
//! - An attempt takes the endpoint's most recently used idle connection that is still open and
//!   not idle past `idle_for`, and waits for it to be ready (the previous response's end may not
//!   have been seen by its task yet); with none, it connects through the [`Connector`] (the SSRF
//!   policy, TLS by rustls).
//! - A request that a reused connection never sent (the receiver closed it while it was idle)
//!   is sent on the next one, or on a new one: it never fails for that.
//! - A connection goes back to its endpoint only once the response's body was read whole;
//!   connections of an endpoint whose URL changed to another origin are closed.
//! - Idle connections of all endpoints together are at most `idle_max`; the claimer's periodic
//!   sweep closes those idle past `idle_for` (see [`Client::sweep`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tower_service::Service;

use super::connector::Connector;

/// Why an exchange failed (its chain names the cause).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/1.1 connection, as the client that sends on it holds it.
pub type Conn = SendRequest<Full<Bytes>>;

/// An endpoint's idle connections, newest last, and the origin they go to.
#[derive(Debug, Default)]
pub struct Conns(Mutex<Idle>);

#[derive(Debug, Default)]
struct Idle {
    origin: Option<(Scheme, Authority)>,
    conns: Vec<(Conn, Instant)>,
}

impl Idle {
    /// Whether these connections go where `uri` does.
    fn goes_to(&self, uri: &Uri) -> bool {
        match &self.origin {
            Some((scheme, authority)) => {
                uri.scheme() == Some(scheme) && uri.authority() == Some(authority)
            }
            None => false,
        }
    }
}

impl Conns {
    fn lock(&self) -> MutexGuard<'_, Idle> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many connections wait idle.
    pub fn idle(&self) -> usize {
        self.lock().conns.len()
    }
}

/// The client every endpoint's connections are made and counted by.
pub struct Client {
    connector: Connector,
    idle: AtomicUsize,
    idle_max: usize,
    idle_for: Duration,
}

impl Client {
    /// A client connecting through `connector`, keeping at most `idle_max` idle connections in
    /// all, each for at most `idle_for`.
    pub fn new(connector: Connector, idle_max: usize, idle_for: Duration) -> Client {
        Client {
            connector,
            idle: AtomicUsize::new(0),
            idle_max,
            idle_for,
        }
    }

    /// Idle connections of all endpoints.
    pub fn idle(&self) -> usize {
        self.idle.load(Ordering::Relaxed)
    }

    /// Send `request` (its URI in origin form, its `Host` header set) to `uri`'s origin on one
    /// of `conns` or a new connection. Give the connection back with [`Client::put_back`] once
    /// the response's body is read whole.
    pub async fn send(
        &self,
        conns: &Conns,
        uri: &Uri,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Conn), Error> {
        while let Some(mut conn) = self.take_idle(conns, uri) {
            if conn.ready().await.is_err() {
                continue;
            }
            match conn.try_send_request(request).await {
                Ok(response) => return Ok((response, conn)),
                Err(mut e) => match e.take_message() {
                    // Never written: the receiver had closed the connection. The next one.
                    Some(unsent) => request = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let io = self.connector.clone().call(uri.clone()).await?;
        let (mut conn, driver) = http1::handshake(io).await?;
        tokio::spawn(async move {
            // Its errors reach the request in flight, if any; an idle one just closes.
            let _ = driver.await;
        });
        let response = conn.send_request(request).await?;
        Ok((response, conn))
    }

    /// An idle connection to `uri`'s origin, newest first, still open and not idle too long.
    fn take_idle(&self, conns: &Conns, uri: &Uri) -> Option<Conn> {
        let mut idle = conns.lock();
        if !idle.goes_to(uri) {
            self.close_all(&mut idle);
            return None;
        }
        while let Some((conn, since)) = idle.conns.pop() {
            self.idle.fetch_sub(1, Ordering::Relaxed);
            if since.elapsed() < self.idle_for && !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    /// A connection whose response was read whole waits for the endpoint's next attempt
    /// (unless it is closed, or `idle_max` connections wait already).
    pub fn put_back(&self, conns: &Conns, uri: &Uri, conn: Conn) {
        if conn.is_closed() {
            return;
        }
        if self.idle.fetch_add(1, Ordering::Relaxed) >= self.idle_max {
            self.idle.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut idle = conns.lock();
        if !idle.goes_to(uri) {
            self.close_all(&mut idle);
            idle.origin = match (uri.scheme(), uri.authority()) {
                (Some(s), Some(a)) => Some((s.clone(), a.clone())),
                _ => None,
            };
        }
        idle.conns.push((conn, Instant::now()));
    }

    /// Close the endpoint's connections that are idle past `idle_for` or closed by the
    /// receiver; whether any stay idle.
    pub fn sweep(&self, conns: &Conns) -> bool {
        let mut idle = conns.lock();
        let before = idle.conns.len();
        idle.conns
            .retain(|(conn, since)| since.elapsed() < self.idle_for && !conn.is_closed());
        self.idle
            .fetch_sub(before - idle.conns.len(), Ordering::Relaxed);
        !idle.conns.is_empty()
    }

    fn close_all(&self, idle: &mut Idle) {
        self.idle.fetch_sub(idle.conns.len(), Ordering::Relaxed);
        idle.conns.clear();
    }
}

/// `uri` in origin form (`/path?query`), what an HTTP/1.1 request line carries.
pub fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => Uri::from(pq.clone()),
        _ => Uri::from_static("/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_request_line_carries_the_path_and_query_only() {
        let form = |u: &str| origin_form(&u.parse().unwrap()).to_string();
        assert_eq!(form("http://example.com"), "/");
        assert_eq!(form("http://example.com/"), "/");
        assert_eq!(form("https://example.com:8443/a/b?c=1&d"), "/a/b?c=1&d");
        assert_eq!(form("http://[::1]:9000/hook"), "/hook");
    }

    /// A loopback receiver answering `200 ok` (keep-alive) to each request; with `close_after`,
    /// it closes each connection that long after its first answer, saying nothing. Counts the
    /// connections it accepted.
    async fn receiver(close_after: Option<Duration>) -> (Uri, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/hook?x=1", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: its head, then its body (Content-Length).
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        assert!(head.starts_with("post /hook?x=1 http/1.1\r\n"), "{head}");
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < end + length {
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + length);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                        if let Some(after) = close_after {
                            tokio::time::sleep(after).await;
                            return;
                        }
                    }
                });
            }
        });
        (uri, accepted)
    }

    fn client(idle_max: usize, idle_for: Duration) -> Client {
        let connector = super::super::connector::connector(true, Duration::from_secs(5));
        Client::new(connector, idle_max, idle_for)
    }

    /// POST once, read the answer whole and give the connection back.
    async fn post(client: &Client, conns: &Conns, uri: &Uri) -> String {
        let mut request = Request::new(Full::new(Bytes::from_static(b"{}")));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = origin_form(uri);
        let host = uri.authority().unwrap().as_str().parse().unwrap();
        request.headers_mut().insert(http::header::HOST, host);
        let (response, conn) = client.send(conns, uri, request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        client.put_back(conns, uri, conn);
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn an_endpoints_attempts_share_one_connection() {
        let (uri, accepted) = receiver(None).await;
        let (client, conns) = (client(8, Duration::from_secs(60)), Conns::default());
        for _ in 0..5 {
            assert_eq!(post(&client, &conns, &uri).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!((conns.idle(), client.idle()), (1, 1));
        // Kept by the sweep while not idle too long.
        assert!(client.sweep(&conns));
        assert_eq!(client.idle(), 1);
    }

    #[tokio::test]
    async fn no_more_than_idle_max_connections_wait() {
        let (uri, accepted) = receiver(None).await;
        let (client, conns) = (client(0, Duration::from_secs(60)), Conns::default());
        for _ in 0..3 {
            assert_eq!(post(&client, &conns, &uri).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!((conns.idle(), client.idle()), (0, 0));
    }

    #[tokio::test]
    async fn connections_idle_too_long_are_closed_not_used() {
        let (uri, accepted) = receiver(None).await;
        let (client, conns) = (client(8, Duration::ZERO), Conns::default());
        assert_eq!(post(&client, &conns, &uri).await, "ok");
        assert_eq!(client.idle(), 1);
        assert!(!client.sweep(&conns), "idle past idle_for");
        assert_eq!((conns.idle(), client.idle()), (0, 0));
        assert_eq!(post(&client, &conns, &uri).await, "ok");
        assert_eq!(post(&client, &conns, &uri).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(
            client.idle(),
            1,
            "the stale one was dropped when it was taken"
        );
    }

    #[tokio::test]
    async fn a_connection_the_receiver_closed_while_idle_costs_no_attempt() {
        let (uri, accepted) = receiver(Some(Duration::ZERO)).await;
        let (client, conns) = (client(8, Duration::from_secs(60)), Conns::default());
        for _ in 0..3 {
            assert_eq!(post(&client, &conns, &uri).await, "ok");
            // The receiver's close reaches this side (or not yet: the send must cope either way).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_new_origin_closes_the_old_ones_connections() {
        let (first, _) = receiver(None).await;
        let (second, accepted) = receiver(None).await;
        let (client, conns) = (client(8, Duration::from_secs(60)), Conns::default());
        assert_eq!(post(&client, &conns, &first).await, "ok");
        assert_eq!(client.idle(), 1);
        assert_eq!(post(&client, &conns, &second).await, "ok");
        assert_eq!(post(&client, &conns, &second).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!((conns.idle(), client.idle()), (1, 1));
    }
}
