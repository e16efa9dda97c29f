//! Micro-benchmarks of the hot path's pure parts, each compared with a saved baseline.
//!
//!   cargo bench --bench micro                    # run, compare with benches/baseline.json
//!   cargo bench --bench micro -- --save-baseline # run and make this the baseline
//!   cargo bench --bench micro -- parse           # only benchmarks whose name contains "parse"
//!
//! Each benchmark runs for a fixed time in several samples; the figure is the median nanoseconds
//! per operation. Compare figures from one machine only; the baseline file records which.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use triggers::auth::{KeyCache, OrgInfo};
use triggers::delivery::sign;
use triggers::flow::answer::RateSnapshot;
use triggers::flow::event::NewEvent;
use triggers::hosts::{Hosts, Use};
use triggers::ids::{new_v7, CoreId, EventId, Micros, OrgId};
use triggers::ingress::parse::{parse_head, Parsed};
use triggers::ingress::response::write_reply;
use triggers::json::{member_value_spans, Field, Parser};
use triggers::reply::Reply;
use triggers::shard::dedup::DedupWindow;
use triggers::shard::rate_limit::TokenBucket;
use triggers::shard::state::Shard;
use triggers::store::copy::{CopyEncoder, RowPlan};
use triggers::store::lanes::{Admitted, Lanes};
use triggers::url_policy::parse_url;

const BASELINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/baseline.json");
const SAMPLES: usize = 7;
const SAMPLE_TIME: Duration = Duration::from_millis(150);

const HEAD: &[u8] = b"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n\
X-API-Key: zap_live_04i65kZBSf3hCPs5zQAzL3BzcGf4H73TAPLDzULBHMfdC7C5OZxj5mS\r\nContent-Length: 209\r\n\r\n";
const BODY: &[u8] = br#"{"type":"order.created","payload":{"order_id":"ord_00001234","customer":"cus_4f9a8b7c","amount":4999,"currency":"usd","items":[{"sku":"sku_1234","qty":2},{"sku":"sku_5678","qty":1}],"note":"load test event"}}"#;

