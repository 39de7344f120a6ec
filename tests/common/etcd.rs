//! A real etcd for integration tests: one single-member etcd per [`Etcd`], on free loopback ports
//! and in its own temporary folder, with raw key helpers through etcd's v3 JSON gateway.
//!
//! - [`Etcd::start`] installs etcd when it is missing (`.ci/install-etcd.sh`, once per process),
//!   starts it and waits until it answers.
//! - [`Etcd::kill`], [`Etcd::restart`], [`Etcd::pause`] and [`Etcd::resume`] are the failures
//!   tests inject: a crash (data kept on disk), a restart on the same ports, a hung server.
//! - [`Etcd::put`], [`Etcd::get`], [`Etcd::delete`], [`Etcd::keys`], [`Etcd::revision`] and
//!   [`Etcd::compact`] look at and change the store behind the code under test's back;
//!   [`Etcd::call`] is any gateway call, for what they do not cover.
//!
//! Dropping an [`Etcd`] kills it: no etcd outlives its test.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long etcd has to answer after it is started.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// How often readiness is polled.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Timeout of the kit's own gateway calls: generous, a loaded CI machine may be slow.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// New ports tried when the chosen ones were taken before etcd bound them.
const PORT_ATTEMPTS: usize = 5;

/// A running single-member etcd, killed on drop.
pub struct Etcd {
    /// Holds the data dir and the log; removed on drop.
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// `None` after [`Etcd::kill`].
    child: Option<Child>,
    http: reqwest::Client,
}

/// Why one start attempt failed.
enum StartError {
    /// A port was taken between choosing it and etcd binding it: worth new ports.
    PortTaken,
    /// Anything else, with what to panic with.
    Failed(String),
}

impl Etcd {
    /// Starts etcd on two free loopback ports and waits until its gateway answers. Installs etcd
    /// first if it is not on PATH. Panics, with the end of etcd's log, if it does not come up.
    pub async fn start() -> Etcd {
        let binary = etcd_binary();
        let mut etcd = Etcd {
            dir: tempfile::tempdir().unwrap(),
            client_port: 0,
            peer_port: 0,
            child: None,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        };
        for _ in 0..PORT_ATTEMPTS {
            (etcd.client_port, etcd.peer_port) = free_ports();
            // A failed attempt may have left a member behind with the old ports: start afresh.
            let _ = std::fs::remove_dir_all(etcd.dir.path().join("data"));
            match etcd.launch(binary).await {
                Ok(()) => return etcd,
                Err(StartError::PortTaken) => continue,
                Err(StartError::Failed(why)) => panic!("{why}"),
            }
        }
        panic!(
            "etcd: ports taken {PORT_ATTEMPTS} times in a row; log tail:\n{}",
            etcd.log_tail()
        );
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The etcd process's id. Panics after [`Etcd::kill`].
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("etcd is not running").id()
    }

    /// The folder holding `data/` and `etcd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills etcd with SIGKILL, as a crash would, and waits for it to exit. The data stays.
    pub fn kill(&mut self) {
        self.stop();
    }

