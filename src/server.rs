//! Listeners and shutdown: the proxy's accept loop, the ops listener, and [`run`].
//!
//! Each proxy connection starts on the [`lane`], vastshift's own HTTP/1.1 loop for plain
//! requests, and moves to hyper's HTTP/1 server for anything else. Both cut off a slow header
//! sender (`header_read_timeout_ms`); a head longer than `max_request_header_bytes` ends on
//! hyper's server, which refuses it (431). Shutdown goes in steps: readiness false, stop
//! accepting, drain in-flight requests within `shutdown_grace_secs` (a warning if the deadline
//! passes), stop the ops listener and the background loops.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::control::supervisor::Supervisor;
use crate::proxy::lane;
use crate::proxy::Client;
use crate::vocab::Backend;

/// Binds a listener with a listen queue of `backlog` (`server.listen_backlog`; the kernel caps
/// it at `net.core.somaxconn`), so a burst of connects is not met by SYN retransmits as it is
/// at the common default of 128.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The two bound listeners; binding is the caller's job so tests can use port 0.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "refusing to start: ${var} is not set and the admin API would listen on {addr}, which is not loopback; set ${var} or bind server.admin_listen to 127.0.0.1"
    )]
    AdminUnprotected { var: String, addr: SocketAddr },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Serves until `shutdown` resolves, then drains and returns.
pub async fn run(
    app: Arc<App>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let config = app.control.config();
    let admin_addr = listeners.admin.local_addr()?;
    if app.admin_token.is_none() {
        if !admin_addr.ip().is_loopback() {
            return Err(RunError::AdminUnprotected {
                var: config.server.admin_token_env.clone(),
                addr: admin_addr,
            });
        }
        tracing::warn!(
            variable = %config.server.admin_token_env,
            %admin_addr,
            "no admin token set: /admin/* is open to anyone who can reach this loopback address"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for backend in Backend::ALL {
        let control = Arc::clone(&app.control);
        let upstream = move || control.snapshot().upstreams.http(backend).cloned();
        tasks.push(tokio::spawn(crate::safety::health::probe_loop(
            Arc::clone(&app.health),
            upstream,
            backend,
            stop_rx.clone(),
        )));
    }
    let peers = match &app.cluster {
        Some(cluster) => {
            tasks.extend(
                cluster
                    .start(admin_addr.to_string(), stop_rx.clone())
                    .await?,
            );
            Some(Arc::clone(cluster) as Arc<dyn crate::control::supervisor::Peers>)
        }
        None => None,
    };
    let supervisor = Supervisor::new(Arc::clone(&app.control), peers);
    tasks.push(tokio::spawn(supervisor.run(stop_rx.clone())));
    if app.reloader.path.is_some() {
        tasks.push(tokio::spawn(crate::reload::watch(
            Arc::clone(&app.reloader),
            stop_rx.clone(),
        )));
    }
    tasks.extend(crate::vastai::instance::spawn(
        Arc::clone(&app.control),
        Arc::clone(&app.health),
        Arc::clone(&app.env),
        stop_rx.clone(),
    ));

    let admin = {
        let mut stop = stop_rx.clone();
        let router = crate::ops::admin::router(Arc::clone(&app), admin_addr);
        tokio::spawn(async move {
            let serve = axum::serve(listeners.admin, router).with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "ops listener failed");
            }
        })
    };

    let proxy_addr = listeners.proxy.local_addr()?;
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, "vastshift serving");
    app.set_ready(true);
    let (drain_tx, drain_rx) = watch::channel(false);
    let connections = accept_loop(&app, listeners.proxy, shutdown, drain_rx).await;

    app.set_ready(false);
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    tracing::info!(grace_secs = grace.as_secs(), "draining in-flight requests");
    let _ = drain_tx.send(true);
    connections.close();
    tokio::select! {
        _ = connections.wait() => tracing::info!("drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!("shutdown grace period passed with requests still in flight; closing them"),
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = admin.await;
    Ok(())
}

/// Serves the rest of a client connection with hyper's server: requests with a body, upgrades,
/// HTTP/1.0, heads the lane does not take (see [`lane`]).
async fn serve_hyper(
    proxy: Arc<crate::proxy::Proxy>,
    client: Arc<Client>,
    peer: SocketAddr,
    io: lane::Prefixed,
    builder: &http1::Builder,
    mut drain: watch::Receiver<bool>,
) {
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let client = Arc::clone(&client);
        // Boxed: hyper keeps the service future's slot for the connection's whole life, so an
        // idle keep-alive connection would otherwise hold a request's full state machine.
        async move { Ok::<_, Infallible>(Box::pin(proxy.handle(client, req)).await) }
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { let _ = drain.wait_for(|d| *d).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Accepts proxy connections until `shutdown` resolves; returns the tracker of live
/// connections. When `drain` turns true every connection finishes its current request and closes.
async fn accept_loop(
    app: &Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    drain: watch::Receiver<bool>,
) -> TaskTracker {
    let config = app.control.config();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.server.header_read_timeout_ms))
        .max_buf_size(config.server.max_request_header_bytes.max(8192))
        .keep_alive(true);
    let builder = Arc::new(builder);
    let lane = lane::Settings {
        header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
        max_head: config.server.max_request_header_bytes.max(8192),
    };
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&app.proxy);
        let client = Arc::new(Client::new(peer));
        let builder = Arc::clone(&builder);
        let drain = drain.clone();
        tracker.spawn(async move {
            let io = match lane::serve(
                Arc::clone(&proxy),
                Arc::clone(&client),
                stream,
                lane,
                drain.clone(),
            )
            .await
            {
                lane::Outcome::Closed => return,
                lane::Outcome::Handoff(io) => io,
            };
            // Boxed: only connections the lane hands over pay for hyper's connection state.
            Box::pin(serve_hyper(proxy, client, peer, io, &builder, drain)).await;
        });
    }
    drop(listener);
    tracker
}
