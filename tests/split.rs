//! Routing over real sockets (SPEC §3): the percentage split, sticky keys, routes and the
//! override header.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures_util::future::join_all;
use reqwest::Method;

/// Sends `n` GETs (with optional extra headers) and returns how many vastai served.
async fn count_vastai(vs: &Vastshift, n: usize, path: &str) -> usize {
    let c = client();
    let mut vastai = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let futs = chunk.iter().map(|_| {
            let c = c.clone();
            let url = vs.url(path);
            async move { served_by(&c.get(url).send().await.unwrap()) }
        });
        vastai += join_all(futs)
            .await
            .iter()
            .filter(|b| b.as_str() == "vastai")
            .count();
    }
    vastai
}

#[tokio::test]
async fn thirty_percent_lands_in_the_binomial_interval_and_extremes_are_exact() {
    let vs = Kit::with("[split]\npercent = 30\n").await;
    let n = 2000usize;
    let got = count_vastai(&vs, n, "/r").await as f64;
    let (mean, sd) = (n as f64 * 0.3, (n as f64 * 0.3 * 0.7).sqrt());
    // 99.9 % two-sided interval of the binomial: mean ± 3.29 sd.
    assert!(
        (got - mean).abs() <= 3.29 * sd,
        "{got} vastai of {n}, expected {mean} ± {}",
        3.29 * sd
    );

    vs.admin_send(Method::PUT, "/admin/split", r#"{"percent": 0}"#)
        .await;
    assert_eq!(count_vastai(&vs, 300, "/r").await, 0);
    vs.admin_send(Method::PUT, "/admin/split", r#"{"percent": 100}"#)
        .await;
    assert_eq!(count_vastai(&vs, 300, "/r").await, 300);
    vs.stop().await;
}

async fn backend_for(c: &reqwest::Client, vs: &Vastshift, header: (&str, &str)) -> String {
    served_by(
        &c.get(vs.url("/s"))
            .header(header.0, header.1)
            .send()
            .await
            .unwrap(),
    )
}

#[tokio::test]
async fn sticky_keys_keep_their_backend_and_only_move_towards_vastai() {
    let vs = Kit::with("[split]\npercent = 20\nsticky = \"header:x-user\"\n").await;
    let c = client();
    let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let mut before = Vec::new();
    for k in &keys {
        let first = backend_for(&c, &vs, ("x-user", k)).await;
        for _ in 0..2 {
            assert_eq!(
                backend_for(&c, &vs, ("x-user", k)).await,
                first,
                "key {k} changed backend"
            );
        }
        before.push(first);
    }
    let at_20 = before.iter().filter(|b| b.as_str() == "vastai").count();
    vs.admin_send(Method::PUT, "/admin/split", r#"{"percent": 50}"#)
        .await;
    let mut at_50 = 0;
    for (k, old) in keys.iter().zip(&before) {
        let now = backend_for(&c, &vs, ("x-user", k)).await;
        if old == "vastai" {
            assert_eq!(now, "vastai", "raising the split moved {k} back to legacy");
        }
        at_50 += usize::from(now == "vastai");
    }
    assert!(
        at_50 > at_20,
        "raising 20 -> 50 moved some keys to vastai ({at_20} -> {at_50})"
    );
    vs.stop().await;
}

#[tokio::test]
async fn sticky_buckets_match_murmur3_reference_values() {
    let vs = Kit::with("[split]\npercent = 31.5\nsticky = \"cookie:uid\"\n").await;
    let c = client();
    // MurmurHash3 x86_32, seed 0, of "vastshift:<key>" mod 10000 (reference: the mmh3 package).
    for (key, bucket) in [
        ("user-1", 314),
        ("user-2", 6341),
        ("alice", 8257),
        ("bob", 2053),
    ] {
        let v = vs.admin_json(&format!("/admin/explain?key={key}")).await;
        assert_eq!(v["bucket"], bucket, "{key}: {v}");
        let expected = if bucket < 3150 { "vastai" } else { "legacy" };
        assert_eq!(v["backend"], expected);
        // The proxy routes a request carrying that cookie the same way.
        let cookie = format!("other=1; uid={key}");
        assert_eq!(
            backend_for(&c, &vs, ("cookie", &cookie)).await,
            expected,
            "{key}"
        );
    }
    vs.stop().await;
}

#[tokio::test]
async fn client_ip_stickiness_is_stable() {
    let vs = Kit::with("[split]\npercent = 50\nsticky = \"client-ip\"\n").await;
    let first = served_by(&vs.get("/").await);
    let expected = if vastshift::routing::bucket_for("vastshift", "127.0.0.1") < 5000 {
        "vastai"
    } else {
        "legacy"
    };
    assert_eq!(first, expected);
    for _ in 0..30 {
        assert_eq!(served_by(&vs.get("/").await), first);
    }
    vs.stop().await;
}

#[tokio::test]
async fn routes_match_whole_segments_and_methods_and_the_override_header_pins() {
    let vs = Kit::with("[split]\npercent = 0\n[[route]]\nname = \"users-read\"\npath_prefix = \"/api/users\"\nmethods = [\"GET\", \"HEAD\"]\npercent = 100\n").await;
    let c = client();
    let get = |p: &str| c.get(vs.url(p)).send();
    assert_eq!(served_by(&get("/api/users").await.unwrap()), "vastai");
    assert_eq!(served_by(&get("/api/users/7").await.unwrap()), "vastai");
    assert_eq!(served_by(&get("/api/users/7?x=1").await.unwrap()), "vastai");
    assert_eq!(served_by(&get("/api/usersx").await.unwrap()), "legacy");
    assert_eq!(served_by(&get("/api").await.unwrap()), "legacy");
    assert_eq!(
        served_by(&c.post(vs.url("/api/users/7")).send().await.unwrap()),
        "legacy"
    );

    // The override header pins either way; a bogus value is ignored.
    let pinned = vs.pinned("/other", "vastai").await;
    assert_eq!(served_by(&pinned), "vastai");
    let pinned = vs.pinned("/api/users/7", "legacy").await;
    assert_eq!(served_by(&pinned), "legacy");
    for _ in 0..20 {
        let bogus = vs.pinned("/other", "bogus").await;
        assert_eq!(served_by(&bogus), "legacy");
    }
    // Route labels in metrics are route names, never paths.
    let metrics = vs.scrape().await;
    assert!(metrics.contains(r#"route="users-read""#));
    assert!(
        !metrics.contains("/api/users"),
        "a raw path leaked into a label"
    );
    vs.stop().await;
}
