#!/usr/bin/env python3
"""Checks that the deployment files speak vastshift's metric contract (SPEC sections 8 and 9).

Every metric name used in the Grafana dashboard's PromQL (panel targets, annotations, template
variables), in the alert rules and in their promtool unit tests must be listed in
deploy/metric-names.txt (one name a line, `#` comments; a histogram appears as its _bucket, _sum
and _count series). Label names used in selectors and in by/without/on/ignoring lists must be
labels that metric has, and label values compared with = or != (or a plain a|b regex) must come
from the closed sets of SPEC sections 8 and 9. The dashboard's expressions are also parsed by
`promtool check rules` (when promtool is installed), since nothing else would parse them.

Usage: .ci/check_dashboard_metrics.py [--names FILE] [--dashboard FILE] [--rules FILE]
                                      [--rules-test FILE] [--no-promtool]
Exit 0 when everything checks, 1 with one line per problem otherwise.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SPEC sections 8 and 9: metric family -> (type, {label: closed set of values, or None when open}).
# `route` is open: a configured route name or "default".
SPEC_METRICS = {
    "vastshift_requests_total": ("counter", {
        "backend": {"legacy", "vastai"},
        "route": None,
        "code": {"1xx", "2xx", "3xx", "4xx", "5xx", "error"},
    }),
    "vastshift_request_duration_seconds": ("histogram", {
        "backend": {"legacy", "vastai"},
        "route": None,
    }),
    "vastshift_upstream_errors_total": ("counter", {
        "backend": {"legacy", "vastai"},
        "kind": {"connect", "timeout", "reset", "other"},
    }),
    "vastshift_fallbacks_total": ("counter", {"route": None}),
    "vastshift_split_percent": ("gauge", {"route": None}),
    "vastshift_rollbacks_total": ("counter", {"trigger": {"admin", "guard", "startup"}}),
    "vastshift_config_reloads_total": ("counter", {"result": {"ok", "error"}}),
    "vastshift_shadow_requests_total": ("counter", {
        "result": {"match", "mismatch", "error", "skipped", "dropped"},
    }),
    "vastshift_upstream_healthy": ("gauge", {"backend": {"legacy", "vastai"}}),
    "vastshift_in_flight_requests": ("gauge", {"backend": {"legacy", "vastai"}}),
    # Added since, documented in the README: operator state that could not be written, and
    # clients that broke, abandoned or stalled their request bodies.
    "vastshift_state_write_failures_total": ("counter", {}),
    "vastshift_client_errors_total": ("counter", {"kind": {"framing", "aborted", "timeout"}}),
    # SPEC section 12: answers to their last byte, how streams ended, tokens in usage.
    "vastshift_response_duration_seconds": ("histogram", {
        "backend": {"legacy", "vastai"},
        "route": None,
    }),
    "vastshift_streams_total": ("counter", {
        "backend": {"legacy", "vastai"},
        "route": None,
        "result": {"complete", "upstream_aborted", "client_aborted"},
    }),
    "vastshift_tokens_total": ("counter", {
        "backend": {"legacy", "vastai"},
        "route": None,
        "kind": {"prompt", "completion"},
    }),
    # SPEC section 12: what each backend costs an hour (NaN when not known).
    "vastshift_cost_per_hour": ("gauge", {"backend": {"legacy", "vastai"}}),
    # SPEC section 12: requests vastai had no capacity for, served by legacy.
    "vastshift_spills_total": ("counter", {
        "route": None,
        "reason": {"rate_limited", "no_worker", "instance_down", "unhealthy"},
    }),
    # SPEC section 9 (many replicas, the etcd store), exported with either store kind.
    "vastshift_store_connected": ("gauge", {}),
    "vastshift_store_revision": ("gauge", {}),
    "vastshift_store_operations_total": ("counter", {
        "op": {"read", "write", "watch", "heartbeat", "campaign"},
        "result": {"ok", "conflict", "error", "timeout"},
    }),
    "vastshift_cluster_replicas": ("gauge", {}),
    "vastshift_cluster_leader": ("gauge", {}),
    # 1 while this replica's config hash differs from the leader's (GET /admin/cluster's
    # config_drift as a metric).
    "vastshift_cluster_config_drift": ("gauge", {}),
}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}

AGGREGATORS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}

TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)
    | (?P<var>\$\{[^}]*\}|\$\w+)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},@])
    """,
    re.VERBOSE,
)


