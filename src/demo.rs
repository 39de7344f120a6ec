//! `vastshift demo` and `vastshift demo-backend`: a self-contained trial.
//!
//! The demo backend answers every request with JSON naming itself, the method and the path
//! (plus a changing `generated_at`, so the parallel run has a noisy field to learn). Two
//! requests are answered in an inference API's shape instead, so the demo's adapted route
//! (`/predict`, adapter `demo-vllm`) has two APIs to bridge: legacy's `POST /predict`
//! (`{"input", "max_length"}` -> `{"output", "tokens"}`) and vastai's vLLM-style
//! `POST /v1/completions`, each whole or as an SSE stream. `demo` starts one backend as legacy
//! and one as vastai, then the proxy with the embedded demo config, and sends one request
//! through the adapted route to show it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app::{App, Options};
use crate::config;

/// The embedded demo configuration.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// Serves the demo backend on `listener` forever.
pub async fn serve_backend(listener: TcpListener, name: &'static str) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(move |req| backend_answer(name, req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn backend_answer(
    name: &'static str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let shadow = req.headers().contains_key("x-vastshift-shadow");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if method == "POST" {
        match (name, path.as_str()) {
            ("vastai", "/v1/completions") => return Ok(completion(&body)),
            ("legacy", "/predict") => return Ok(prediction(&body)),
            _ => {}
        }
    }
    let received = body.len();
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let body = serde_json::json!({
        "service": "demo",
        "backend": name,
        "method": method,
        "path": path,
        "received_bytes": received,
        "shadow": shadow,
        "generated_at": millis.to_string(),
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// The demo's "generation": who answered, then the prompt's words, `max` tokens at most.
fn generate(who: &str, prompt: &str, max: u64) -> Vec<String> {
    let words = prompt.split_whitespace().map(|w| format!(" {w}"));
    [who.to_owned(), " heard:".to_owned()]
        .into_iter()
        .chain(words)
        .take(usize::try_from(max.clamp(1, 64)).unwrap_or(1))
        .collect()
}

/// vastai's answer to a vLLM-style `POST /v1/completions`: an OpenAI completion, or with
/// `"stream": true` its SSE chunks and `data: [DONE]`. The request line and body it got are
/// echoed in `x-demo-request` fields, so the demo can show what the adapter sent.
fn completion(body: &[u8]) -> Response<Full<Bytes>> {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("demo-llm");
    let prompt = req["prompt"].as_str().unwrap_or("");
    let tokens = generate("vastai", prompt, req["max_tokens"].as_u64().unwrap_or(16));
    let chunk = |text: &str, finish: Option<&str>| {
        serde_json::json!({"id": "cmpl-demo", "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}]})
    };
    let mut resp = if req["stream"] == true {
        let mut text = String::new();
        for t in &tokens {
            text.push_str(&format!("data: {}\n\n", chunk(t, None)));
        }
        text.push_str("data: [DONE]\n\n");
        typed(text, "text/event-stream")
    } else {
        let mut doc = chunk(&tokens.concat(), Some("length"));
        let prompt_tokens = prompt.split_whitespace().count();
        doc["usage"] = serde_json::json!({"prompt_tokens": prompt_tokens,
            "completion_tokens": tokens.len(), "total_tokens": prompt_tokens + tokens.len()});
        typed(doc.to_string(), "application/json")
    };
    let echo = [
        ("x-demo-request", "POST /v1/completions".as_bytes()),
        ("x-demo-request-body", body),
    ];
    for (name, value) in echo {
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

/// legacy's answer to `POST /predict` `{"input", "max_length", "stream"}`: `{"output",
/// "tokens"}`, or with `"stream": true` one `{"token"}` event per token and `data: [DONE]`.
fn prediction(body: &[u8]) -> Response<Full<Bytes>> {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let prompt = req["input"].as_str().unwrap_or("");
    let tokens = generate("legacy", prompt, req["max_length"].as_u64().unwrap_or(16));
    if req["stream"] == true {
        let mut text = String::new();
        for t in &tokens {
            text.push_str(&format!("data: {}\n\n", serde_json::json!({"token": t})));
        }
        text.push_str("data: [DONE]\n\n");
        return typed(text, "text/event-stream");
    }
    let doc = serde_json::json!({"output": tokens.concat(), "tokens": tokens.len()});
    typed(doc.to_string(), "application/json")
}

fn typed(body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

async fn bind_or_any(preferred: &str) -> std::io::Result<TcpListener> {
    match TcpListener::bind(preferred).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind("127.0.0.1:0").await,
    }
}

/// Runs the whole demo until `shutdown` resolves.
pub async fn run(shutdown: impl std::future::Future<Output = ()> + Send) -> anyhow::Result<()> {
    let legacy = TcpListener::bind("127.0.0.1:0").await?;
    let vastai = TcpListener::bind("127.0.0.1:0").await?;
    let legacy_addr = legacy.local_addr()?;
    let vastai_addr = vastai.local_addr()?;
    tokio::spawn(serve_backend(legacy, "legacy"));
    tokio::spawn(serve_backend(vastai, "vastai"));

    let proxy = bind_or_any("127.0.0.1:8080").await?;
    let admin = bind_or_any("127.0.0.1:9901").await?;
    let proxy_addr = proxy.local_addr()?;
    let admin_addr = admin.local_addr()?;

    let state = std::env::temp_dir().join(format!("vastshift-demo-{}.json", std::process::id()));
    let text = DEMO_CONFIG
        .replace("http://127.0.0.1:18001", &format!("http://{legacy_addr}"))
        .replace("http://127.0.0.1:18002", &format!("http://{vastai_addr}"))
        .replace(
            "vastshift-demo-state.json",
            &state.display().to_string().replace('\\', "/"),
        );
    let config = config::parse(&text, std::env::temp_dir())?;
    let token = format!("demo-{:016x}", fastrand::u64(..));
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert(config.server.admin_token_env.clone(), token.clone());
    let app = App::build(
        config,
        Options {
            env: Arc::new(env),
            ..Default::default()
        },
    )?;
    print_banner(proxy_addr, admin_addr, legacy_addr, vastai_addr, &token);
    tokio::spawn(show_adapted(proxy_addr));
    crate::server::run(app, crate::server::Listeners { proxy, admin }, shutdown).await?;
    let _ = std::fs::remove_file(&state);
    Ok(())
}

/// Sends one request through the adapted route, pinned to vastai, and prints what the client
/// sent, what vastai got and what the client got back.
async fn show_adapted(proxy: SocketAddr) {
    let body = r#"{"input": "Say hello to the demo", "max_length": 8}"#;
    let sent = reqwest::Client::new()
        .post(format!("http://{proxy}/predict"))
        .header("x-vastshift-backend", "vastai")
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            println!("(the demo request through /predict failed: {e})\n");
            return;
        }
    };
    let field = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned()
    };
    let (backend, line, got) = (
        field("x-vastshift-backend"),
        field("x-demo-request"),
        field("x-demo-request-body"),
    );
    let status = resp.status().as_u16();
    let answer = resp.text().await.unwrap_or_default();
    println!(
        r#"One request through the adapted route /predict (adapter demo-vllm), pinned to vastai:
  client sent    POST /predict {body}
  vastai got     {line} {got}
  client got     {status} from {backend}: {answer}
"#
    );
}

fn print_banner(
    proxy: SocketAddr,
    admin: SocketAddr,
    legacy: SocketAddr,
    vastai: SocketAddr,
    token: &str,
) {
    println!(
        r#"vastshift demo is running (Ctrl-C stops everything)

  proxy          http://{proxy}
  ops / admin    http://{admin}   (admin token: {token})
  demo legacy    http://{legacy}
  demo vastai    http://{vastai}

30 % of requests go to vastai; /api/users is its own route at 50 %; sticky by the x-user header.
The parallel run mirrors GETs to the other backend and learns the noisy "generated_at" field.
POST /predict (50 %) is adapted: legacy's {{"input", "max_length"}} API becomes a vLLM-style
/v1/completions request on vastai, and its answer {{"output", "tokens"}} again (adapter demo-vllm).

Try:
  for i in $(seq 20); do curl -s http://{proxy}/hello -o /dev/null -w '%{{http_code}} ' -D - | grep -i x-vastshift-backend; done
  curl -s -H 'x-user: alice' http://{proxy}/api/users/7          # same user, same backend, every time
  curl -s -H 'x-vastshift-backend: vastai' http://{proxy}/pinned  # pin a backend
  curl -s -H 'content-type: application/json' -d '{{"input": "Say hello", "max_length": 8}}' http://{proxy}/predict   # the same shape from either backend
  cargo run --release -- adapt demo-vllm --config config/demo.toml --request config/adapters/samples/predict.json
  curl -s http://{admin}/health
  curl -s http://{admin}/metrics | grep vastshift_requests_total
  export VASTSHIFT_ADMIN_TOKEN={token} VASTSHIFT_ADMIN_URL=http://{admin}
  cargo run --release -- set 50 --reason "demo"        # or: curl -X PUT -H "Authorization: Bearer $VASTSHIFT_ADMIN_TOKEN" -d '{{"percent": 50}}' http://{admin}/admin/split
  cargo run --release -- status
  cargo run --release -- rollback --reason "demo"
  curl -s -H "Authorization: Bearer {token}" http://{admin}/admin/shadow
"#
    );
}
