//! The endpoints API and its checks: create, read, change, delete; headers of an endpoint's own; signing secrets (rotated, or given); a create retried with its Idempotency-Key.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_api_creates_reads_changes_and_deletes() {
    let s = Server::start(&[PRIVATE, "--endpoints-per-org-max", "3"]);
    let (key, _) = new_org(s.addr, "pro").await;
    let created = create_endpoint(
        s.addr,
        &key,
        json!({"url": "http://127.0.0.1:9/a", "event_types": ["order.*", "user.created", "order.*"],
               "description": "orders", "rate_limit_per_second": 50}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["url"], "http://127.0.0.1:9/a");
    assert_eq!(
        created["event_types"],
        json!(["order.*", "user.created"]),
        "repeated patterns are kept once"
    );
    assert_eq!(created["description"], "orders");
    assert_eq!(created["rate_limit_per_second"], 50);
    assert_eq!(created["status"], "active");
    assert!(created["signing_secret"]
        .as_str()
        .unwrap()
        .starts_with("whsec_"));
    assert_eq!(
        created["health"],
        json!({"circuit": "closed", "consecutive_failures": 0, "last_success_at": null,
               "last_failure_at": null})
    );
    assert_eq!(created["created_at"], created["updated_at"]);

    // Reads never show the secret; the secret has its own route.
    let one = get(s.addr, &key, &format!("/api/endpoints/{id}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json().get("signing_secret"), None);
    let list = get(s.addr, &key, "/api/endpoints").await.json();
    assert_eq!(list["endpoints"].as_array().unwrap().len(), 1);
    assert_eq!(list["endpoints"][0].get("signing_secret"), None);
    let secret = get(s.addr, &key, &format!("/api/endpoints/{id}/secret"))
        .await
        .json();
    assert_eq!(
        secret,
        json!({"signing_secret": created["signing_secret"], "previous_secret_expires_at": null})
    );

    // PATCH changes only what is sent; null clears.
    let changed = patch(
        s.addr,
        &key,
        &format!("/api/endpoints/{id}"),
        &json!({"description": null, "event_types": null}),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    let changed = changed.json();
    assert_eq!(changed["description"], Value::Null);
    assert_eq!(changed["event_types"], Value::Null);
    assert_eq!(changed["rate_limit_per_second"], 50);
    assert_eq!(changed["url"], "http://127.0.0.1:9/a");

    // Another organization sees none of it.
    let (other, _) = new_org(s.addr, "pro").await;
    for path in [
        format!("/api/endpoints/{id}"),
        format!("/api/endpoints/{id}/secret"),
    ] {
        assert_eq!(get(s.addr, &other, &path).await.status, 404, "{path}");
    }
    assert_eq!(
        delete(s.addr, &other, &format!("/api/endpoints/{id}"))
            .await
            .status,
        404
    );
    assert_eq!(
        get(s.addr, &other, "/api/endpoints").await.json()["endpoints"],
        json!([])
    );

    // Shape checks: 422 naming the field, nothing created.
    let bad: [(Value, &str); 13] = [
        (json!({}), "url"),
        (json!({"url": "ftp://x/"}), "url"),
        // As a browser shows it: the message says to send the ASCII form (xn--…).
        (json!({"url": "https://bücher.example/"}), "url"),
        (json!({"url": 7}), "url"),
        (
            json!({"url": "http://127.0.0.1:9/", "event_types": []}),
            "event_types",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "event_types": ["or*der"]}),
            "event_types",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "event_types": ["a.*.b"]}),
            "event_types",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "event_types": (0..51).map(|i| format!("t{i}")).collect::<Vec<_>>()}),
            "event_types",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "description": "d".repeat(256)}),
            "description",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "rate_limit_per_second": 0}),
            "rate_limit_per_second",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "rate_limit_per_second": 10001}),
            "rate_limit_per_second",
        ),
        (
            json!({"url": "http://127.0.0.1:9/", "rate_limit_per_second": 1.5}),
            "rate_limit_per_second",
        ),
        // A number too wide for a float is JSON, and out of range here.
        (
            json!({"url": "http://127.0.0.1:9/", "rate_limit_per_second": "WIDE"}),
            "rate_limit_per_second",
        ),
    ];
    for (body, field) in bad {
        let text = body.to_string().replace(r#""WIDE""#, "1e400");
        let r = post_text(s.addr, &key, "/api/endpoints", text.as_bytes()).await;
        assert_eq!(r.status, 422, "{text}: {}", r.text());
        assert_eq!(r.json()["field"], field, "{text}");
        if text.contains("bücher") {
            let error = r.json()["error"].as_str().unwrap().to_string();
            assert!(
                error.starts_with("url has characters outside ASCII") && error.contains("xn--"),
                "{error}"
            );
        }
    }
    let r = patch(s.addr, &key, &format!("/api/endpoints/{id}"), &json!({})).await;
    assert_eq!(r.status, 422);
    let r = get(s.addr, &key, "/api/endpoints/not-a-uuid").await;
    assert_eq!(r.status, 422);

    // At most `--endpoints-per-org-max`; a deleted one makes room again.
    create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/b"})).await;
    create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/c"})).await;
    let r = post(
        s.addr,
        &key,
        "/api/endpoints",
        &json!({"url": "http://127.0.0.1:9/d"}),
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(r.json()["error"].as_str().unwrap().contains("at most 3"));
    let gone = delete(s.addr, &key, &format!("/api/endpoints/{id}")).await;
    assert_eq!(gone.status, 200);
    assert_eq!(gone.json(), json!({"id": id, "deleted": true}));
    assert_eq!(
        get(s.addr, &key, &format!("/api/endpoints/{id}"))
            .await
            .status,
        404
    );
    create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/d"})).await;
    assert_eq!(
        get(s.addr, &key, "/api/endpoints").await.json()["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

/// An endpoint's own headers (an `Authorization` its receiver's gateway asks for) go with every
/// delivery to it, beside the server's own; a PATCH replaces them, null removes them; reads show
/// them as set, but for a credential's value, which reads as `<redacted>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_own_headers_go_with_every_delivery_and_a_patch_replaces_them() {
    let url = own_database("triggers_test_own_headers").await;
    let s = Server::start_with_db(&[PRIVATE], &url);
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let (key, _) = new_org(s.addr, "pro").await;
    let own = json!({"Authorization": "Bearer gw-t0k3n", "X-Tenant": "acme eu-1"});
    let shown = json!({"Authorization": "<redacted>", "X-Tenant": "acme eu-1"});
    let created =
        create_endpoint(s.addr, &key, json!({"url": recv.url("/h"), "headers": own})).await;
    assert_eq!(created["headers"], shown);
    let path = format!("/api/endpoints/{}", created["id"].as_str().unwrap());
    assert_eq!(get(s.addr, &key, &path).await.json()["headers"], shown);
    let listed = get(s.addr, &key, "/api/endpoints").await.json();
    assert_eq!(listed["endpoints"][0]["headers"], shown);

    let first = post_typed(s.addr, &key, "order.paid").await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    assert_eq!(got[0].header("authorization"), Some("Bearer gw-t0k3n"));
    assert_eq!(got[0].header("x-tenant"), Some("acme eu-1"));
    assert_eq!(got[0].header("webhook-id"), Some(first.as_str()));
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    let named = |name: &str| {
        got[0]
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    };
    assert_eq!((named("host"), named("authorization")), (1, 1));

    // What a read shows, sent back with one value changed: the credential keeps its value.
    let back = patch(
        s.addr,
        &key,
        &path,
        &json!({"headers": {"Authorization": "<redacted>", "X-Tenant": "acme eu-3"}}),
    )
    .await;
    assert_eq!(back.status, 200, "{}", back.text());
    assert_eq!(
        back.json()["headers"],
        json!({"Authorization": "<redacted>", "X-Tenant": "acme eu-3"})
    );
    post_typed(s.addr, &key, "order.paid").await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| r.len() >= 2)
        .await;
    assert_eq!(got[1].header("authorization"), Some("Bearer gw-t0k3n"));
    assert_eq!(got[1].header("x-tenant"), Some("acme eu-3"));
    // A redacted value for a credential the endpoint does not have is refused, and changes
    // nothing; so is one on a create, which has none.
    let unknown = patch(
        s.addr,
        &key,
        &path,
        &json!({"headers": {"X-API-Key": "<redacted>", "X-Tenant": "x"}}),
    )
    .await;
    assert_eq!(unknown.status, 422, "{}", unknown.text());
    assert_eq!(unknown.json()["field"], "headers");
    assert!(unknown.json()["error"]
        .as_str()
        .unwrap()
        .contains("X-API-Key"));
    assert_eq!(
        get(s.addr, &key, &path).await.json()["headers"]["X-Tenant"],
        "acme eu-3"
    );
    let fresh = post(
        s.addr,
        &key,
        "/api/endpoints",
        &json!({"url": recv.url("/h"), "headers": {"Authorization": "<redacted>"}}),
    )
    .await;
    assert_eq!(fresh.status, 422, "{}", fresh.text());
    assert_eq!(fresh.json()["field"], "headers");

    // A PATCH replaces the whole set (what is not named goes); deliveries from then on carry it.
    let changed = patch(
        s.addr,
        &key,
        &path,
        &json!({"headers": {"X-Tenant": "acme us-2"}}),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    assert_eq!(changed.json()["headers"], json!({"X-Tenant": "acme us-2"}));
    post_typed(s.addr, &key, "order.paid").await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    assert_eq!(got[2].header("x-tenant"), Some("acme us-2"));
    assert_eq!(got[2].header("authorization"), None);

    // null: none of its own; a PATCH of something else leaves them as they are.
    let same = patch(s.addr, &key, &path, &json!({"description": "d"})).await;
    assert_eq!(same.json()["headers"], json!({"X-Tenant": "acme us-2"}));
    let cleared = patch(s.addr, &key, &path, &json!({"headers": null})).await;
    assert_eq!(cleared.json()["headers"], json!({}));
    post_typed(s.addr, &key, "order.paid").await;
    let got = recv
        .wait_until(Duration::from_secs(10), |r| r.len() >= 4)
        .await;
    assert_eq!(got[3].header("x-tenant"), None);
}

/// Headers that could change what the request means (a second `Content-Length`, a line break
/// that starts another header, the server's own signature) are refused with 422 naming
/// `headers`, and a refused PATCH changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_headers_are_checked_and_a_refused_change_leaves_them() {
    let s = Server::start(&[PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    let url = "http://127.0.0.1:9/h";
    let created = create_endpoint(s.addr, &key, json!({"url": url, "headers": {"X-A": "1"}})).await;
    let path = format!("/api/endpoints/{}", created["id"].as_str().unwrap());
    let many: serde_json::Map<String, Value> =
        (0..21).map(|i| (format!("X-{i}"), json!("v"))).collect();
    let large: serde_json::Map<String, Value> = (0..9)
        .map(|i| (format!("X-{i}"), json!("v".repeat(1000))))
        .collect();
    let bad = [
        json!({"Content-Length": "0"}),
        json!({"webhook-signature": "v1,forged"}),
        json!({"HOST": "evil.example"}),
        json!({"Transfer-Encoding": "chunked"}),
        json!({"X-A": "1\r\nX-Injected: 1"}),
        json!({"X-A": "line\nbreak"}),
        json!({"X A": "1"}),
        json!({"X:A": "1"}),
        json!({"": "1"}),
        json!({"X-A": "caf\u{e9}"}),
        json!({"X-A": " padded"}),
        json!({"X-A": "x".repeat(1025)}),
        json!({"X-A": 1}),
        json!({"X-A": null}),
        json!(["X-A", "1"]),
        json!("X-A: 1"),
        Value::Object(many),
        Value::Object(large),
    ];
    for headers in bad {
        let r = post(
            s.addr,
            &key,
            "/api/endpoints",
            &json!({"url": url, "headers": headers}),
        )
        .await;
        assert_eq!(r.status, 422, "{headers}: {}", r.text());
        assert_eq!(r.json()["field"], "headers", "{headers}");
        let r = patch(
            s.addr,
            &key,
            &path,
            &json!({"headers": headers, "description": "d"}),
        )
        .await;
        assert_eq!(r.status, 422, "{headers}: {}", r.text());
    }
    // The same name twice in any case (JSON allows it; HTTP would send both).
    let twice = br#"{"url": "http://127.0.0.1:9/h", "headers": {"X-A": "1", "x-a": "2"}}"#;
    let r = call(
        s.addr,
        "POST",
        "/api/endpoints",
        &[("X-API-Key", &key), ("Content-Type", "application/json")],
        Some(twice),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("twice"));
    let now = get(s.addr, &key, &path).await.json();
    assert_eq!(now["headers"], json!({"X-A": "1"}));
    assert_eq!(
        now["description"],
        Value::Null,
        "nothing of a refused PATCH was kept"
    );
    assert_eq!(
        get(s.addr, &key, "/api/endpoints").await.json()["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "nothing created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_signs_beside_the_new_one_for_the_grace_period() {
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_rotated_secret").await;
    let s = Server::start_with_db(&[PRIVATE, "--secret-rotation-grace-s", "2"], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": recv.url("/r")})).await;
    let id = ep["id"].as_str().unwrap();
    let old = ep["signing_secret"].as_str().unwrap().to_string();
    let rotated = post_empty(s.addr, &key, &format!("/api/endpoints/{id}/secret/rotate")).await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    let rotated = rotated.json();
    let new = rotated["signing_secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert!(rotated["previous_secret_expires_at"].is_string());
    assert_eq!(
        get(s.addr, &key, &format!("/api/endpoints/{id}/secret"))
            .await
            .json(),
        rotated
    );
    // During the grace period: both signatures, the new one first; either secret verifies.
    let first = post_typed(s.addr, &key, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 1)
        .await;
    assert_eq!(got[0].event_id(), first);
    let header = got[0].header("webhook-signature").unwrap().to_string();
    let parts: Vec<&str> = header.split(' ').collect();
    assert_eq!(parts.len(), 2, "{header}");
    assert_eq!(parts[0], standard_signature(&new, &got[0]));
    assert_eq!(parts[1], standard_signature(&old, &got[0]));
    verify_standard_webhook(&new, &got[0]);
    verify_standard_webhook(&old, &got[0]);
    // After it: the new secret only.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    post_typed(s.addr, &key, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 2)
        .await;
    assert_eq!(
        got[1].header("webhook-signature"),
        Some(standard_signature(&new, &got[1]).as_str())
    );
    assert_eq!(
        get(s.addr, &key, &format!("/api/endpoints/{id}/secret"))
            .await
            .json()["previous_secret_expires_at"],
        Value::Null
    );
}

/// A team moving from Svix keeps the secret its receivers verify with: a secret given on create
/// signs every delivery, one given on rotate signs beside the old for the grace period (padded
/// base64 or not: it is kept padded), and a rotation to the secret it already has changes
/// nothing (a retried rotation is safe); one that is not `whsec_` and the base64 of 24 to 64
/// bytes is refused naming `signing_secret` and changes nothing, and a PATCH never changes the
/// secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_given_on_create_or_rotate_signs_and_a_refused_one_changes_nothing() {
    use base64::Engine;
    let recv = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_given_secret").await;
    let s = Server::start_with_db(&[PRIVATE], &url);
    let (key, _) = new_org(s.addr, "pro").await;
    let svix = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let ep = create_endpoint(
        s.addr,
        &key,
        json!({"url": recv.url("/r"), "signing_secret": svix}),
    )
    .await;
    assert_eq!(ep["signing_secret"], svix);
    let id = ep["id"].as_str().unwrap();
    let secret_path = format!("/api/endpoints/{id}/secret");
    let rotate_path = format!("/api/endpoints/{id}/secret/rotate");
    let first = post_typed(s.addr, &key, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 1)
        .await;
    assert_eq!(got[0].event_id(), first);
    assert_eq!(
        got[0].header("webhook-signature"),
        Some(standard_signature(svix, &got[0]).as_str())
    );

    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![0x5a; n]);
    let bad = [
        json!("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        json!(format!("whsec_{}", b64(23))),
        json!(format!("whsec_{}", b64(65))),
        json!("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa-w"),
        json!("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\r\nX: 1"),
        json!(""),
        json!(42),
        json!({"key": svix}),
    ];
    let unchanged = json!({"signing_secret": svix, "previous_secret_expires_at": null});
    for secret in &bad {
        let r = post(
            s.addr,
            &key,
            "/api/endpoints",
            &json!({"url": recv.url("/r"), "signing_secret": secret}),
        )
        .await;
        assert_eq!(r.status, 422, "{secret}: {}", r.text());
        assert_eq!(r.json()["field"], "signing_secret", "{secret}");
        let r = post(
            s.addr,
            &key,
            &rotate_path,
            &json!({"signing_secret": secret}),
        )
        .await;
        assert_eq!(r.status, 422, "{secret}: {}", r.text());
        assert_eq!(r.json()["field"], "signing_secret", "{secret}");
    }
    // Rotating to the current secret changes nothing (a retried rotation is safe).
    let r = post(s.addr, &key, &rotate_path, &json!({"signing_secret": svix})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), unchanged);
    // A PATCH names the route that changes the secret, and changes nothing else either.
    let r = patch(
        s.addr,
        &key,
        &format!("/api/endpoints/{id}"),
        &json!({"signing_secret": b64(32), "description": "d"}),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["field"], "signing_secret");
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("secret/rotate"));
    // A body that is not JSON: 415, as everywhere.
    let r = call(
        s.addr,
        "POST",
        &rotate_path,
        &[("X-API-Key", &key), ("Content-Type", "text/plain")],
        Some(b"whsec_x"),
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(get(s.addr, &key, &secret_path).await.json(), unchanged);
    let list = get(s.addr, &key, "/api/endpoints").await.json();
    assert_eq!(list["endpoints"].as_array().unwrap().len(), 1, "{list}");

    // A given secret of 32 bytes without its padding: the same key, kept padded.
    let given = format!("whsec_{}", b64(32));
    let unpadded = given.trim_end_matches('=');
    assert_ne!(unpadded, given);
    let r = post(
        s.addr,
        &key,
        &rotate_path,
        &json!({"signing_secret": unpadded}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["signing_secret"], given.as_str());
    assert!(r.json()["previous_secret_expires_at"].is_string());
    post_typed(s.addr, &key, "t").await;
    let got = recv
        .wait_until(Duration::from_secs(5), |r| r.len() == 2)
        .await;
    let expected = format!(
        "{} {}",
        standard_signature(&given, &got[1]),
        standard_signature(svix, &got[1])
    );
    assert_eq!(got[1].header("webhook-signature"), Some(expected.as_str()));
    assert_eq!(
        expected.split(' ').next(),
        Some(standard_signature(unpadded, &got[1]).as_str())
    );
    // The same rotation again, padded or not: answered as it is, the grace not extended.
    let after = get(s.addr, &key, &secret_path).await.json();
    for same in [&given[..], unpadded] {
        let r = post(s.addr, &key, &rotate_path, &json!({"signing_secret": same})).await;
        assert_eq!(r.status, 200, "{same}: {}", r.text());
        assert_eq!(r.json(), after);
    }
    // No body, `{}` or a null secret: a random one, as before.
    let mut seen = HashSet::from([svix.to_string(), given]);
    for body in [None, Some(json!({})), Some(json!({"signing_secret": null}))] {
        let r = match &body {
            None => post_empty(s.addr, &key, &rotate_path).await,
            Some(b) => post(s.addr, &key, &rotate_path, b).await,
        };
        assert_eq!(r.status, 200, "{body:?}: {}", r.text());
        let made = r.json()["signing_secret"].as_str().unwrap().to_string();
        assert!(made.starts_with("whsec_") && made.len() == 50, "{made}");
        assert!(seen.insert(made), "{body:?} made a secret seen before");
    }
}

/// A create whose answer was lost (a timeout, a 503 after the commit) can be sent again with
/// the same `Idempotency-Key`: it is answered with the endpoint the first made (201, with its
/// secret, as it is now, `Idempotent-Replayed: true`), never a second endpoint; the same key
/// with another body is a 422 that creates nothing; creates racing with one key make one
/// endpoint; a deleted endpoint lets its key go; a malformed key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_sent_again_with_its_idempotency_key_makes_one_endpoint() {
    let s = Server::start(&[PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    let count = || async {
        let list = get(s.addr, &key, "/api/endpoints").await.json();
        list["endpoints"].as_array().unwrap().len()
    };
    let body = br#"{"url": "http://127.0.0.1:9/a", "event_types": ["order.*"]}"#;
    let first = create_keyed(s.addr, &key, "7c9e6679-7425-40de-944b-e07fc1f90ae7", body).await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.header("idempotent-replayed"), None);
    let first = first.json();
    let id = first["id"].as_str().unwrap();
    // Sent again, bare or quoted: the same endpoint, its secret, nothing new.
    for idem in [
        "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "\"7c9e6679-7425-40de-944b-e07fc1f90ae7\"",
    ] {
        let again = create_keyed(s.addr, &key, idem, body).await;
        assert_eq!(again.status, 201, "{}", again.text());
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.json(), first);
    }
    assert_eq!(count().await, 1);
    // As it is now: a change made since shows.
    let r = patch(
        s.addr,
        &key,
        &format!("/api/endpoints/{id}"),
        &json!({"description": "d"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let again = create_keyed(s.addr, &key, "7c9e6679-7425-40de-944b-e07fc1f90ae7", body).await;
    assert_eq!(again.json()["description"], "d");
    assert_eq!(again.json()["signing_secret"], first["signing_secret"]);
    // The same key with another body (another URL, or the same JSON written otherwise).
    for other in [
        &br#"{"url": "http://127.0.0.1:9/b", "event_types": ["order.*"]}"#[..],
        br#"{"event_types": ["order.*"], "url": "http://127.0.0.1:9/a"}"#,
    ] {
        let r = create_keyed(s.addr, &key, "7c9e6679-7425-40de-944b-e07fc1f90ae7", other).await;
        assert_eq!(r.status, 422, "{}", r.text());
        assert_eq!(r.json()["field"], "Idempotency-Key");
    }
    assert_eq!(count().await, 1);
    // Another organization's key space is its own.
    let (other_org, _) = new_org(s.addr, "pro").await;
    let r = create_keyed(
        s.addr,
        &other_org,
        "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        body,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("idempotent-replayed"), None);
    assert_ne!(r.json()["id"], first["id"]);

    // Eight at once with one key: one endpoint, every answer its.
    let body2 = br#"{"url": "http://127.0.0.1:9/c"}"#;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (addr, key) = (s.addr, key.clone());
        tasks.spawn(async move { create_keyed(addr, &key, "race-1", body2).await });
    }
    let racing: Vec<Response> = tasks.join_all().await;
    let ids: HashSet<String> = racing
        .iter()
        .map(|r| {
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let replayed = racing
        .iter()
        .filter(|r| r.header("idempotent-replayed").is_some())
        .count();
    assert_eq!(replayed, 7);
    assert_eq!(count().await, 2);

    // A deleted endpoint lets its key go: the same create makes a new one.
    assert_eq!(
        delete(s.addr, &key, &format!("/api/endpoints/{id}"))
            .await
            .status,
        200
    );
    let r = create_keyed(s.addr, &key, "7c9e6679-7425-40de-944b-e07fc1f90ae7", body).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("idempotent-replayed"), None);
    assert_ne!(r.json()["id"], first["id"]);
    assert_eq!(count().await, 2);

    // Malformed keys: refused, nothing made.
    let long = "k".repeat(256);
    for bad in ["", "\"\"", "a b", "caf\u{e9}", "\"a\"b\"", long.as_str()] {
        let r = create_keyed(s.addr, &key, bad, br#"{"url": "http://127.0.0.1:9/d"}"#).await;
        assert_eq!(r.status, 422, "{bad:?}: {}", r.text());
        assert_eq!(r.json()["field"], "Idempotency-Key", "{bad:?}");
    }
    assert_eq!(count().await, 2);
    // Without a key, a create is a create each time.
    let plain = json!({"url": "http://127.0.0.1:9/d"});
    for _ in 0..2 {
        assert_eq!(
            post(s.addr, &key, "/api/endpoints", &plain).await.status,
            201
        );
    }
    assert_eq!(count().await, 4);
}

/// Events from `key` to `s` until both its ingress cores have verified the key (a connection
/// lands on either, as the kernel spreads them; each core verifies a key once and caches it):
/// how many were sent.
async fn verify_on_both_cores(s: &Server, key: &str) -> usize {
    let verified = || metric(s, "triggers_auth_cache_misses_total");
    let mut sent = 0;
    while verified().await < 2.0 {
        assert!(sent < 200, "{sent} events, all on one core");
        assert_eq!(post_typed(s.addr, key, "t").await.len(), 36);
        sent += 1;
    }
    sent
}

/// Endpoint changes leave the organization's key verified on every core: its requests amid a
/// stream of changes (a Terraform apply, a script) are answered from the cores' caches, none
/// verifies the key again and none is refused. Before, each change dropped the key from every
/// core's cache, the next request on each core verified it in the store, and a stream of
/// changes had requests refused 503 "the database is unavailable" as their verifications kept
/// racing with the changes (a fifth of them, by hand, with 16 connections changing one
/// endpoint). A key rotation still reaches every core at once (its own tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_leave_the_organizations_key_verified() {
    let s = Server::process(&["--ingress-cores", "2", PRIVATE]);
    let (key, _) = new_org(s.addr, "pro").await;
    let ep = create_endpoint(s.addr, &key, json!({"url": "http://127.0.0.1:9/a"})).await;
    let path = format!("/api/endpoints/{}", ep["id"].as_str().unwrap());
    verify_on_both_cores(&s, &key).await;
    let misses = metric(&s, "triggers_auth_cache_misses_total").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (addr, key, path) = (s.addr, key.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut refused = Vec::new();
            for i in 0..15 {
                let url = format!("http://127.0.0.1:9/{t}-{i}");
                let r = patch(addr, &key, &path, &json!({"url": url})).await;
                if r.status != 200 {
                    refused.push(format!("PATCH {}: {}", r.status, r.text()));
                }
                let r = post_event(addr, &key, "t", json!(i), None).await;
                if r.status != 201 {
                    refused.push(format!("POST {}: {}", r.status, r.text()));
                }
            }
            refused
        }));
    }
    let mut refused = Vec::new();
    for t in tasks {
        refused.extend(t.await.unwrap());
    }
    assert!(refused.is_empty(), "{} refused: {refused:?}", refused.len());
    assert_eq!(
        metric(&s, "triggers_auth_cache_misses_total").await,
        misses,
        "the key was verified again"
    );
}

/// An endpoint change made on one node reaches another node's deliveries: the other hears that
/// only the organization's endpoints changed (the NOTIFY's braced payload) and drops the
/// endpoints it had cached, while its cores keep the organization's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_change_on_one_node_reaches_another_nodes_deliveries() {
    let first = Receiver::start(|_, _| Answer::status(200)).await;
    let second = Receiver::start(|_, _| Answer::status(200)).await;
    let url = own_database("triggers_test_change_elsewhere").await;
    let a = Server::start_with_db(&[PRIVATE], &url);
    let b = Server::start_with_db(&[PRIVATE], &url);
    let (key, _) = new_org(a.addr, "pro").await;
    let ep = create_endpoint(a.addr, &key, json!({"url": first.url("/")})).await;
    // b delivers events of its own to the endpoint: it has the endpoints cached, and the key
    // verified on both its cores.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = verify_on_both_cores(&b, &key).await;
    first
        .wait_until(Duration::from_secs(10), |r| r.len() == sent)
        .await;
    let path = format!("/api/endpoints/{}", ep["id"].as_str().unwrap());
    let r = patch(a.addr, &key, &path, &json!({"url": second.url("/")})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let misses = metric(&b, "triggers_auth_cache_misses_total").await;
    assert_eq!(post_typed(b.addr, &key, "t").await.len(), 36);
    let got = second
        .wait_until(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(first.received().len(), sent, "nothing more to the old URL");
    assert_eq!(
        metric(&b, "triggers_auth_cache_misses_total").await,
        misses,
        "b kept the key"
    );
}
