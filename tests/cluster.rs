//! Many replicas on one migration (SPEC §9), against a real etcd started by the test kit:
//! propagation, compare-and-swap under concurrency, the store killed, hung and compacted, the
//! guard and the ramp across replicas, start-up with the store down, bad input in the store.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::*;
use reqwest::Method;
use serde_json::Value;

/// The `[store]` section of a replica `id` on `endpoint`, under a prefix of its own per test.
fn store(endpoint: &str, prefix: &str, id: &str) -> String {
    format!(
        "[store]\nkind = \"etcd\"\nendpoints = [\"{endpoint}\"]\nprefix = \"/vs/{prefix}\"\nreplica_id = \"{id}\"\nheartbeat_secs = 1\ntimeout_ms = 500\n"
    )
}

/// A replica in front of the given backends.
async fn replica(legacy: &str, vastai: &str, extra: &str) -> Running {
    Kit::with(extra)
        .legacy_url(legacy)
        .vastai_url(vastai)
        .start()
        .await
}

/// `n` replicas sharing the migration under `prefix`, each with `extra` config; the first owns
/// the two backends.
async fn replicas(etcd: &Etcd, prefix: &str, n: usize, extra: &str) -> Vec<Running> {
    let first = Kit::with(format!(
        "{extra}\n{}",
        store(&etcd.endpoint(), prefix, "r0")
    ))
    .await;
    let (legacy, vastai) = (first.legacy().url(), first.vastai().url());
    let mut all = vec![first];
    for i in 1..n {
        let text = format!(
            "{extra}\n{}",
            store(&etcd.endpoint(), prefix, &format!("r{i}"))
        );
        all.push(replica(&legacy, &vastai, &text).await);
    }
    for r in &all {
        assert!(
            eventually(10.0, || async { cluster_ready(r, n).await }).await,
            "replica never saw {n} replicas and a leader: {}",
            r.admin_json("/admin/cluster").await
        );
    }
    all
}

async fn cluster_ready(r: &Running, n: usize) -> bool {
    let c = r.admin_json("/admin/cluster").await;
    c["store"]["connected"] == true
        && c["leader"].is_string()
        && c["replicas"].as_array().map_or(0, Vec::len) == n
}

async fn percent(r: &Running) -> f64 {
    r.admin_json("/admin/split").await["percent"]
        .as_f64()
        .unwrap()
}

async fn applied(r: &Running) -> i64 {
    r.admin_json("/admin/cluster").await["store"]["applied_revision"]
        .as_i64()
        .unwrap()
}

async fn put_split(r: &Running, percent: f64, reason: &str) -> reqwest::Response {
    r.admin_send(
        Method::PUT,
        "/admin/split",
        &format!("{{\"percent\": {percent}, \"reason\": \"{reason}\"}}"),
    )
    .await
}