    /// Starts etcd again on the same ports and data dir (killing it first if it still runs) and
    /// waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let binary = etcd_binary();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            match self.launch(binary).await {
                Ok(()) => return,
                // The port is ours, but whoever took it meanwhile may let it go: keep trying.
                Err(StartError::PortTaken) if Instant::now() < deadline => {
                    self.stop();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(StartError::PortTaken) => {
                    panic!("etcd restart: port still taken\n{}", self.log_tail())
                }
                Err(StartError::Failed(why)) => panic!("{why}"),
            }
        }
    }

    /// Freezes etcd (SIGSTOP): connections are accepted by the kernel but nothing answers, like
    /// a hung or partitioned server.
    pub fn pause(&self) {
        signal("STOP", self.pid());
    }

    /// Lets a paused etcd run again (SIGCONT).
    pub fn resume(&self) {
        signal("CONT", self.pid());
    }

    /// Writes `key` = `value`; returns the revision of the write.
    pub async fn put(&self, key: &str, value: &str) -> i64 {
        let body =
            json!({"key": b64_encode(key.as_bytes()), "value": b64_encode(value.as_bytes())});
        let out = self.must("/v3/kv/put", body).await;
        int(&out["header"]["revision"])
    }

    /// The value of `key` and its mod revision, `None` when absent.
    pub async fn get(&self, key: &str) -> Option<(String, i64)> {
        let out = self
            .must("/v3/kv/range", json!({"key": b64_encode(key.as_bytes())}))
            .await;
        let kv = out["kvs"].as_array()?.first()?;
        let value = b64_decode(kv["value"].as_str().unwrap_or(""));
        Some((
            String::from_utf8(value).expect("etcd value is not UTF-8"),
            int(&kv["mod_revision"]),
        ))
    }

    /// Deletes `key` (absent is fine).
    pub async fn delete(&self, key: &str) {
        self.must(
            "/v3/kv/deleterange",
            json!({"key": b64_encode(key.as_bytes())}),
        )
        .await;
    }

    /// The store's current revision.
    pub async fn revision(&self) -> i64 {
        let out = self
            .must("/v3/kv/range", json!({"key": b64_encode(b"\0")}))
            .await;
        int(&out["header"]["revision"])
    }

    /// Compacts history up to `revision` (physically, before answering): reads and watches at
    /// older revisions fail afterwards.
    pub async fn compact(&self, revision: i64) {
        self.must(
            "/v3/kv/compaction",
            json!({"revision": revision.to_string(), "physical": true}),
        )
        .await;
    }

    /// Every key starting with `prefix`, in order.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let body = json!({
            "key": b64_encode(prefix.as_bytes()),
            "range_end": b64_encode(&prefix_end(prefix.as_bytes())),
            "keys_only": true,
        });
        let out = self.must("/v3/kv/range", body).await;
        out["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        let key = b64_decode(kv["key"].as_str().unwrap_or(""));
                        String::from_utf8(key).expect("etcd key is not UTF-8")
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// POSTs `body` to gateway `path` (e.g. `/v3/kv/range`) and returns the JSON answer; an
    /// error for no answer within `timeout`, a non-2xx status (with the body) or non-JSON.
    pub async fn call(&self, path: &str, body: Value, timeout: Duration) -> Result<Value, String> {
        let resp = self
            .http
            .post(format!("{}{path}", self.endpoint()))
            .timeout(timeout)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| format!("{path}: {e}"))?;
        if !status.is_success() {
            return Err(format!("{path}: {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("{path}: {e}: {text}"))
    }

    /// The last lines of etcd's log (all its runs), for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A gateway call that must succeed.
    async fn must(&self, path: &str, body: Value) -> Value {
        self.call(path, body, CALL_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("etcd {e}"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Spawns etcd on this instance's ports and data dir and waits for it to answer.
    async fn launch(&mut self, binary: &Path) -> Result<(), StartError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(binary);
        cmd.arg("--name")
            .arg("kit")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("kit={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        // etcd reads ETCD_* variables as flags: none from the test's environment may leak in.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(name);
            }
        }
        // etcd 3.4 refuses to run on architectures other than amd64 unless told to.
        if std::env::consts::ARCH != "x86_64" {
            let arch = match std::env::consts::ARCH {
                "aarch64" => "arm64",
                other => other,
            };
            cmd.env("ETCD_UNSUPPORTED_ARCH", arch);
        }
        let child = cmd
            .spawn()
            .map_err(|e| StartError::Failed(format!("etcd: cannot run {binary:?}: {e}")))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Polls a range until etcd answers it; fails early if etcd exits.
    async fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + READY_WITHIN;
        let probe = json!({"key": b64_encode(b"\0")});
        loop {
            if self
                .call("/v3/kv/range", probe.clone(), Duration::from_secs(1))
                .await
                .is_ok()
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                let tail = self.log_tail();
                self.child = None;
                if tail.contains("address already in use") {
                    return Err(StartError::PortTaken);
                }
                return Err(StartError::Failed(format!(
                    "etcd exited ({status}) before answering; log tail:\n{tail}"
                )));
            }
            if Instant::now() >= deadline {
                let tail = self.log_tail();
                self.stop();
                return Err(StartError::Failed(format!(
                    "etcd did not answer within {READY_WITHIN:?}; log tail:\n{tail}"
                )));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// SIGCONT (a paused etcd must not linger), SIGKILL, and reap.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                signal("CONT", child.id());
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The etcd binary: found on PATH, else installed by `.ci/install-etcd.sh` (once per process;
/// the script itself serializes concurrent processes).
fn etcd_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(found) = on_path("etcd") {
            return found;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/install-etcd.sh");
        let out = Command::new("bash")
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
        assert!(
            out.status.success(),
            "{script} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        on_path("etcd").unwrap_or_else(|| panic!("{script} ran but etcd is not on PATH"))
    })
}

/// `name` in a PATH folder, if there.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| File::open(p).is_ok_and(|f| f.metadata().is_ok_and(|m| m.is_file())))
}

/// Two distinct free loopback ports (both held while choosing, then released for etcd).
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Sends SIGname to `pid` with kill(1) (the crate has no libc binding, and forbids unsafe).
fn signal(name: &str, pid: u32) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(status.success(), "kill -{name} {pid} failed: {status}");
}

/// An int64 field of a gateway answer: a JSON string, absent when 0.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not an int64: {s:?}")),
        Value::Number(n) => n.as_i64().unwrap_or_else(|| panic!("not an int64: {n}")),
        Value::Null => 0,
        other => panic!("not an int64: {other}"),
    }
}

/// The range end covering every key with this prefix: the prefix with its last byte below 0xff
/// incremented (later bytes dropped); `\0` (everything) when there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as the gateway wants for keys and values.
pub fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional). Panics on anything else: the gateway sent it.
pub fn b64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = B64
            .iter()
            .position(|&b| b == c)
            .unwrap_or_else(|| panic!("not base64: {text:?}"));
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
