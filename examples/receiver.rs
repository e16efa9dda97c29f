//! A fast webhook receiver for load tests: answers every POST with 200 at once (HTTP/1.1
//! keep-alive), counts deliveries, and measures the end-to-end lag of each one (its `created_at`
//! to its arrival) into an HDR histogram.
//!
//!   cargo run --release --example receiver -- [listen] [stats-file]
//!
//! Defaults: 127.0.0.1:9999, loadtest/results/receiver.json. Every second it rewrites the stats
//! file with one JSON object: deliveries, distinct events, and lag percentiles in ms since the last
//! reset. `kill -USR1` resets the counters (the loadtest harness does that between phases).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Stats {
    deliveries: u64,
    events: HashSet<u128>,
    lag_us: Histogram<u64>,
    since: SystemTime,
}

impl Stats {
    fn new() -> Self {
        Stats {
            deliveries: 0,
            events: HashSet::new(),
            lag_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
            since: SystemTime::now(),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen = args
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:9999".into());
    let stats_file = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "loadtest/results/receiver.json".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let stats = Arc::new(Mutex::new(Stats::new()));
        let listener = TcpListener::bind(&listen).await.expect("bind the receiver");
        eprintln!("receiver listening on {listen}, stats in {stats_file}");
        let writer = Arc::clone(&stats);
        tokio::spawn(async move {
            let mut usr1 =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                    .unwrap();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = usr1.recv() => { *writer.lock().unwrap() = Stats::new(); }
                }
                let text = render(&writer.lock().unwrap());
                let tmp = format!("{stats_file}.tmp");
                if std::fs::write(&tmp, text).is_ok() {
                    let _ = std::fs::rename(&tmp, &stats_file);
                }
            }
        });
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(stream, Arc::clone(&stats)));
        }
    });
}

/// The quantiles of the lag written for the report's distribution chart.
const LAG_QUANTILES: [f64; 13] = [
    0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
];

fn render(s: &Stats) -> String {
    let secs = s
        .since
        .elapsed()
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
        .max(0.001);
    let ms = |q: f64| s.lag_us.value_at_quantile(q) as f64 / 1000.0;
    // The lag's distribution for the report's chart: [percentile, ms] pairs.
    let cdf = LAG_QUANTILES
        .iter()
        .map(|&q| format!("[{},{:.3}]", q * 100.0, ms(q)))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "{{\"deliveries\":{},\"events\":{},\"seconds\":{secs:.1},\"rate\":{:.0},\"lag_ms\":{{\"p50\":{:.2},\"p90\":{:.2},\"p99\":{:.2},\"max\":{:.2}}},\"lag_cdf\":[{cdf}]}}\n",
        s.deliveries,
        s.events.len(),
        s.deliveries as f64 / secs,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        s.lag_us.max() as f64 / 1000.0
    )
}

async fn serve(mut stream: TcpStream, stats: Arc<Mutex<Stats>>) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 65536];
    loop {
        // Complete requests in the buffer: head, then a Content-Length body.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let Ok(httparse::Status::Complete(head)) = req.parse(&buf) else {
                break;
            };
            let len = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .unwrap_or(0);
            if buf.len() < head + len {
                break;
            }
            let body = &buf[head..head + len];
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_micros() as i64;
            {
                let mut s = stats.lock().unwrap();
                s.deliveries += 1;
                if let Some((id, created)) = parse_body(body) {
                    s.events.insert(id);
                    let _ = s.lag_us.record((now - created).max(1) as u64);
                }
            }
            buf.drain(..head + len);
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The event id and `created_at` (µs since the epoch) of a delivery body.
fn parse_body(body: &[u8]) -> Option<(u128, i64)> {
    let text = std::str::from_utf8(body).ok()?;
    let id = text.split("\"event_id\":\"").nth(1)?.get(..36)?;
    let id = u128::from_str_radix(&id.replace('-', ""), 16).ok()?;
    let ts = text.rsplit("\"created_at\":\"").next()?.get(..26)?;
    Some((id, parse_rfc3339_micros(ts)?))
}

/// `2026-11-23T10:00:00.123456` (the server's format, `Z` dropped) to µs since the epoch.
fn parse_rfc3339_micros(s: &str) -> Option<i64> {
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, sec, us) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..26)?);
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) * 1_000_000) + us)
}
