#!/usr/bin/env python3
"""Checks that the deployment files agree with each other and with vastshift's own config.

Schema validation (kubernetes-validate) and linting (yamllint) say each file is well formed;
this says they fit together: the probes hit the ops port that the ConfigMap's admin_listen opens,
the pod outlives shutdown_grace_secs, the ConfigMap is a folder mount (a subPath mount never sees
updates), the state file is on the writable volume, the Secret's keys are the ones the pod
reads, Prometheus scrapes the right port, and the compose trial's config points at its services.

Usage: .ci/check_manifests.py [--rendered FILE]
  --rendered: the output of `kubectl kustomize deploy/kubernetes`; without it the resources
  listed in deploy/kubernetes/kustomization.yaml are read as they are (there are no patches).
Exit 0 when everything checks, 1 with one line per problem otherwise.
"""

import argparse
import os
import re
import sys
import tomllib

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "kubernetes")
problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


def expect(cond, where, msg):
    if not cond:
        problem(where, msg)
    return cond


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def load_resources(rendered):
    if rendered:
        with open(rendered) as f:
            return [d for d in yaml.safe_load_all(f) if d]
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    docs = []
    for res in kust.get("resources", []):
        with open(os.path.join(K8S, res)) as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d)
    return docs


def check_kubernetes(rendered):
    docs = load_resources(rendered)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    w = "kustomization"
    for kind in ("ConfigMap", "Deployment", "Service", "ServiceMonitor"):
        expect(len(by_kind.get(kind, [])) == 1, w, f"expected one {kind}, got {len(by_kind.get(kind, []))}")
    expect("Secret" not in by_kind, w, "a Secret is rendered: real secrets must never be part of the kustomization")
    if problems:
        return

    cm = by_kind["ConfigMap"][0]
    dep = by_kind["Deployment"][0]
    svc = by_kind["Service"][0]
    sm = by_kind["ServiceMonitor"][0]

    # The configuration vastshift will run with.
    w = "configmap.yaml"
    toml_text = cm.get("data", {}).get("vastshift.toml")
    if not expect(toml_text is not None, w, "no data key vastshift.toml"):
        return
    cfg = tomllib.loads(toml_text)
    server = cfg.get("server", {})
    listen = server.get("listen", "0.0.0.0:8080")
    admin_listen = server.get("admin_listen", "127.0.0.1:9901")
    grace = server.get("shutdown_grace_secs", 30)
    state_file = server.get("state_file", "vastshift-state.json")
    token_env = server.get("admin_token_env", "VASTSHIFT_ADMIN_TOKEN")
    api_key_env = cfg.get("vastai", {}).get("api_key_env")
    expect(not admin_listen.startswith("127.") and not admin_listen.startswith("[::1]"), w,
           f"admin_listen {admin_listen} is loopback: probes and Prometheus could not reach it")
    expect(listen.startswith("0.0.0.0:") or listen.startswith("[::]:"), w, f"listen {listen} is not on all interfaces")
    expect(state_file.startswith("/var/lib/vastshift/"), w, f"state_file {state_file} is not on the state volume")
    expect(cfg.get("split", {}).get("percent", 0.0) == 0.0, w, "a fresh deployment should start with split.percent = 0")

    # The Deployment.
    w = "deployment.yaml"
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    expect(spec.get("replicas") == 1, w, "replicas must be 1 (per-replica state: see the comment there)")
    expect(pod.get("terminationGracePeriodSeconds", 30) > grace, w,
           f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} must exceed shutdown_grace_secs {grace}")
    psc = pod.get("securityContext", {})
    expect(psc.get("runAsNonRoot") is True, w, "pod securityContext.runAsNonRoot must be true")
    expect(psc.get("runAsUser", 10001) == 10001, w, "runAsUser should be the image's uid 10001")
    containers = pod["containers"]
    expect(len(containers) == 1, w, "one container expected")
    c = containers[0]
    csc = c.get("securityContext", {})
    expect(csc.get("readOnlyRootFilesystem") is True, w, "readOnlyRootFilesystem must be true")
    expect(csc.get("allowPrivilegeEscalation") is False, w, "allowPrivilegeEscalation must be false")
    expect(csc.get("capabilities", {}).get("drop") == ["ALL"], w, "capabilities.drop must be [ALL]")
    res = c.get("resources", {})
    for k in ("requests", "limits"):
        for r in ("cpu", "memory"):
            expect(r in res.get(k, {}), w, f"resources.{k}.{r} is missing")

    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    expect(ports.get("http") == port_of(listen), w, f"container port http {ports.get('http')} != listen port {port_of(listen)}")
    expect(ports.get("admin") == port_of(admin_listen), w,
           f"container port admin {ports.get('admin')} != admin_listen port {port_of(admin_listen)}")

    def probe_port(probe):
        p = probe.get("httpGet", {}).get("port")
        return ports.get(p) if isinstance(p, str) else p

    for name, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        probe = c.get(name)
        if expect(probe is not None, w, f"{name} is missing"):
            expect(probe.get("httpGet", {}).get("path") == path, w, f"{name} must GET {path}")
            expect(probe_port(probe) == port_of(admin_listen), w, f"{name} must hit the ops port {port_of(admin_listen)}")

    env = {e["name"]: e for e in c.get("env", [])}
    with open(os.path.join(K8S, "secret.example.yaml")) as f:
        example = yaml.safe_load(f)
    example_keys = set((example.get("stringData") or {}).keys()) | set((example.get("data") or {}).keys())
    wanted = [token_env] + ([api_key_env] if api_key_env else [])
    for var in wanted:
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
        if expect(ref is not None, w, f"env {var} must come from a secretKeyRef"):
            expect(ref.get("name") == "vastshift-secrets", w, f"env {var} must read Secret vastshift-secrets")
            expect(ref.get("key") in example_keys, w, f"env {var} reads key {ref.get('key')!r}, which secret.example.yaml lacks")
            expect(ref.get("optional") is not True, w, f"env {var} must not be optional")
    cfg_env = env.get("VASTSHIFT_CONFIG", {}).get("value", "/etc/vastshift/vastshift.toml")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    m = mounts.get("/etc/vastshift")
    if expect(m is not None, w, "the ConfigMap must be mounted at /etc/vastshift"):
        expect("subPath" not in m and "subPathExpr" not in m, w, "the ConfigMap mount must not use subPath (it would never see updates)")
        vol = volumes.get(m["name"], {})
        expect(vol.get("configMap", {}).get("name") == cm["metadata"]["name"], w, "/etc/vastshift must be the vastshift ConfigMap")
        expect(cfg_env == "/etc/vastshift/vastshift.toml", w, f"VASTSHIFT_CONFIG {cfg_env} is not the ConfigMap's file")
    m = mounts.get("/var/lib/vastshift")
    if expect(m is not None, w, "a volume must be mounted at /var/lib/vastshift (state file)"):
        vol = volumes.get(m["name"], {})
        expect("persistentVolumeClaim" in vol or "emptyDir" in vol, w, "the state volume must be a PVC or an emptyDir")
        expect(not m.get("readOnly"), w, "the state volume must be writable")
        claim = vol.get("persistentVolumeClaim", {}).get("claimName")
        if claim:
            pvcs = [p["metadata"]["name"] for p in by_kind.get("PersistentVolumeClaim", [])]
            expect(claim in pvcs, w, f"PVC {claim} is not part of the kustomization")
            expect(spec.get("strategy", {}).get("type") == "Recreate", w,
                   "with a ReadWriteOnce PVC the strategy must be Recreate (a rolling update would deadlock on the volume)")

    ann = spec["template"]["metadata"].get("annotations", {})
    expect(ann.get("prometheus.io/scrape") == "true", w, "pod annotation prometheus.io/scrape must be \"true\"")
    expect(ann.get("prometheus.io/port") == str(port_of(admin_listen)), w, "pod annotation prometheus.io/port must be the ops port")
    expect(ann.get("prometheus.io/path") == "/metrics", w, "pod annotation prometheus.io/path must be /metrics")

    # Service and ServiceMonitor.
    w = "service.yaml"
    pod_labels = spec["template"]["metadata"].get("labels", {})
    expect(spec["selector"]["matchLabels"].items() <= pod_labels.items(), "deployment.yaml", "selector does not match the pod's labels")
    expect(svc["spec"]["selector"].items() <= pod_labels.items(), w, "selector does not match the pod's labels")
    sports = {p["name"]: p for p in svc["spec"]["ports"]}
    for name, want in (("http", port_of(listen)), ("admin", port_of(admin_listen))):
        p = sports.get(name)
        if expect(p is not None, w, f"no port named {name}"):
            expect(p["port"] == want, w, f"port {name} is {p['port']}, expected {want}")
            tp = p.get("targetPort", p["port"])
            expect((ports.get(tp) if isinstance(tp, str) else tp) == want, w, f"port {name} targets the wrong container port")
    w = "servicemonitor.yaml"
    expect(sm["apiVersion"] == "monitoring.coreos.com/v1", w, "apiVersion must be monitoring.coreos.com/v1")
    expect(sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"].get("labels", {}).items(), w,
           "selector does not match the Service's labels")
    eps = sm["spec"].get("endpoints", [])
    expect(any(e.get("port") == "admin" and e.get("path", "/metrics") == "/metrics" for e in eps), w,
           "must scrape port admin at /metrics")

    # The example Secret holds placeholders only.
    w = "secret.example.yaml"
    for k, v in (example.get("stringData") or {}).items():
        expect("REPLACE" in str(v), w, f"{k} must be a placeholder (REPLACE-ME...), never a real value")
    return cfg