/// Median ns per call of `f`, which runs `per_call` operations each time.
fn measure(mut f: impl FnMut(), per_call: u64) -> f64 {
    // Warm up and find how many calls fill a sample.
    let mut calls = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        if t.elapsed() > SAMPLE_TIME / 10 {
            break;
        }
        calls *= 2;
    }
    calls *= 10;
    let mut samples: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                f();
            }
            t.elapsed().as_nanos() as f64 / (calls * per_call) as f64
        })
        .collect();
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[SAMPLES / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let save = args.iter().any(|a| a == "--save-baseline");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned();
    let mut results: BTreeMap<&str, f64> = BTreeMap::new();
    let mut run = |name: &'static str, f: &mut dyn FnMut() -> f64| {
        if filter.as_deref().is_none_or(|flt| name.contains(flt)) {
            results.insert(name, f());
        }
    };

    run("parse_head", &mut || {
        // Many requests back to back in one buffer, parsed one after the other.
        const N: usize = 256;
        let mut wire = Vec::with_capacity(N * (HEAD.len() + BODY.len()));
        for _ in 0..N {
            wire.extend_from_slice(HEAD);
            wire.extend_from_slice(BODY);
        }
        let wire = Bytes::from(wire);
        measure(
            || {
                let mut buf = BytesMut::from(&wire[..]);
                for _ in 0..N {
                    match parse_head(&mut buf) {
                        Ok(Parsed::Complete(head)) => {
                            let _ = buf.split_to(BODY.len());
                            black_box(head);
                        }
                        other => panic!("{other:?}"),
                    }
                }
            },
            N as u64,
        )
    });

    run("validate_event_body", &mut || {
        let mut parser = Parser::default();
        measure(
            || {
                let (t, p) = parser
                    .with_object(BODY, |b| {
                        (
                            matches!(b.get("type"), Some(Field::Str("order.created"))),
                            b.member_index("payload"),
                        )
                    })
                    .unwrap();
                assert!(t);
                let spans = member_value_spans(BODY).unwrap();
                black_box(&spans[p.unwrap()]);
            },
            1,
        )
    });

    run("token_bucket_take", &mut || {
        let mut bucket = TokenBucket::new(u32::MAX, 0);
        let mut now = 0u64;
        measure(
            || {
                now += 1;
                black_box(bucket.try_take(now, u32::MAX).unwrap());
            },
            1,
        )
    });

    run("shard_admit_with_dedup", &mut || {
        let mut shard = Shard::new(CoreId(0), 65_536);
        let org = OrgInfo {
            id: OrgId(new_v7(Micros::now())),
            limit: u32::MAX,
        };
        let ids: Vec<String> = (0..4096).map(|i| format!("order-{i}")).collect();
        let mut i = 0;
        measure(
            || {
                i = (i + 1) % ids.len();
                black_box(shard.admit(&org, Some(&ids[i])));
            },
            1,
        )
    });

    run("dedup_window_reserve_settle", &mut || {
        let mut window = DedupWindow::new(65_536);
        let mut key = 0u128;
        let id = EventId(new_v7(Micros::now()));
        measure(
            || {
                key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                black_box(window.check_and_reserve(key));
                window.settle(key, Some(id));
            },
            1,
        )
    });

    run("key_cache_hit", &mut || {
        let mut cache = KeyCache::new(65_536);
        let key = b"zap_live_04i65kZBSf3hCPs5zQAzL3BzcGf4H73TAPLDzULBHMfdC7C5OZxj5mS";
        let hash = cache.hash(key);
        let epoch = cache.epoch();
        cache.insert(
            hash,
            OrgInfo {
                id: OrgId(new_v7(Micros::now())),
                limit: 1,
            },
            epoch,
        );
        measure(
            || {
                let _ = black_box(cache.get(cache.hash(black_box(key))));
            },
            1,
        )
    });

    run("copy_encode_row", &mut || {
        let mut encoder = CopyEncoder::default();
        let event = NewEvent {
            id: EventId(new_v7(Micros::now())),
            org: OrgId(new_v7(Micros::now())),
            event_type: "order.created".into(),
            payload: Bytes::from_static(&BODY[36..BODY.len() - 1]),
            dedup_id: None,
            created_at: Micros::now(),
            traceparent: None,
        };
        measure(
            || {
                encoder.begin();
                for _ in 0..1000 {
                    encoder.row(
                        &event,
                        RowPlan {
                            status: 0,
                            endpoints: None,
                            batch: None,
                        },
                    );
                }
                black_box(encoder.finish());
            },
            1000,
        )
    });

    run("uuid_v7", &mut || {
        let now = Micros::now();
        measure(
            || {
                let _ = black_box(new_v7(now));
            },
            1,
        )
    });

    run("sign_standard_webhook", &mut || {
        let key = sign::secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = [b'x'; 300];
        measure(
            || {
                drop(black_box(sign::signature(
                    &key,
                    "01a20816-3728-7000-8016-7397ba174e15",
                    1_795_432_003,
                    &body,
                )))
            },
            1,
        )
    });

    // TLS to a receiver, both ends in memory (rustls with ring, as the delivery client uses
    // it; the receiver's end is rustls too): what a delivery to an https endpoint adds.
    run("tls_full_handshake", &mut || {
        let (client, server) = tls_configs();
        measure(
            || {
                black_box(tls_pair(&client, &server));
            },
            1,
        )
    });

    run("tls_exchange_kept_connection", &mut || {
        let (client, server) = tls_configs();
        let (mut c, mut s) = tls_pair(&client, &server);
        let request = [b'x'; 600];
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let mut buf = vec![0u8; 4096];
        measure(
            || {
                use std::io::{Read, Write};
                c.writer().write_all(&request).unwrap();
                tls_move(&mut c, &mut s);
                let mut got = 0;
                while got < request.len() {
                    got += s.reader().read(&mut buf).unwrap();
                }
                s.writer().write_all(answer).unwrap();
                tls_move(&mut s, &mut c);
                let mut got = 0;
                while got < answer.len() {
                    got += c.reader().read(&mut buf).unwrap();
                }
                black_box(&buf);
            },
            1,
        )
    });

    // A receiver's host for a new connection: looked up each time (getaddrinfo on a blocking
    // thread, as every connection did before `hosts`, and does with --delivery-dns-fresh-s 0;
    // "localhost" is answered from /etc/hosts, the cheapest lookup there is: a DNS server adds
    // its round trip), or kept (the default 30 s).
    for (name, fresh) in [
        ("host_resolve_per_connection", 0),
        ("host_resolve_kept", 3600),
    ] {
        run(name, &mut || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let url = parse_url("http://localhost:8080/in").unwrap();
            let hosts = Hosts::new(
                Duration::from_secs(fresh),
                Duration::ZERO,
                triggers::metrics::Metrics::new(&[("GET", "/")], 1),
            );
            measure(
                || {
                    black_box(
                        rt.block_on(hosts.resolve(&url, true, Use::Connect))
                            .unwrap(),
                    );
                },
                1,
            )
        });
    }

    // A store job's turn (`store::lanes`, taken under a lock on the asking core): one job of a
    // new tenant queued, started and finished while `tenants` others each have one waiting, as
    // under a flood of tenants (keyless work by client address: a botnet's bad keys).
    for (name, tenants) in [
        ("lanes_turn_16_tenants", 16u32),
        ("lanes_turn_4096_tenants", 4096),
    ] {
        run(name, &mut || {
            let mut lanes = Lanes::new(64, 8, 4096);
            let now = Instant::now();
            for t in 0..tenants {
                assert_eq!(lanes.admit(t, (), now), Admitted::Queued);
            }
            // Every slot busy but one, so each turn starts exactly the job just queued or one
            // of the others: the walk's length is what is measured.
            let mut running = Vec::new();
            while running.len() < 63 {
                let Some((t, _, ())) = lanes.start_next() else {
                    break;
                };
                running.push(t);
            }
            let mut next = tenants;
            measure(
                || {
                    next += 1;
                    black_box(lanes.admit(next, (), now));
                    let (t, _, ()) = lanes.start_next().unwrap();
                    lanes.finished(t);
                },
                1,
            )
        });
    }

    run("write_201_response", &mut || {
        let reply = Reply::json(
            201,
            &br#"{"id":"01a20816-3728-7000-8016-7397ba174e15","status":"accepted","created_at":"2026-11-23T11:06:43.368749Z"}"#[..],
        )
        .with_rate(Some(RateSnapshot { limit: 100_000, remaining: 99_999, reset_s: 1 }));
        let mut out = Vec::with_capacity(512);
        measure(
            || {
                out.clear();
                write_reply(&mut out, &reply, true, b"Mon, 23 Nov 2026 10:10:16 GMT");
                black_box(&out);
            },
            1,
        )
    });

    let baseline: BTreeMap<String, f64> = std::fs::read_to_string(BASELINE)
        .ok()
        .map(|text| parse_baseline(&text))
        .unwrap_or_default();
    println!(
        "{:<30} {:>12} {:>12} {:>9}",
        "benchmark", "ns/op", "baseline", "change"
    );
    for (name, ns) in &results {
        match baseline.get(*name) {
            Some(base) => println!(
                "{name:<30} {ns:>12.1} {base:>12.1} {:>+8.1}%",
                (ns / base - 1.0) * 100.0
            ),
            None => println!("{name:<30} {ns:>12.1} {:>12} {:>9}", "-", "-"),
        }
    }
    if save {
        let mut all = baseline;
        for (name, ns) in &results {
            all.insert(name.to_string(), *ns);
        }
        let body: Vec<String> = all
            .iter()
            .map(|(k, v)| format!("  \"{k}\": {v:.1}"))
            .collect();
        std::fs::write(BASELINE, format!("{{\n{}\n}}\n", body.join(",\n")))
            .expect("write the baseline");
        println!("baseline saved to {BASELINE}");
    }
}

