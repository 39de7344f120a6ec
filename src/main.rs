//! The `vastshift` binary: parses the command line, sets up logging, binds listeners and calls
//! into the library. No business logic lives here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use vastshift::cli::{self, AdminClient, EXIT_ERROR};
use vastshift::{config, App, Listeners, Options};

/// mimalloc instead of the system allocator: a mirrored request allocates a few dozen small
/// buffers and a task (an over-aligned allocation, slow in glibc's malloc) and frees them on the
/// same thread; 10 % fewer instructions per mirrored request (benches/README.md). Built without
/// transparent huge pages (Cargo.toml, .cargo/config.toml) so that its RSS stays near glibc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "vastshift",
    version,
    about = "Strangler-fig migration proxy from a legacy service to Vast.ai"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The ops listener's URL.
    #[arg(
        long,
        env = "VASTSHIFT_ADMIN_URL",
        default_value = "http://127.0.0.1:9901"
    )]
    admin: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// Config file [default: $VASTSHIFT_CONFIG, else config/vastshift.toml]
        #[arg(long)]
        config: Option<PathBuf>,
        /// Worker threads, at least 1 [default: one per available core]
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
        worker_threads: Option<usize>,
    },
    /// Start a demo legacy backend, a demo Vast.ai backend and the proxy in one process.
    Demo,
    /// Validate a config file: exit 0 with a summary, or 2 naming the bad field.
    CheckConfig { path: PathBuf },
    /// Print the migration status report; exit 0 if every check passes, 1 if not, 2 on error.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the JSON document instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Show the shared store and every replica; exit 0 if connected with no lag or drift, 1 if not.
    Cluster {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the JSON document instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Set the runtime override of the global split or of one route.
    Set {
        /// Percentage of traffic to send to vastai (0-100, two decimals at most).
        percent: f64,
        #[arg(long)]
        route: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Send every request to legacy now, until an operator sets a split again.
    Rollback {
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Exit 0 if the ops listener's /health answers 200 (for container health checks).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9901/health")]
        url: String,
    },
    /// Run adapter NAME offline on sample files: print the request vastai would get and, with
    /// --response, the answer the client would get back. Exit 0, or 2 naming what failed.
    Adapt {
        /// The `[adapter.NAME]` to run.
        name: String,
        /// The client's request: a raw HTTP/1.1 request as recorded, or only its JSON body (then
        /// a POST to the path_prefix of the first route naming the adapter).
        #[arg(long, value_name = "FILE")]
        request: PathBuf,
        /// vastai's answer: a raw HTTP/1.1 response, a JSON body, or an SSE stream's text.
        #[arg(long, value_name = "FILE")]
        response: Option<PathBuf>,
        /// Config file [default: $VASTSHIFT_CONFIG, else config/vastshift.toml]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Print one JSON document instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Run only a demo backend (for docker compose and benchmarks).
    DemoBackend {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: String,
        /// `legacy` or `vastai`.
        #[arg(long, default_value = "legacy")]
        name: String,
    },
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("VASTSHIFT_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// One worker thread means a current-thread runtime: the same single core without the
/// work-stealing scheduler's bookkeeping (what `--worker-threads 1` is for: pinned deployments
/// and benchmarks).
fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) if n > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::CheckConfig { path } => check_config(&path),
        Command::Adapt {
            name,
            request,
            response,
            config,
            json,
        } => match runtime(Some(1)) {
            Ok(rt) => rt.block_on(cli::adapt(
                &config_path(config),
                &name,
                &request,
                response.as_deref(),
                json,
            )),
            Err(e) => {
                eprintln!("vastshift: cannot start the runtime: {e}");
                EXIT_ERROR
            }
        },
        Command::Serve {
            config,
            worker_threads,
        } => {
            init_logging();
            match runtime(worker_threads) {
                Ok(rt) => rt.block_on(serve(config)),
                Err(e) => {
                    eprintln!("vastshift: cannot start the runtime: {e}");
                    EXIT_ERROR
                }
            }
        }
        other => {
            init_logging();
            match runtime(None) {
                Ok(rt) => rt.block_on(client_command(other)),
                Err(e) => {
                    eprintln!("vastshift: cannot start the runtime: {e}");
                    EXIT_ERROR
                }
            }
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}

fn check_config(path: &std::path::Path) -> i32 {
    match config::load(path) {
        Ok(c) => {
            println!("{}: {}", path.display(), c.summary());
            0
        }
        Err(e) => {
            eprintln!("{}: invalid configuration: {e}", path.display());
            2
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupt: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

/// The config file: `--config`, else `$VASTSHIFT_CONFIG`, else `config/vastshift.toml` (SPEC §1).
fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("VASTSHIFT_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config/vastshift.toml"))
}

async fn serve(path: Option<PathBuf>) -> i32 {
    let path = config_path(path);
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vastshift: {}: invalid configuration: {e}", path.display());
            return EXIT_ERROR;
        }
    };
    tracing::info!("{}", config.summary());
    let env: HashMap<String, String> = std::env::vars().collect();
    let force_legacy = env
        .get("VASTSHIFT_FORCE_LEGACY")
        .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
    let (proxy_addr, admin_addr) = (config.server.listen, config.server.admin_listen);
    let backlog = config.server.listen_backlog;
    let proxy = match vastshift::server::bind(proxy_addr, backlog) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vastshift: cannot listen on {proxy_addr} (server.listen): {e}");
            return EXIT_ERROR;
        }
    };
    let admin = match vastshift::server::bind(admin_addr, backlog) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vastshift: cannot listen on {admin_addr} (server.admin_listen): {e}");
            return EXIT_ERROR;
        }
    };
    let app = match App::build(
        config,
        Options {
            config_path: Some(path),
            env: Arc::new(env),
            force_legacy,
            store: None,
        },
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vastshift: {e}");
            return EXIT_ERROR;
        }
    };
    match vastshift::run(app, Listeners { proxy, admin }, shutdown_signal()).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vastshift: {e}");
            EXIT_ERROR
        }
    }
}