def check_compose():
    w = "docker-compose.yml"
    with open(os.path.join(ROOT, "deploy", "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    vs = services.get("vastshift", {})
    env = vs.get("environment", {})
    cfg_path = env.get("VASTSHIFT_CONFIG", "")
    host_cfg = None
    for vol in vs.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if cfg_path.startswith(dst.rstrip("/") + "/"):
            host_cfg = os.path.join(ROOT, "deploy", src, cfg_path[len(dst.rstrip("/")) + 1:])
    if not expect(host_cfg and os.path.exists(host_cfg), w, f"VASTSHIFT_CONFIG {cfg_path} is not a mounted file of the repo"):
        return
    with open(host_cfg, "rb") as f:
        cfg = tomllib.load(f)
    rel = os.path.relpath(host_cfg, ROOT)
    for backend in ("legacy", "vastai"):
        url = cfg.get(backend, {}).get("url", "")
        m = re.match(r"https?://([^:/]+):(\d+)", url)
        if not expect(m, rel, f"[{backend}] url {url!r} has no host:port"):
            continue
        host, port = m.group(1), m.group(2)
        svc = services.get(host)
        if expect(svc is not None, rel, f"[{backend}] url points at {host}, not a compose service"):
            cmd = svc.get("command", [])
            expect("--listen" in cmd and cmd[cmd.index("--listen") + 1].endswith(":" + port), w,
                   f"service {host} does not listen on port {port}")
            expect("--name" in cmd and cmd[cmd.index("--name") + 1] == backend, w, f"service {host} is not the {backend} demo backend")
    token = env.get("VASTSHIFT_ADMIN_TOKEN", "")
    expect(token.startswith("${VASTSHIFT_ADMIN_TOKEN"), w, "the admin token must come from the environment (with a demo default)")
    admin_port = port_of(cfg.get("server", {}).get("admin_listen", "127.0.0.1:9901"))
    with open(os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    targets = [t for sc in prom["scrape_configs"] for st in sc.get("static_configs", []) for t in st["targets"]]
    expect(f"vastshift:{admin_port}" in targets, "prometheus.yml", f"no scrape target vastshift:{admin_port}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rendered", help="output of kubectl kustomize deploy/kubernetes")
    args = ap.parse_args()
    check_kubernetes(args.rendered)
    check_compose()
    for p in problems:
        print(f"  PROBLEM {p}")
    if problems:
        print(f"  {len(problems)} problem(s)")
        return 1
    print("  manifests, ConfigMap config, Secret template, compose and scrape config agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
