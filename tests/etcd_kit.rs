//! The real-etcd kit itself ([`common::etcd::Etcd`]): its helpers and the failures it injects
//! behave as the tests built on it assume.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::etcd::{b64_decode, b64_encode, prefix_end, Etcd};
use serde_json::json;

#[test]
fn base64_and_prefix_end_round_trip() {
    for (plain, coded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("/t/state", "L3Qvc3RhdGU="),
        ("hello", "aGVsbG8="),
    ] {
        assert_eq!(b64_encode(plain.as_bytes()), coded);
        assert_eq!(b64_decode(coded), plain.as_bytes());
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(b64_decode(&b64_encode(&all)), all);
    assert_eq!(prefix_end(b"/a/"), b"/a0");
    assert_eq!(prefix_end(b"a\xff\xff"), b"b");
    assert_eq!(prefix_end(b""), b"\0");
}

#[tokio::test]
async fn put_get_keys_delete() {
    let etcd = Etcd::start().await;
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    assert_eq!(etcd.get("/t/state").await, None);

    let r1 = etcd.put("/t/state", "hello").await;
    assert_eq!(etcd.get("/t/state").await, Some(("hello".into(), r1)));
    assert_eq!(etcd.revision().await, r1);
    let r2 = etcd.put("/t/state", "world").await;
    assert!(r2 > r1);
    assert_eq!(etcd.get("/t/state").await, Some(("world".into(), r2)));

    etcd.put("/t/a", "1").await;
    etcd.put("/t0", "outside the prefix").await;
    etcd.put("/u/b", "2").await;
    assert_eq!(etcd.keys("/t/").await, ["/t/a", "/t/state"]);
    assert!(etcd.keys("/none/").await.is_empty());

    etcd.delete("/t/a").await;
    etcd.delete("/t/absent").await;
    assert_eq!(etcd.get("/t/a").await, None);
    assert_eq!(etcd.keys("/t/").await, ["/t/state"]);
}

#[tokio::test]
async fn kill_and_restart_keep_the_data_and_the_endpoint() {
    let mut etcd = Etcd::start().await;
    let endpoint = etcd.endpoint();
    let rev = etcd.put("/t/state", "kept").await;
    let old_pid = etcd.pid();

    etcd.kill();
    let down = etcd
        .call(
            "/v3/kv/range",
            json!({"key": b64_encode(b"x")}),
            Duration::from_secs(2),
        )
        .await;
    assert!(down.is_err(), "a killed etcd answered: {down:?}");

    etcd.restart().await;
    assert_ne!(etcd.pid(), old_pid);
    assert_eq!(etcd.endpoint(), endpoint);
    assert_eq!(etcd.get("/t/state").await, Some(("kept".into(), rev)));
    assert!(etcd.put("/t/state", "after").await > rev);
}

#[tokio::test]
async fn pause_hangs_requests_and_resume_answers_them() {
    let etcd = Etcd::start().await;
    etcd.put("/t/state", "v").await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let range = || {
        client
            .post(format!("{}/v3/kv/range", etcd.endpoint()))
            .json(&json!({"key": b64_encode(b"/t/state")}))
            .send()
    };
    assert!(range().await.unwrap().status().is_success());

    etcd.pause();
    let started = Instant::now();
    let err = range().await.expect_err("a paused etcd answered");
    assert!(err.is_timeout(), "not a timeout: {err}");
    assert!(started.elapsed() >= Duration::from_millis(450));

    etcd.resume();
    assert!(range().await.unwrap().status().is_success());
    assert_eq!(etcd.get("/t/state").await.unwrap().0, "v");
}

#[tokio::test]
async fn compaction_makes_older_revisions_unreadable() {
    let etcd = Etcd::start().await;
    let old = etcd.put("/t/state", "1").await;
    etcd.put("/t/state", "2").await;
    let now = etcd.put("/t/state", "3").await;
    let at = |revision: i64| {
        etcd.call(
            "/v3/kv/range",
            json!({"key": b64_encode(b"/t/state"), "revision": revision.to_string()}),
            Duration::from_secs(5),
        )
    };
    let before = at(old).await.unwrap();
    assert_eq!(
        b64_decode(before["kvs"][0]["value"].as_str().unwrap()),
        b"1"
    );

    etcd.compact(now).await;
    let err = at(old).await.expect_err("a compacted revision was read");
    assert!(err.contains("compacted"), "unexpected error: {err}");
    let current = at(now).await.unwrap();
    assert_eq!(
        b64_decode(current["kvs"][0]["value"].as_str().unwrap()),
        b"3"
    );
    assert_eq!(etcd.get("/t/state").await, Some(("3".into(), now)));
}
