//! The shipped adapter examples (`config/adapters/`) and `vastshift adapt`, run as the real
//! binary on the shipped samples and on temporary files: every example loads, each turns its
//! samples into the upstream body and the answer its comments promise, and every failure exits
//! 2 with the reason on stderr.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_vastshift");
const SAMPLES: &str = "config/adapters/samples";

/// `vastshift adapt ARGS`: exit code, stdout, stderr.
fn adapt(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("adapt")
        .args(args)
        .env_remove("VASTSHIFT_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sample(name: &str) -> String {
    format!("{SAMPLES}/{name}")
}

/// `adapt NAME --config config/adapters/FILE.toml --request REQ [--response RESP] --json`, which
/// must succeed; its document.
fn trial(name: &str, config: &str, request: &str, response: Option<&str>) -> Value {
    let config = format!("config/adapters/{config}.toml");
    let request = sample(request);
    let mut args = vec![name, "--config", &config, "--request", &request, "--json"];
    let response = response.map(sample);
    if let Some(r) = &response {
        args.extend(["--response", r]);
    }
    let (code, out, err) = adapt(&args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// The texts of a stream's events, as the client gets them.
fn event_data(doc: &Value) -> Vec<Value> {
    doc["response"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["outcome"] != "dropped")
        .map(|e| {
            let text = e["text"].as_str().unwrap();
            let data = text.trim().strip_prefix("data:").unwrap().trim();
            serde_json::from_str(data).unwrap_or_else(|_| json!(data))
        })
        .collect()
}

fn temp(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn every_example_loads_and_passes_check_config() {
    for (file, adapter) in [
        ("vllm", "vllm"),
        ("tgi", "tgi"),
        ("serverless", "serverless"),
    ] {
        let path = format!("config/adapters/{file}.toml");
        let config = vastshift::config::load(Path::new(&path)).unwrap();
        assert!(config.adapters.contains_key(adapter), "{path}");
        assert!(
            config
                .routes
                .iter()
                .any(|r| r.adapter.as_deref() == Some(adapter)),
            "{path}: a route names the adapter"
        );
        let out = Command::new(BIN)
            .args(["check-config", &path])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn vllm_turns_the_legacy_api_into_completions_and_back() {
    let doc = trial("vllm", "vllm", "predict.http", Some("vllm-answer.json"));
    let request = &doc["request"];
    assert_eq!(request["method"], "POST");
    assert_eq!(request["target"], "/v1/completions");
    assert_eq!(
        request["body"],
        json!({"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "Write a haiku about GPUs",
            "max_tokens": 32, "stream": false})
    );
    let headers = request["headers"].as_object().unwrap();
    for gone in [
        "authorization",
        "cookie",
        "x-legacy-session",
        "accept-encoding",
        "host",
    ] {
        assert!(
            !headers.contains_key(gone),
            "{gone} is not sent: {headers:?}"
        );
    }
    assert_eq!(headers["x-adapted-from"], "legacy-predict");
    assert_eq!(headers["user-agent"], "legacy-client/2.3");
    let body_len = serde_json::to_vec(&request["body"]).unwrap().len();
    assert_eq!(headers["content-length"], body_len.to_string());
    assert_eq!(
        doc["response"]["body"],
        json!({"output": " Silicon rivers run,", "tokens": 5})
    );
    assert_eq!(doc["response"]["adapted"], "response");
}

#[test]
fn vllm_streams_keep_a_legacy_shape() {
    let doc = trial(
        "vllm",
        "vllm",
        "predict-stream.json",
        Some("vllm-stream.txt"),
    );
    assert_eq!(
        doc["request"]["body"],
        json!({"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "Write a haiku about GPUs",
            "max_tokens": 32, "stream": true, "stream_options": {"include_usage": true}})
    );
    assert_eq!(doc["response"]["adapted"], "event");
    assert_eq!(
        event_data(&doc),
        vec![
            json!({"token": " Sil"}),
            json!({"token": "icon"}),
            json!({"token": " rivers"}),
            json!({"token": " run"}),
            json!({"token": ","}),
            json!({"token": "", "done": true, "tokens": 5}),
            json!("[DONE]"),
        ]
    );
}

#[test]
fn tgi_turns_the_legacy_api_into_generate_and_back() {
    let doc = trial("tgi", "tgi", "predict.http", Some("tgi-answer.json"));
    assert_eq!(doc["request"]["target"], "/");
    assert_eq!(
        doc["request"]["body"],
        json!({"inputs": "Write a haiku about GPUs",
            "parameters": {"max_new_tokens": 32, "details": true, "return_full_text": false},
            "stream": false})
    );
    assert_eq!(
        doc["response"]["body"],
        json!({"output": " Silicon rivers run,", "tokens": 5})
    );
    let stream = trial("tgi", "tgi", "predict-stream.json", Some("tgi-stream.txt"));
    assert_eq!(stream["request"]["body"]["stream"], true);
    assert_eq!(
        event_data(&stream),
        vec![
            json!({"token": " Silicon"}),
            json!({"token": " rivers"}),
            json!({"token": " run"}),
            json!({"token": ","}),
            json!({"token": "", "done": true, "tokens": 5}),
        ]
    );
}

#[test]
fn tgi_takes_generates_object_answer_too() {
    let dir = tempfile::tempdir().unwrap();
    let answer: Value =
        serde_json::from_str(&std::fs::read_to_string(sample("tgi-answer.json")).unwrap()).unwrap();
    let object = temp(dir.path(), "object.json", &answer[0].to_string());
    let (code, out, err) = adapt(&[
        "tgi",
        "--config",
        "config/adapters/tgi.toml",
        "--request",
        &sample("predict.json"),
        "--response",
        object.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        doc["response"]["body"],
        json!({"output": " Silicon rivers run,", "tokens": 5})
    );
}

#[test]
fn serverless_writes_the_workers_payload() {
    let doc = trial(
        "serverless",
        "serverless",
        "predict.http",
        Some("serverless-answer.http"),
    );
    assert_eq!(doc["request"]["target"], "/v1/completions");
    assert_eq!(doc["request"]["serverless_payload"], true);
    assert_eq!(
        doc["request"]["body"],
        json!({"input": {"model": "meta-llama/Llama-3.1-8B-Instruct",
            "prompt": "Write a haiku about GPUs", "max_tokens": 32, "stream": false}})
    );
    // The cost the router is told is read from the payload.
    let config = vastshift::config::load(Path::new("config/adapters/serverless.toml")).unwrap();
    let vastshift::config::VastaiMode::Serverless(mode) = &config.vastai.mode else {
        panic!("not serverless");
    };
    let pointer = mode.cost_pointer.as_deref().unwrap();
    assert_eq!(doc["request"]["body"].pointer(pointer), Some(&json!(32)));
    let response = &doc["response"];
    assert_eq!(response["status"], 200);
    assert_eq!(
        response["body"],
        json!({"output": " Silicon rivers run,", "tokens": 5})
    );
    assert_eq!(
        response["headers"]["content-length"],
        serde_json::to_vec(&response["body"])
            .unwrap()
            .len()
            .to_string()
    );
}

#[test]
fn the_demo_config_adapts_its_predict_route() {
    let (code, out, err) = adapt(&[
        "demo-vllm",
        "--config",
        "config/demo.toml",
        "--request",
        &sample("predict.json"),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["route"], "predict");
    assert_eq!(doc["request"]["target"], "/v1/completions");
    assert_eq!(doc["request"]["body"]["model"], "demo-llm");
    assert_eq!(doc["response"], Value::Null);
}

#[test]
fn the_human_form_shows_request_fields_and_answer() {
    let (code, out, err) = adapt(&[
        "vllm",
        "--config",
        "config/adapters/vllm.toml",
        "--request",
        &sample("predict.http"),
        "--response",
        &sample("vllm-answer.json"),
    ]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "request to vastai:\n  POST /v1/completions\n",
        "(set: set_headers)",
        "removed: x-legacy-session (remove_headers)",
        "added by the proxy at run time: host, x-forwarded-for",
        "\"prompt\": \"Write a haiku about GPUs\"",
        "answer to the client (the response program ran):",
        "\"output\": \" Silicon rivers run,\"",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
}

#[test]
fn the_config_defaults_to_vastshift_config() {
    let out = Command::new(BIN)
        .args([
            "adapt",
            "vllm",
            "--request",
            &sample("predict.json"),
            "--json",
        ])
        .env("VASTSHIFT_CONFIG", "config/adapters/vllm.toml")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn failures_exit_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vllm = "config/adapters/vllm.toml";
    let predict = sample("predict.json");
    let config_with = |name: &str, extra: &str| {
        let text = std::fs::read_to_string(vllm).unwrap() + extra;
        temp(d, name, &text)
    };
    let bad_config = temp(
        d,
        "bad.toml",
        "[legacy]\nurl = \"http://x\"\n[vastai]\nurl = 1\n",
    );
    let failing_event = config_with(
        "event.toml",
        "[adapter.boom]\nevent = 'error(\"boom\")'\n[[route]]\nname = \"boom\"\npath_prefix = \"/boom\"\npercent = 0\nadapter = \"boom\"\n",
    );
    let no_input = temp(d, "no-input.json", r#"{"max_length": 3}"#);
    let garbage = temp(d, "garbage.txt", "this is neither JSON nor HTTP\n");
    let broken_json = temp(d, "broken.json", r#"{"input": "#);
    let elsewhere = temp(d, "elsewhere.http", "POST /other HTTP/1.1\nHost: x\n\n{}");
    let not_json_answer = temp(
        d,
        "answer.http",
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n<html>",
    );
    let stream = sample("vllm-stream.txt");
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "nope".into(),
                "--config".into(),
                vllm.into(),
                "--request".into(),
                predict.clone(),
            ],
            "vllm.toml: no [adapter.nope] (adapters: vllm)",
        ),
        (
            vec![
                "vllm".into(),
                "--config".into(),
                p(&bad_config),
                "--request".into(),
                predict.clone(),
            ],
            "invalid configuration: vastai.url",
        ),
        (
            vec![
                "vllm".into(),
                "--config".into(),
                p(&d.join("missing.toml")),
                "--request".into(),
                predict.clone(),
            ],
            "invalid configuration",
        ),
        (
            vec![
                "vllm".into(),
                "--config".into(),
                vllm.into(),
                "--request".into(),
                p(&d.join("missing.json")),
            ],
            "cannot read",
        ),
        (
            vec![
                "vllm".into(),
                "--config".into(),
                vllm.into(),
                "--request".into(),
                p(&garbage),
            ],
            "not a JSON body, and not an HTTP/1.1 request",
        ),
        (
            vec![
                "vllm".into(),
                "--config".into(),
                vllm.into(),
                "--request".into(),
                p(&broken_json),
            ],
            "not JSON: EOF",
        ),
        (
            vec![
                "vllm".into(),
                "--config".into(),
                vllm.into(),
                "--request".into(),
                predict.clone(),
                "--response".into(),
                p(&garbage),
            ],
            "not an HTTP response, a JSON body",
        ),
        (
            vec![
                "vllm".into(),
                "--config".into(),
                vllm.into(),
                "--request".into(),
                p(&elsewhere),
            ],
            "POST /other matches no [[route]]",
        ),
        (
            vec![
                "vllm".into(),
                "--config".into(),
                vllm.into(),
                "--request".into(),
                p(&no_input),
            ],
            "adapter vllm: input must be a string\n  (at run time this request is served by legacy",
        ),
        (
            vec![
                "vllm".into(),
                "--config".into(),
                vllm.into(),
                "--request".into(),
                predict.clone(),
                "--response".into(),
                p(&not_json_answer),
            ],
            "adapter vllm: the answer is not JSON",
        ),
        (
            vec![
                "boom".into(),
                "--config".into(),
                p(&failing_event),
                "--request".into(),
                predict.clone(),
                "--response".into(),
                stream,
            ],
            "adapter boom: event 1: boom\n  (at run time this event passes unchanged",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = adapt(&args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.starts_with("vastshift adapt: "), "{args:?}: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: {expected:?} not in {err:?}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: nothing on stdout: {out}");
    }
    let out = Command::new(BIN)
        .args(["adapt", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let (code, _, _) = adapt(&["vllm"]);
    assert_eq!(code, 2, "--request is required");
}

#[test]
fn stream_events_follow_the_sse_rules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = std::fs::read_to_string("config/adapters/vllm.toml").unwrap()
        + "[adapter.rules]\nevent = 'if .drop then empty else {x: .x} end'\nmax_body_bytes = 64\n\
           [[route]]\nname = \"rules\"\npath_prefix = \"/rules\"\npercent = 0\nadapter = \"rules\"\n";
    let config = temp(d, "rules.toml", &config);
    let stream = "event: tick\r\nid: 7\r\ndata: {\"x\":\r\ndata:  1, \"y\": 2}\r\n\r\n\
                  : a comment\n\n\
                  data: {\"drop\": true}\n\n\
                  data: not json\n\n\
                  data: [DONE]\n\n\
                  data: {\"x\": 2}";
    let stream = temp(d, "stream.txt", stream);
    let (code, out, err) = adapt(&[
        "rules",
        "--config",
        config.to_str().unwrap(),
        "--request",
        &sample("predict.json"),
        "--response",
        stream.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    let events: Vec<(String, String)> = doc["response"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let outcome = match e["why"].as_str() {
                Some(why) => format!("passed: {why}"),
                None => e["outcome"].as_str().unwrap().to_owned(),
            };
            (outcome, e["text"].as_str().unwrap().to_owned())
        })
        .collect();
    let expected = [
        ("rewritten", "event: tick\nid: 7\ndata: {\"x\":1}\n\n"),
        ("passed: no data", ": a comment\n\n"),
        ("dropped", ""),
        ("passed: its data is not JSON", "data: not json\n\n"),
        ("passed: [DONE]", "data: [DONE]\n\n"),
        (
            "passed: incomplete: no blank line after it",
            "data: {\"x\": 2}",
        ),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(o, t)| (o.to_string(), t.to_string()))
        .collect();
    assert_eq!(events, expected);
    // An event over max_body_bytes is counted at run time, so it fails here.
    let big = temp(
        d,
        "big.txt",
        &format!("data: {{\"x\": \"{}\"}}\n\n", "a".repeat(100)),
    );
    let (code, _, err) = adapt(&[
        "rules",
        "--config",
        config.to_str().unwrap(),
        "--request",
        &sample("predict.json"),
        "--response",
        big.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("adapter rules: event 1: the event is larger than max_body_bytes (64)"),
        "{err}"
    );
}

#[tokio::test]
async fn no_cut_or_mangled_sample_panics() {
    use vastshift::adapter::offline::{parse_answer, parse_request, run};
    let config = vastshift::config::load(Path::new("config/adapters/vllm.toml")).unwrap();
    let request = std::fs::read(sample("predict.http")).unwrap();
    let answers = [
        std::fs::read(sample("serverless-answer.http")).unwrap(),
        std::fs::read(sample("vllm-stream.txt")).unwrap(),
    ];
    let mut checked = 0;
    for cut in 0..=request.len() {
        let mut bytes = request[..cut].to_vec();
        if let Some(b) = bytes.last_mut() {
            *b ^= 0x5a;
        }
        for candidate in [&request[..cut], &bytes[..]] {
            if let Ok(sample) = parse_request(candidate) {
                let _ = run(&config, "vllm", sample, None).await;
                checked += 1;
            }
        }
    }
    for answer in &answers {
        for cut in (0..=answer.len()).step_by(7) {
            if let Ok(a) = parse_answer(&answer[..cut]) {
                let sample = parse_request(&request).unwrap();
                let _ = run(&config, "vllm", sample, Some(a)).await;
                checked += 1;
            }
        }
    }
    assert!(checked > 10, "some cuts still parse: {checked}");
}
