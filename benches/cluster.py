#!/usr/bin/env python3
"""Many replicas on etcd (issue #20): propagation, rollback reach, chaos, instructions per request.

Starts a real etcd (Debian's etcd-server, installed by .ci/install-etcd.sh when missing), two demo
backends and three release vastshift replicas sharing one prefix, all on loopback, then measures:

1. propagation: CHANGES (200) PUTs of the global split, rotating over the replicas; for each, the
   time from sending the PUT until each of the two other replicas routes by it (polled on its
   /admin/explain, which reads the snapshot the request path reads), p50 and p99;
2. rollback reach: ROLLBACKS (20) POST /admin/rollback on one replica, the time until all three
   are rolled back;
3. chaos under load (wrk on every replica): etcd SIGKILLed, a rollback while it is down,
   etcd restarted; then SIGSTOPped, a write answered 503, SIGCONT: requests sent and failed, and
   the time for all replicas to converge on one revision after etcd returns;
4. instructions per proxied GET (callgrind, as in benches/run.sh) of one replica with the file
   store and one with the etcd store, side by side.

Usage: cargo build --release && python3 benches/cluster.py   (env: CHANGES, ROLLBACKS, CHAOS_SECS,
CALLGRIND_SECS). Prints a Markdown report.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("VASTSHIFT_BIN", os.path.join(ROOT, "target/release/vastshift"))
CHANGES = int(os.environ.get("CHANGES", "200"))
ROLLBACKS = int(os.environ.get("ROLLBACKS", "20"))
CALLGRIND_SECS = int(os.environ.get("CALLGRIND_SECS", "8"))
TOKEN = "bench-token"
procs = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spawn(args, log, **kw):
    p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, **kw)
    procs.append(p)
    return p


def need(cmd, package):
    if shutil.which(cmd):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                   check=True, env=env, stdout=subprocess.DEVNULL)


class Admin:
    """A keep-alive connection to one replica's ops listener."""

    def __init__(self, port):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def call(self, method, path, body=None):
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body,
                                  headers={"authorization": f"Bearer {TOKEN}",
                                           "content-type": "application/json"})
                r = self.conn.getresponse()
                data = r.read()
                return r.status, (json.loads(data) if data else None)
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise RuntimeError("unreachable")


def wait_until(f, secs, what):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        try:
            if f():
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"timed out: {what}")


def q(sorted_values, p):
    i = round((len(sorted_values) - 1) * p)
    return sorted_values[min(i, len(sorted_values) - 1)]


def ms(v):
    return f"{v * 1000:.1f} ms"


