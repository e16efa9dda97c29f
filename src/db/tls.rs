//! The database URL, and TLS to PostgreSQL as libpq reads it from there.
//!
//! tokio-postgres parses the URL (or `key=value` string) itself but knows only `sslmode=disable`,
//! `prefer` and `require`, and no `sslrootcert`. The URLs managed databases hand out use libpq's
//! whole set, so [`DatabaseUrl::parse`] takes `sslmode` and `sslrootcert` out of the text (once,
//! with the configuration), leaves the rest to tokio-postgres, and keeps what they ask for as a
//! [`Tls`]; [`Tls::connector`] makes the rustls connector every connection to PostgreSQL goes
//! through. What each asks (libpq's meanings, but for the default):
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | none (the default) | as `prefer`, but never to a database on this machine | not checked |
//! | `allow`, `prefer` | when the server offers it | not checked |
//! | `require` | always | not checked; with `sslrootcert`, as `verify-ca` |
//! | `verify-ca` | always | signed by an authority of `sslrootcert` |
//! | `verify-full` | always | signed so, and for the host connected to |
//!
//! Never over a Unix socket, whatever the mode (as libpq: PostgreSQL has no TLS there).
//!
//! `sslrootcert` names a PEM file of authorities, or `system`: the public authorities' roots
//! (Mozilla's, built in), as for webhooks; `verify-ca` and `verify-full` without it use those too
//! (libpq would look for `~/.postgresql/root.crt`). Client certificates (`sslcert`, `sslkey`) are
//! not supported: tokio-postgres refuses them as unknown options.
//!
//! SCRAM's channel binding (`SCRAM-SHA-256-PLUS`, `channel_binding=prefer`, tokio-postgres's
//! default as libpq's, or `require`) binds the password exchange to the server's certificate:
//! [`end_point`] hashes it by its signature's hash, read from its DER frame with a few lines
//! here (the crate that glues tokio-postgres to rustls, `tokio-postgres-rustls`, reads it with a
//! whole X.509 decoder: 92 KB more binary; BENCHMARKS.md, thirtieth session).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::watched::Watched;

/// How the server's certificate is checked, once TLS is in use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Check {
    /// Not at all (`prefer`, `require`): encrypted against a passive listener only.
    #[default]
    Nothing,
    /// Its chain up to a trusted authority (`verify-ca`).
    Authority,
    /// Its chain and the host name (`verify-full`).
    Full,
}

/// What the URL asked of TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// Whether TLS is used at all.
    pub encrypt: Encrypt,
    /// How the certificate is checked.
    pub check: Check,
    /// The authorities' PEM file; `None`: the built-in public roots.
    pub roots: Option<String>,
}

/// Whether connections use TLS (tokio-postgres's `sslmode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encrypt {
    /// Never (`disable`).
    Never,
    /// No `sslmode` given: as [`Encrypt::IfOffered`], unless the database is on this machine
    /// ([`DatabaseUrl::is_local`]), where TLS protects nothing (whoever can read the loopback
    /// can read the server's memory) and costs CPU for every message: never there.
    #[default]
    IfRemote,
    /// When the server offers it (`allow`, `prefer`).
    IfOffered,
    /// Always, or no connection (`require` and stronger).
    Always,
}

/// `--database-url` read: the text tokio-postgres parses, and what it asks of TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseUrl {
    /// The URL or `key=value` string without `sslmode` and `sslrootcert`.
    pub pg: String,
    /// TLS as `sslmode` and `sslrootcert` ask.
    pub tls: Tls,
}