def tokenize(expr):
    out = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot tokenize at {expr[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind in ("ws", "comment"):
            continue
        out.append((kind, m.group()))
    return out


def unquote(s):
    if s[0] == "`":
        return s[1:-1]
    return bytes(s[1:-1], "utf-8").decode("unicode_escape")


class Checker:
    def __init__(self, allowed):
        self.allowed = allowed
        self.problems = []
        self.used = {}  # name -> set of places
        self.exprs = 0
        # Series name -> labels it carries.
        self.series_labels = {}
        for family, (kind, labels) in SPEC_METRICS.items():
            names = [family]
            if kind == "histogram":
                names = [family + "_bucket", family + "_sum", family + "_count"]
            for n in names:
                ls = dict(labels)
                if n.endswith("_bucket"):
                    ls["le"] = None
                self.series_labels[n] = ls
        self.all_labels = set(TARGET_LABELS)
        for ls in self.series_labels.values():
            self.all_labels.update(ls)

    def problem(self, where, msg):
        self.problems.append(f"{where}: {msg}")

    def use(self, name, where):
        self.used.setdefault(name, set()).add(where.split(":")[0])
        if name not in self.allowed:
            self.problem(where, f"metric {name!r} is not in deploy/metric-names.txt (SPEC sections 8 and 9)")
            return False
        return True

    def check_matcher(self, metric, label, op, value, where):
        if label == "__name__":
            if op == "=" and value:
                self.use(value, where)
            return
        known = self.series_labels.get(metric) if metric else None
        if known is None:
            if metric is None and label not in self.all_labels:
                self.problem(where, f"label {label!r} is not a label of any vastshift metric")
            return
        if label in TARGET_LABELS:
            return
        if label not in known:
            self.problem(where, f"{metric} has no label {label!r} (it has: {', '.join(sorted(known))})")
            return
        closed = known[label]
        if closed is None or "$" in value:
            return
        if op in ("=", "!="):
            values = [value]
        else:
            # Only plain alternations of literal words are checked: a|b|c.
            if not re.fullmatch(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*", value):
                return
            values = value.split("|")
        for v in values:
            if v not in closed:
                self.problem(where, f"{metric}{{{label}}} has no value {v!r} (values: {', '.join(sorted(closed))})")

    def check_expr(self, expr, where):
        """Finds metric selectors and label lists in a PromQL expression and checks them."""
        self.exprs += 1
        try:
            toks = tokenize(expr)
        except ValueError as e:
            self.problem(where, str(e))
            return
        i = 0
        n = len(toks)

        def nxt(k):
            return toks[k] if k < n else (None, None)

        while i < n:
            kind, text = toks[i]
            if kind == "ident":
                low = text.lower()
                after = nxt(i + 1)
                if low in LABEL_LIST_KEYWORDS and after == ("op", "("):
                    j = i + 2
                    while j < n and toks[j] != ("op", ")"):
                        k2, t2 = toks[j]
                        if k2 == "ident" and t2 not in self.all_labels:
                            self.problem(where, f"{text} ({t2}): {t2!r} is not a label of any vastshift metric")
                        j += 1
                    i = j + 1
                    continue
                if low in KEYWORDS:
                    i += 1
                    continue
                if after == ("op", "("):  # a function call
                    i += 1
                    continue
                if low in AGGREGATORS and after[0] == "ident" and after[1].lower() in ("by", "without"):
                    i += 1
                    continue
                # A metric name, possibly followed by {matchers}.
                known = self.use(text, where)
                i += 1
                if nxt(i) == ("op", "{"):
                    i = self.matchers(toks, i, text if known else None, where)
                continue
            if (kind, text) == ("op", "{"):  # a selector without a metric name
                i = self.matchers(toks, i, None, where)
                continue
            i += 1

    def matchers(self, toks, i, metric, where):
        """Parses {label op "value", ...} starting at the `{`; returns the index after `}`."""
        i += 1
        n = len(toks)
        while i < n and toks[i] != ("op", "}"):
            if toks[i] == ("op", ","):
                i += 1
                continue
            if i + 2 < n and toks[i][0] == "ident" and toks[i + 1][0] == "op" and toks[i + 2][0] == "string":
                self.check_matcher(metric, toks[i][1], toks[i + 1][1], unquote(toks[i + 2][1]), where)
                i += 3
                continue
            self.problem(where, f"cannot read label matcher at {toks[i][1]!r}")
            i += 1
        return i + 1

    def check_series(self, series, where):
        """A promtool input series: name{label="value",...}."""
        self.check_expr(series, where)


def load_allowed(path):
    names = set()
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                names.add(line)
    return names


def walk_json(node, path=""):
    """Yields (json path, dict) for every dict in a JSON document."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk_json(v, f"{path}.{k}")
    elif isinstance(node, list):
        for idx, v in enumerate(node):
            yield from walk_json(v, f"{path}[{idx}]")


GRAFANA_VARS = {
    "$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
    "${__rate_interval}": "1m", "${__interval}": "1m", "${__range}": "1h",
}


def grafana_to_promql(expr):
    """Replaces Grafana's variables with values promtool can parse."""
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)


def check_dashboard(c, path, promtool):
    rel = os.path.relpath(path, ROOT)
    with open(path) as f:
        dash = json.load(f)
    exprs = []
    for jpath, d in walk_json(dash):
        if isinstance(d.get("expr"), str):
            exprs.append((f"{rel}:{jpath}", d["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if var.get("type") == "query" and isinstance(q, str):
            m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", q)
            if m:
                c.check_expr(m.group(1), f"{rel}:templating.{var.get('name')}")
                if m.group(2) not in c.all_labels:
                    c.problem(f"{rel}:templating.{var.get('name')}", f"label {m.group(2)!r} is not a label of any vastshift metric")
            else:
                exprs.append((f"{rel}:templating.{var.get('name')}", q))
    for where, e in exprs:
        c.check_expr(e, where)

    # Structure Grafana relies on.
    names = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    ids = set()
    cells = {}
    for p in dash.get("panels", []):
        pid = p.get("id")
        where = f"{rel}:panel {pid} {p.get('title')!r}"
        if pid in ids:
            c.problem(where, "duplicate panel id")
        ids.add(pid)
        ds = json.dumps(p.get("datasource"))
        for var in re.findall(r"\$\{?(\w+)", ds):
            if var not in names:
                c.problem(where, f"datasource uses undefined variable ${var}")
        refs = [t.get("refId") for t in p.get("targets", [])]
        if len(refs) != len(set(refs)) or None in refs:
            c.problem(where, "targets need distinct refIds")
        if not p.get("targets") and p.get("type") != "row":
            c.problem(where, "panel has no query")
        g = p.get("gridPos", {})
        x, y, w, h = (g.get(k) for k in ("x", "y", "w", "h"))
        if None in (x, y, w, h) or x < 0 or w <= 0 or h <= 0 or x + w > 24:
            c.problem(where, f"bad gridPos {g}")
            continue
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                if (cx, cy) in cells:
                    c.problem(where, f"overlaps panel {cells[(cx, cy)]}")
                    break
                cells[(cx, cy)] = pid
            else:
                continue
            break

    # promtool parses every dashboard expression as a recording rule.
    if promtool:
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(e)} for i, (_, e) in enumerate(exprs)
        ]}]}
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as tmp:
            yaml.safe_dump(rules, tmp)
        try:
            r = subprocess.run([promtool, "check", "rules", tmp.name], capture_output=True, text=True)
        finally:
            os.unlink(tmp.name)
        if r.returncode != 0:
            c.problem(rel, "promtool cannot parse the dashboard's PromQL:\n" + r.stdout + r.stderr)
        else:
            print(f"  promtool parsed all {len(exprs)} dashboard expressions")
    return len(exprs)


