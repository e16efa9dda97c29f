//! Connections to PostgreSQL, shared by the store and delivery pools (each builds its own pool and
//! owns its SQL): connection settings from the configuration, pool construction, and which
//! database errors mean "the database is in trouble" rather than "this data is bad".

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::config::{Config, DB_CONNECT_RETRY, DB_KEEPALIVE_IDLE};

/// The PostgreSQL connection settings from the config.
pub fn pg_config(config: &Config) -> Result<tokio_postgres::Config, String> {
    let mut pg: tokio_postgres::Config = config
        .database_url
        .parse()
        .map_err(|e| format!("--database-url: {e}"))?;
    pg.connect_timeout(Config::ms(config.db_connect_timeout_ms));
    pg.keepalives(true);
    pg.keepalives_idle(DB_KEEPALIVE_IDLE);
    if pg.get_application_name().is_none() {
        pg.application_name("triggers");
    }
    Ok(pg)
}

/// A connection pool of `size` with the configured timeouts.
pub fn build_pool(config: &Config, size: usize) -> Result<Pool, String> {
    build_pool_with(config, size, pg_config(config)?)
}

/// The delivery pool's connections: its writes (attempt outcomes, leases) commit without waiting
/// for the disk. A crash that loses the last milliseconds of them only means those events are
/// delivered again (at-least-once); events themselves are always written synchronously.
pub fn build_bookkeeping_pool(config: &Config, size: usize) -> Result<Pool, String> {
    let mut pg = pg_config(config)?;
    let options = match pg.get_options() {
        Some(o) => format!("{o} -c synchronous_commit=off"),
        None => "-c synchronous_commit=off".to_string(),
    };
    pg.options(options);
    build_pool_with(config, size, pg)
}

fn build_pool_with(
    config: &Config,
    size: usize,
    pg: tokio_postgres::Config,
) -> Result<Pool, String> {
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let connect = Config::ms(config.db_connect_timeout_ms);
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(connect))
        .create_timeout(Some(connect))
        .recycle_timeout(Some(connect))
        .build()
        .map_err(|e| format!("database pool: {e}"))
}

/// Connect once, retrying for up to `patience` while the database starts.
pub async fn connect(
    config: &Config,
    patience: Duration,
) -> Result<tokio_postgres::Client, String> {
    let pg = pg_config(config)?;
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match pg.connect(tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection closed");
                    }
                });
                return Ok(client);
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(DB_CONNECT_RETRY).await;
            }
            Err(e) => return Err(format!("cannot connect to the database: {e}")),
        }
    }
}

/// Whether a database error means the database (or the connection to it) is gone, as opposed to
/// a problem with this statement's data.
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // Class 08: connection exception; 57P01-03: admin shutdown, crash shutdown, cannot connect now.
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P") || c == "53300"
        }
        None => true,
    }
}
