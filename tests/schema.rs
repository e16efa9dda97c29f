//! The schema's promises that no single query shows: every table of an organization's data can be
//! distributed by `org_id` (docs/scale-out.md).

mod common;

use common::*;

/// Tables that are not an organization's data: on Citus they are reference tables (the
/// organizations themselves, looked up by key id; one probe row per node) or stay on the
/// coordinator (the migration ledger, the pace of retention). A new table must be added here on purpose, or carry
/// `org_id` in every key.
const NOT_DISTRIBUTED: [&str; 4] = [
    "organizations",
    "triggers_probe",
    "triggers_migrations",
    "triggers_retention",
];

/// Proves the data model is ready to be distributed by organization: every other table (and so
/// every partition, which inherits them) has a NOT NULL `org_id`, and every primary and unique key
/// includes it (Citus refuses a unique key without the distribution column).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_an_organizations_data_includes_org_id() {
    // A server start has migrated the database to the current schema.
    let _s = Server::start(&[]);
    let client = db().await;
    let tables: Vec<(String, Option<bool>)> = client
        .query(
            "SELECT c.relname::text, a.attnotnull \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'org_id' \
                                      AND NOT a.attisdropped \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') \
               AND NOT c.relispartition \
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let names: Vec<&str> = tables.iter().map(|(t, _)| t.as_str()).collect();
    for expected in [
        "events",
        "deliveries",
        "delivery_attempts",
        "delivery_batches",
        "endpoints",
        "dedup_keys",
        "rate_budgets",
        "endpoint_budgets",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let mut checked = 0;
    for (table, org_id_not_null) in &tables {
        if NOT_DISTRIBUTED.contains(&table.as_str()) {
            continue;
        }
        assert_eq!(
            *org_id_not_null,
            Some(true),
            "{table} has no NOT NULL org_id"
        );
        let keys: Vec<(String, bool)> = client
            .query(
                "SELECT i.indexrelid::regclass::text, bool_or(a.attname = 'org_id') \
                 FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1::text::regclass AND i.indisunique \
                 GROUP BY 1",
                &[table],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (index, has_org) in &keys {
            assert!(has_org, "unique key {index} of {table} lacks org_id");
        }
        // Every one of these tables has a primary key (or, for the append-only attempt log, none
        // at all: no unique key to distribute).
        if table != "delivery_attempts" {
            assert!(!keys.is_empty(), "{table} has no primary key");
        }
        checked += 1;
    }
    assert!(checked >= 7, "{checked} tables checked");
}