/// The flat `{"name": ns, ...}` object the baseline is saved as.
fn parse_baseline(text: &str) -> BTreeMap<String, f64> {
    text.trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once(':')?;
            Some((
                k.trim().trim_matches('"').to_string(),
                v.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// A client config that trusts the test authority and never resumes (every handshake is a full
/// one), and a server config with the authority's certificate for `localhost`.
fn tls_configs() -> (
    std::sync::Arc<rustls::ClientConfig>,
    std::sync::Arc<rustls::ServerConfig>,
) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/delivery/testdata/");
    let read = |name: &str| std::fs::read(format!("{DATA}{name}")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&read("ca.pem")).unwrap())
        .unwrap();
    // The server's own set-up (src/tls.rs).
    let mut client = triggers::tls::client(roots);
    client.resumption = rustls::client::Resumption::disabled();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(&read("leaf.pem")).unwrap()],
            PrivateKeyDer::from_pem_slice(&read("leaf.key")).unwrap(),
        )
        .unwrap();
    (std::sync::Arc::new(client), std::sync::Arc::new(server))
}

/// A client and a server connection, handshaken.
fn tls_pair(
    client: &std::sync::Arc<rustls::ClientConfig>,
    server: &std::sync::Arc<rustls::ServerConfig>,
) -> (rustls::ClientConnection, rustls::ServerConnection) {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = rustls::ClientConnection::new(std::sync::Arc::clone(client), name).unwrap();
    let mut s = rustls::ServerConnection::new(std::sync::Arc::clone(server)).unwrap();
    while c.is_handshaking() || s.is_handshaking() {
        tls_move(&mut c, &mut s);
        tls_move(&mut s, &mut c);
    }
    (c, s)
}

/// Everything `from` has to send, into `to`, processed.
fn tls_move<A, B, DA, DB>(from: &mut A, to: &mut B)
where
    A: std::ops::DerefMut<Target = rustls::ConnectionCommon<DA>>,
    B: std::ops::DerefMut<Target = rustls::ConnectionCommon<DB>>,
    DA: rustls::SideData,
    DB: rustls::SideData,
{
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
        to.process_new_packets().unwrap();
    }
}
