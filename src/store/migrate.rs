//! Migrations: the plain SQL files of `migrations/`, compiled into the binary, applied in order at
//! start and by `triggers migrate`. An advisory lock makes nodes that start together take turns;
//! each file runs in its own transaction with its version recorded.

use tokio_postgres::Client;

use crate::db::describe;

/// (version, file name, SQL), in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "0001_init.sql",
        include_str!("../../migrations/0001_init.sql"),
    ),
    (
        2,
        "0002_probe.sql",
        include_str!("../../migrations/0002_probe.sql"),
    ),
    (
        3,
        "0003_endpoints.sql",
        include_str!("../../migrations/0003_endpoints.sql"),
    ),
    (
        4,
        "0004_retention.sql",
        include_str!("../../migrations/0004_retention.sql"),
    ),
    (
        5,
        "0005_traceparent.sql",
        include_str!("../../migrations/0005_traceparent.sql"),
    ),
    (
        6,
        "0006_rate_budgets.sql",
        include_str!("../../migrations/0006_rate_budgets.sql"),
    ),
    (
        7,
        "0007_distribution_keys.sql",
        include_str!("../../migrations/0007_distribution_keys.sql"),
    ),
    (
        8,
        "0008_claimed_batches.sql",
        include_str!("../../migrations/0008_claimed_batches.sql"),
    ),
    (
        9,
        "0009_redelivered_batches.sql",
        include_str!("../../migrations/0009_redelivered_batches.sql"),
    ),
    (
        10,
        "0010_delivery_leases.sql",
        include_str!("../../migrations/0010_delivery_leases.sql"),
    ),
    (
        11,
        "0011_endpoint_budgets.sql",
        include_str!("../../migrations/0011_endpoint_budgets.sql"),
    ),
    (
        12,
        "0012_endpoint_budget_shares.sql",
        include_str!("../../migrations/0012_endpoint_budget_shares.sql"),
    ),
    (
        13,
        "0013_endpoint_headers.sql",
        include_str!("../../migrations/0013_endpoint_headers.sql"),
    ),
    (
        14,
        "0014_endpoint_idempotency.sql",
        include_str!("../../migrations/0014_endpoint_idempotency.sql"),
    ),
    (
        15,
        "0015_key_rotation_retry.sql",
        include_str!("../../migrations/0015_key_rotation_retry.sql"),
    ),
    (
        16,
        "0016_retention_pace.sql",
        include_str!("../../migrations/0016_retention_pace.sql"),
    ),
    (
        17,
        "0017_generate_retry.sql",
        include_str!("../../migrations/0017_generate_retry.sql"),
    ),
];

/// Arbitrary constant naming the migration lock.
pub const LOCK_ID: i64 = 0x7472_6967_6765_7273; // "triggers"

/// Take the migration lock (`$1`: [`LOCK_ID`]) and read the session's values of
/// [`SESSION_SETTINGS`] and the server's `fsync`, in one round trip.
pub const LOCK_AND_SETTINGS: &str =
    "SELECT current_setting('idle_in_transaction_session_timeout'), \
     current_setting('jit'), current_setting('synchronous_commit'), current_setting('fsync') \
     FROM pg_advisory_lock($1) AS locked";

/// The session settings every connection of the server asks for at start-up (`db::pg_config`),
/// with the value that shows it was not taken (`synchronous_commit`: `off`, with which a crash of
/// the database's machine loses the last events answered 201, whoever set it).
pub const SESSION_SETTINGS: [(&str, &str); 3] = [
    ("idle_in_transaction_session_timeout", "0"),
    ("jit", "on"),
    ("synchronous_commit", "off"),
];

/// Apply pending migrations; returns the versions applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, String> {
    // The lock comes first: even CREATE TABLE IF NOT EXISTS fails when two nodes run it at once.
    // The same round trip reads the session's settings.
    let row = client
        .query_one(LOCK_AND_SETTINGS, &[&LOCK_ID])
        .await
        .map_err(|e| describe(&e))?;
    let not_taken = settings_not_taken(&[row.get(0), row.get(1), row.get(2)]);
    if !not_taken.is_empty() {
        tracing::warn!(
            settings = not_taken.join(", "),
            "sessions lack this server's settings: the URL's options ask otherwise \
             (synchronous_commit = off: a crash of the database's machine loses events answered \
             201), or a pooler drops the `options` parameter: set them on the role, ALTER ROLE \
             <user> SET idle_in_transaction_session_timeout = '5s'; … jit = off; … \
             synchronous_commit = on (README, \"Behind a connection pooler\")"
        );
    }
    if row.get::<_, &str>(3) == "off" {
        tracing::warn!(
            "PostgreSQL runs with fsync = off: a crash of its machine loses events answered 201 \
             and may leave the database corrupt (README, Durability)"
        );
    }
    let result = apply_pending(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_ID])
        .await;
    let applied = result.map_err(|e| describe(&e))?;
    unlock.map_err(|e| describe(&e))?;
    Ok(applied)
}

/// The names of [`SESSION_SETTINGS`] whose `values` (in that order) are what a session has when it
/// did not take the server's.
pub fn settings_not_taken(values: &[&str]) -> Vec<&'static str> {
    SESSION_SETTINGS
        .iter()
        .zip(values)
        .filter(|((_, untaken), value)| *untaken == **value)
        .map(|((name, _), _)| *name)
        .collect()
}

async fn apply_pending(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS triggers_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let done: Vec<i32> = client
        .query("SELECT version FROM triggers_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO triggers_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "migration applied");
        applied.push(*version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_a_session_did_not_take_are_named() {
        assert_eq!(
            settings_not_taken(&["0", "on", "off"]),
            [
                "idle_in_transaction_session_timeout",
                "jit",
                "synchronous_commit"
            ]
        );
        assert_eq!(settings_not_taken(&["5s", "on", "on"]), ["jit"]);
        assert!(settings_not_taken(&["5s", "off", "on"]).is_empty());
        // Set on the role (or in the URL) to another value than the server's: taken all the
        // same; only `off` loses acknowledged events.
        assert!(settings_not_taken(&["1min", "off", "remote_apply"]).is_empty());
        assert_eq!(
            settings_not_taken(&["5s", "off", "off"]),
            ["synchronous_commit"]
        );
    }

    #[test]
    fn every_file_in_migrations_is_listed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.1).collect();
        assert_eq!(files, listed);
        for (i, (version, name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
            assert!(name.starts_with(&format!("{version:04}_")));
        }
    }
}
