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
use std::sync::Mutex;
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
    /// A client over `connector` keeping at most `max_idle` idle connections per origin, each
    /// for at most `idle_timeout`.
    pub fn new(
        connector: HttpsConnector<SafeConnector>,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Client {
        Client {
            connector,
            idle: Mutex::new(Idle::default()),
            max_idle,
            idle_timeout,
        }
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

    /// Keep a connection for the next request to `origin` (closing it when `max_idle` are
    /// kept), and close idle connections past their time, for every origin, now and then.
    fn put_back(&self, origin: Origin, conn: Box<Conn>) {
        let mut expired = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = conn.idle_since;
        if idle
            .swept
            .is_none_or(|t| now.duration_since(t) >= self.idle_timeout / 4)
        {
            idle.swept = Some(now);
            let timeout = self.idle_timeout;
            idle.by_origin.retain(|_, conns| {
                // Oldest first: the ones past their time are at the front.
                let old = conns
                    .iter()
                    .take_while(|c| now.duration_since(c.idle_since) >= timeout)
                    .count();
                expired.extend(conns.drain(..old));
                !conns.is_empty()
            });
        }
        let conns = idle.by_origin.entry(origin).or_default();
        if conns.len() < self.max_idle {
            conns.push(conn);
        } else {
            expired.push(conn);
        }
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
    use super::*;

    #[test]
    fn the_request_target_is_the_path_and_query() {
        let t = |u: &str| origin_form(&u.parse().unwrap()).to_string();
        assert_eq!(t("http://example.com:8080/hook?a=1"), "/hook?a=1");
        assert_eq!(t("https://example.com"), "/");
        assert_eq!(t("http://example.com/"), "/");
    }
}
