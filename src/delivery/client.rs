//! The delivery client: HTTP/1.1 connections kept per origin (scheme and authority), each one
//! driven by the delivery task that is using it.
//!
//! A pooled client (hyper-util's) runs every connection as a task of its own: a delivery hands
//! its request to that task and is woken with the answer, two hand-offs and two wake-ups an
//! attempt, often across threads. Here the task of the attempt polls the connection itself while
//! it waits for its answer, and puts it back when the answer is read; an idle connection is
//! polled by nobody. Its state is looked at when it is taken again: polling it then reads the
//! EOF of a connection the receiver closed, and such a connection is dropped, not used.
//! A request that a reused connection could not send (it closed as the request was handed to it)
//! goes again on another connection, as a pooled client does; one that was written is never sent
//! twice by the client.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::connector::SafeConnector;
use crate::metrics::Metrics;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Body = Full<Bytes>;
type Driver = http1::Connection<Io, Body>;

/// Where a connection goes: requests to one origin share connections.
type Origin = (Scheme, Authority);

/// One connection: the handle requests are given to, and the state machine that writes them and
/// reads the answers when it is polled.
struct Conn {
    send: http1::SendRequest<Body>,
    /// `None` once the connection has ended.
    driver: Option<Driver>,
    /// When it was put back (idle connections older than the idle timeout are closed).
    idle_since: Instant,
}

/// What came back from the receiver.
pub struct Answer {
    /// The status and headers.
    pub head: http::response::Parts,
    /// What it sent, when that was read whole within the limit (`None`: more than the limit,
    /// or the connection failed while it was read).
    pub body: Option<Bytes>,
}

/// The delivery client.
pub struct Client {
    connector: HttpsConnector<SafeConnector>,
    idle: Mutex<Idle>,
    /// Idle connections kept per origin at most.
    max_idle: usize,
    /// How long an idle connection is kept.
    idle_timeout: Duration,
    /// Where the connections it opens are counted.
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Idle {
    // Boxed on purpose: a connection is about a kilobyte and moves between the list and the
    // attempts that use it; a box moves as a pointer.
    #[allow(clippy::vec_box)]
    by_origin: HashMap<Origin, Vec<Box<Conn>>, ahash::RandomState>,
    /// When idle connections past their time were last closed, for every origin.
    swept: Option<Instant>,
}

impl Client {
    /// A client over `connector` (TLS by rustls with the webpki roots for https) keeping at
    /// most `max_idle` idle connections per origin, each for at most `idle_timeout`.
    pub fn new(
        connector: SafeConnector,
        max_idle: usize,
        idle_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Client {
        use hyper_rustls::ConfigBuilderExt;
        let tls = rustls::ClientConfig::builder()
            .with_webpki_roots()
            .with_no_client_auth();
        Client::with_tls(connector, tls, max_idle, idle_timeout, metrics)
    }

    /// The same with TLS as `tls` says (its roots: the tests' own authority).
    fn with_tls(
        connector: SafeConnector,
        tls: rustls::ClientConfig,
        max_idle: usize,
        idle_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Client {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Client {
            connector,
            idle: Mutex::new(Idle::default()),
            max_idle,
            idle_timeout,
            metrics,
        }
    }

    /// How many idle connections it keeps, in all.
    #[cfg(test)]
    fn idle(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.by_origin.values().map(Vec::len).sum()
    }

    /// Send `request` to `uri` and read the answer, its body up to `body_limit` bytes. The
    /// request is sent with `uri`'s path and query as its target; its `Host` header is the
    /// caller's. An `Err` says, in the words of the deepest cause, why nothing came back.
    pub async fn exchange(
        &self,
        uri: &Uri,
        mut request: Request<Body>,
        body_limit: usize,
    ) -> Result<Answer, String> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err("the endpoint URL has no scheme or host".into());
        };
        let origin = (scheme.clone(), authority.clone());
        *request.uri_mut() = origin_form(uri);
        loop {
            let (mut conn, reused) = match self.take(&origin) {
                Some(conn) => (conn, true),
                // Boxed: a connect's state is large and rare; the exchange's stays small.
                None => (Box::pin(self.connect(uri)).await?, false),
            };
            let c = &mut *conn;
            let ready = drive(&mut c.driver, poll_fn(|cx| c.send.poll_ready(cx))).await;
            if ready.is_err() || c.driver.is_none() {
                if reused {
                    continue;
                }
                return Err(match ready {
                    Err(e) => describe(&e),
                    Ok(()) => "the connection closed before the request was sent".into(),
                });
            }
            let response = drive(&mut c.driver, c.send.try_send_request(request)).await;
            let response = match response {
                Ok(r) => r,
                Err(mut e) => match e.take_message() {
                    // Not written: a reused connection that had closed. Send it on another.
                    Some(r) if reused => {
                        request = r;
                        continue;
                    }
                    _ => return Err(describe(e.error())),
                },
            };
            let (head, body) = response.into_parts();
            let body = read(&mut c.driver, body, body_limit).await;
            if c.driver.is_some() && body.is_some() && !c.send.is_closed() {
                c.idle_since = Instant::now();
                self.put_back(origin, conn);
            }
            return Ok(Answer { head, body });
        }
    }