async fn client_command(command: Command) -> i32 {
    let token = std::env::var("VASTSHIFT_ADMIN_TOKEN").ok();
    let client = |admin: &AdminArgs| AdminClient::new(&admin.admin, token.clone());
    let result = match command {
        Command::Demo => {
            return match vastshift::demo::run(shutdown_signal()).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vastshift demo: {e}");
                    EXIT_ERROR
                }
            }
        }
        Command::Status { admin, json } => client(&admin).map(|c| (c, Action::Status(json))),
        Command::Cluster { admin, json } => client(&admin).map(|c| (c, Action::Cluster(json))),
        Command::Set {
            percent,
            route,
            reason,
            admin,
        } => client(&admin).map(|c| (c, Action::Set(percent, route, reason))),
        Command::Rollback { reason, admin } => {
            client(&admin).map(|c| (c, Action::Rollback(reason)))
        }
        Command::Healthcheck { url } => return cli::healthcheck(&url).await,
        Command::DemoBackend { listen, name } => return demo_backend(&listen, &name).await,
        Command::Serve { .. } | Command::CheckConfig { .. } | Command::Adapt { .. } => {
            return EXIT_ERROR
        }
    };
    match result {
        Err(e) => {
            eprintln!("vastshift: {e}");
            EXIT_ERROR
        }
        Ok((c, Action::Status(json))) => cli::status(&c, json).await,
        Ok((c, Action::Cluster(json))) => cli::cluster(&c, json).await,
        Ok((c, Action::Set(p, route, reason))) => cli::set(&c, p, route, reason).await,
        Ok((c, Action::Rollback(reason))) => cli::rollback(&c, reason).await,
    }
}

enum Action {
    Status(bool),
    Cluster(bool),
    Set(f64, Option<String>, Option<String>),
    Rollback(Option<String>),
}

async fn demo_backend(listen: &str, name: &str) -> i32 {
    let name: &'static str = match name {
        "legacy" => "legacy",
        "vastai" => "vastai",
        other => {
            eprintln!("vastshift demo-backend: --name must be legacy or vastai, got {other:?}");
            return EXIT_ERROR;
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vastshift demo-backend: cannot listen on {listen}: {e}");
            return EXIT_ERROR;
        }
    };
    tracing::info!(%listen, name, "demo backend serving");
    tokio::select! {
        _ = vastshift::demo::serve_backend(listener, name) => {}
        _ = shutdown_signal() => {}
    }
    0
}
