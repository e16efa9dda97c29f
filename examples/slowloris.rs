//! A slowloris client for the hostile-input measurement: N connections, each sending one byte of a
//! never-ending request head per second, reconnecting when the server closes it (at its head
//! timeout). Cheap enough (one tokio thread) to share the box with the server and a load generator.
//!
//!   cargo run --release --example slowloris -- 127.0.0.1:8080 10000 SECONDS
//!
//! Prints how many connections were open at the end and how many reconnects happened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const HEAD: &[u8] = b"POST /api/events HTTP/1.1\r\nHost: slow\r\nX-Padding: ";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: slowloris ADDR CONNECTIONS SECONDS");
        std::process::exit(2);
    }
    let addr = args[0].clone();
    let n: usize = args[1].parse().expect("CONNECTIONS");
    let seconds: u64 = args[2].parse().expect("SECONDS");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let reconnects = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        for i in 0..n {
            let (addr, reconnects, open) =
                (addr.clone(), Arc::clone(&reconnects), Arc::clone(&open));
            tokio::spawn(async move {
                // Spread the first bytes over the first second, as a real client would.
                tokio::time::sleep(Duration::from_micros((i as u64 * 1_000_000) / n as u64)).await;
                loop {
                    let Ok(mut s) = TcpStream::connect(&addr).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    open.fetch_add(1, Ordering::Relaxed);
                    let mut sent = 0usize;
                    loop {
                        let byte = if sent < HEAD.len() { HEAD[sent] } else { b'a' };
                        if s.write_all(&[byte]).await.is_err() {
                            break;
                        }
                        sent += 1;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                    reconnects.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
    });
    println!(
        "{{\"open\":{},\"reconnects\":{}}}",
        open.load(Ordering::Relaxed),
        reconnects.load(Ordering::Relaxed)
    );
}
