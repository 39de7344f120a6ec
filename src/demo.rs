//! `vastshift demo` and `vastshift demo-backend`: a self-contained trial.
//!
//! The demo backend answers every request with JSON naming itself, the method and the path
//! (plus a changing `generated_at`, so the parallel run has a noisy field to learn). `demo`
//! starts one as legacy and one as vastai, then the proxy with the embedded demo config.

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
    let received = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
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
    crate::server::run(app, crate::server::Listeners { proxy, admin }, shutdown).await?;
    let _ = std::fs::remove_file(&state);
    Ok(())
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

Try:
  for i in $(seq 20); do curl -s http://{proxy}/hello -o /dev/null -w '%{{http_code}} ' -D - | grep -i x-vastshift-backend; done
  curl -s -H 'x-user: alice' http://{proxy}/api/users/7          # same user, same backend, every time
  curl -s -H 'x-vastshift-backend: vastai' http://{proxy}/pinned  # pin a backend
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