impl DatabaseUrl {
    /// Take `sslmode` and `sslrootcert` out of `url` (the rest is left to tokio-postgres).
    #[cold]
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        let mut mode = None;
        let mut roots = None;
        let (pg, taken) = take_params(url, &["sslmode", "sslrootcert"])?;
        // The last of each wins, as in libpq.
        for (key, value) in taken {
            match key {
                "sslmode" => mode = Some(value),
                _ => roots = Some(value),
            }
        }
        let system = roots.as_deref() == Some("system");
        let (encrypt, check) = match mode.as_deref() {
            None if system => (Encrypt::Always, Check::Full),
            None => (Encrypt::IfRemote, Check::Nothing),
            Some("prefer") | Some("allow") => (Encrypt::IfOffered, Check::Nothing),
            Some("disable") => (Encrypt::Never, Check::Nothing),
            Some("require") if roots.is_some() => (Encrypt::Always, Check::Authority),
            Some("require") => (Encrypt::Always, Check::Nothing),
            Some("verify-ca") => (Encrypt::Always, Check::Authority),
            Some("verify-full") => (Encrypt::Always, Check::Full),
            Some(other) => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, \
                     verify-ca, verify-full"
                ))
            }
        };
        if system && check != Check::Full {
            return Err("sslrootcert=system needs sslmode=verify-full (as libpq)".into());
        }
        if roots.as_deref() == Some("") {
            return Err("sslrootcert is empty".into());
        }
        let roots = roots.filter(|r| r != "system");
        Ok(DatabaseUrl {
            pg,
            tls: Tls {
                encrypt,
                check,
                roots,
            },
        })
    }

    /// tokio-postgres's settings: the URL's own, with its `sslmode`.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, String> {
        // tokio-postgres's words and their cause ("invalid connection string: unknown option
        // `sslcert`").
        let mut pg =
            self.pg.parse::<tokio_postgres::Config>().map_err(
                |e| match std::error::Error::source(&e) {
                    Some(cause) => format!("{e}: {cause}"),
                    None => e.to_string(),
                },
            )?;
        // libpq never begins TLS on a Unix socket (PostgreSQL has none there), whatever the mode.
        let sockets = pg
            .get_hosts()
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        let mode = match self.tls.encrypt {
            _ if sockets => SslMode::Disable,
            Encrypt::IfRemote if hosts_local(&pg) => SslMode::Disable,
            Encrypt::Never => SslMode::Disable,
            Encrypt::IfRemote | Encrypt::IfOffered => SslMode::Prefer,
            Encrypt::Always => SslMode::Require,
        };
        pg.ssl_mode(mode);
        Ok(pg)
    }

    /// Whether every host in the URL is this machine: a Unix socket, `localhost`, or a loopback
    /// address (no host at all means libpq's default, the local socket). By name: a `hostaddr`
    /// is not looked at.
    pub fn is_local(&self) -> bool {
        self.pg.parse().is_ok_and(|pg| hosts_local(&pg))
    }
}

impl Tls {
    /// The connector for tokio-postgres: rustls with `ring`, checking the server as asked. The
    /// authorities' file is read now, and again by a connection that finds it changed since
    /// (its time, size or inode: a file renewed in place or by a rename, as Kubernetes renews a
    /// mounted secret), so a renewed bundle is taken by the pools' next connections without a
    /// restart; one that cannot be read or holds no certificate is logged and the last good one
    /// kept.
    #[cold]
    pub fn connector(&self) -> Result<Connector, String> {
        let tls = self.clone();
        let watched = Watched::new(self.roots.clone(), "database authorities", move |_| {
            tls.rustls()
        })?;
        Ok(Connector(Arc::new(watched)))
    }

    /// rustls's connector, the authorities' file read.
    fn rustls(&self) -> Result<TlsConnector, String> {
        let roots = Arc::new(match self.check {
            Check::Nothing => rustls::RootCertStore::empty(),
            Check::Authority | Check::Full => self.authorities()?,
        });
        // The set-up the deliveries use too (src/tls.rs), then checked our way.
        let mut tls = crate::tls::client(roots.clone());
        let verifier = Verifier {
            check: self.check,
            roots,
            algorithms: tls.crypto_provider().signature_verification_algorithms,
        };
        tls.dangerous().set_certificate_verifier(Arc::new(verifier));
        // PostgreSQL 17's direct TLS (`sslnegotiation=direct`) requires it; older servers ignore it.
        tls.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(TlsConnector::from(Arc::new(tls)))
    }

    fn authorities(&self) -> Result<rustls::RootCertStore, String> {
        let Some(path) = &self.roots else {
            return Ok(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            });
        };
        let mut store = rustls::RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(path).map_err(|e| format!("sslrootcert {path}: {e}"))?
        {
            let cert = cert.map_err(|e| format!("sslrootcert {path}: {e}"))?;
            store
                .add(cert)
                .map_err(|e| format!("sslrootcert {path}: {e}"))?;
        }
        if store.is_empty() {
            return Err(format!("sslrootcert {path}: no certificate in it"));
        }
        Ok(store)
    }
}

