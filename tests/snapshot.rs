//! One snapshot per request: a reload that changes several sections at once (both upstreams,
//! the global split and a route's percentage) is seen by every request entirely or not at all,
//! on the fast lane and on hyper's path alike.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;

/// Config A sends the default split to legacy (`l1`) and the route to vastai (`v1`); config B
/// swaps both upstreams and both percentages, so it sends the default split to vastai (`v2`) and
/// the route to legacy (`l2`). A request that read one section from A and another from B would
/// be answered by `v1` or `l2` on the default split, or by `l1` or `v2` on the route.
fn config(legacy: &Backend, vastai: &Backend, split: u32, route: u32) -> String {
    common::config(
        &legacy.url(),
        &vastai.url(),
        &format!(
            "[split]\npercent = {split}\nfallback = false\n\n[[route]]\nname = \"r\"\npath_prefix = \"/r\"\npercent = {route}\n"
        ),
    )
}

/// (path, method) -> the body that answered -> how often.
type Answers = BTreeMap<(String, String), BTreeMap<String, u32>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_several_sections_is_never_seen_half_applied() {
    let (l1, v1, l2, v2) = (
        Backend::named("l1").await,
        Backend::named("v1").await,
        Backend::named("l2").await,
        Backend::named("v2").await,
    );
    let a = config(&l1, &v1, 0, 100);
    let b = config(&l2, &v2, 100, 0);
    let vs = Arc::new(Vastshift::start(&a).await);
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Answers>> = Arc::default();
    let mut clients = Vec::new();
    for (path, post) in [("/x", false), ("/r/1", false), ("/x", true), ("/r/1", true)] {
        let (vs, stop, seen) = (Arc::clone(&vs), Arc::clone(&stop), Arc::clone(&seen));
        clients.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                // GETs take the lane; POSTs with a body are served by hyper's path.
                let req = if post {
                    c.post(vs.url(path)).body("{}")
                } else {
                    c.get(vs.url(path))
                };
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 200);
                let body = resp.text().await.unwrap();
                let method = if post { "POST" } else { "GET" };
                *seen
                    .lock()
                    .unwrap()
                    .entry((path.to_string(), method.to_string()))
                    .or_default()
                    .entry(body)
                    .or_default() += 1;
            }
        }));
    }
    for i in 0..200 {
        vs.write_config(if i % 2 == 0 { &b } else { &a });
        assert!(vs.app.reload().unwrap(), "reload {i} applied");
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    eprintln!("answers seen: {seen:?}");
    for ((path, method), bodies) in &seen {
        let allowed: &[&str] = if path == "/x" {
            &["l1", "v2"]
        } else {
            &["v1", "l2"]
        };
        for (body, n) in bodies {
            assert!(
                allowed.contains(&body.as_str()),
                "{method} {path} was answered by {body} {n} times: a half-applied reload"
            );
        }
        assert_eq!(
            bodies.len(),
            2,
            "{method} {path} saw both configs: {bodies:?}"
        );
    }
    assert_eq!(seen.len(), 4);
}
