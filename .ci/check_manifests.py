#!/usr/bin/env python3
"""Checks that the deployment files agree with each other and with vastshift's own config.

Schema validation (kubernetes-validate) and linting (yamllint) say each file is well formed;
this says they fit together: the probes hit the ops port that the ConfigMap's admin_listen opens,
the pod outlives shutdown_grace_secs, the ConfigMap is a folder mount (a subPath mount never sees
updates), the state file is on the writable volume, the Secret's keys are the ones the pod
reads, Prometheus scrapes the right port, and the compose trial's config points at its services.
For many replicas (SPEC section 9): the ConfigMap's [store] is etcd, the Deployment runs several
replicas with a rolling update that never drops below them, a PodDisruptionBudget covers them,
the etcd credentials come from the Secret, the example etcd (components/etcd) is the one the
endpoints name, and the compose trial runs two replicas on one etcd behind a load balancer.

Usage: .ci/check_manifests.py [--rendered FILE] [--rendered-etcd FILE]
  --rendered: the output of `kubectl kustomize deploy/kubernetes`; without it the resources
  listed in deploy/kubernetes/kustomization.yaml are read as they are (there are no patches).
  --rendered-etcd: the same with components/etcd added; without it the component's resources
  are read as they are.
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
ETCD_COMPONENT = os.path.join(K8S, "components", "etcd")
problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


def expect(cond, where, msg):
    if not cond:
        problem(where, msg)
    return cond


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def load_resources(rendered, folder=K8S):
    if rendered:
        return load_yaml_docs(rendered)
    with open(os.path.join(folder, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    docs = []
    for res in kust.get("resources", []):
        docs.extend(load_yaml_docs(os.path.join(folder, res)))
    return docs


def selects(selector, labels):
    """Whether a matchLabels selector (or a Service's plain selector) picks pods with these labels."""
    match = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    return bool(match) and match.items() <= labels.items()


def flag_values(args):
    """--name=value arguments as a dict (the last one wins)."""
    out = {}
    for a in args:
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
    return out


def check_kubernetes(rendered):
    docs = load_resources(rendered)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    w = "kustomization"
    for kind in ("ConfigMap", "Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget"):
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
    store = cfg.get("store", {})
    expect(store.get("kind") == "etcd", w, "[store] kind must be \"etcd\": the replicas share their state through it")
    endpoints = store.get("endpoints", [])
    expect(endpoints and all(re.fullmatch(r"https?://[^/]+:\d+", e) for e in endpoints), w,
           f"[store] endpoints {endpoints!r} must be URLs with a port")
    expect(store.get("replica_id", "") == "", w,
           "[store] replica_id must stay empty: every pod reads this file, and the default ($HOSTNAME) is the pod's own name")
    expect(str(store.get("prefix", "")).startswith("/"), w, "[store] prefix must be an absolute key path")

    # The Deployment.
    w = "deployment.yaml"
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    replicas = spec.get("replicas", 1)
    expect(replicas >= 2, w, f"replicas {replicas}: the shared store is there for several replicas (3 shipped)")
    strategy = spec.get("strategy", {})
    rolling = strategy.get("rollingUpdate", {})
    expect(strategy.get("type", "RollingUpdate") == "RollingUpdate", w, "strategy must be RollingUpdate")
    expect(rolling.get("maxUnavailable") == 0, w, "rollingUpdate.maxUnavailable must be 0: a rollout never drops a serving pod first")
    expect(rolling.get("maxSurge", 0) not in (0, "0%"), w, "rollingUpdate.maxSurge must be above 0, or a rollout with maxUnavailable 0 cannot start")
    pod_labels = spec["template"]["metadata"].get("labels", {})
    keys = {}
    for tsc in pod.get("topologySpreadConstraints", []):
        keys[tsc.get("topologyKey")] = tsc
        expect(selects(tsc.get("labelSelector", {}), pod_labels), w,
               f"topologySpreadConstraint on {tsc.get('topologyKey')} does not select the pods")
    for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone"):
        expect(key in keys, w, f"no topologySpreadConstraint on {key}")
    zone = keys.get("topology.kubernetes.io/zone", {})
    expect(zone.get("whenUnsatisfiable", "ScheduleAnyway") == "ScheduleAnyway", w,
           "the zone spread must be ScheduleAnyway: a cluster in one zone must still schedule the pods")
    pdbs = [p for p in by_kind["PodDisruptionBudget"] if selects(p["spec"].get("selector", {}), pod_labels)]
    if expect(pdbs, "pdb.yaml", "no PodDisruptionBudget selects the vastshift pods"):
        pspec = pdbs[0]["spec"]
        if "maxUnavailable" in pspec:
            expect(pspec["maxUnavailable"] == 1, "pdb.yaml", "maxUnavailable must be 1")
        else:
            expect(isinstance(pspec.get("minAvailable"), int) and 1 <= pspec["minAvailable"] < replicas, "pdb.yaml",
                   f"minAvailable must be between 1 and replicas - 1 ({replicas - 1}), or no drain can proceed")
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
    # The etcd credentials: named by [store], read from the Secret; optional (an etcd without auth).
    for key in ("username_env", "password_env"):
        var = store.get(key, "")
        if not var:
            continue
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
        if expect(ref is not None, w, f"env {var} ([store] {key}) must come from a secretKeyRef"):
            expect(ref.get("name") == "vastshift-secrets", w, f"env {var} must read Secret vastshift-secrets")
            expect(ref.get("key") in example_keys, w, f"env {var} reads key {ref.get('key')!r}, which secret.example.yaml lacks")
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
        expect(not m.get("readOnly"), w, "the state volume must be writable")
        # Each pod keeps its own copy of the last applied state; one ReadWriteOnce claim cannot be
        # mounted by pods on several nodes, nor written by several replicas at once.
        expect("emptyDir" in vol, w, "the state volume must be an emptyDir: each replica keeps its own copy, the shared state is in etcd")

    ann = spec["template"]["metadata"].get("annotations", {})
    expect(ann.get("prometheus.io/scrape") == "true", w, "pod annotation prometheus.io/scrape must be \"true\"")
    expect(ann.get("prometheus.io/port") == str(port_of(admin_listen)), w, "pod annotation prometheus.io/port must be the ops port")
    expect(ann.get("prometheus.io/path") == "/metrics", w, "pod annotation prometheus.io/path must be /metrics")

    # Service and ServiceMonitor.
    w = "service.yaml"
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
    expect(not [d for d in docs if d["kind"] == "StatefulSet"], "kustomization",
           "the example etcd is opt-in: components/etcd must not be part of the default kustomization")
    return cfg


def check_etcd_component(cfg, rendered):
    """components/etcd: a Component whose 3-member etcd is the one the ConfigMap's endpoints name."""
    w = "components/etcd/kustomization.yaml"
    with open(os.path.join(ETCD_COMPONENT, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    expect(kust.get("kind") == "Component" and kust.get("apiVersion") == "kustomize.config.k8s.io/v1alpha1", w,
           "must be a kustomize Component (apiVersion kustomize.config.k8s.io/v1alpha1)")
    docs = load_resources(rendered, ETCD_COMPONENT)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    sts = [d for d in by_kind.get("StatefulSet", []) if d["metadata"]["name"] == "etcd"]
    if not expect(len(sts) == 1, w, "expected one StatefulSet etcd"):
        return
    sts = sts[0]
    w = "components/etcd/statefulset.yaml"
    spec = sts["spec"]
    name = sts["metadata"]["name"]
    replicas = spec.get("replicas", 1)
    expect(replicas == 3, w, f"replicas {replicas}: the example is a 3-member cluster")
    expect(spec.get("podManagementPolicy") == "Parallel", w,
           "podManagementPolicy must be Parallel: with OrderedReady etcd-0 waits for a quorum that never forms")
    pod_labels = spec["template"]["metadata"].get("labels", {})
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    headless = services.get(spec.get("serviceName"))
    if expect(headless is not None, w, f"serviceName {spec.get('serviceName')!r} is not a Service of the component"):
        hs = headless["spec"]
        expect(hs.get("clusterIP") == "None", w, f"Service {spec['serviceName']} must be headless (clusterIP: None)")
        expect(hs.get("publishNotReadyAddresses") is True, w,
               f"Service {spec['serviceName']} needs publishNotReadyAddresses: the members resolve each other before they are ready")
        expect(selects(hs.get("selector", {}), pod_labels), w, f"Service {spec['serviceName']} does not select the etcd pods")
    svc_name = spec.get("serviceName")
    clients = [n for n, s in services.items() if n != svc_name and s["spec"].get("clusterIP") != "None"
               and selects(s["spec"].get("selector", {}), pod_labels)]
    expect(clients, "components/etcd/service.yaml", "no client Service (ClusterIP) selects the etcd pods")
    c = spec["template"]["spec"]["containers"][0]
    expect(re.fullmatch(r"(quay\.io/coreos|gcr\.io/etcd-development)/etcd:v3\.5\.\d+", c.get("image", "")), w,
           f"image {c.get('image')!r} is not an etcd v3.5 release image")
    flags = flag_values(c.get("command", []) + c.get("args", []))
    env = {e["name"]: e for e in c.get("env", [])}
    expect(env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name", w,
           "POD_NAME must come from the pod's metadata.name")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    client_port, peer_port = ports.get("client"), ports.get("peer")
    expect(client_port and peer_port, w, "container ports client and peer are missing")
    members = [f"{name}-{i}" for i in range(replicas)]
    want = ",".join(f"{m}=http://{m}.{svc_name}:{peer_port}" for m in members)
    expect(flags.get("initial-cluster") == want, w, f"--initial-cluster must be {want}")
    expect(flags.get("name") == "$(POD_NAME)", w, "--name must be $(POD_NAME)")
    expect(flags.get("initial-advertise-peer-urls") == f"http://$(POD_NAME).{svc_name}:{peer_port}", w,
           "--initial-advertise-peer-urls must be the member's own name in the headless Service")
    expect(flags.get("advertise-client-urls") == f"http://$(POD_NAME).{svc_name}:{client_port}", w,
           "--advertise-client-urls must be the member's own name in the headless Service")
    expect(flags.get("listen-client-urls") == f"http://0.0.0.0:{client_port}", w, "--listen-client-urls must be on all interfaces")
    expect(flags.get("listen-peer-urls") == f"http://0.0.0.0:{peer_port}", w, "--listen-peer-urls must be on all interfaces")
    expect(flags.get("initial-cluster-state") == "new", w, "--initial-cluster-state must be new")
    data_dir = flags.get("data-dir", "")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    expect(any(n in claims and data_dir.startswith(p.rstrip("/") + "/") for n, p in mounts.items()), w,
           f"--data-dir {data_dir} is not under a volume from volumeClaimTemplates")
    for probe in ("readinessProbe", "livenessProbe"):
        expect(probe in c, w, f"{probe} is missing")
    pdbs = [p for p in by_kind.get("PodDisruptionBudget", []) if selects(p["spec"].get("selector", {}), pod_labels)]
    if expect(pdbs, "components/etcd/pdb.yaml", "no PodDisruptionBudget selects the etcd pods"):
        expect(pdbs[0]["spec"].get("maxUnavailable") == 1, "components/etcd/pdb.yaml", "maxUnavailable must be 1: a quorum of 2 of 3")

    # The ConfigMap's endpoints are these members.
    if cfg:
        endpoints = cfg.get("store", {}).get("endpoints", [])
        want = [f"http://{m}.{svc_name}:{client_port}" for m in members]
        expect(endpoints == want, "configmap.yaml", f"[store] endpoints {endpoints} are not components/etcd's members {want}")

    # The NetworkPolicy lets the vastshift pods reach the client port.
    w = "components/etcd/networkpolicy.yaml"
    nps = [n for n in by_kind.get("NetworkPolicy", []) if selects(n["spec"].get("podSelector", {}), pod_labels)]
    if nps:
        vastshift_pod = {"app.kubernetes.io/name": "vastshift"}
        ok = any(
            any(p.get("port") in (client_port, "client") for p in rule.get("ports", [{"port": client_port}]))
            and any(selects(fr.get("podSelector", {}), vastshift_pod) for fr in rule.get("from", []))
            for n in nps for rule in n["spec"].get("ingress", [])
        )
        expect(ok, w, f"no ingress rule lets the vastshift pods reach etcd's client port {client_port}")


def check_compose():
    w = "docker-compose.yml"
    with open(os.path.join(ROOT, "deploy", "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    replicas = {n: s for n, s in services.items() if s.get("command", [None])[0] == "serve"}
    if not expect("vastshift" in replicas and len(replicas) >= 2, w,
                  f"expected two vastshift replicas, one named vastshift; got {sorted(replicas)}"):
        return
    vs = replicas["vastshift"]
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
    server = cfg.get("server", {})
    listen_port = port_of(server.get("listen", "0.0.0.0:8080"))
    admin_port = port_of(server.get("admin_listen", "127.0.0.1:9901"))

    # The replicas: one config file, their own state, their own ops port on the host.
    host_ports, state_volumes, hostnames = [], [], []
    for name, r in sorted(replicas.items()):
        renv = r.get("environment", {})
        expect(renv == env, w, f"service {name}'s environment differs from vastshift's (one config for both replicas)")
        vols = r.get("volumes", [])
        expect(any(v.split(":")[1] == cfg_path.rsplit("/", 1)[0] for v in vols if v.count(":") >= 1), w,
               f"service {name} does not mount the config folder")
        state = [v.split(":")[0] for v in vols if v.split(":")[1].rstrip("/") == "/var/lib/vastshift"]
        state_volumes.extend(state)
        hostnames.append(r.get("hostname", name))
        for p in r.get("ports", []):
            parts = str(p).split(":")
            if int(parts[-1]) == admin_port:
                host_ports.append(parts[-2])
            expect(int(parts[-1]) != listen_port, w, f"service {name} publishes its proxy port: clients go through the load balancer")
        expect(r.get("stop_grace_period") is not None, w, f"service {name} needs a stop_grace_period above shutdown_grace_secs")
        token = renv.get("VASTSHIFT_ADMIN_TOKEN", "")
        expect(token.startswith("${VASTSHIFT_ADMIN_TOKEN"), w, f"{name}: the admin token must come from the environment (with a demo default)")
    expect(len(set(state_volumes)) == len(state_volumes), w, f"the replicas share a state volume {state_volumes}: each keeps its own copy")
    expect(len(set(hostnames)) == len(hostnames), w, f"replica hostnames (their replica ids) repeat: {hostnames}")
    expect(len(host_ports) == len(replicas) == len(set(host_ports)), w,
           f"each replica's ops port needs its own host port (9901, 9902); got {host_ports}")

    # The store: kind etcd, at the compose etcd service, which listens there.
    store = cfg.get("store", {})
    expect(store.get("kind") == "etcd", rel, "[store] kind must be \"etcd\": the two replicas share their state")
    expect(store.get("replica_id", "") == "", rel, "[store] replica_id must stay empty: both replicas read this file")
    for ep in store.get("endpoints", []):
        m = re.match(r"https?://([^:/]+):(\d+)$", ep)
        if not expect(m, rel, f"[store] endpoint {ep!r} has no host:port"):
            continue
        host, port = m.group(1), m.group(2)
        etcd = services.get(host)
        if expect(etcd is not None, rel, f"[store] endpoint points at {host}, not a compose service"):
            flags = flag_values(etcd.get("command", []))
            expect(flags.get("listen-client-urls") == f"http://0.0.0.0:{port}", w,
                   f"service {host}: --listen-client-urls must be http://0.0.0.0:{port}")
            expect(flags.get("advertise-client-urls") == f"http://{host}:{port}", w,
                   f"service {host}: --advertise-client-urls must be http://{host}:{port}")
            expect(etcd.get("image", "").startswith("quay.io/coreos/etcd:v3.5."), w, f"service {host} is not an etcd v3.5 image")
            for name, r in replicas.items():
                expect(host in r.get("depends_on", []), w, f"service {name} does not depend on {host}")
    for key in ("username_env", "password_env"):
        var = store.get(key, "")
        expect(not var or var in env, rel, f"[store] {key} names {var}, which the replicas' environment does not set")

    # The load balancer in front of both.
    lbs = [(n, s) for n, s in services.items() if str(s.get("image", "")).startswith("nginx:")]
    if expect(len(lbs) == 1, w, "expected one nginx load balancer service"):
        name, lb = lbs[0]
        conf = None
        for vol in lb.get("volumes", []):
            src = vol.split(":")[0]
            if src.endswith(".conf"):
                conf = os.path.join(ROOT, "deploy", src)
        if expect(conf and os.path.exists(conf), w, f"service {name} mounts no nginx .conf of the repo"):
            with open(conf) as f:
                text = f.read()
            servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", text, re.M)
            want = sorted((n, str(listen_port)) for n in replicas)
            expect(sorted(servers) == want, os.path.relpath(conf, ROOT), f"upstream servers {sorted(servers)} are not the replicas {want}")
            listens = re.findall(r"^\s*listen\s+(\d+)\s*;", text, re.M)
            published = [str(p).split(":")[-1] for p in lb.get("ports", [])]
            expect(listens and all(p in listens for p in published), w, f"service {name} publishes {published}, nginx listens on {listens}")
            expect(text.count("{") == text.count("}"), os.path.relpath(conf, ROOT), "unbalanced braces")
            for n in replicas:
                expect(n in lb.get("depends_on", []), w, f"service {name} does not depend on {n}")

    with open(os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    targets = [t for sc in prom["scrape_configs"] for st in sc.get("static_configs", []) for t in st["targets"]]
    for n in replicas:
        expect(f"{n}:{admin_port}" in targets, "prometheus.yml", f"no scrape target {n}:{admin_port}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rendered", help="output of kubectl kustomize deploy/kubernetes")
    ap.add_argument("--rendered-etcd", help="output of kubectl kustomize of deploy/kubernetes with components/etcd")
    args = ap.parse_args()
    cfg = check_kubernetes(args.rendered)
    check_etcd_component(cfg, args.rendered_etcd)
    check_compose()
    for p in problems:
        print(f"  PROBLEM {p}")
    if problems:
        print(f"  {len(problems)} problem(s)")
        return 1
    print("  manifests, ConfigMap config, Secret template, etcd component, compose and scrape config agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
