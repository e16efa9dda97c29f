//! An open-loop load generator for latency at a fixed rate, cheap enough to share two cores with
//! the server: request k is due at start + k/rate, over keep-alive connections, one thread. When a
//! request goes out late because its connection was still waiting for the server, its latency
//! counts from the due time (a stall is counted, not hidden: no coordinated omission); when it only
//! went out late because the generator's timer (1 ms granularity) woke late, from when it was sent.
//!
//!   cargo run --release --example openloop -- URL RATE SECONDS CONNECTIONS KEYS_FILE [OUT_JSON]
//!
//! Posts the load-test event (as loadtest/ingest.lua does) with the keys of KEYS_FILE in turn, and
//! prints (and writes to OUT_JSON) the achieved rate, latency percentiles and statuses.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Shared {
    next: Cell<u64>,
    total: u64,
    start: Instant,
    interval: Duration,
    requests: Vec<Vec<u8>>,
    latency_us: RefCell<Histogram<u64>>,
    /// The worst latency of the requests due in each second of the run: where a stall was.
    worst_us_by_second: RefCell<Vec<u64>>,
    statuses: RefCell<BTreeMap<u16, u64>>,
    errors: Cell<u64>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!("usage: openloop URL RATE SECONDS CONNECTIONS KEYS_FILE [OUT_JSON]");
        std::process::exit(2);
    }
    let url = &args[0];
    let rate: f64 = args[1].parse().expect("RATE");
    let seconds: f64 = args[2].parse().expect("SECONDS");
    let connections: usize = args[3].parse().expect("CONNECTIONS");
    let keys: Vec<String> = std::fs::read_to_string(&args[4])
        .expect("KEYS_FILE")
        .lines()
        .filter(|k| k.len() == 64)
        .map(str::to_string)
        .collect();
    let out = args.get(5).cloned();
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let requests = (0..keys.len().max(1) * 4)
        .map(|i| {
            let key = &keys[i % keys.len()];
            let body = format!(
                "{{\"type\":\"order.created\",\"payload\":{{\"order_id\":\"ord_{i:08}\",\"customer\":\"cus_4f9a8b7c\",\"amount\":{},\"currency\":\"usd\",\"items\":[{{\"sku\":\"sku_1234\",\"qty\":2}},{{\"sku\":\"sku_5678\",\"qty\":1}}],\"note\":\"load test event\"}}}}",
                i % 10000
            );
            format!(
                "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nX-API-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .collect();
    let shared = Rc::new(Shared {
        next: Cell::new(0),
        total: (rate * seconds) as u64,
        start: Instant::now() + Duration::from_millis(200),
        interval: Duration::from_secs_f64(1.0 / rate),
        requests,
        latency_us: RefCell::new(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        worst_us_by_second: RefCell::new(vec![0; seconds.ceil() as usize + 1]),
        statuses: RefCell::new(BTreeMap::new()),
        errors: Cell::new(0),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let authority = authority.to_string();
    local.block_on(&rt, async {
        let mut tasks = Vec::new();
        for _ in 0..connections {
            tasks.push(tokio::task::spawn_local(connection(
                Rc::clone(&shared),
                authority.clone(),
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let elapsed = shared.start.elapsed().as_secs_f64();
    let h = shared.latency_us.borrow();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let statuses: Vec<String> = shared
        .statuses
        .borrow()
        .iter()
        .map(|(s, n)| format!("\"{s}\":{n}"))
        .collect();
    let json = format!(
        "{{\"offered\":{rate},\"achieved\":{:.1},\"p50\":{:.3},\"p90\":{:.3},\"p99\":{:.3},\"p999\":{:.3},\"max\":{:.3},\"statuses\":{{{}}},\"errors\":{},\"worst_ms_by_second\":[{}]}}",
        h.len() as f64 / elapsed,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        statuses.join(","),
        shared.errors.get(),
        shared
            .worst_us_by_second
            .borrow()
            .iter()
            .map(|us| format!("{:.1}", *us as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("{json}");
    if let Some(path) = out {
        std::fs::write(path, format!("{json}\n")).expect("write OUT_JSON");
    }
}

/// One keep-alive connection: take the next due request, send it at its time, read the answer.
async fn connection(shared: Rc<Shared>, authority: String) {
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    let mut free_since = Instant::now();
    loop {
        let k = shared.next.get();
        if k >= shared.total {
            return;
        }
        shared.next.set(k + 1);
        let due = shared.start + shared.interval.mul_f64(k as f64);
        tokio::time::sleep_until(due.into()).await;
        // Busy past the due time: the server held us up, count from the due time.
        let from = if free_since > due {
            due
        } else {
            Instant::now()
        };
        if stream.is_none() {
            match TcpStream::connect(&authority).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stream = Some(s);
                }
                Err(_) => {
                    shared.errors.set(shared.errors.get() + 1);
                    continue;
                }
            }
        }
        let s = stream.as_mut().expect("connected above");
        let request = &shared.requests[k as usize % shared.requests.len()];
        let answer = exchange(s, request, &mut buf).await;
        free_since = Instant::now();
        match answer {
            Some(status) => {
                let us = from.elapsed().as_micros().max(1) as u64;
                let _ = shared.latency_us.borrow_mut().record(us);
                let second = due.saturating_duration_since(shared.start).as_secs() as usize;
                if let Some(w) = shared.worst_us_by_second.borrow_mut().get_mut(second) {
                    *w = (*w).max(us);
                }
                *shared.statuses.borrow_mut().entry(status).or_default() += 1;
            }
            None => {
                shared.errors.set(shared.errors.get() + 1);
                stream = None;
            }
        }
    }
}

/// Send one request and read its response; the status, or `None` if the connection failed.
async fn exchange(s: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> Option<u16> {
    s.write_all(request).await.ok()?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(buf) {
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            let status = resp.code?;
            while buf.len() < head + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(status);
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