/// Waits until every replica applied the same revision; returns it.
async fn converged(all: &[Running], secs: f64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        let mut revs = Vec::new();
        for r in all.iter() {
            revs.push(applied(r).await);
        }
        if revs.iter().all(|v| *v == revs[0] && *v > 0) {
            return revs[0];
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge: applied revisions {revs:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_follow_a_put_on_any_of_them() {
    let etcd = Etcd::start().await;
    let all = replicas(&etcd, "follow", 3, "").await;
    let mut times = Vec::new();
    for i in 0..30usize {
        let p = (i + 1) as f64;
        let writer = &all[i % 3];
        let t0 = Instant::now();
        let resp = put_split(writer, p, &format!("step {i}")).await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        for (j, other) in all.iter().enumerate() {
            if j == i % 3 {
                continue;
            }
            assert!(
                eventually(2.0, || async { percent(other).await == p }).await,
                "replica r{j} never routed by {p}%"
            );
            times.push(t0.elapsed());
        }
    }
    times.sort();
    let (p50, p99) = (quantile(&times, 0.5), quantile(&times, 0.99));
    eprintln!(
        "propagation over {} observations: p50 {p50:?}, p99 {p99:?}",
        times.len()
    );
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
    // Each replica routes by it: the explain endpoint answers with the shared percentage.
    for r in &all {
        let e = r.admin_json("/admin/explain?path=/x&key=k").await;
        assert_eq!(e["percent"], 30.0);
    }
    let c = all[1].admin_json("/admin/cluster").await;
    assert_eq!(c["replicas"].as_array().unwrap().len(), 3);
    assert!(c["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["config_drift"] == false));
    assert_eq!(all[0].metric("vastshift_cluster_replicas").await, 3.0);
    let leaders: f64 = {
        let mut s = 0.0;
        for r in &all {
            s += r.metric("vastshift_cluster_leader").await;
        }
        s
    };
    assert_eq!(leaders, 1.0, "exactly one leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_writes_across_replicas_lose_nothing() {
    let etcd = Etcd::start().await;
    let all = Arc::new(replicas(&etcd, "cas", 3, "").await);
    let mut tasks = Vec::new();
    for i in 0..50usize {
        let all = Arc::clone(&all);
        tasks.push(tokio::spawn(async move {
            let r = put_split(&all[i % 3], (i % 100) as f64, &format!("w{i}")).await;
            r.status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let revision = converged(&all, 5.0).await;
    let audit = all[2].admin_json("/admin/audit").await;
    let reasons: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .filter(|r| r.starts_with('w'))
        .collect();
    for i in 0..50 {
        let n = reasons.iter().filter(|r| **r == format!("w{i}")).count();
        assert_eq!(n, 1, "write w{i} is in the audit log {n} times");
    }
    // The final state is the last one applied: the newest audit entry's percentage.
    let newest = &audit[0];
    for r in all.iter() {
        assert_eq!(Some(percent(r).await), newest["to"].as_f64());
        assert_eq!(applied(r).await, revision);
    }
    assert!(
        all[0]
            .metric("vastshift_store_operations_total{op=\"write\",result=\"conflict\"}")
            .await
            + all[1]
                .metric("vastshift_store_operations_total{op=\"write\",result=\"conflict\"}")
                .await
            + all[2]
                .metric("vastshift_store_operations_total{op=\"write\",result=\"conflict\"}")
                .await
            > 0.0,
        "50 concurrent writes without a single conflict: the swap is not being exercised"
    );
}

/// GETs on every replica until stopped; counts requests and failures.
fn load(
    all: &[Running],
) -> (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for r in all {
        let url = r.url("/load");
        let (stop, sent, failed) = (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                match c.get(&url).timeout(Duration::from_secs(5)).send().await {
                    Ok(r) if r.status() == 200 => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    (stop, sent, failed, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_hung_under_load_fails_no_request_and_converges() {
    let mut etcd = Etcd::start().await;
    let all = replicas(&etcd, "chaos", 3, "[split]\npercent = 50\n").await;
    let (stop, sent, failed, tasks) = load(&all);

    // Killed: admin writes fail fast (503 within 2 x timeout_ms), rollback still applies here.
    etcd.kill();
    let t0 = Instant::now();
    let r = put_split(&all[0], 20.0, "while down").await;
    assert_eq!(r.status(), 503);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        t0.elapsed()
    );
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("state store unavailable"),
        "{body}"
    );
    assert!(
        eventually(5.0, || async {
            all[1].open_json("/health").await["store"]["connected"] == false
        })
        .await
    );
    assert_eq!(all[1].metric("vastshift_store_connected").await, 0.0);
    etcd.restart().await;
    assert!(
        eventually(10.0, || async {
            put_split(&all[0], 20.0, "back").await.status() == 200
        })
        .await,
        "admin writes never worked again"
    );
    converged(&all, 10.0).await;
    for r in &all {
        assert_eq!(percent(r).await, 20.0);
    }

    // Hung (SIGSTOP): every call is bounded; the write answers 503 within 2 x timeout_ms.
    etcd.pause();
    let t0 = Instant::now();
    let r = put_split(&all[1], 30.0, "while hung").await;
    assert_eq!(r.status(), 503);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    etcd.resume();
    assert!(
        eventually(10.0, || async {
            put_split(&all[1], 30.0, "resumed").await.status() == 200
        })
        .await
    );
    let t_resume = Instant::now();
    let revision = converged(&all, 10.0).await;
    eprintln!(
        "converged on revision {revision} {:?} after the store resumed",
        t_resume.elapsed()
    );
    for r in &all {
        assert_eq!(percent(r).await, 30.0);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("client requests during the chaos: {sent} sent, {failed} failed");
    assert!(sent > 100);
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_while_the_store_is_down_applies_here_and_reaches_all_when_it_returns() {
    let mut etcd = Etcd::start().await;
    let all = replicas(&etcd, "pending", 2, "[split]\npercent = 40\n").await;
    etcd.kill();
    assert!(
        eventually(5.0, || async {
            all[0].open_json("/health").await["store"]["connected"] == false
        })
        .await
    );
    let t0 = Instant::now();
    let r = all[0]
        .admin_send(Method::POST, "/admin/rollback", "{\"reason\": \"3am\"}")
        .await;
    assert_eq!(r.status(), 200);
    assert!(t0.elapsed() < Duration::from_secs(1));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["propagated"], false);
    assert_eq!(body["rolled_back"], true);
    assert_eq!(percent(&all[0]).await, 0.0, "applied here at once");
    assert_eq!(
        percent(&all[1]).await,
        40.0,
        "the other has not heard of it yet"
    );
    etcd.restart().await;
    assert!(
        eventually(10.0, || async { percent(&all[1]).await == 0.0 }).await,
        "the rollback never reached the other replica"
    );
    // The stale stored state (40 %) never undid it on the replica that rolled back.
    assert_eq!(percent(&all[0]).await, 0.0);
    let audit = all[1].admin_json("/admin/audit").await;
    assert_eq!(audit[0]["change"], "rollback");
    assert_eq!(audit[0]["replica"], "r0");
    let rollbacks = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["change"] == "rollback")
        .count();
    assert_eq!(rollbacks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_rollback_on_one_replica_rolls_back_all() {
    let etcd = Etcd::start().await;
    // Replica r0's vastai answers 500: its guard fails; r1's vastai is healthy.
    let failing = Kit::new().vastai(|req| async move {
        if is_probe(&req) {
            respond(200, "ok")
        } else {
            respond(500, "boom")
        }
    });
    let guard = "[guard]\nmin_requests = 5\nwindow_secs = 30\n[split]\nfallback = false\n";
    let r0 = failing
        .config(format!(
            "{guard}\n{}",
            store(&etcd.endpoint(), "guard", "r0")
        ))
        .start()
        .await;
    let r1 = replica(
        &r0.legacy().url(),
        &r0.legacy().url(),
        &format!("{guard}\n{}", store(&etcd.endpoint(), "guard", "r1")),
    )
    .await;
    let all = [r0, r1];
    for r in &all {
        assert!(eventually(10.0, || async { cluster_ready(r, 2).await }).await);
    }
    assert_eq!(put_split(&all[1], 100.0, "go").await.status(), 200);
    assert!(eventually(5.0, || async { percent(&all[0]).await == 100.0 }).await);
    for _ in 0..20 {
        assert_eq!(served_by(&all[0].get("/x").await), "vastai");
    }
    assert!(
        eventually(5.0, || async {
            all[1].admin_json("/admin/split").await["rolled_back"] == true
        })
        .await,
        "the guard's rollback on r0 never reached r1: r0 {} / status {}",
        all[0].admin_json("/admin/split").await,
        all[0].admin_json("/admin/status").await["guard"]
    );
    let audit = all[1].admin_json("/admin/audit").await;
    assert_eq!(audit[0]["actor"], "guard");
    assert_eq!(audit[0]["replica"], "r0");
    assert_eq!(all[1].admin_json("/admin/split").await["source"], "guard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_dies_and_the_ramp_goes_on_from_another_replica() {
    let etcd = Etcd::start().await;
    let extra = "[guard]\nmin_requests = 4\nwindow_secs = 5\n[ramp]\nsteps = [10.0, 20.0, 30.0, 40.0]\nhold_secs = 1\n";
    // The leader is the real binary, so it can die by SIGKILL, without revoking its lease.
    let mut leader = Kit::with(format!(
        "{extra}\n{}",
        store(&etcd.endpoint(), "ramp", "binary")
    ))
    .serve_binary(std::process::Stdio::null())
    .await;
    assert!(leader.ready_within(20.0).await);
    let leader_admin = leader.admin_url("/admin/cluster");
    let c = client();
    assert!(
        eventually(10.0, || async {
            let doc = json_of(admin(&c, Method::GET, leader_admin.clone())).await;
            doc["leader"] == "binary"
        })
        .await
    );
    let other = replica(
        &leader.legacy().url(),
        &leader.vastai().url(),
        &format!("{extra}\n{}", store(&etcd.endpoint(), "ramp", "inproc")),
    )
    .await;
    assert!(eventually(10.0, || async { cluster_ready(&other, 2).await }).await);
    let r = other
        .admin_send(Method::POST, "/admin/ramp", "{\"action\": \"start\"}")
        .await;
    assert_eq!(r.status(), 200);
    // Traffic on both replicas; the ramp steps on the leader.
    let stop = Arc::new(AtomicBool::new(false));
    let mut traffic = Vec::new();
    for url in [leader.url("/r"), other.url("/r")] {
        let stop = Arc::clone(&stop);
        traffic.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let _ = c
                    .get(&url)
                    .header("x-vastshift-backend", "vastai")
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    assert!(
        eventually(15.0, || async { percent(&other).await >= 20.0 }).await,
        "the leader never advanced the ramp"
    );
    leader.child.kill().unwrap();
    let killed = Instant::now();
    assert!(
        eventually(6.0, || async {
            other.admin_json("/admin/cluster").await["leader"] == "inproc"
        })
        .await,
        "leadership did not move"
    );
    let moved = killed.elapsed();
    eprintln!("leadership moved {moved:?} after the leader was killed");
    assert!(moved < Duration::from_secs(3) + Duration::from_millis(1500));
    assert!(
        eventually(15.0, || async { percent(&other).await == 40.0 }).await,
        "the ramp did not go on from the new leader: {}",
        other.admin_json("/admin/split").await
    );
    let audit = other.admin_json("/admin/audit").await;
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["change"] == "ramp step 4" && e["replica"] == "inproc"));
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.await.unwrap();
    }
    let _ = leader.child.wait();
}

/// A TCP relay to `target` that can be cut: while cut, live connections are closed and new
/// ones are refused at once.
struct Relay {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl Relay {
    async fn start(target: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (c, g) = (Arc::clone(&cut), Arc::clone(&generation));
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::Relaxed) {
                    continue;
                }
                let target = target.clone();
                let (c, g) = (Arc::clone(&c), Arc::clone(&g));
                tokio::spawn(async move {
                    let born = g.load(Ordering::Relaxed);
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let cut = async {
                        while !c.load(Ordering::Relaxed) && g.load(Ordering::Relaxed) == born {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! { _ = copy => {}, _ = cut => {} }
                });
            }
        });
        Relay {
            addr,
            cut,
            generation,
        }
    }

    fn cut(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.cut.store(true, Ordering::Relaxed);
    }

    fn mend(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_behind_a_compaction_reads_the_state_in_full() {
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.endpoint().trim_start_matches("http://").to_string()).await;
    let direct = Kit::with(store(&etcd.endpoint(), "compact", "direct")).await;
    let behind = replica(
        &direct.legacy().url(),
        &direct.vastai().url(),
        &store(&format!("http://{}", relay.addr), "compact", "behind"),
    )
    .await;
    assert!(eventually(10.0, || async { cluster_ready(&behind, 2).await }).await);
    relay.cut();
    assert!(
        eventually(5.0, || async {
            behind.admin_json("/admin/cluster").await["store"]["connected"] == false
        })
        .await
    );
    for p in [11.0, 12.0, 13.0] {
        assert_eq!(put_split(&direct, p, "while cut off").await.status(), 200);
    }
    etcd.compact(etcd.revision().await).await;
    assert_eq!(
        percent(&behind).await,
        0.0,
        "still by the last state it applied"
    );
    relay.mend();
    assert!(
        eventually(10.0, || async { percent(&behind).await == 13.0 }).await,
        "the replica behind the compaction never caught up"
    );
    assert_eq!(applied(&behind).await, applied(&direct).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_with_the_store_down_serves_from_its_local_copy_or_rolled_back() {
    let mut etcd = Etcd::start().await;
    let folder = tempfile::tempdir().unwrap();
    let text = store(&etcd.endpoint(), "down", "r0");
    let first = Kit::with(&text).dir(folder.path()).await;
    assert!(eventually(10.0, || async { cluster_ready(&first, 1).await }).await);
    assert_eq!(put_split(&first, 35.0, "before").await.status(), 200);
    let kit = first.stop().await;
    etcd.kill();

    // With the local copy of the last applied state: serves by it at once.
    let t0 = Instant::now();
    let again = kit.config(&text).dir(folder.path()).await;
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "serving waited for the store"
    );
    assert_eq!(percent(&again).await, 35.0);
    assert_eq!(again.get("/").await.status(), 200);
    let health = again.open_json("/health").await;
    assert_eq!(health["store"]["connected"], false, "{health}");
    let (legacy, vastai) = (again.legacy().url(), again.vastai().url());

    // Without one: starts rolled back, serves legacy, and adopts the stored state later.
    let fresh = replica(&legacy, &vastai, &store(&etcd.endpoint(), "down", "r1")).await;
    let split = fresh.admin_json("/admin/split").await;
    assert_eq!(split["rolled_back"], true);
    assert_eq!(split["percent"], 0.0);
    assert_eq!(served_by(&fresh.get("/").await), "legacy");
    etcd.restart().await;
    assert!(
        eventually(10.0, || async { percent(&fresh).await == 35.0 }).await,
        "the provisional rollback was not replaced by the stored state"
    );
    let audit = fresh.admin_json("/admin/audit").await;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] != "startup"),
        "the provisional rollback reached the shared audit log: {audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_in_the_store_are_reported_and_never_change_the_split() {
    let etcd = Etcd::start().await;
    let all = replicas(&etcd, "bad", 2, "").await;
    assert_eq!(put_split(&all[0], 25.0, "good").await.status(), 200);
    assert!(eventually(5.0, || async { percent(&all[1]).await == 25.0 }).await);
    etcd.put("/vs/bad/state", "{\"default_override\": 99").await;
    etcd.put("/vs/bad/somebody-elses", "hello").await;
    etcd.put("/vs/bad/replicas/ghost", "not json").await;
    assert!(
        eventually(5.0, || async {
            all[1].admin_json("/admin/cluster").await["store"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("unreadable"))
        })
        .await
    );
    for r in &all {
        assert_eq!(
            percent(r).await,
            25.0,
            "a malformed state changed the split"
        );
        assert_eq!(r.get("/").await.status(), 200);
    }
    let c = all[0].admin_json("/admin/cluster").await;
    assert_eq!(
        c["replicas"].as_array().unwrap().len(),
        2,
        "the ghost record counted: {c}"
    );
    // An operator's next write replaces the malformed document.
    assert_eq!(put_split(&all[1], 5.0, "repair").await.status(), 200);
    assert!(eventually(5.0, || async { percent(&all[0]).await == 5.0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_with_the_same_id_refuses_to_start() {
    let etcd = Etcd::start().await;
    let first = Kit::with(store(&etcd.endpoint(), "dup", "same")).await;
    assert!(eventually(10.0, || async { cluster_ready(&first, 1).await }).await);
    let second = Kit::with(store(&etcd.endpoint(), "dup", "same"))
        .legacy_url(first.legacy().url())
        .vastai_url(first.vastai().url())
        .try_start()
        .await;
    match second {
        Err(e) => assert!(
            e.to_string().contains("held by another live replica"),
            "{e}"
        ),
        Ok(_) => panic!("two live replicas with one id"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_list_is_reported_and_serving_goes_on() {
    let dead = dead_url().await;
    let r = Kit::with(store(&dead, "none", "r0")).await;
    assert_eq!(r.get("/").await.status(), 200);
    assert!(
        eventually(5.0, || async {
            let h = r.open_json("/health").await;
            h["store"]["connected"] == false
                && h["store"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("cannot reach"))
        })
        .await,
        "{}",
        r.open_json("/health").await
    );
    let w = put_split(&r, 10.0, "x").await;
    assert_eq!(w.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_drift_is_flagged_and_the_cli_shows_every_replica() {
    let etcd = Etcd::start().await;
    let all = replicas(&etcd, "drift", 2, "").await;
    // r1 reloads a file whose guard differs: its config hash no longer matches the leader's.
    let leader = all[0].admin_json("/admin/cluster").await["leader"]
        .as_str()
        .unwrap()
        .to_string();
    let drifting = if leader == "r0" { &all[1] } else { &all[0] };
    let drifting_id = if leader == "r0" { "r1" } else { "r0" };
    let text = std::fs::read_to_string(&drifting.config_path).unwrap();
    drifting.write_config(&format!("{text}\n[guard]\nmin_requests = 99\n"));
    assert!(
        eventually(10.0, || async {
            let c = all[0].admin_json("/admin/cluster").await;
            c["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"] == drifting_id && r["config_drift"] == true)
        })
        .await,
        "drift never flagged: {}",
        all[0].admin_json("/admin/cluster").await
    );
    assert!(
        eventually(5.0, || async {
            drifting.metric("vastshift_cluster_config_drift").await == 1.0
        })
        .await
    );
    let out = tokio::process::Command::new(BIN)
        .args(["cluster", "--admin", &drifting.admin_url("")])
        .env("VASTSHIFT_ADMIN_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "drift exits 1: {text}");
    assert!(text.starts_with("store: etcd connected"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("replica ")).count(),
        2,
        "{text}"
    );
    assert!(
        text.contains("CONFIG DRIFT") && text.contains("[leader"),
        "{text}"
    );
    let out = tokio::process::Command::new(BIN)
        .args(["status", "--admin", &drifting.admin_url("")])
        .env("VASTSHIFT_ADMIN_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("replica ")).count(),
        2,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_auth_takes_the_right_credentials_and_names_the_wrong_ones() {
    let etcd = Etcd::start().await;
    let t = Duration::from_secs(10);
    for (path, body) in [
        (
            "/v3/auth/user/add",
            serde_json::json!({"name": "root", "password": "s3cret-pw"}),
        ),
        ("/v3/auth/role/add", serde_json::json!({"name": "root"})),
        (
            "/v3/auth/user/grant",
            serde_json::json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/enable", serde_json::json!({})),
    ] {
        etcd.call(path, body, t).await.unwrap();
    }
    let auth = "username_env = \"ETCD_USER\"\npassword_env = \"ETCD_PASS\"\n";
    let good = Kit::with(format!("{}{auth}", store(&etcd.endpoint(), "auth", "good")))
        .env("ETCD_USER", "root")
        .env("ETCD_PASS", "s3cret-pw")
        .await;
    assert!(eventually(10.0, || async { cluster_ready(&good, 1).await }).await);
    assert_eq!(put_split(&good, 15.0, "authenticated").await.status(), 200);
    let bad = Kit::with(format!("{}{auth}", store(&etcd.endpoint(), "auth", "bad")))
        .legacy_url(good.legacy().url())
        .vastai_url(good.vastai().url())
        .env("ETCD_USER", "root")
        .env("ETCD_PASS", "wrong-pw")
        .await;
    assert!(
        eventually(5.0, || async {
            bad.open_json("/health").await["store"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("authentication failed") && e.contains("root"))
        })
        .await,
        "{}",
        bad.open_json("/health").await
    );
    let health = bad.open_json("/health").await.to_string();
    let cluster = bad.admin_json("/admin/cluster").await.to_string();
    for doc in [&health, &cluster] {
        assert!(
            !doc.contains("wrong-pw") && !doc.contains("s3cret"),
            "a secret leaked: {doc}"
        );
    }
    assert_eq!(bad.get("/").await.status(), 200, "serving goes on");
    assert_eq!(put_split(&bad, 20.0, "refused").await.status(), 503);
}