    /// The most recently used idle connection to `origin` that is not past its time.
    fn take(&self, origin: &Origin) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.by_origin.get_mut(origin)?;
        while let Some(conn) = conns.pop() {
            if conn.idle_since.elapsed() < self.idle_timeout {
                return Some(conn);
            }
        }
        None
    }

    /// Keep a connection for the next request to `origin`, or close it when `max_idle` are kept.
    fn put_back(&self, origin: Origin, conn: Box<Conn>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.by_origin.entry(origin).or_default();
        if conns.len() < self.max_idle {
            conns.push(conn);
            return;
        }
        drop(idle);
        // Closed outside the lock.
        drop(conn);
    }

    /// Close idle connections past their time, for every origin, at most once every quarter of
    /// the idle timeout (the claimer calls this on each round; `take` skips any it has not yet
    /// closed).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < self.idle_timeout / 4)
        {
            return;
        }
        idle.swept = Some(now);
        let timeout = self.idle_timeout;
        idle.by_origin.retain(|_, conns| {
            // Oldest first: the ones past their time are at the front.
            let old = conns
                .iter()
                .take_while(|c| now.saturating_duration_since(c.idle_since) >= timeout)
                .count();
            expired.extend(conns.drain(..old));
            !conns.is_empty()
        });
        drop(idle);
        // Closed outside the lock.
        drop(expired);
    }

    /// A new connection to `uri`'s origin (the connector applies the address policy and the
    /// connect timeout, and TLS for https).
    async fn connect(&self, uri: &Uri) -> Result<Box<Conn>, String> {
        let io = self
            .connector
            .clone()
            .call(uri.clone())
            .await
            .map_err(|e| describe(&*e))?;
        let (send, driver) = http1::handshake(io).await.map_err(|e| describe(&e))?;
        self.metrics
            .delivery_connections
            .fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(Conn {
            send,
            driver: Some(driver),
            idle_since: Instant::now(),
        }))
    }
}

/// Run `fut` while polling the connection, the connection first: what it reads for `fut` is
/// there when `fut` is polled. A connection that ends is dropped (`driver` becomes `None`); what
/// was in flight on it then fails, and `fut` says so.
async fn drive<F: Future>(driver: &mut Option<Driver>, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        if let Some(d) = driver.as_mut() {
            if Pin::new(d).poll(cx).is_ready() {
                *driver = None;
            }
        }
        fut.as_mut().poll(cx)
    })
    .await
}

/// Read an answer's body, up to `limit` bytes, while polling the connection.
async fn read(driver: &mut Option<Driver>, body: Incoming, limit: usize) -> Option<Bytes> {
    let collected = drive(driver, Limited::new(body, limit).collect()).await;
    collected.ok().map(|c| c.to_bytes())
}

/// `uri`'s path and query alone: the request target of HTTP/1.1 to an origin server.
fn origin_form(uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).expect("a path and query alone is a valid URI")
}

