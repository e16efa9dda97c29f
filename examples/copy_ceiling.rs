//! The ceiling: how fast PostgreSQL on this machine takes the same rows the server writes, by
//! binary COPY with the server's own encoder, into the real `events` table, with nothing else in
//! the way (no HTTP, no queues, no load generator). Every server figure is reported as a share of
//! this one, measured in the same run.
//!
//!   DATABASE_URL=postgres://… cargo run --release --example copy_ceiling -- [rows] [batch] [connections]
//!
//! Defaults: 400,000 rows, batches of 5,000, 2 connections. Prints one JSON line.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::SinkExt;
use triggers::flow::event::NewEvent;
use triggers::ids::{new_v7, EventId, Micros, OrgId};
use triggers::store::copy::{CopyEncoder, RowPlan, COPY_EVENTS};

const PAYLOAD: &str = r#"{"order_id":"ord_00001234","customer":"cus_4f9a8b7c","amount":4999,"currency":"usd","items":[{"sku":"sku_1234","qty":2},{"sku":"sku_5678","qty":1}],"note":"load test event"}"#;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    let (rows, batch, connections) = (arg(0, 400_000), arg(1, 5_000), arg(2, 2));
    let url = match std::env::var("DATABASE_URL") {
        Ok(u) => u,
        Err(_) => {
            eprintln!("copy_ceiling: set DATABASE_URL (loadtest/run.sh does)");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(connections.max(1))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut setup = connect(&url).await;
        let applied = triggers::store::migrate::migrate(&mut setup).await.expect("migrate");
        let _ = applied;
        // 200 organizations, as in the load tests.
        let orgs: Arc<Vec<OrgId>> = Arc::new((0..200).map(|_| OrgId(new_v7(Micros::now()))).collect());
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (url, orgs, next) = (url.clone(), Arc::clone(&orgs), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                let client = connect(&url).await;
                let statement = client.prepare(COPY_EVENTS).await.unwrap();
                let mut encoder = CopyEncoder::default();
                let payload = Bytes::from_static(PAYLOAD.as_bytes());
                loop {
                    let start = next.fetch_add(batch, Ordering::Relaxed);
                    if start >= rows {
                        break;
                    }
                    let n = batch.min(rows - start);
                    encoder.begin();
                    for i in 0..n {
                        let now = Micros::now();
                        let event = NewEvent {
                            id: EventId(new_v7(now)),
                            org: orgs[(start + i) % orgs.len()],
                            event_type: "order.created".into(),
                            payload: payload.clone(),
                            dedup_id: None,
                            created_at: now,
                            traceparent: None,
                        };
                        let plan = RowPlan {
                            status: 0,
                            endpoints: None,
                            batch: None,
                        };
                        encoder.row(&event, plan);
                    }
                    let sink = client.copy_in::<_, Bytes>(&statement).await.unwrap();
                    futures_util::pin_mut!(sink);
                    sink.send(encoder.finish()).await.unwrap();
                    sink.finish().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{{\"bench\":\"copy_ceiling\",\"rows\":{rows},\"batch\":{batch},\"connections\":{connections},\"seconds\":{secs:.2},\"rows_per_s\":{:.0}}}",
            rows as f64 / secs
        );
    });
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}
