//! Keys and organizations: generate, info, rotate (old key refused everywhere at once), the admin
//! token, and the webhook configuration's rules.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use serde_json::json;

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(&[]))
}

fn generate_body(body: serde_json::Value) -> Vec<u8> {
    body.to_string().into_bytes()
}

async fn generate(addr: std::net::SocketAddr, body: serde_json::Value) -> Response {
    call(
        addr,
        "POST",
        "/api/keys/generate",
        &[("Content-Type", "application/json")],
        Some(&generate_body(body)),
    )
    .await
}

#[tokio::test]
async fn generate_returns_a_64_character_key_once() {
    let s = server();
    for (tier, limit) in [
        ("free", 100),
        ("pro", 1000),
        ("business", 10_000),
        ("enterprise", 100_000),
    ] {
        let r = generate(
            s.addr,
            json!({"organization_name": "Acme Ltd", "tier": tier}),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json();
        let key = v["api_key"].as_str().unwrap();
        assert_eq!(key.len(), 64);
        assert!(key.starts_with("zap_live_"));
        assert!(key[9..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(v["organization_name"], "Acme Ltd");
        assert_eq!(v["tier"], tier);
        assert_eq!(v["rate_limit_per_minute"], limit);
        assert!(uuid::Uuid::parse_str(v["organization_id"].as_str().unwrap()).is_ok());
        assert!(v["created_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v.as_object().unwrap().len(), 6, "{v}");
        // Only a hash of the secret is stored.
        let row = db()
            .await
            .query_one(
                "SELECT key_hash, key_prefix FROM organizations WHERE id = $1::text::uuid",
                &[&v["organization_id"].as_str().unwrap()],
            )
            .await
            .unwrap();
        let hash: String = row.get(0);
        assert!(hash.starts_with("$argon2id$"));
        assert!(!hash.contains(&key[25..]));
        assert_eq!(row.get::<_, String>(1), &key[..25]);
    }
    // Default tier, and the org_name alias.
    let v = generate(s.addr, json!({"org_name": "Alias Inc"}))
        .await
        .json();
    assert_eq!(
        (v["tier"].as_str(), v["organization_name"].as_str()),
        (Some("free"), Some("Alias Inc"))
    );
}

#[tokio::test]
async fn generate_validates_name_and_tier() {
    let s = server();
    for (body, field) in [
        (json!({}), "organization_name"),
        (json!({"organization_name": ""}), "organization_name"),
        (
            json!({"organization_name": "x".repeat(256)}),
            "organization_name",
        ),
        (json!({"organization_name": 12}), "organization_name"),
        (json!({"organization_name": "A", "tier": "gold"}), "tier"),
        (json!({"organization_name": "A", "tier": 3}), "tier"),
    ] {
        let r = generate(s.addr, body.clone()).await;
        assert_eq!(r.status, 422, "{body}");
        assert_eq!(error_code(&r), "validation_failed");
        assert_eq!(r.json()["field"], field, "{body}");
    }
    let r = call(
        s.addr,
        "POST",
        "/api/keys/generate",
        &[],
        Some(b"{\"organization_name\":\"a\"}"),
    )
    .await;
    assert_eq!(r.status, 415);
    let r = call(
        s.addr,
        "POST",
        "/api/keys/generate",
        &[("Content-Type", "application/json")],
        Some(b"{oops"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(error_code(&r), "invalid_json");
}

#[tokio::test]
async fn key_info_describes_the_organization() {
    let s = server();
    let (key, org) = new_org(s.addr, "business").await;
    let r = get(s.addr, &key, "/api/keys").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["organization_id"], org.as_str());
    assert_eq!(v["organization_name"], "test-business");
    assert_eq!(v["tier"], "business");
    assert_eq!(v["rate_limit_per_minute"], 10_000);
    assert_eq!(v["webhook_url"], serde_json::Value::Null);
    assert_eq!(v["key_prefix"], &key[..25]);
    assert_eq!(v["rotated_at"], serde_json::Value::Null);
    assert!(v["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v.as_object().unwrap().len(), 8);
    assert_eq!(r.header("x-ratelimit-limit"), Some("10000"));
}

#[tokio::test]
async fn rotation_refuses_the_old_key_on_every_core_at_once() {
    let s = server();
    let (old, org) = new_org(s.addr, "pro").await;
    // Warm the old key into both cores' caches: many connections land on both.
    for _ in 0..20 {
        assert_eq!(get(s.addr, &old, "/api/keys").await.status, 200);
    }
    let r = post_empty(s.addr, &old, "/api/keys/rotate").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let new = v["api_key"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(new.len(), 64);
    assert_eq!(v["organization_id"], org.as_str());
    assert_eq!(v["organization_name"], "test-pro");
    assert!(v["rotated_at"].as_str().unwrap().ends_with('Z'));
    // From now on, on any connection and core, the old key is refused and the new one works.
    for _ in 0..20 {
        let r = get(s.addr, &old, "/api/keys").await;
        assert_eq!(r.status, 401);
        assert_eq!(error_code(&r), "unauthorized");
        let r = get(s.addr, &new, "/api/keys").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["key_prefix"], &new[..25]);
        assert_eq!(r.json()["rotated_at"], v["rotated_at"]);
    }
}

#[tokio::test]
async fn rotation_reaches_another_node_within_a_second() {
    // Two server processes on one database: a key rotated on one is refused by the other.
    let a = server();
    let b = Server::start(&[]);
    let (old, _) = new_org(a.addr, "pro").await;
    assert_eq!(
        get(b.addr, &old, "/api/keys").await.status,
        200,
        "cached on node B"
    );
    let new = post_empty(a.addr, &old, "/api/keys/rotate").await.json()["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        if get(b.addr, &old, "/api/keys").await.status == 401 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node B still accepts the rotated key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(b.addr, &new, "/api/keys").await.status, 200);
}

#[tokio::test]
async fn admin_token_guards_key_generation() {
    let s = Server::start(&["--admin-token", "correct-horse-battery-staple"]);
    let body = generate_body(json!({"organization_name": "A"}));
    let ct = ("Content-Type", "application/json");
    let r = call(s.addr, "POST", "/api/keys/generate", &[ct], Some(&body)).await;
    assert_eq!(r.status, 401);
    assert_eq!(error_code(&r), "unauthorized");
    let r = call(
        s.addr,
        "POST",
        "/api/keys/generate",
        &[ct, ("Authorization", "Bearer wrong-token-xxxxxxxx")],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = call(
        s.addr,
        "POST",
        "/api/keys/generate",
        &[ct, ("Authorization", "Bearer correct-horse-battery-staple")],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn repeated_bad_keys_from_one_address_are_throttled() {
    let s = Server::start(&["--auth-failures-per-minute", "5"]);
    let (good, _) = new_org(s.addr, "pro").await;
    let (verified, _) = new_org(s.addr, "pro").await;
    assert_eq!(get(s.addr, &verified, "/api/keys").await.status, 200);
    let mut throttled = None;
    for i in 0..30 {
        // Distinct well-formed keys for a real key id: each would cost an Argon2 run.
        let bad = format!("{}{:0>39}", &good[..25], i);
        let r = get(s.addr, &bad, "/api/keys").await;
        if r.status == 401 {
            assert_eq!(error_code(&r), "unauthorized");
            continue;
        }
        // Refused without checking: 429, not 401 (the key was never looked at).
        assert_eq!(r.status, 429);
        assert_eq!(error_code(&r), "rate_limited");
        assert!(r.header("retry-after").is_some());
        assert!(r.json()["error"]
            .as_str()
            .unwrap()
            .contains("too many failed"));
        throttled = Some(i);
        break;
    }
    assert!(matches!(throttled, Some(5..=7)), "{throttled:?}");
    // Keys this node verified or issued before the flood keep working, on every core.
    for _ in 0..10 {
        assert_eq!(get(s.addr, &verified, "/api/keys").await.status, 200);
        assert_eq!(get(s.addr, &good, "/api/keys").await.status, 200);
    }
}

#[tokio::test]
async fn webhook_configuration_rules() {
    let s = server();
    let (key, org) = new_org(s.addr, "pro").await;
    for (url, why) in [
        (json!("ftp://example.com/x"), "http or https"),
        (json!("not a url"), "valid absolute URL"),
        (
            json!(format!("https://example.com/{}", "a".repeat(2048))),
            "2048",
        ),
        // Private targets and names that don't resolve get one sentence that names neither the
        // address nor which of the two it was: no oracle for internal DNS.
        (
            json!("http://127.0.0.1:9/hook"),
            "not resolve to a public address",
        ),
        (
            json!("http://10.0.0.5/hook"),
            "not resolve to a public address",
        ),
        (
            json!("http://169.254.169.254/latest/meta-data"),
            "not resolve to a public address",
        ),
        (
            json!("http://100.64.1.1/"),
            "not resolve to a public address",
        ),
        (json!("http://[::1]/"), "not resolve to a public address"),
        (
            json!("http://localhost:8080/"),
            "not resolve to a public address",
        ),
        (
            json!("http://does-not-exist.invalid/"),
            "not resolve to a public address",
        ),
        (json!("http://127.0.0.1:99999/hook"), "1 to 65535"),
        (json!("http://example.com:0/hook"), "1 to 65535"),
        (json!(5), "must be a string"),
    ] {
        // A name that does not exist is asked of this machine's DNS: a resolver that fails for
        // now is a 503 (the server's trouble, drilled in tests/durability.rs), asked again here.
        let mut r = None;
        for _ in 0..3 {
            let answer = post(
                s.addr,
                &key,
                "/api/webhook/config",
                &json!({"webhook_url": url}),
            )
            .await;
            let again = answer.status == 503;
            r = Some(answer);
            if !again {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let r = r.unwrap();
        assert_eq!(r.status, 422, "{url}: {}", r.text());
        assert_eq!(r.json()["field"], "webhook_url");
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(msg.contains(why), "{url}: {msg}");
        for revealing in ["127.0.0.1:", "::1]:", "loopback address", "private address"] {
            assert!(!msg.contains(revealing), "{url}: {msg}");
        }
    }
    assert_eq!(
        get(s.addr, &key, "/api/keys").await.json()["webhook_url"],
        serde_json::Value::Null,
        "nothing changed"
    );
    // Delete without a webhook is fine.
    let r = delete(s.addr, &key, "/api/webhook/config").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["organization_id"], org.as_str());
    assert_eq!(v["webhook_url"], serde_json::Value::Null);
    assert!(v["updated_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn signing_secret_is_kept_for_the_organizations_life() {
    let s = Server::start(&["--allow-private-webhooks"]);
    let (key, org) = new_org(s.addr, "pro").await;
    let r = post(
        s.addr,
        &key,
        "/api/webhook/config",
        &json!({"webhook_url": "http://127.0.0.1:9/a"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["organization_id"], org.as_str());
    assert_eq!(v["webhook_url"], "http://127.0.0.1:9/a");
    let secret = v["signing_secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&secret[6..])
        .unwrap();
    assert_eq!(raw.len(), 32);
    // A new URL keeps the secret; so do a delete and a new configuration.
    let v2 = post(
        s.addr,
        &key,
        "/api/webhook/config",
        &json!({"webhook_url": "http://127.0.0.1:9/b"}),
    )
    .await
    .json();
    assert_eq!(v2["signing_secret"], secret.as_str());
    assert_eq!(
        get(s.addr, &key, "/api/keys").await.json()["webhook_url"],
        "http://127.0.0.1:9/b"
    );
    let r = delete(s.addr, &key, "/api/webhook/config").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        get(s.addr, &key, "/api/keys").await.json()["webhook_url"],
        serde_json::Value::Null
    );
    let v3 = post(
        s.addr,
        &key,
        "/api/webhook/config",
        &json!({"webhook_url": "http://127.0.0.1:9/c"}),
    )
    .await
    .json();
    assert_eq!(v3["signing_secret"], secret.as_str());
    // Another organization gets its own secret.
    let (other, _) = new_org(s.addr, "pro").await;
    let v4 = post(
        s.addr,
        &other,
        "/api/webhook/config",
        &json!({"webhook_url": "http://127.0.0.1:9/a"}),
    )
    .await
    .json();
    assert_ne!(v4["signing_secret"], secret.as_str());
}

/// POST /api/keys/rotate with `key` and this `Idempotency-Key`.
async fn rotate_keyed(addr: std::net::SocketAddr, key: &str, idem: &str) -> Response {
    call(
        addr,
        "POST",
        "/api/keys/rotate",
        &[("X-API-Key", key), ("Idempotency-Key", idem)],
        None,
    )
    .await
}

/// The new key of a rotation is shown only in its answer, and the old key stops working as it is
/// sent: a rotation sent with an `Idempotency-Key` whose answer is lost can be asked again with
/// the old key and the same Idempotency-Key within `--key-rotation-retry-s`, and it rotates again
/// (the lost answer's key stops working too). Nothing else takes the old key, and no other
/// Idempotency-Key, no header, a rotation without one, or the window's end lets it retry.
#[tokio::test]
async fn a_rotation_whose_answer_was_lost_can_be_asked_again_with_the_old_key() {
    let s = Server::start(&["--key-rotation-retry-s", "3"]);
    let (old, org) = new_org(s.addr, "pro").await;
    let idem = "rot-3b1f9c2e-5d0a-4c7e";
    let r = rotate_keyed(s.addr, &old, idem).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let lost = r.json()["api_key"].as_str().unwrap().to_string();
    // The old key is refused for everything else, a retry without the header and one with
    // another Idempotency-Key included.
    assert_eq!(get(s.addr, &old, "/api/keys").await.status, 401);
    assert_eq!(
        post_empty(s.addr, &old, "/api/keys/rotate").await.status,
        401
    );
    let r = rotate_keyed(s.addr, &old, "another-key-of-16+").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.header("www-authenticate"), Some("ApiKey"));
    // The answer was lost: ask again.
    let r = rotate_keyed(s.addr, &old, idem).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["organization_id"], org.as_str());
    let kept = r.json()["api_key"].as_str().unwrap().to_string();
    assert_ne!(kept, lost);
    assert_eq!(get(s.addr, &lost, "/api/keys").await.status, 401);
    assert_eq!(get(s.addr, &old, "/api/keys").await.status, 401);
    let info = get(s.addr, &kept, "/api/keys").await;
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["key_prefix"], &kept[..25]);
    // The lost key is no retired key of its own: it can't ask.
    assert_eq!(rotate_keyed(s.addr, &lost, idem).await.status, 401);
    // A wrong secret with the old key's id and prefix: refused (Argon2 decides).
    let forged = format!("{}{}", &old[..25], "x".repeat(39));
    assert_eq!(rotate_keyed(s.addr, &forged, idem).await.status, 401);

    // A rotation without the header keeps no retired key: nothing can ask it again.
    let r = post_empty(s.addr, &kept, "/api/keys/rotate").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let plain = r.json()["api_key"].as_str().unwrap().to_string();
    assert_eq!(rotate_keyed(s.addr, &kept, idem).await.status, 401);
    assert_eq!(rotate_keyed(s.addr, &old, idem).await.status, 401);

    // The window ends.
    let r = rotate_keyed(s.addr, &plain, "rot-2-0123456789ab").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let last = r.json()["api_key"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(3300)).await;
    assert_eq!(
        rotate_keyed(s.addr, &plain, "rot-2-0123456789ab")
            .await
            .status,
        401
    );
    assert_eq!(get(s.addr, &last, "/api/keys").await.status, 200);
    // A malformed or guessable Idempotency-Key with the current key is the client's mistake,
    // said so, and nothing rotates.
    for bad in ["a b", "short-key-15chr"] {
        let r = rotate_keyed(s.addr, &last, bad).await;
        assert_eq!(r.status, 422, "{bad}: {}", r.text());
        assert_eq!(r.json()["field"], "Idempotency-Key");
    }
    assert_eq!(get(s.addr, &last, "/api/keys").await.status, 200);
}

/// POST /api/keys/generate with `body` and this `Idempotency-Key`.
async fn generate_keyed(
    addr: std::net::SocketAddr,
    body: &serde_json::Value,
    idem: &str,
) -> Response {
    call(
        addr,
        "POST",
        "/api/keys/generate",
        &[
            ("Content-Type", "application/json"),
            ("Idempotency-Key", idem),
        ],
        Some(&generate_body(body.clone())),
    )
    .await
}

/// The key of a new organization is shown only in the answer to its generation: a generation
/// sent with an `Idempotency-Key` whose answer is lost can be sent again within
/// `--key-rotation-retry-s` and answers with the organization the first made and a new key (the
/// lost answer's key stops working), not a second organization, even when both are sent at
/// once. The same Idempotency-Key with another body, or a guessable one, is refused and makes
/// nothing; without the header, or once the window has passed, a generation makes a new
/// organization.
#[tokio::test]
async fn a_generation_whose_answer_was_lost_can_be_sent_again() {
    let s = Server::start(&["--key-rotation-retry-s", "3", "--key-ops-per-minute", "100"]);
    let client = db().await;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("lost-answer-{run}");
    let body = json!({"organization_name": name, "tier": "business"});
    let orgs_named = || {
        let (client, name) = (&client, name.clone());
        async move {
            client
                .query_one(
                    "SELECT count(*) FROM organizations WHERE name = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let idem = format!("gen-{run}");
    let r = generate_keyed(s.addr, &body, &idem).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let first = r.json();
    let lost = first["api_key"].as_str().unwrap().to_string();
    // The answer was lost: the same request again.
    let r = generate_keyed(s.addr, &body, &idem).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let again = r.json();
    for field in [
        "organization_id",
        "organization_name",
        "tier",
        "rate_limit_per_minute",
        "created_at",
    ] {
        assert_eq!(again[field], first[field], "{field}");
    }
    let kept = again["api_key"].as_str().unwrap().to_string();
    assert_ne!(kept, lost);
    assert_eq!(get(s.addr, &lost, "/api/keys").await.status, 401);
    let info = get(s.addr, &kept, "/api/keys").await;
    assert_eq!(info.status, 200, "{}", info.text());
    assert_eq!(info.json()["organization_id"], first["organization_id"]);
    assert_eq!(orgs_named().await, 1);

    // Another body with the same Idempotency-Key, or a guessable key: refused, nothing made.
    let other = json!({"organization_name": name, "tier": "pro"});
    let r = generate_keyed(s.addr, &other, &idem).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["field"], "Idempotency-Key");
    let r = generate_keyed(s.addr, &body, "short-key-15chr").await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["field"], "Idempotency-Key");
    assert_eq!(orgs_named().await, 1);
    assert_eq!(get(s.addr, &kept, "/api/keys").await.status, 200);

    // Without the header, each generation is an organization of its own.
    for _ in 0..2 {
        assert_eq!(generate(s.addr, body.clone()).await.status, 201);
    }
    assert_eq!(orgs_named().await, 3);

    // Sent twice at once: one organization, and the key of the later answer is the one.
    let twice = format!("gen-twice-{run}");
    let (a, b) = tokio::join!(
        generate_keyed(s.addr, &body, &twice),
        generate_keyed(s.addr, &body, &twice)
    );
    assert_eq!(
        (a.status, b.status),
        (201, 201),
        "{} {}",
        a.text(),
        b.text()
    );
    assert_eq!(a.json()["organization_id"], b.json()["organization_id"]);
    assert_eq!(orgs_named().await, 4);
    let mut working = 0;
    for r in [&a, &b] {
        let key = r.json()["api_key"].as_str().unwrap().to_string();
        if get(s.addr, &key, "/api/keys").await.status == 200 {
            working += 1;
        }
    }
    assert_eq!(working, 1);

    // The window ends: the Idempotency-Key makes a new organization, and the first keeps its key.
    tokio::time::sleep(std::time::Duration::from_millis(3300)).await;
    let r = generate_keyed(s.addr, &body, &idem).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_ne!(r.json()["organization_id"], first["organization_id"]);
    assert_eq!(orgs_named().await, 5);
    assert_eq!(get(s.addr, &kept, "/api/keys").await.status, 200);
}
