//! The pool against hand-written HTTP/1.1 servers on loopback that count their connections,
//! so that every answer byte, close and stall is the test's choice.
//!
//! The pool's clock is `tokio::time::Instant`, so a paused clock moves it. Time is paused
//! only between requests (`pause`, `advance`, `resume`): while a request waits on real
//! sockets the clock runs, since a paused clock would auto-advance to the next timer (the
//! reaper's, the connect timeout's) whenever the runtime idles on I/O.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::upstream::{empty, full};

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// What a test server does with one request.
enum Reply {
    /// Writes these bytes and waits for the next request on the connection.
    Send(&'static [u8]),
    /// Writes these pieces a little apart (so they arrive in separate reads), then waits
    /// for the next request.
    Pieces(&'static [&'static [u8]]),
    /// Writes these bytes and closes the connection.
    SendClose(&'static [u8]),
    /// Closes the connection without answering.
    Close,
}

/// The reply to request `n` (from 0) on connection `conn` (from 0, in accept order).
type Script = dyn Fn(usize, usize) -> Reply + Send + Sync;

struct Server {
    addr: SocketAddr,
    base: BaseUrl,
    accepts: Arc<AtomicUsize>,
    /// Connections that ended, closed by either side.
    closed: Arc<AtomicUsize>,
    /// Every request received: its connection and its head.
    requests: Arc<Mutex<Vec<(usize, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// (connection, request line) of every request so far.
    fn requests(&self) -> Vec<(usize, String)> {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .map(|(c, h)| (*c, h.lines().next().unwrap_or_default().to_string()))
            .collect()
    }
}

async fn server(script: impl Fn(usize, usize) -> Reply + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let base = BaseUrl::parse(&format!("http://{addr}")).expect("base URL");
    let script: Arc<Script> = Arc::new(script);
    let accepts = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (a, c, r) = (accepts.clone(), closed.clone(), requests.clone());
    let task = tokio::spawn(async move {
        // Dropped with the accept loop, which aborts every connection's task.
        let mut conns = tokio::task::JoinSet::new();
        for conn in 0.. {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            let (script, c, r) = (script.clone(), c.clone(), r.clone());
            conns.spawn(async move {
                serve(sock, conn, &*script, &r).await;
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Server {
        addr,
        base,
        accepts,
        closed,
        requests,
        task,
    }
}

async fn serve(
    mut sock: TcpStream,
    conn: usize,
    script: &Script,
    requests: &Mutex<Vec<(usize, String)>>,
) {
    let mut buf = Vec::new();
    for n in 0.. {
        let Some(head) = read_request(&mut sock, &mut buf).await else {
            return;
        };
        requests.lock().expect("lock").push((conn, head));
        match script(conn, n) {
            Reply::Send(bytes) => {
                if sock.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Reply::Pieces(pieces) => {
                for piece in pieces {
                    if sock.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Reply::SendClose(bytes) => {
                let _ = sock.write_all(bytes).await;
                return;
            }
            Reply::Close => return,
        }
    }
}

/// The next request on `sock`, head and `Content-Length` body; the head is returned.
/// `None` once the peer closed.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < end + length {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..end + length);
    Some(head)
}

fn pool() -> ConnPool {
    ConnPool::new(crate::upstream::connect::connector(
        Duration::from_secs(5),
        None,
    ))
}

/// `f`, or a panic if it hangs: a broken pool must fail a test, not stall the run.
async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("timed out")
}

/// Polls `done` every few milliseconds until it holds, for at most 5 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn send(pool: &ConnPool, base: &BaseUrl, req: Request<Body>) -> Response<UpstreamBody> {
    let what = format!("{} {}", req.method(), req.uri());
    match within(pool.request(base, req)).await {
        Ok(resp) => resp,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

async fn get(pool: &ConnPool, base: &BaseUrl, path: &str) -> Response<UpstreamBody> {
    let req = Request::get(path).body(empty()).expect("request");
    send(pool, base, req).await
}

/// A request with a body, so on hyper's client.
async fn post(pool: &ConnPool, base: &BaseUrl, path: &str) -> Response<UpstreamBody> {
    let req = Request::post(path)
        .header(http::header::CONTENT_LENGTH, "2")
        .body(full("hi"))
        .expect("request");
    send(pool, base, req).await
}

/// `GET path`, read to its end.
async fn fetch(pool: &ConnPool, base: &BaseUrl, path: &str) -> Bytes {
    read_all(get(pool, base, path).await.into_body()).await
}

async fn read_all(body: UpstreamBody) -> Bytes {
    within(body.collect()).await.expect("body").to_bytes()
}

/// The next frame of `body`, which must be its last: data after which it is at its end.
async fn last_frame(body: &mut UpstreamBody) -> Bytes {
    let frame = within(body.frame()).await.expect("a frame").expect("data");
    assert!(body.is_end_stream(), "more after the last byte");
    frame.into_data().expect("data")
}

/// `GET path` in wire form, on the own exchange.
async fn exchange(
    pool: &ConnPool,
    base: &BaseUrl,
    path: &str,
    again: bool,
) -> Result<Answer, PoolError> {
    let head = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    within(pool.exchange_head(base, head.as_bytes(), false, again)).await
}

fn line(conn: usize, request_line: &str) -> (usize, String) {
    (conn, request_line.to_string())
}

#[tokio::test]
async fn a_connection_is_reused_once_its_body_was_read_to_the_end() {
    let s = server(|_, _| Reply::Send(OK)).await;
    let pool = pool();
    for path in ["/1", "/2", "/3"] {
        let resp = get(&pool, &s.base, path).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        assert_eq!(last_frame(&mut body).await, "ok");
        // Home with the body's last byte: not on a later poll for its end (hyper's server
        // stops at `is_end_stream`), nor on the drop.
        assert_eq!(pool.raw.lock().len(), 1);
        drop(body);
    }
    assert_eq!(s.accepts(), 1);
    assert_eq!(
        s.requests(),
        [
            line(0, "GET /1 HTTP/1.1"),
            line(0, "GET /2 HTTP/1.1"),
            line(0, "GET /3 HTTP/1.1")
        ]
    );
}

#[tokio::test]
async fn a_body_dropped_before_its_end_closes_its_connection() {
    // The first answer promises 10 bytes and sends 5.
    let s = server(|conn, n| match (conn, n) {
        (0, 0) => Reply::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"),
        _ => Reply::Send(OK),
    })
    .await;
    let pool = pool();
    let mut body = get(&pool, &s.base, "/1").await.into_body();
    let frame = within(body.frame()).await.expect("a frame").expect("data");
    assert_eq!(frame.into_data().expect("data"), "hello");
    assert!(!body.is_end_stream());
    drop(body);
    assert!(pool.raw.lock().is_empty());
    // Closed, not leaked: the server sees its end.
    eventually("the server sees the connection close", || s.closed() == 1).await;
    assert_eq!(fetch(&pool, &s.base, "/2").await, "ok");
    assert_eq!(s.accepts(), 2);
    assert_eq!(s.requests()[1], line(1, "GET /2 HTTP/1.1"));
}

#[tokio::test]
async fn a_body_never_read_does_not_return_its_connection_even_if_it_all_arrived() {
    let s = server(|_, _| Reply::Send(OK)).await;
    let pool = pool();
    let resp = get(&pool, &s.base, "/1").await;
    // Let the whole answer arrive; the pool still cannot know it did without reading it.
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(resp);
    assert!(pool.raw.lock().is_empty());
    assert_eq!(fetch(&pool, &s.base, "/2").await, "ok");
    assert_eq!(s.accepts(), 2);
}

#[tokio::test]
async fn an_idle_connection_is_reused_within_pool_idle_and_not_after() {
    let s = server(|_, _| Reply::Send(OK)).await;
    let pool = pool();
    fetch(&pool, &s.base, "/1").await;

    tokio::time::pause();
    tokio::time::advance(POOL_IDLE - Duration::from_secs(1)).await;
    tokio::time::resume();
    fetch(&pool, &s.base, "/2").await;
    assert_eq!(
        s.accepts(),
        1,
        "reused {:?} after",
        POOL_IDLE - Duration::from_secs(1)
    );

    tokio::time::pause();
    tokio::time::advance(POOL_IDLE).await;
    tokio::time::resume();
    // Checkout refuses it or the reaper has closed it; either way it is not used.
    assert_eq!(fetch(&pool, &s.base, "/3").await, "ok");
    assert_eq!(s.accepts(), 2, "reused {POOL_IDLE:?} after");
    assert_eq!(s.requests()[2], line(1, "GET /3 HTTP/1.1"));
}

#[tokio::test]
async fn the_reaper_closes_connections_idle_past_pool_idle_with_no_request() {
    let s = server(|_, _| Reply::Send(OK)).await;
    let pool = pool();
    fetch(&pool, &s.base, "/1").await;
    assert_eq!(pool.raw.lock().len(), 1);

    tokio::time::pause();
    tokio::time::advance(POOL_IDLE + Duration::from_secs(1)).await;
    tokio::time::resume();
    eventually("the server sees the idle connection close", || {
        s.closed() == 1
    })
    .await;
    assert!(pool.raw.lock().is_empty());
    assert_eq!(s.accepts(), 1);
}

/// A stand-in connection, to pin `Shared` on its own (no reaper runs for it).
struct Fake {
    id: usize,
    alive: bool,
}

impl Pooled for Fake {
    fn alive(&mut self) -> bool {
        self.alive
    }
}

fn key(url: &str) -> Key {
    Key::of(&BaseUrl::parse(url).expect("base URL"))
}

fn fake(id: usize, alive: bool) -> Fake {
    Fake { id, alive }
}

#[tokio::test(start_paused = true)]
async fn checkout_takes_the_newest_live_fresh_connection_of_its_key() {
    let shared = Shared::<Fake>::new();
    let (a, b) = (key("http://a:1"), key("https://a:1"));
    shared.put_back(a.clone(), fake(1, true));
    tokio::time::advance(POOL_IDLE).await;
    shared.put_back(a.clone(), fake(2, true));
    shared.put_back(a.clone(), fake(3, true));
    shared.put_back(a.clone(), fake(4, false));
    shared.put_back(b.clone(), fake(5, true));

    // 4 is dead and closed on the way; 1 is stale.
    let ids = |s: &Shared<Fake>| s.lock().iter().map(|i| i.conn.id).collect::<Vec<_>>();
    assert_eq!(shared.checkout(&a).map(|c| c.id), Some(3));
    assert!(!ids(&shared).contains(&4));
    assert_eq!(shared.checkout(&a).map(|c| c.id), Some(2));
    // The stale one is left for the reaper, never handed out.
    assert_eq!(shared.checkout(&a).map(|c| c.id), None);
    assert!(ids(&shared).contains(&1));
    // Same authority, other scheme: its own key.
    assert_eq!(shared.checkout(&b).map(|c| c.id), Some(5));
    assert_eq!(shared.checkout(&b).map(|c| c.id), None);
    shared.sweep();
    assert!(shared.lock().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_checkout_keeps_the_order_of_the_other_keys() {
    let shared = Shared::<Fake>::new();
    let (a, b) = (key("http://a:1"), key("http://b:1"));
    shared.put_back(a.clone(), fake(1, true));
    shared.put_back(b.clone(), fake(2, true));
    shared.put_back(b.clone(), fake(3, true));
    assert_eq!(shared.checkout(&a).map(|c| c.id), Some(1));
    // The newest of b's is still taken first.
    assert_eq!(shared.checkout(&b).map(|c| c.id), Some(3));
    assert_eq!(shared.checkout(&b).map(|c| c.id), Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_full_pool_sweeps_to_make_room_and_otherwise_closes_what_comes_back() {
    let shared = Shared::<Fake>::new();
    let a = key("http://a:1");
    for id in 0..MAX_IDLE {
        shared.put_back(a.clone(), fake(id, false));
    }
    assert_eq!(shared.lock().len(), MAX_IDLE);
    // Full of dead ones: they go, the live one stays.
    shared.put_back(a.clone(), fake(MAX_IDLE, true));
    assert_eq!(shared.lock().len(), 1);

    for id in 1..MAX_IDLE {
        shared.put_back(a.clone(), fake(MAX_IDLE + id, true));
    }
    assert_eq!(shared.lock().len(), MAX_IDLE);
    // Full of live, fresh ones: the one coming back is closed, the list unchanged.
    shared.put_back(a.clone(), fake(usize::MAX, true));
    assert_eq!(shared.lock().len(), MAX_IDLE);
    assert!(shared.lock().iter().all(|i| i.conn.id != usize::MAX));

    // Stale ones make room too.
    tokio::time::advance(POOL_IDLE).await;
    shared.put_back(a.clone(), fake(7, true));
    assert_eq!(shared.lock().len(), 1);
    assert_eq!(shared.checkout(&a).map(|c| c.id), Some(7));
}

/// Answers the first request, then closes on the second without answering (a server that
/// closed its idle keep-alive connection just as the request came); later connections
/// answer.
fn closes_on_the_second_request(conn: usize, n: usize) -> Reply {
    match (conn, n) {
        (0, 1) => Reply::Close,
        _ => Reply::Send(OK),
    }
}

#[tokio::test]
async fn again_sends_once_more_on_a_new_connection_when_a_reused_one_closes_unanswered() {
    let s = server(closes_on_the_second_request).await;
    let pool = pool();
    let answer = exchange(&pool, &s.base, "/1", true).await.expect("first");
    read_all(pool.body(answer)).await;

    let answer = exchange(&pool, &s.base, "/2", true)
        .await
        .expect("sent again");
    assert_eq!(answer.head.status, 200);
    assert_eq!(read_all(pool.body(answer)).await, "ok");
    assert_eq!(s.accepts(), 2);
    assert_eq!(
        s.requests(),
        [
            line(0, "GET /1 HTTP/1.1"),
            line(0, "GET /2 HTTP/1.1"),
            line(1, "GET /2 HTTP/1.1")
        ]
    );
    // The same bytes both times.
    let heads = s.requests.lock().expect("lock").clone();
    assert_eq!(heads[1].1, heads[2].1);
}

#[tokio::test]
async fn without_again_a_reused_connection_closed_unanswered_is_an_error() {
    let s = server(closes_on_the_second_request).await;
    let pool = pool();
    let answer = exchange(&pool, &s.base, "/1", false).await.expect("first");
    read_all(pool.body(answer)).await;

    match exchange(&pool, &s.base, "/2", false).await {
        Err(PoolError::Exchange(ExchangeError::Closed(_))) => {}
        Err(e) => panic!("expected Exchange(Closed), got {e:?}"),
        Ok(_) => panic!("sent twice without again"),
    }
    assert_eq!(s.accepts(), 1);
    assert_eq!(s.requests().len(), 2);
}

#[tokio::test]
async fn again_sends_only_once_more() {
    // Every connection closes unanswered after the first answer.
    let s = server(|conn, n| match (conn, n) {
        (0, 0) => Reply::Send(OK),
        _ => Reply::Close,
    })
    .await;
    let pool = pool();
    let answer = exchange(&pool, &s.base, "/1", true).await.expect("first");
    read_all(pool.body(answer)).await;

    match exchange(&pool, &s.base, "/2", true).await {
        Err(PoolError::Exchange(ExchangeError::Closed(_))) => {}
        Err(e) => panic!("expected Exchange(Closed), got {e:?}"),
        Ok(_) => panic!("no server answered"),
    }
    // Any further try would have had to be accepted and read for the call to return.
    assert_eq!(s.accepts(), 2);
    assert_eq!(s.requests().len(), 3);
}

#[tokio::test]
async fn request_sends_again_an_idempotent_method_only() {
    for (method, again) in [(Method::GET, true), (Method::POST, false)] {
        let s = server(closes_on_the_second_request).await;
        let pool = pool();
        fetch(&pool, &s.base, "/1").await;
        // No body, so the own exchange, for POST too.
        let req = Request::builder()
            .method(method.clone())
            .uri("/2")
            .body(empty())
            .expect("request");
        match (within(pool.request(&s.base, req)).await, again) {
            (Ok(resp), true) => assert_eq!(read_all(resp.into_body()).await, "ok"),
            (Err(PoolError::Exchange(ExchangeError::Closed(_))), false) => {}
            (Ok(_), false) => panic!("{method} sent twice"),
            (Err(e), _) => panic!("{method}: {e:?}"),
        }
        assert_eq!(s.accepts(), if again { 2 } else { 1 }, "{method}");
        assert!(pool.hyper.lock().is_empty());
    }
}

#[tokio::test]
async fn an_idle_connection_the_server_closed_is_skipped_even_without_again() {
    // Keep-alive in the head, but the server closes right after answering.
    let s = server(|_, _| Reply::SendClose(OK)).await;
    let pool = pool();
    let answer = exchange(&pool, &s.base, "/1", false).await.expect("first");
    read_all(pool.body(answer)).await;
    assert_eq!(pool.raw.lock().len(), 1);
    // Until the runtime has seen the close, nothing could tell; wait for that, probing as
    // checkout does.
    eventually("the close is seen", || {
        pool.raw.lock().iter_mut().all(|i| !i.conn.alive())
    })
    .await;

    let answer = exchange(&pool, &s.base, "/2", false)
        .await
        .expect("a new connection, not the dead one");
    assert_eq!(read_all(pool.body(answer)).await, "ok");
    assert_eq!(s.accepts(), 2);
}

#[tokio::test]
async fn a_connect_failure_is_a_connect_error_on_both_paths() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    let base = BaseUrl::parse(&format!("http://{addr}")).expect("base URL");
    let pool = pool();

    match exchange(&pool, &base, "/", true).await {
        Err(PoolError::Connect(_)) => {}
        Err(e) => panic!("expected Connect, got {e:?}"),
        Ok(_) => panic!("connected to a closed port"),
    }
    let req = Request::post("/")
        .header(http::header::CONTENT_LENGTH, "2")
        .body(full("hi"))
        .expect("request");
    match within(pool.request(&base, req)).await {
        Err(PoolError::Connect(_)) => {}
        Err(e) => panic!("expected Connect, got {e:?}"),
        Ok(_) => panic!("connected to a closed port"),
    }
}

#[tokio::test]
async fn the_hyper_path_reuses_its_connection() {
    let s = server(|_, _| Reply::Send(OK)).await;
    let pool = pool();
    for path in ["/1", "/2", "/3"] {
        let resp = post(&pool, &s.base, path).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        assert_eq!(last_frame(&mut body).await, "ok");
        // Home with the body's last byte: not on a later poll for its end (hyper's server
        // stops at `is_end_stream`), nor on the drop.
        assert_eq!(pool.hyper.lock().len(), 1);
        drop(body);
    }
    assert_eq!(s.accepts(), 1);
    assert_eq!(
        s.requests(),
        [
            line(0, "POST /1 HTTP/1.1"),
            line(0, "POST /2 HTTP/1.1"),
            line(0, "POST /3 HTTP/1.1")
        ]
    );
    // The requests went on hyper's client, whose pool holds the connection.
    assert!(pool.raw.lock().is_empty());
    assert_eq!(pool.hyper.lock().len(), 1);
}

#[tokio::test]
async fn an_empty_hyper_answer_returns_its_connection_when_dropped_unread() {
    let s = server(|_, _| Reply::Send(b"HTTP/1.1 204 No Content\r\n\r\n")).await;
    let pool = pool();
    for path in ["/1", "/2"] {
        let resp = post(&pool, &s.base, path).await;
        assert_eq!(resp.status(), 204);
        drop(resp);
        assert_eq!(pool.hyper.lock().len(), 1);
    }
    assert_eq!(s.accepts(), 1);
}

#[tokio::test]
async fn a_closed_idle_hyper_connection_is_replaced() {
    let s = server(|_, _| Reply::SendClose(OK)).await;
    let pool = pool();
    read_all(post(&pool, &s.base, "/1").await.into_body()).await;
    eventually("hyper sees the close", || {
        pool.hyper.lock().iter().all(|i| i.conn.is_closed())
    })
    .await;
    assert_eq!(
        read_all(post(&pool, &s.base, "/2").await.into_body()).await,
        "ok"
    );
    assert_eq!(s.accepts(), 2);
}

#[tokio::test]
async fn connection_close_answers_are_not_pooled() {
    // The server keeps the socket open: only the header says not to reuse it.
    const CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    let s = server(|_, _| Reply::Send(CLOSE)).await;
    let pool = pool();
    for path in ["/1", "/2"] {
        let resp = get(&pool, &s.base, path).await;
        assert!(!resp.headers().contains_key(http::header::CONNECTION));
        assert_eq!(read_all(resp.into_body()).await, "ok");
        assert!(pool.raw.lock().is_empty());
    }
    // hyper closes such a connection itself and, on this single-threaded runtime, has done
    // so by the body's end; so this half holds even without `wrap`'s own check.
    for path in ["/3", "/4"] {
        assert_eq!(
            read_all(post(&pool, &s.base, path).await.into_body()).await,
            "ok"
        );
        assert!(pool.hyper.lock().is_empty());
    }
    assert_eq!(s.accepts(), 4);
    // Each closed by the client once its body ended, not left open.
    eventually("every connection closes", || s.closed() == 4).await;
}

#[tokio::test]
async fn a_chunked_body_is_read_across_reads_and_its_connection_reused_after_trailers() {
    let s = server(|_, n| match n {
        0 => Reply::Pieces(&[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n6;ext=1\r\n world\r\n0\r\n",
            b"x-trailer: 1\r\n\r\n",
        ]),
        _ => Reply::Send(OK),
    })
    .await;
    let pool = pool();
    let resp = get(&pool, &s.base, "/1").await;
    assert!(!resp.headers().contains_key(http::header::TRANSFER_ENCODING));
    assert_eq!(read_all(resp.into_body()).await, "hello world");
    // Had it come back at the last chunk, the trailers would be read as the next answer.
    assert_eq!(fetch(&pool, &s.base, "/2").await, "ok");
    assert_eq!(s.accepts(), 1);
}

#[tokio::test]
async fn a_body_cut_short_delivers_what_arrived_then_fails_and_is_not_reused() {
    let s = server(|conn, _| match conn {
        0 => Reply::SendClose(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"),
        _ => Reply::Send(OK),
    })
    .await;
    let pool = pool();
    let mut body = get(&pool, &s.base, "/1").await.into_body();
    let frame = within(body.frame()).await.expect("a frame").expect("data");
    assert_eq!(frame.into_data().expect("data"), "hello");
    assert!(matches!(within(body.frame()).await, Some(Err(_))));
    assert!(!body.is_end_stream());
    assert!(matches!(within(body.frame()).await, Some(Err(_))));
    drop(body);
    assert!(pool.raw.lock().is_empty());
    assert_eq!(fetch(&pool, &s.base, "/2").await, "ok");
    assert_eq!(s.accepts(), 2);
}

#[tokio::test]
async fn head_and_204_answers_return_their_connection_at_once() {
    let s = server(|_, n| match n {
        // A HEAD answer's Content-Length is that of the GET; no body follows.
        0 => Reply::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        1 => Reply::Send(b"HTTP/1.1 204 No Content\r\n\r\n"),
        _ => Reply::Send(OK),
    })
    .await;
    let pool = pool();
    let req = Request::head("/1").body(empty()).expect("request");
    let resp = send(&pool, &s.base, req).await;
    assert_eq!(resp.headers()[http::header::CONTENT_LENGTH], "5");
    assert!(resp.body().is_end_stream());
    drop(resp);
    let resp = get(&pool, &s.base, "/2").await;
    assert_eq!(resp.status(), 204);
    drop(resp);
    assert_eq!(fetch(&pool, &s.base, "/3").await, "ok");
    assert_eq!(s.accepts(), 1);
}

#[tokio::test]
async fn connections_are_pooled_per_authority() {
    let (a, b) = (
        server(|_, _| Reply::Send(OK)).await,
        server(|_, _| Reply::Send(OK)).await,
    );
    assert_ne!(a.addr, b.addr);
    let pool = pool();
    for s in [&a, &b, &a, &b] {
        fetch(&pool, &s.base, "/").await;
    }
    for s in [&a, &b] {
        assert_eq!(s.accepts(), 1);
        assert_eq!(s.requests().len(), 2);
    }
    assert_eq!(pool.raw.lock().len(), 2);
}