/// The most specific message in an error's chain ("connection refused", not "client error").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut messages = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        messages.push(s.to_string());
        source = s.source();
    }
    messages.dedup();
    messages.join(": ")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn the_request_target_is_the_path_and_query() {
        let t = |u: &str| origin_form(&u.parse().unwrap()).to_string();
        assert_eq!(t("http://example.com:8080/hook?a=1"), "/hook?a=1");
        assert_eq!(t("https://example.com"), "/");
        assert_eq!(t("http://example.com/"), "/");
    }

    /// The length of the first request in `buf` (its head and `Content-Length` body) once all of
    /// it is there.
    fn whole_request(buf: &[u8]) -> Option<usize> {
        let mut hs = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut hs);
        let httparse::Status::Complete(head) = req.parse(buf).ok()? else {
            return None;
        };
        let body: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
            .unwrap_or(0);
        (buf.len() >= head + body).then_some(head + body)
    }

    /// A receiver on loopback that answers every request with `answer` after `delay`, keeping
    /// the connection; it counts the connections it accepted.
    async fn receiver(answer: &'static [u8], delay: Duration) -> (Uri, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/hook", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        if let Some(n) = whole_request(&buf) {
                            buf.drain(..n);
                            tokio::time::sleep(delay).await;
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (uri, accepted)
    }

    /// Connections to loopback allowed, as the tests' receivers are there.
    fn connector() -> SafeConnector {
        SafeConnector {
            allow_private: true,
            connect_timeout: Duration::from_secs(2),
        }
    }

    fn client(max_idle: usize, idle_timeout: Duration) -> Client {
        Client::new(
            connector(),
            max_idle,
            idle_timeout,
            Metrics::new(&[("GET", "/")], 1),
        )
    }

    fn post() -> Request<Body> {
        let mut r = Request::new(Full::new(Bytes::from_static(b"{}")));
        *r.method_mut() = http::Method::POST;
        r
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[tokio::test]
    async fn a_connection_is_reused_until_it_has_been_idle_too_long() {
        let (uri, accepted) = receiver(OK, Duration::ZERO).await;
        let c = client(8, Duration::from_millis(300));
        for _ in 0..3 {
            let a = c.exchange(&uri, post(), 1024).await.unwrap();
            assert_eq!(a.head.status, 200);
            assert_eq!(a.body.as_deref(), Some(&b"ok"[..]));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(c.idle(), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.exchange(&uri, post(), 1024).await.unwrap();
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the idle one had expired"
        );
        assert_eq!(c.idle(), 1);
    }

    #[tokio::test]
    async fn a_sweep_closes_idle_connections_past_their_time() {
        let (uri, _) = receiver(OK, Duration::ZERO).await;
        let c = client(8, Duration::from_millis(200));
        c.exchange(&uri, post(), 1024).await.unwrap();
        c.sweep();
        assert_eq!(c.idle(), 1, "still within its time");
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.sweep();
        assert_eq!(c.idle(), 0);
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept_per_origin() {
        let (uri, accepted) = receiver(OK, Duration::from_millis(100)).await;
        let c = client(1, Duration::from_secs(60));
        // Three at once need three connections; one of them is kept afterwards.
        let ex = || c.exchange(&uri, post(), 1024);
        let (a, b, d) = tokio::join!(ex(), ex(), ex());
        for answer in [a, b, d] {
            assert_eq!(answer.unwrap().head.status, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(c.idle(), 1);
        let (a, b) = tokio::join!(ex(), ex());
        for answer in [a, b] {
            assert_eq!(answer.unwrap().head.status, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4, "one reused, one new");
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_is_not_kept_and_its_connection_is_not_reused() {
        const BIG: &[u8] = b"HTTP/1.1 500 X\r\nContent-Length: 10\r\n\r\n0123456789";
        let (uri, accepted) = receiver(BIG, Duration::ZERO).await;
        let c = client(8, Duration::from_secs(60));
        let a = c.exchange(&uri, post(), 4).await.unwrap();
        assert_eq!(a.head.status, 500);
        assert_eq!(a.body, None);
        assert_eq!(c.idle(), 0);
        let a = c.exchange(&uri, post(), 64).await.unwrap();
        assert_eq!(a.body.as_deref(), Some(&b"0123456789"[..]));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(c.idle(), 1);
    }

    /// A TLS receiver (a certificate for `localhost` from the test authority in `testdata/`) on
    /// a thread of its own: it answers every request with 200 and keeps the connection, and
    /// counts the connections it accepted.
    fn tls_receiver() -> (Uri, Arc<AtomicUsize>) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::io::{Read, Write};
        let cert = CertificateDer::from_pem_slice(include_bytes!("testdata/leaf.pem")).unwrap();
        let key = PrivateKeyDer::from_pem_slice(include_bytes!("testdata/leaf.key")).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!(
            "https://localhost:{}/hook",
            listener.local_addr().unwrap().port()
        )
        .parse()
        .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let config = Arc::clone(&config);
                std::thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut buf = Vec::new();
                    loop {
                        if let Some(n) = whole_request(&buf) {
                            buf.drain(..n);
                            if tls.write_all(OK).and_then(|_| tls.flush()).is_err() {
                                return;
                            }
                            continue;
                        }
                        let mut chunk = [0u8; 4096];
                        match tls.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (uri, accepted)
    }

    #[tokio::test]
    async fn https_answers_come_back_over_one_kept_connection() {
        use rustls::pki_types::pem::PemObject;
        let (uri, accepted) = tls_receiver();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                rustls::pki_types::CertificateDer::from_pem_slice(include_bytes!(
                    "testdata/ca.pem"
                ))
                .unwrap(),
            )
            .unwrap();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let metrics = Metrics::new(&[("GET", "/")], 1);
        let c = Client::with_tls(connector(), tls, 8, Duration::from_secs(60), metrics);
        for _ in 0..3 {
            let a = c.exchange(&uri, post(), 1024).await.unwrap();
            assert_eq!(a.head.status, 200);
            assert_eq!(a.body.as_deref(), Some(&b"ok"[..]));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // The same receiver is refused by the public roots: the certificate is checked.
        let public = client(8, Duration::from_secs(60));
        let e = match public.exchange(&uri, post(), 1024).await {
            Err(e) => e,
            Ok(_) => panic!("a certificate from an unknown authority was taken"),
        };
        assert!(e.contains("certificate"), "{e}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_that_says_so() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let e = match client(8, Duration::from_secs(60))
            .exchange(&uri, post(), 1024)
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("nothing listens there"),
        };
        assert!(e.to_lowercase().contains("refused"), "{e}");
    }
}