/// Whether every host of `pg` is this machine (see [`DatabaseUrl::is_local`]).
fn hosts_local(pg: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    pg.get_hosts().iter().all(|host| match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    })
}

/// tokio-postgres's way to TLS: rustls, for the host name the connection is made to, with the
/// authorities' file as it is now (see [`Tls::connector`]). Clones share it (a pool clones its
/// connector for each connection).
#[derive(Clone)]
pub struct Connector(Arc<Watched<TlsConnector>>);

/// One connection's TLS start, for its host name (empty for a Unix socket, where TLS is never
/// begun: the name is read only when it is).
pub struct Start(TlsConnector, String);

/// A connection to PostgreSQL over TLS.
pub struct Stream<S>(TlsStream<S>);

/// The handshake under way, or the host name that could not be one.
pub enum Handshake<S> {
    /// Under way (boxed: a kilobyte of state, once per connection).
    Going(Box<tokio_rustls::Connect<S>>),
    /// Not a name a certificate can be for.
    Failed(Option<io::Error>),
}

impl<S> MakeTlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Start;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<Start> {
        Ok(Start(self.0.current(), host.to_string()))
    }
}

impl<S> TlsConnect<S> for Start
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        match ServerName::try_from(self.1) {
            Ok(name) => Handshake::Going(Box::new(self.0.connect(name, stream))),
            Err(e) => Handshake::Failed(Some(io::Error::new(io::ErrorKind::InvalidInput, e))),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Future for Handshake<S> {
    type Output = io::Result<Stream<S>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Handshake::Going(connect) => Pin::new(&mut **connect).poll(cx).map_ok(Stream),
            Handshake::Failed(e) => Poll::Ready(Err(e
                .take()
                .unwrap_or_else(|| io::Error::other("polled after its end")))),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for Stream<S> {
    /// RFC 5929's `tls-server-end-point` for SCRAM-SHA-256-PLUS: the hash of the server's
    /// certificate, as PostgreSQL computes it (see [`end_point`]).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, connection) = self.0.get_ref();
        match connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| end_point(cert))
        {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Parameters taken out of a URL, each with its value, in order.
type Taken = Vec<(&'static str, String)>;

/// Cut the parameters named `keys` out of a URL's query or a `key=value` string: the rest of
/// the text as it was, and each one taken with its value (decoded), in order.
fn take_params(url: &str, keys: &[&'static str]) -> Result<(String, Taken), String> {
    let mut taken = Vec::new();
    let ours = |key: &str| keys.iter().find(|k| **k == key).copied();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), taken));
        };
        let mut kept: Vec<&str> = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match ours(key) {
                Some(key) => taken.push((key, percent_decoded(value)?)),
                None => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, taken));
    }
    // `key = value` pairs apart by spaces; a value in single quotes may hold spaces, and a
    // backslash takes the next character as it is (tokio-postgres's and libpq's rules). Split
    // at ASCII bytes only, so every piece is UTF-8 as the whole was.
    let bytes = url.as_bytes();
    let space = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_whitespace);
    let mut kept = String::with_capacity(url.len());
    let mut i = 0;
    loop {
        while space(i) {
            i += 1;
        }
        if i == bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !space(i) {
            i += 1;
        }
        let key = &url[start..i];
        while space(i) {
            i += 1;
        }
        if bytes.get(i) != Some(&b'=') {
            return Err(format!("{key:?} has no value"));
        }
        i += 1;
        while space(i) {
            i += 1;
        }
        let quoted = bytes.get(i) == Some(&b'\'');
        i += usize::from(quoted);
        let mut value = Vec::new();
        loop {
            match bytes.get(i) {
                None if quoted => return Err(format!("{key}'s value has no closing quote")),
                None => break,
                Some(b'\'') if quoted => {
                    i += 1;
                    break;
                }
                Some(_) if !quoted && space(i) => break,
                Some(b'\\') => {
                    let Some(&c) = bytes.get(i + 1) else {
                        return Err(format!("{key}'s value ends with a backslash"));
                    };
                    value.push(c);
                    i += 2;
                }
                Some(&c) => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        match ours(key) {
            Some(key) => {
                let value =
                    String::from_utf8(value).map_err(|_| format!("{key}'s value is not UTF-8"))?;
                taken.push((key, value));
            }
            None => {
                kept.push_str(&url[start..i]);
                kept.push(' ');
            }
        }
    }
    kept.pop();
    if taken.is_empty() {
        return Ok((url.to_string(), taken));
    }
    // What was a `key=value` string stays one (tokio-postgres tells the two apart by the start).
    if kept.starts_with("postgres://") || kept.starts_with("postgresql://") {
        kept.insert(0, ' ');
    }
    Ok((kept, taken))
}

/// A URL query value with its `%XX` escapes decoded.
fn percent_decoded(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{value:?}: a % not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{value:?} is not UTF-8 once decoded"))
}

/// The server's certificate checked as `check` says, by rustls's webpki functions; the
/// handshake's signatures are checked against the key it presents in every mode.
#[derive(Debug)]
struct Verifier {
    check: Check,
    /// The authorities (none for [`Check::Nothing`]).
    roots: Arc<rustls::RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.check != Check::Nothing {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                &self.roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
            if self.check == Check::Full {
                verify_server_name(&cert, name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server's certificate hashed for channel binding (RFC 5929, 4.1): with the hash of its
/// signature algorithm, SHA-256 where that is MD5 or SHA-1. `None` for an algorithm with no
/// single hash there (Ed25519; RSASSA-PSS, whose hash is in its parameters, is not read) or a
/// certificate that is not DER: no binding is offered then (`channel_binding=require` fails,
/// `prefer` goes on without).
pub fn end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use ring::digest::{digest, SHA256, SHA384, SHA512};
    // 1.2.840.113549.1.1.{4, 5, 11, 12, 13}: md5, sha1, sha256, sha384, sha512 with RSA.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    // 1.2.840.10045.4.1 (sha1) and 1.2.840.10045.4.3.{2, 3, 4}: ECDSA with sha256, 384, 512.
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let oid = signature_algorithm(cert)?;
    let hash = match oid.strip_prefix(RSA) {
        Some([4 | 5 | 11]) => &SHA256,
        Some([12]) => &SHA384,
        Some([13]) => &SHA512,
        _ => match oid.strip_prefix(ECDSA) {
            Some([1] | [3, 2]) => &SHA256,
            Some([3, 3]) => &SHA384,
            Some([3, 4]) => &SHA512,
            _ => return None,
        },
    };
    Some(digest(hash, cert).as_ref().to_vec())
}

/// The signature algorithm's object identifier in a DER certificate: `SEQUENCE { SEQUENCE
/// tbsCertificate, SEQUENCE { OBJECT IDENTIFIER algorithm, … }, … }`.
fn signature_algorithm(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let (certificate, _) = der(cert, SEQUENCE)?;
    let (_, rest) = der(certificate, SEQUENCE)?;
    let (algorithm, _) = der(rest, SEQUENCE)?;
    let (oid, _) = der(algorithm, 0x06)?;
    Some(oid)
}

/// The DER element with `tag` at the start of `input`: its contents, and what follows it.
fn der(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let [found, first, rest @ ..] = input else {
        return None;
    };
    if *found != tag {
        return None;
    }
    let (len, rest) = match *first {
        short @ 0..=0x7f => (usize::from(short), rest),
        // The long form, in up to four bytes.
        long @ 0x81..=0x84 => {
            let (bytes, rest) = rest.split_at_checked(usize::from(long & 0x7f))?;
            let len = bytes.iter().fold(0usize, |n, b| n << 8 | usize::from(*b));
            (len, rest)
        }
        _ => return None,
    };
    rest.split_at_checked(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_binding_hashes_the_certificate_by_its_signatures_hash() {
        use sha2::{Digest, Sha256};
        // The tests' certificate: ECDSA with SHA-256.
        let pem = include_bytes!("../delivery/testdata/leaf.pem");
        let cert = CertificateDer::from_pem_slice(pem).unwrap();
        assert_eq!(end_point(&cert), Some(Sha256::digest(&cert).to_vec()));
        // A certificate's frame with only an algorithm in it, in the short and long forms.
        let with = |oid: &[u8], long: bool| {
            let mut algorithm = vec![0x06, oid.len() as u8];
            algorithm.extend_from_slice(oid);
            let mut body = vec![0x30, 0x00, 0x30, algorithm.len() as u8];
            body.extend_from_slice(&algorithm);
            let mut cert = if long {
                vec![0x30, 0x82, 0x00, body.len() as u8]
            } else {
                vec![0x30, body.len() as u8]
            };
            cert.extend_from_slice(&body);
            cert
        };
        let rsa = |n: u8| [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, n];
        let ecdsa = |n: &[u8]| [&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04][..], n].concat();
        for (oid, len) in [
            (rsa(4).to_vec(), Some(32)),
            (rsa(5).to_vec(), Some(32)),
            (rsa(11).to_vec(), Some(32)),
            (rsa(12).to_vec(), Some(48)),
            (rsa(13).to_vec(), Some(64)),
            // RSASSA-PSS: the hash is in its parameters, not read.
            (rsa(10).to_vec(), None),
            (ecdsa(&[1]), Some(32)),
            (ecdsa(&[3, 2]), Some(32)),
            (ecdsa(&[3, 3]), Some(48)),
            (ecdsa(&[3, 4]), Some(64)),
            (ecdsa(&[3, 5]), None),
            // Ed25519.
            (vec![0x2b, 0x65, 0x70], None),
        ] {
            for long in [false, true] {
                let got = end_point(&with(&oid, long)).map(|h| h.len());
                assert_eq!(got, len, "{oid:x?}");
            }
        }
        // Cut anywhere, or not DER: none.
        let whole = with(&rsa(11), false);
        for cut in 0..whole.len() {
            assert_eq!(end_point(&whole[..cut]), None, "cut at {cut}");
        }
        assert_eq!(end_point(b"-----BEGIN CERTIFICATE-----"), None);
        assert_eq!(end_point(&[0x30, 0x85, 0, 0, 0, 0, 1]), None);
    }

    fn tls(url: &str) -> (String, Encrypt, Check, Option<String>) {
        let u = DatabaseUrl::parse(url).unwrap();
        (u.pg, u.tls.encrypt, u.tls.check, u.tls.roots)
    }

    #[test]
    fn sslmode_and_sslrootcert_come_out_of_a_url_and_the_rest_stays() {
        use Check::*;
        use Encrypt::*;
        let base = "postgres://u:p%40ss@db.example:5432/app";
        assert_eq!(tls(base), (base.into(), IfRemote, Nothing, None));
        assert_eq!(
            tls(&format!(
                "{base}?sslmode=verify-full&sslrootcert=/etc/ca%20dir/rds.pem&application_name=x"
            )),
            (
                format!("{base}?application_name=x"),
                Always,
                Full,
                Some("/etc/ca dir/rds.pem".into())
            )
        );
        assert_eq!(
            tls(&format!("{base}?connect_timeout=3&sslmode=require")),
            (format!("{base}?connect_timeout=3"), Always, Nothing, None)
        );
        // libpq: `require` with authorities checks the chain, as `verify-ca`.
        assert_eq!(
            tls(&format!("{base}?sslmode=require&sslrootcert=ca.pem")).2,
            Authority
        );
        assert_eq!(tls(&format!("{base}?sslmode=verify-ca")).2, Authority);
        assert_eq!(tls(&format!("{base}?sslmode=disable")).1, Never);
        assert_eq!(tls(&format!("{base}?sslmode=allow")).1, IfOffered);
        // `system`: the public roots, and the name checked.
        assert_eq!(
            tls(&format!("{base}?sslrootcert=system")),
            (base.into(), Always, Full, None)
        );
        for (bad, says) in [
            ("sslmode=verify", "is not one of"),
            (
                "sslmode=require&sslrootcert=system",
                "needs sslmode=verify-full",
            ),
            ("sslrootcert=", "empty"),
            ("sslrootcert=%zz", "two hex digits"),
            ("sslrootcert=%ff", "not UTF-8"),
        ] {
            let e = DatabaseUrl::parse(&format!("{base}?{bad}")).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // tokio-postgres reads the rest, with the mode.
        let pg = DatabaseUrl::parse(&format!("{base}?sslmode=verify-full&application_name=x"))
            .unwrap()
            .pg_config()
            .unwrap();
        assert_eq!(pg.get_ssl_mode(), SslMode::Require);
        assert_eq!(pg.get_application_name(), Some("x"));
        assert_eq!(pg.get_hosts().len(), 1);
        // No `sslmode`: TLS when offered, except on this machine.
        let mode = |url: &str| {
            DatabaseUrl::parse(url)
                .unwrap()
                .pg_config()
                .unwrap()
                .get_ssl_mode()
        };
        assert_eq!(mode(base), SslMode::Prefer);
        assert_eq!(mode("postgres://u@127.0.0.1/app"), SslMode::Disable);
        assert_eq!(
            mode("postgres://u@localhost/app?sslmode=prefer"),
            SslMode::Prefer
        );
        assert_eq!(
            mode("host=/run/postgresql,db.example dbname=app"),
            SslMode::Prefer
        );
    }

    #[test]
    fn sslmode_and_sslrootcert_come_out_of_a_key_value_string() {
        use Check::*;
        use Encrypt::*;
        assert_eq!(
            tls("host=db user=u sslmode = verify-full  sslrootcert='/a b/c\\'s.pem' dbname=app"),
            (
                "host=db user=u dbname=app".into(),
                Always,
                Full,
                Some("/a b/c's.pem".into())
            )
        );
        // Nothing taken: the text as it was.
        let spaced = "  host='x y'   password=a\\ b  ";
        assert_eq!(tls(spaced), (spaced.into(), IfRemote, Nothing, None));
        assert_eq!(
            tls("host='x y'   sslmode=disable password=a\\ b  "),
            ("host='x y' password=a\\ b".into(), Never, Nothing, None)
        );
        // A string that only looks like a URL once a pair is out stays a `key=value` string.
        assert_eq!(
            tls(" sslmode=disable postgresql://x=y").0,
            " postgresql://x=y"
        );
        assert_eq!(tls("sslmode=disable").0, "");
        for (bad, says) in [
            ("host", "has no value"),
            ("host=db sslrootcert='x", "no closing quote"),
            ("host=db password=x\\", "ends with a backslash"),
        ] {
            let e = DatabaseUrl::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let pg = DatabaseUrl::parse("host=db user=u sslmode=verify-ca dbname='my app'")
            .unwrap()
            .pg_config()
            .unwrap();
        assert_eq!(pg.get_dbname(), Some("my app"));
        assert_eq!(pg.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn a_unix_socket_has_no_host_name_and_needs_none() {
        // tokio-postgres asks for a connector with "" for a Unix socket, before it knows that
        // TLS will not be used there: the name is read only when a handshake begins.
        let mut connector = DatabaseUrl::parse("postgres://h/d?sslmode=verify-full")
            .unwrap()
            .tls
            .connector()
            .unwrap();
        let start = MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut connector, "");
        assert!(start.is_ok());
    }

    #[test]
    fn a_connector_needs_authorities_it_can_read() {
        let check = |roots: &str| {
            DatabaseUrl::parse(&format!(
                "postgres://h/d?sslmode=verify-ca&sslrootcert={roots}"
            ))
            .unwrap()
            .tls
            .connector()
            .map(drop)
        };
        let testdata = concat!(env!("CARGO_MANIFEST_DIR"), "/src/delivery/testdata");
        assert!(check(&format!("{testdata}/ca.pem")).is_ok());
        let missing = check("/nonexistent/ca.pem").unwrap_err();
        assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
        let none = check(&format!("{testdata}/README.md")).unwrap_err();
        assert!(none.contains("no certificate"), "{none}");
        // No file needed where nothing is checked, or the public roots are.
        for url in [
            "postgres://h/d?sslmode=require",
            "postgres://h/d?sslmode=verify-full",
        ] {
            assert!(DatabaseUrl::parse(url).unwrap().tls.connector().is_ok());
        }
    }
}