def main():
    if not os.access(BIN, os.X_OK):
        raise SystemExit(f"{BIN} missing: cargo build --release first")
    subprocess.run(["bash", os.path.join(ROOT, ".ci/install-etcd.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    need("wrk", "wrk")
    work = tempfile.mkdtemp(prefix="vastshift-cluster-")
    log = open(os.path.join(work, "log.txt"), "w")
    cport, pport = free_port(), free_port()
    etcd_args = ["etcd", "--name", "bench", "--data-dir", os.path.join(work, "etcd"),
                 "--listen-client-urls", f"http://127.0.0.1:{cport}",
                 "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                 "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                 "--initial-cluster", f"bench=http://127.0.0.1:{pport}"]
    etcd_env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    etcd = spawn(etcd_args, log, env=etcd_env)
    b1, b2 = free_port(), free_port()
    spawn([BIN, "demo-backend", "--listen", f"127.0.0.1:{b1}", "--name", "legacy"], log)
    spawn([BIN, "demo-backend", "--listen", f"127.0.0.1:{b2}", "--name", "vastai"], log)

    def config(i, proxy, admin, store):
        text = f"""[server]
listen = "127.0.0.1:{proxy}"
admin_listen = "127.0.0.1:{admin}"
state_file = "{work}/state-{i}.json"
[legacy]
url = "http://127.0.0.1:{b1}"
[vastai]
url = "http://127.0.0.1:{b2}"
[split]
percent = 0
"""
        if store:
            text += f"""[store]
kind = "etcd"
endpoints = ["http://127.0.0.1:{cport}"]
prefix = "/bench"
replica_id = "r{i}"
heartbeat_secs = 1
timeout_ms = 500
"""
        path = os.path.join(work, f"r{i}.toml")
        open(path, "w").write(text)
        return path

    env = dict(os.environ, VASTSHIFT_ADMIN_TOKEN=TOKEN, RUST_LOG="warn")
    replicas = []
    for i in range(3):
        proxy, admin = free_port(), free_port()
        spawn([BIN, "serve", "--worker-threads", "1", "--config", config(i, proxy, admin, True)],
              log, env=env)
        replicas.append((proxy, admin))
    admins = [Admin(a) for _, a in replicas]

    def cluster_ok():
        for a in admins:
            s, doc = a.call("GET", "/admin/cluster")
            if s != 200 or not doc["store"]["connected"] or len(doc["replicas"]) != 3:
                return False
        return True

    wait_until(cluster_ok, 30, "three replicas connected")
    report = ["## Many replicas on etcd (benches/cluster.py)", "",
              f"etcd {subprocess.run(['etcd', '--version'], capture_output=True, text=True).stdout.split()[2]}"
              f" on loopback; three release replicas (`--worker-threads 1`), heartbeat 1 s, timeout 500 ms.", ""]

    # 1. propagation
    times = []
    for n in range(CHANGES):
        percent = 1 + n % 99 + (0.5 if n % 2 else 0)
        writer = n % 3
        others = [i for i in range(3) if i != writer]
        body = json.dumps({"percent": percent, "reason": f"bench {n}"})
        t0 = time.monotonic()
        s, _ = admins[writer].call("PUT", "/admin/split", body)
        assert s == 200, s
        pending = set(others)
        while pending:
            for i in list(pending):
                _, e = admins[i].call("GET", "/admin/explain?path=/p&key=k")
                if e["percent"] == percent:
                    times.append(time.monotonic() - t0)
                    pending.discard(i)
            if time.monotonic() - t0 > 5:
                raise SystemExit(f"change {n} did not reach replicas {pending}")
    times.sort()
    report += [f"- propagation, PUT on one replica to routing on the two others, {len(times)} "
               f"observations over {CHANGES} changes: **p50 {ms(q(times, 0.5))}, p99 "
               f"{ms(q(times, 0.99))}**, max {ms(times[-1])}"]

    # 2. rollback reach
    reach = []
    for n in range(ROLLBACKS):
        s, _ = admins[(n + 1) % 3].call("PUT", "/admin/split", json.dumps({"percent": 50}))
        assert s == 200
        wait_until(lambda: all(a.call("GET", "/admin/split")[1]["percent"] == 50 for a in admins),
                   5, "set before rollback")
        t0 = time.monotonic()
        s, doc = admins[n % 3].call("POST", "/admin/rollback", json.dumps({"reason": "bench"}))
        assert s == 200 and doc["propagated"] is True, doc
        pending = {0, 1, 2}
        while pending:
            for i in list(pending):
                if admins[i].call("GET", "/admin/split")[1]["rolled_back"]:
                    pending.discard(i)
        reach.append(time.monotonic() - t0)
    reach.sort()
    report += [f"- rollback on one replica until all three are rolled back, {ROLLBACKS} rollbacks: "
               f"**median {ms(statistics.median(reach))}, max {ms(reach[-1])}**"]

    # 3. chaos under load
    secs = int(os.environ.get("CHAOS_SECS", "24"))
    wrks = [subprocess.Popen(["wrk", "-t1", "-c4", f"-d{secs}s", "--timeout", "5s",
                              f"http://127.0.0.1:{p}/chaos"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for p, _ in replicas]
    events = []

    def converge_after(t_back, what):
        def same():
            docs = [a.call("GET", "/admin/cluster")[1] for a in admins]
            revs = {d["store"]["applied_revision"] for d in docs}
            return len(revs) == 1 and all(d["store"]["connected"] for d in docs) and all(
                a.call("GET", "/admin/split")[1]["rolled_back"] for a in admins)
        wait_until(same, 30, what)
        return time.monotonic() - t_back

    time.sleep(2)
    admins[0].call("PUT", "/admin/split", json.dumps({"percent": 40}))
    time.sleep(1)
    etcd.send_signal(signal.SIGKILL)
    etcd.wait()
    time.sleep(0.5)
    t0 = time.monotonic()
    s, _ = admins[1].call("PUT", "/admin/split", json.dumps({"percent": 45}))
    events.append(f"etcd killed: a PUT answered {s} in {ms(time.monotonic() - t0)}")
    t0 = time.monotonic()
    s, doc = admins[0].call("POST", "/admin/rollback", json.dumps({"reason": "chaos"}))
    events.append(f"a rollback while it was down answered {s} (propagated {str(doc['propagated']).lower()}) "
                  f"in {ms(time.monotonic() - t0)}")
    time.sleep(3)
    etcd = spawn(etcd_args, log, env=etcd_env)
    t_back = time.monotonic()
    events.append(f"etcd restarted: all replicas rolled back on one revision "
                  f"**{ms(converge_after(t_back, 'converge after restart'))}** after the restart")
    admins[2].call("PUT", "/admin/split", json.dumps({"percent": 40}))
    time.sleep(1)
    etcd.send_signal(signal.SIGSTOP)
    time.sleep(0.3)
    t0 = time.monotonic()
    s, _ = admins[2].call("PUT", "/admin/split", json.dumps({"percent": 45}))
    events.append(f"etcd stopped (SIGSTOP): a PUT answered {s} in {ms(time.monotonic() - t0)}")
    s, doc = admins[1].call("POST", "/admin/rollback", json.dumps({"reason": "hung"}))
    events.append(f"a rollback while it hung answered {s} (propagated {str(doc['propagated']).lower()})")
    time.sleep(3)
    etcd.send_signal(signal.SIGCONT)
    t_back = time.monotonic()
    events.append(f"etcd continued: converged **{ms(converge_after(t_back, 'converge after SIGCONT'))}** later")
    sent = failed = 0
    for w in wrks:
        out, _ = w.communicate()
        for line in out.splitlines():
            line = line.strip()
            if "requests in" in line:
                sent += int(line.split()[0])
            if line.startswith("Non-2xx"):
                failed += int(line.split()[-1])
            if line.startswith("Socket errors"):
                failed += sum(int(x.strip(",")) for x in line.split()[3::2])
    report += ["- chaos under load (wrk -c4 on each replica for "
               f"{secs} s): **{sent} requests sent, {failed} failed**"]
    report += [f"  - {e}" for e in events]

    # 4. instructions per proxied GET, file store against etcd store
    if shutil.which("valgrind"):
        ipr = {}
        for name, store in (("file", False), ("etcd", True)):
            proxy, admin = free_port(), free_port()
            path = config(9 if store else 8, proxy, admin, store)
            if store:
                text = open(path).read().replace('replica_id = "r9"', 'replica_id = "cg"')
                open(path, "w").write(text)
            out = os.path.join(work, f"callgrind-{name}.out")
            p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", BIN,
                                  "serve", "--worker-threads", "1", "--config", path],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
            procs.append(p)
            a = Admin(admin)
            wait_until(lambda: a.call("GET", "/ready")[0] == 200, 60, f"callgrind {name} ready")
            subprocess.run(["wrk", "-t1", "-c10", "-d3s", f"http://127.0.0.1:{proxy}/"],
                           capture_output=True)
            subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True)

            def total():
                _, _ = a.call("GET", "/ready")
                a.conn.request("GET", "/metrics")
                text = a.conn.getresponse().read().decode()
                return sum(float(line.split()[-1]) for line in text.splitlines()
                           if line.startswith("vastshift_requests_total"))
            before = total()
            subprocess.run(["wrk", "-t1", "-c10", f"-d{CALLGRIND_SECS}s", f"http://127.0.0.1:{proxy}/"],
                           capture_output=True)
            after = total()
            subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True)
            time.sleep(1)
            totals = []
            for f in os.listdir(work):
                if f.startswith(f"callgrind-{name}.out"):
                    for line in open(os.path.join(work, f)):
                        if line.startswith(("summary:", "totals:")):
                            totals.append(int(line.split()[1]))
            p.kill()
            p.wait()
            if totals and after > before:
                ipr[name] = (max(totals) / (after - before), int(after - before))
        if len(ipr) == 2:
            f, e = ipr["file"], ipr["etcd"]
            report += [f"- instructions per proxied GET (callgrind, wrk -c10 {CALLGRIND_SECS} s): "
                       f"file store **{f[0]:,.0f}** ({f[1]} requests), etcd store **{e[0]:,.0f}** "
                       f"({e[1]} requests, heartbeats and the watch included): "
                       f"{(e[0] / f[0] - 1) * 100:+.2f} %"]
    print("\n".join(report))


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except OSError:
                pass