def check_rules(c, path):
    rel = os.path.relpath(path, ROOT)
    with open(path) as f:
        doc = yaml.safe_load(f)
    count = 0
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            name = r.get("alert") or r.get("record")
            c.check_expr(r["expr"], f"{rel}:{name}")
            count += 1
            # Metric names mentioned in annotations must be real too.
            for text in list((r.get("annotations") or {}).values()) + list((r.get("labels") or {}).values()):
                for tok in re.findall(r"(?<![\w])vastshift_[a-z0-9_]+", str(text)):
                    c.use(tok, f"{rel}:{name} (annotation)")
    return count


def check_rules_test(c, path):
    rel = os.path.relpath(path, ROOT)
    with open(path) as f:
        doc = yaml.safe_load(f)
    count = 0
    for t_idx, t in enumerate(doc.get("tests", [])):
        tname = t.get("name", f"test {t_idx}")
        for s in t.get("input_series", []):
            c.check_series(s["series"], f"{rel}:{tname}: input series")
            count += 1
        for e in t.get("promql_expr_test", []):
            c.check_expr(e["expr"], f"{rel}:{tname}: promql_expr_test")
            count += 1
    return count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", default=os.path.join(ROOT, "deploy/metric-names.txt"))
    ap.add_argument("--dashboard", default=os.path.join(ROOT, "deploy/grafana/vastshift-dashboard.json"))
    ap.add_argument("--rules", default=os.path.join(ROOT, "deploy/prometheus/rules.yml"))
    ap.add_argument("--rules-test", default=os.path.join(ROOT, "deploy/prometheus/rules_test.yml"))
    ap.add_argument("--no-promtool", action="store_true", help="do not parse the dashboard with promtool")
    args = ap.parse_args()

    allowed = load_allowed(args.names)
    c = Checker(allowed)
    # The label table above and the names file must describe the same metrics.
    table = set(c.series_labels)
    for extra in sorted(allowed - table):
        c.problem(os.path.relpath(args.names, ROOT), f"{extra!r} is listed but is not a SPEC metric known to this checker")
    for missing in sorted(table - allowed):
        c.problem(os.path.relpath(args.names, ROOT), f"SPEC series {missing!r} is missing from the list")

    promtool = None if args.no_promtool else shutil.which("promtool")
    if not args.no_promtool and not promtool:
        print("  promtool not found: the dashboard's PromQL is scanned but not parsed")
    n_dash = check_dashboard(c, args.dashboard, promtool)
    n_rules = check_rules(c, args.rules)
    n_tests = check_rules_test(c, args.rules_test) if os.path.exists(args.rules_test) else 0

    for p in c.problems:
        print(f"  PROBLEM {p}")
    print(f"  {n_dash} dashboard queries, {n_rules} rules, {n_tests} test series/expressions; "
          f"{len(c.used)} metric names used: {', '.join(sorted(c.used))}")
    unused = sorted(allowed - set(c.used))
    if unused:
        print(f"  (listed but used nowhere: {', '.join(unused)})")
    if c.problems:
        print(f"  {len(c.problems)} problem(s)")
        return 1
    print("  every metric name and label is from SPEC sections 8 and 9")
    return 0


if __name__ == "__main__":
    sys.exit(main())
