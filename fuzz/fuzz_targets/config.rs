//! The configuration, from any arguments and environment an operator (or a deploy script) might
//! give: one line per argument, `NAME=value` lines starting with `TRIGGERS_` or `DATABASE_URL`
//! going to the environment. Parsing and validating never panics (no overflow in a duration, a
//! count or a product of two), and what it accepts is usable: every time is at most ten years and
//! the sizes derived from it are computed without overflow. The database URL's TLS parameters
//! (`sslmode`, `sslrootcert`, taken out before tokio-postgres reads the rest) are taken out
//! whole: what is left has none (read again, it asks nothing of TLS and stays as it is).
#![no_main]

use libfuzzer_sys::fuzz_target;
use triggers::config::{Config, TIME_OPTION_MAX};
use triggers::db::tls::{DatabaseUrl, Tls};

/// A URL read once more from what its first reading left is that text again, asking nothing.
fn taken_whole(url: &str) {
    if let Ok(first) = DatabaseUrl::parse(url) {
        let again = DatabaseUrl::parse(&first.pg).expect("what was left reads again");
        assert_eq!(again.pg, first.pg);
        assert_eq!(again.tls, Tls::default());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    taken_whole(text);
    let mut args = Vec::new();
    let mut env = Vec::new();
    for line in text.split('\n') {
        match line.split_once('=') {
            Some((k, v)) if k.starts_with("TRIGGERS_") || k == "DATABASE_URL" => {
                env.push((k.to_string(), v.to_string()))
            }
            _ => args.push(line.to_string()),
        }
    }
    let Ok((_, c)) = Config::from_args_and_env(args, env) else {
        return;
    };
    taken_whole(&c.database_url.pg);
    assert!(c.retry_delays().iter().all(|d| *d <= TIME_OPTION_MAX));
    for s in [
        c.delivery_lease_s,
        c.circuit_open_s,
        c.unsent_patience_s,
        c.endpoint_disable_after_s,
        c.secret_rotation_grace_s,
        c.key_rotation_retry_s,
        c.retry_after_max_s,
        c.shutdown_timeout_s,
    ] {
        assert!(s <= TIME_OPTION_MAX.as_secs(), "{s}");
    }
    // Connections per core within any open files limit: within the option and above 0.
    for open_files in [0, 1, 1024, c.descriptors_reserved() as u64, 1 << 20, u64::MAX] {
        let per_core = c.connections_within(open_files);
        assert!((1..=c.connections_per_core_max).contains(&per_core), "{per_core}");
    }
    std::hint::black_box((
        c.batch_body_max(),
        c.query_jobs_running_max(),
        c.recorder_queue_max(),
        c.delivery_pool_size(),
        c.delivery_endpoint_in_memory_max(),
    ));
});
