//! One adapter program (SPEC §10): jq compiled once with jaq, run on one JSON value.
//!
//! [`Program::compile`] parses and compiles a program with jaq's standard library and the four
//! variables `$method`, `$path`, `$query` and `$headers`; any other variable, an undefined
//! filter or a parse error is a [`CompileError`] that names the config field. The `env` filter
//! (the proxy's environment, secrets included) is left out, and `$ENV` is not bound.
//! [`Program::run`] runs it on one input: exactly one output is the result, `empty` is `None`,
//! more outputs or a jq error is a [`RunError`].
//!
//! # Bounds
//!
//! jaq itself takes no countermeasure against resource exhaustion (its README says so: no
//! fuel, no interruption, no recursion limit; `def f: 1 + f; f` overflows the stack). So a run
//! is bounded from outside the interpreter:
//!
//! - **A pool of run threads.** Runs evaluate on worker threads, each with a [`STACK_SIZE`]
//!   stack (address space; only the pages a run touches are used): one worker per core the
//!   process may use and at least two, started by the first run and fed by one queue. A caller
//!   waits for its answer without a timer of its own (the watchdog answers for the deadline).
//!   The deadline counts from the call, so time spent queued behind other runs is part of it; a
//!   run whose deadline passes while it is queued is answered with [`RunError::Timeout`] and not
//!   started. Handing a run to a worker and its answer back costs a few microseconds while the
//!   workers are busy, and some tens of microseconds of waiting when an idle worker and then
//!   the caller have to be woken; a thread of its own per run cost 50 µs and more. A worker keeps the stack pages its runs touched, except that a worker
//!   whose run went deeper than [`RETIRE_DEPTH`] (as seen at the run's ticks) hands over to a
//!   fresh thread after that run, which gives them back.
//! - **A watchdog.** One more thread, started with the pool, looks every [`WATCH_EVERY`] (on
//!   std's clock) for runs queued or running past their deadline plus [`GRACE`] and answers each
//!   with [`RunError::Timeout`]. A run has one answer: whoever takes its reply first, its worker
//!   or the watchdog, gives it, and the other's is dropped. When the watchdog answers a run that
//!   had started, it starts a fresh worker in its place, so the pool keeps its size, and the
//!   old worker ends when its run does. So a caller has its answer at most the deadline plus
//!   [`GRACE`] plus [`WATCH_EVERY`] after the call (and whatever the scheduler adds), whatever
//!   the run does.
//! - **A tick inside the interpreter.** jaq clones its evaluation context (which holds our
//!   per-run data) at every filter call, pipe, comma, binding and loop step, so that clone is
//!   where we check: each tick compares the stack pointer with where the run started (taken
//!   afresh at the start of every run, since a worker runs one after another; more than
//!   [`STACK_LIMIT`] used: [`RunError::TooDeep`]) and every [`TIME_CHECK_EVERY`] ticks reads the
//!   clock ([`Limits::time`], default [`DEFAULT_TIME`], passed: [`RunError::Timeout`]). A check
//!   that fails unwinds out of the interpreter with [`std::panic::resume_unwind`] (no panic
//!   message is printed) and the worker catches it, as it catches a panic, around every run, so
//!   nothing is left behind and the worker goes on to its next run; this needs
//!   `panic = "unwind"`, which is why Cargo.toml must not set `panic = "abort"`. `range/3` (and
//!   with it `range/1`, `range/2`) is replaced by a copy that ticks at every number, because jaq's
//!   own yields numbers without cloning a context, and `[range(1e9)]` would otherwise fill memory
//!   inside one step.
//! - **Outputs.** Pulling stops at the [`COUNTED_OUTPUTS`]th output, so `repeat(1)` or
//!   `range(1e12)` at the top level ends with [`RunError::TooMany`].
//! - **The result's size.** Converting the output to JSON counts its serialized length (strings
//!   without their escapes) against [`Limits::max_bytes`] (default [`DEFAULT_MAX_BYTES`]) and its
//!   depth against [`MAX_OUTPUT_DEPTH`], and ticks, so a value that shares structure
//!   (`reduce range(40) as $i (0; [., .])`, 2^40 leaves in 40 steps) ends with
//!   [`RunError::TooBig`] (or the deadline) instead of being expanded.
//!
//! # What this does not bound
//!
//! - **One built-in operation is never interrupted**: a tick happens between operations, not
//!   inside them. An operation that walks a value that shares structure (`tojson`, `tostring`,
//!   string interpolation, `[..]`, `contains`, `sort`) can take time and memory exponential in
//!   the steps that built the value. When such a run misses its deadline by more than [`GRACE`],
//!   the watchdog answers it with [`RunError::Timeout`] and a fresh worker takes its place; the
//!   old one is left to finish on its own (it stops at its next tick) and then ends, using a
//!   core meanwhile. While [`MAX_STRAYS`] such runs are still running, further runs are refused
//!   with [`RunError::Busy`], both when called and when a worker takes them from the queue,
//!   instead of piling up; so at most [`MAX_STRAYS`] - 1 plus the pool's size of them run at
//!   once.
//! - **Memory is bounded only through time.** There is no allocation limit: within the deadline
//!   jaq can build values of hundreds of MB (a string doubled at every step grows at memcpy
//!   speed), and the check after the deadline may come one doubling late. A string repeated
//!   with `*` (`"x" * $n`) is allocated in one step, whatever its size: a count so large that
//!   the allocation fails makes Rust abort the process (a count past `isize::MAX` bytes is a
//!   panic, caught as [`RunError::Panic`]), and a smaller one is granted in full. Programs that
//!   repeat a string by a number from the input should clamp the number first.
//! - **Deep values are dropped recursively.** A value nested a million levels deep, built by a
//!   loop within the deadline, is dropped (and printed by `tojson`) by recursion on the worker's
//!   thread; [`STACK_SIZE`] leaves room above [`STACK_LIMIT`] for that (a debug build drops a
//!   value a million levels deep in it), sized for the default deadline, not for one of many
//!   seconds. No tick sees that recursion, so [`RETIRE_DEPTH`] does not apply to it: the worker
//!   keeps the stack pages it touched, up to [`STACK_SIZE`], for as long as it lives.
//! - **The deadline is wall-clock time**, so a run starved of CPU can time out with little work,
//!   and so can a run queued while every worker is busy with slow runs: the pool runs as many
//!   runs at once as it has workers, and its queue has no bound of its own (a queued run holds
//!   its input until a worker takes it, and one past its deadline is dropped at once then).
//! - **Dropping a caller's future does not stop its run**: the run goes on within its bounds and
//!   its answer is dropped.
//!
//! [`Program::run`] and [`Program::run_with`] block the calling thread until the answer, at most
//! the deadline plus [`GRACE`] plus [`WATCH_EVERY`] (210 ms by default). The proxy's async code
//! awaits [`Program::run_async`] instead, which blocks no thread and uses no tokio timer, so a
//! paused tokio clock does not make it time out.

use std::cell::Cell;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use jaq_core::data::HasLut;
use jaq_core::load::{self, Arena, File, Loader};
use jaq_core::{compile, native, DataT, Exn, RunPtr, ValX};
use jaq_json::{Num, Val};
use serde_json::{Map, Value};

/// The default time a run may take, from the call to its result.
pub const DEFAULT_TIME: Duration = Duration::from_millis(100);
/// The default bound on an output's serialized size (8 MiB).
pub const DEFAULT_MAX_BYTES: usize = 8 << 20;
/// How deeply an output may nest: serde_json's own parse limit, so whatever a program outputs
/// can be read back by a serde_json consumer with default settings.
pub const MAX_OUTPUT_DEPTH: usize = 128;
/// The stack of each worker thread: mostly address space, touched only as deep as its runs go.
pub const STACK_SIZE: usize = 256 << 20;
/// The stack a run's evaluation may use before it is stopped with [`RunError::TooDeep`]; the rest
/// of [`STACK_SIZE`] is headroom for recursion that has no tick (dropping or printing a deep
/// value).
pub const STACK_LIMIT: usize = 32 << 20;
/// How long past its deadline a run may go before the watchdog answers it with
/// [`RunError::Timeout`] and gives up on it.
pub const GRACE: Duration = Duration::from_millis(100);
/// How often the watchdog looks for runs past their deadline plus [`GRACE`].
pub const WATCH_EVERY: Duration = Duration::from_millis(10);
/// How many given-up runs may still be running before new runs are refused with
/// [`RunError::Busy`].
pub const MAX_STRAYS: usize = 4;
/// A worker whose run went deeper than this into its stack (as seen at the run's ticks) hands
/// over to a fresh thread after the run, so the stack pages it touched are given back.
pub const RETIRE_DEPTH: usize = 4 << 20;
/// Ticks between two reads of the clock.
pub const TIME_CHECK_EVERY: u32 = 16;
/// Outputs pulled at most, to say how many a program produced beyond one.
pub const COUNTED_OUTPUTS: usize = 10;
/// The variables bound for every program, in the order [`Vars::to_vals`] gives their values.
const GLOBALS: [&str; 4] = ["$method", "$path", "$query", "$headers"];
/// Native filters left out: `env` exposes the proxy's environment.
const LEFT_OUT: [&str; 1] = ["env"];
/// How much of a jq error message is kept (values in messages can be huge).
const MAX_MESSAGE: usize = 1024;

/// Runs the watchdog gave up on (answered with a timeout) that are still running, each on a
/// worker that ends with it.
static STRAYS: AtomicUsize = AtomicUsize::new(0);

/// Variables bound for every program: `$method`, `$path` (without the query), `$query` (object of
/// strings; a repeated key keeps its first value), `$headers` (object, lower-case names), all as
/// the client sent them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Vars {
    /// `$method`, e.g. `"POST"`.
    pub method: String,
    /// `$path`, e.g. `"/v1/completions"`, without the query.
    pub path: String,
    /// `$query`: each key's first value, percent-decoded.
    pub query: Map<String, Value>,
    /// `$headers`: lower-case names; several values of one name joined with `", "`.
    pub headers: Map<String, Value>,
}

impl Vars {
    /// The variables of one request. `query` is the raw query (after `?`): split on `&`, keys and
    /// values percent-decoded as form-urlencoded (`+` is a space), a repeated key keeping its
    /// first value. Header values that are not UTF-8 are skipped; several values of one header
    /// are joined with `", "`.
    pub fn from_request(
        method: &http::Method,
        path: &str,
        query: Option<&str>,
        headers: &http::HeaderMap,
    ) -> Vars {
        let mut query_map = Map::new();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            query_map
                .entry(key.into_owned())
                .or_insert_with(|| Value::String(value.into_owned()));
        }
        let mut header_map = Map::new();
        for name in headers.keys() {
            let values: Vec<&str> = headers
                .get_all(name)
                .iter()
                .filter_map(|value| std::str::from_utf8(value.as_bytes()).ok())
                .collect();
            if !values.is_empty() {
                header_map.insert(name.as_str().to_owned(), Value::String(values.join(", ")));
            }
        }
        Vars {
            method: method.as_str().to_owned(),
            path: path.to_owned(),
            query: query_map,
            headers: header_map,
        }
    }

    /// The values of [`GLOBALS`], in their order.
    fn to_vals(&self) -> [Val; 4] {
        let obj = |map: &Map<String, Value>| {
            let entries = map
                .iter()
                .map(|(k, v)| (Val::from(k.clone()), json_to_val(v)));
            Val::obj(entries.collect())
        };
        [
            Val::from(self.method.clone()),
            Val::from(self.path.clone()),
            obj(&self.query),
            obj(&self.headers),
        ]
    }
}

/// The bounds of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time from the call to the result.
    pub time: Duration,
    /// Serialized size of the output, in bytes.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: DEFAULT_TIME,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// A program that does not compile: the config field and jq's message(s), with where they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CompileError {
    /// The config field that holds the program, e.g. `adapter.vllm.request`.
    pub field: String,
    /// jq's messages, `; `-separated, e.g. `undefined filter foo/0 at line 1, column 1`.
    pub message: String,
}

/// Why a run gave no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// A jq runtime error (`error("x")`, `.a` on a string), with jq's message.
    #[error("{0}")]
    Jq(String),
    /// More than one output: how many were pulled (pulling stops at [`COUNTED_OUTPUTS`], so that
    /// many means at least that many).
    #[error("produced more than one value ({})", outputs(.0))]
    TooMany(usize),
    /// The run passed its deadline (the [`Limits::time`] it had).
    #[error("ran longer than {} ms", millis(.0))]
    Timeout(Duration),
    /// The run recursed past [`STACK_LIMIT`].
    #[error("recursed too deeply (more than {} MiB of stack)", STACK_LIMIT >> 20)]
    TooDeep,
    /// The output's serialized size passed [`Limits::max_bytes`].
    #[error("output is larger than {0} bytes")]
    TooBig(usize),
    /// The output nests deeper than [`MAX_OUTPUT_DEPTH`].
    #[error("output is nested deeper than {} levels", MAX_OUTPUT_DEPTH)]
    TooNested,
    /// The output has no JSON form (an object key that is not a string).
    #[error("output is not JSON: {0}")]
    NotJson(String),
    /// The program called `halt` or `halt_error`.
    #[error("called halt (exit code {0})")]
    Halt(i32),
    /// [`MAX_STRAYS`] or more given-up runs are still running; this one was not started.
    #[error("{0} earlier runs are still running past their deadline; not starting another")]
    Busy(usize),
    /// The interpreter panicked (a jaq bug); the message is the panic's.
    #[error("the jq interpreter panicked: {0}")]
    Panic(String),
    /// The pool's threads could not be started.
    #[error("cannot start a thread for the run: {0}")]
    Spawn(String),
}

fn outputs(count: &usize) -> String {
    if *count >= COUNTED_OUTPUTS {
        format!("at least {count} values")
    } else {
        format!("{count} values")
    }
}

fn millis(time: &Duration) -> u128 {
    time.as_millis()
}

/// A compiled jq program: cheap to clone (an `Arc`), `Send + Sync`, runnable from many threads at
/// once.
#[derive(Clone)]
pub struct Program {
    inner: Arc<Compiled>,
}

struct Compiled {
    field: String,
    source: String,
    filter: jaq_core::Filter<Kind>,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("field", &self.inner.field)
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Program>();
};

impl Program {
    /// Compiles `source`; `field` names the config field for the error, e.g.
    /// `adapter.vllm.request`.
    pub fn compile(field: &str, source: &str) -> Result<Program, CompileError> {
        let fail = |message: String| CompileError {
            field: field.to_owned(),
            message,
        };
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let arena = Arena::default();
        let modules = Loader::new(defs)
            .load(
                &arena,
                File {
                    code: source,
                    path: (),
                },
            )
            .map_err(|errs| fail(load_message(errs)))?;
        // `import "file" as $x` would bind a variable we have no value for.
        load::import(&modules, |_| {
            Err("importing data is not supported".to_owned())
        })
        .map_err(|errs| fail(load_message(errs)))?;
        let filter = jaq_core::Compiler::<_, Kind>::default()
            .with_funs(funs())
            .with_global_vars(GLOBALS)
            .compile(modules)
            .map_err(|errs| fail(compile_message(errs)))?;
        Ok(Program {
            inner: Arc::new(Compiled {
                field: field.to_owned(),
                source: source.to_owned(),
                filter,
            }),
        })
    }

    /// Runs on `input` with the default [`Limits`]. Exactly one output is `Some`, `empty` is
    /// `None`; more than one output, a jq error or a passed bound is an error.
    pub fn run(&self, input: Value, vars: &Vars) -> Result<Option<Value>, RunError> {
        self.run_with(input, vars, Limits::default())
    }

    /// [`Program::run_with`] for async callers: the run is queued before this returns (the
    /// variables converted first), and the future, `'static`, waits for its answer without
    /// blocking a thread and without a tokio timer: the deadline is kept by the run and the
    /// watchdog on std's clock, so a paused tokio clock changes nothing. Dropping the future does
    /// not stop the run; it goes on within its bounds and its result is dropped.
    pub fn run_async(
        &self,
        input: Value,
        vars: &Vars,
        limits: Limits,
    ) -> impl std::future::Future<Output = Result<Option<Value>, RunError>> + Send + 'static {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let reply: Reply = Box::new(move |result| {
            // The caller may have dropped the future; the result goes nowhere then.
            let _ = sender.send(result);
        });
        let queued = pool().and_then(|pool| pool.submit(self, input, vars, limits, reply));
        async move {
            queued?;
            receiver.await.unwrap_or_else(|_| Err(unanswered()))
        }
    }

    /// [`Program::run`] within the given bounds. Blocks the calling thread until the answer: at
    /// most about the deadline plus [`GRACE`] plus [`WATCH_EVERY`].
    pub fn run_with(
        &self,
        input: Value,
        vars: &Vars,
        limits: Limits,
    ) -> Result<Option<Value>, RunError> {
        self.run_on(pool()?, input, vars, limits)
    }

    /// [`Program::run_with`] on the given pool.
    fn run_on(
        &self,
        pool: &Pool,
        input: Value,
        vars: &Vars,
        limits: Limits,
    ) -> Result<Option<Value>, RunError> {
        let (sender, receiver) = mpsc::sync_channel(1);
        let reply: Reply = Box::new(move |result| {
            let _ = sender.send(result);
        });
        pool.submit(self, input, vars, limits, reply)?;
        receiver.recv().unwrap_or_else(|_| Err(unanswered()))
    }
}

/// The error for a run whose reply was dropped unanswered, which the pool never does.
fn unanswered() -> RunError {
    RunError::Panic("the run ended without an answer".to_owned())
}

/// A run's answer, called once, by whoever answers first: its worker or the watchdog.
type Reply = Box<dyn FnOnce(Result<Option<Value>, RunError>) + Send>;

/// The run threads: [`workers`] workers taking jobs from one queue, and the watchdog.
struct Pool {
    queue: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

/// What the pool's threads share.
struct Shared {
    /// The queue's receiving end: the worker holding the lock waits here for the next job, the
    /// other idle workers wait for the lock.
    jobs: Mutex<mpsc::Receiver<Job>>,
    /// Every queued or running run, by when the watchdog gives up on it (deadline plus
    /// [`GRACE`]) and a unique number; its worker or the watchdog, whichever is first, removes it.
    runs: Mutex<BTreeMap<(Instant, u64), Arc<Ticket>>>,
    next_id: AtomicU64,
}

/// The number of workers: one per core the process may use, at least two.
fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .max(2)
}

/// The pool every run goes to, started by the first run. A start that fails (a thread that
/// cannot be spawned) is the error of that run, and the next run tries again.
fn pool() -> Result<&'static Pool, RunError> {
    static POOL: OnceLock<Pool> = OnceLock::new();
    static STARTING: Mutex<()> = Mutex::new(());
    if let Some(pool) = POOL.get() {
        return Ok(pool);
    }
    let _starting = STARTING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(pool) = POOL.get() {
        return Ok(pool);
    }
    let pool = Pool::start(workers())?;
    Ok(POOL.get_or_init(|| pool))
}

impl Pool {
    /// Starts `workers` workers and the watchdog. If one cannot be started, those already
    /// started end when the queue's sending end, dropped with the error, disconnects.
    fn start(workers: usize) -> Result<Pool, RunError> {
        let (queue, jobs) = mpsc::channel();
        let shared = Arc::new(Shared {
            jobs: Mutex::new(jobs),
            runs: Mutex::default(),
            next_id: AtomicU64::new(0),
        });
        let spawn_error = |e: std::io::Error| RunError::Spawn(e.to_string());
        for _ in 0..workers {
            spawn_worker(&shared).map_err(spawn_error)?;
        }
        // The watchdog holds the shared part weakly: a pool that is dropped (only a test's is)
        // ends its workers at once and its watchdog at its next look.
        let watched = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("jq-watchdog".to_owned())
            .spawn(move || watch(&watched))
            .map_err(spawn_error)?;
        Ok(Pool { queue, shared })
    }

    /// Queues a run; `reply` gets its answer. The deadline counts from here.
    fn submit(
        &self,
        program: &Program,
        input: Value,
        vars: &Vars,
        limits: Limits,
        reply: Reply,
    ) -> Result<(), RunError> {
        let strays = STRAYS.load(AtomicOrdering::Relaxed);
        if strays >= MAX_STRAYS {
            return Err(RunError::Busy(strays));
        }
        let now = Instant::now();
        // A time too long for an `Instant` (`Duration::MAX`) is an hour.
        let deadline = (now.checked_add(limits.time))
            .filter(|deadline| deadline.checked_add(GRACE).is_some())
            .unwrap_or(now + Duration::from_secs(3600));
        let ticket = Arc::new(Ticket {
            id: self.shared.next_id.fetch_add(1, AtomicOrdering::Relaxed),
            deadline,
            time: limits.time,
            state: Mutex::new(TicketState {
                reply: Some(reply),
                running: false,
            }),
        });
        self.shared
            .lock_runs()
            .insert(ticket.key(), Arc::clone(&ticket));
        let job = Job {
            program: Arc::clone(&program.inner),
            input,
            vars: vars.to_vals(),
            limits,
            ticket,
        };
        // The receiving end lives in `shared`, which the pool holds, so this does not fail.
        self.queue.send(job).map_err(|mpsc::SendError(job)| {
            self.shared.forget(&job.ticket);
            RunError::Spawn("the run threads are gone".to_owned())
        })
    }
}

impl Shared {
    fn lock_runs(&self) -> MutexGuard<'_, BTreeMap<(Instant, u64), Arc<Ticket>>> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a run off the watchdog's list.
    fn forget(&self, ticket: &Ticket) {
        self.lock_runs().remove(&ticket.key());
    }
}

/// Starts one worker.
fn spawn_worker(shared: &Arc<Shared>) -> std::io::Result<()> {
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("jq-run".to_owned())
        .stack_size(STACK_SIZE)
        .spawn(move || work(&shared))
        .map(drop)
}

/// A worker: runs jobs one after another until the queue disconnects, the watchdog gives up on
/// its run, or it hands over to a fresh thread after a deep run.
fn work(shared: &Arc<Shared>) {
    loop {
        // The guard is a temporary: the lock is held while waiting, released once a job is taken.
        let next = shared
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(job) = next else {
            return;
        };
        let ticket = Arc::clone(&job.ticket);
        if let Start::Skip(answer) = ticket.start() {
            shared.forget(&ticket);
            drop(job);
            if let Some((reply, error)) = answer {
                reply(Err(error));
            }
            continue;
        }
        let (result, deepest) = job.run();
        shared.forget(&ticket);
        let Some(reply) = ticket.finish() else {
            // The watchdog answered, counted this run in STRAYS and started a worker in this
            // one's place.
            STRAYS.fetch_sub(1, AtomicOrdering::Relaxed);
            return;
        };
        reply(result);
        // A fresh thread in this one's place: this one's stack pages go back when it ends. If it
        // cannot be started, this one goes on.
        if deepest > RETIRE_DEPTH && spawn_worker(shared).is_ok() {
            return;
        }
    }
}

/// The watchdog: every [`WATCH_EVERY`], answers the runs past their deadline plus [`GRACE`]
/// with [`RunError::Timeout`] and starts a worker in place of each one that was running.
fn watch(shared: &Weak<Shared>) {
    // Workers that could not be started yet, tried again at every look.
    let mut missing = 0usize;
    loop {
        std::thread::sleep(WATCH_EVERY);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        while missing > 0 && spawn_worker(&shared).is_ok() {
            missing -= 1;
        }
        let now = Instant::now();
        let mut overdue = Vec::new();
        {
            let mut runs = shared.lock_runs();
            while let Some(entry) = runs.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                overdue.push(entry.remove());
            }
        }
        for ticket in overdue {
            // Its worker may have answered since.
            let Some((reply, started)) = ticket.give_up() else {
                continue;
            };
            if started && spawn_worker(&shared).is_err() {
                missing += 1;
            }
            reply(Err(RunError::Timeout(ticket.time)));
        }
    }
}

/// Everything a worker needs for one run, owned.
struct Job {
    program: Arc<Compiled>,
    input: Value,
    vars: [Val; 4],
    limits: Limits,
    ticket: Arc<Ticket>,
}

impl Job {
    /// Runs on this thread: the result, and how far from where it started its ticks saw the
    /// stack go. A [`Stop`] or a panic is caught here, so the worker goes on.
    fn run(self) -> (Result<Option<Value>, RunError>, usize) {
        let Job {
            program,
            input,
            vars,
            limits,
            ticket,
        } = self;
        // Measured here, at the start of every run: a worker runs one job after another.
        let guard = Guard::new(ticket.deadline);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            evaluate(&program.filter, input, vars, limits, &guard)
        }));
        let result = result.unwrap_or_else(|payload| match payload.downcast::<Stop>() {
            Ok(stop) => Err(match *stop {
                Stop::Time => RunError::Timeout(limits.time),
                Stop::Stack => RunError::TooDeep,
            }),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".to_owned());
                Err(RunError::Panic(message))
            }
        });
        (result, guard.deepest.get())
    }
}

/// One run's reply and where the run stands, shared by its job, the watchdog's list and the
/// watchdog.
struct Ticket {
    id: u64,
    deadline: Instant,
    /// The run's [`Limits::time`], for its [`RunError::Timeout`].
    time: Duration,
    state: Mutex<TicketState>,
}

struct TicketState {
    /// Taken by whoever answers first.
    reply: Option<Reply>,
    /// A worker has started the run.
    running: bool,
}

/// What a worker does with a job it took from the queue.
enum Start {
    Run,
    /// Not to be run: the answer to give, or none when the watchdog gave it while it was queued.
    Skip(Option<(Reply, RunError)>),
}

impl Ticket {
    /// Where it is on the watchdog's list.
    fn key(&self) -> (Instant, u64) {
        (self.deadline + GRACE, self.id)
    }

    fn lock(&self) -> MutexGuard<'_, TicketState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A worker took the job: it runs unless it was answered already, its deadline has passed
    /// in the queue, or [`MAX_STRAYS`] given-up runs are still running.
    fn start(&self) -> Start {
        let mut state = self.lock();
        if state.reply.is_none() {
            return Start::Skip(None);
        }
        let strays = STRAYS.load(AtomicOrdering::Relaxed);
        let refusal = if Instant::now() >= self.deadline {
            RunError::Timeout(self.time)
        } else if strays >= MAX_STRAYS {
            RunError::Busy(strays)
        } else {
            state.running = true;
            return Start::Run;
        };
        Start::Skip(state.reply.take().map(|reply| (reply, refusal)))
    }

    /// The worker is done: the reply, or `None` if the watchdog gave up on the run.
    fn finish(&self) -> Option<Reply> {
        self.lock().reply.take()
    }

    /// The watchdog gives up: the reply if nobody answered yet, and whether the run had started.
    /// A started run is counted in [`STRAYS`] here, under the lock, so that its worker (which
    /// takes the lock to find the reply gone) cannot uncount it first.
    fn give_up(&self) -> Option<(Reply, bool)> {
        let mut state = self.lock();
        let reply = state.reply.take()?;
        if state.running {
            STRAYS.fetch_add(1, AtomicOrdering::Relaxed);
        }
        Some((reply, state.running))
    }
}

/// Runs the filter on the current thread (a worker); a failed check unwinds with [`Stop`].
fn evaluate(
    filter: &jaq_core::Filter<Kind>,
    input: Value,
    vars: [Val; 4],
    limits: Limits,
    guard: &Guard,
) -> Result<Option<Value>, RunError> {
    let data = Data {
        lut: &filter.lut,
        guard,
    };
    let ctx = jaq_core::Ctx::<Kind>::new(data, jaq_core::Vars::new(vars));
    let mut outputs = filter.id.run((ctx, json_to_val(&input)));
    drop(input);
    let first = match outputs.next() {
        None => return Ok(None),
        Some(output) => output.map_err(exn_error)?,
    };
    let mut count = 1;
    while count < COUNTED_OUTPUTS {
        match outputs.next() {
            None => break,
            Some(output) => {
                output.map_err(exn_error)?;
                count += 1;
            }
        }
    }
    drop(outputs);
    if count > 1 {
        return Err(RunError::TooMany(count));
    }
    let mut budget = Budget {
        left: limits.max_bytes,
        max_bytes: limits.max_bytes,
        guard,
    };
    budget.convert(&first, 0).map(Some)
}

/// Why a run was unwound out of the interpreter.
#[derive(Debug)]
enum Stop {
    Time,
    Stack,
}

/// The per-run checks, called from inside the interpreter.
struct Guard {
    deadline: Instant,
    /// The stack address where the run started, taken afresh for every run.
    base: usize,
    /// The most stack, from `base`, seen at a tick so far.
    deepest: Cell<usize>,
    ticks: Cell<u32>,
}

impl Guard {
    fn new(deadline: Instant) -> Guard {
        Guard {
            deadline,
            base: stack_address(),
            deepest: Cell::new(0),
            ticks: Cell::new(0),
        }
    }

    /// One step of evaluation: checks the stack, and the clock every [`TIME_CHECK_EVERY`] ticks.
    fn tick(&self) {
        let used = stack_address().abs_diff(self.base);
        if used > STACK_LIMIT {
            self.deepest.set(used);
            panic::resume_unwind(Box::new(Stop::Stack));
        }
        if used > self.deepest.get() {
            self.deepest.set(used);
        }
        let ticks = self.ticks.get().wrapping_add(1);
        self.ticks.set(ticks);
        if ticks % TIME_CHECK_EVERY == 0 {
            self.check_time();
        }
    }

    fn check_time(&self) {
        if Instant::now() >= self.deadline {
            panic::resume_unwind(Box::new(Stop::Time));
        }
    }
}

/// An address in the current stack frame.
#[inline(never)]
fn stack_address() -> usize {
    let probe = 0u8;
    std::ptr::from_ref(std::hint::black_box(&probe)).addr()
}

/// jaq's data kind for our runs: JSON values, and per-run [`Data`] holding the [`Guard`].
struct Kind;

impl DataT for Kind {
    type V<'a> = Val;
    type Data<'a> = Data<'a>;
}

/// What the interpreter carries in every evaluation context. Its `Clone` is the tick: jaq clones
/// the context at every call, pipe, comma, binding and loop step.
struct Data<'a> {
    lut: &'a jaq_core::Lut<Kind>,
    guard: &'a Guard,
}

impl Clone for Data<'_> {
    fn clone(&self) -> Self {
        self.guard.tick();
        Data {
            lut: self.lut,
            guard: self.guard,
        }
    }
}

impl<'a> HasLut<'a, Kind> for Data<'a> {
    fn lut(&self) -> &'a jaq_core::Lut<Kind> {
        self.lut
    }
}

/// The native filters: our ticking `range/3` first (the compiler takes the first native of a
/// name and arity), then jaq's core, standard and JSON ones, without [`LEFT_OUT`].
fn funs() -> impl Iterator<Item = native::Fun<Kind>> {
    let range: native::Filter<RunPtr<Kind>> = ("range", native::v(3), |mut cv| {
        let guard = cv.0.data().guard;
        let by = cv.0.pop_var();
        let to = cv.0.pop_var();
        let from = cv.0.pop_var();
        let direction = by
            .partial_cmp(&Val::from(0isize))
            .unwrap_or(Ordering::Equal);
        let mut from: ValX<'_, Val> = Ok(from);
        // jaq-core's `range` (funs.rs), with a tick per number.
        Box::new(std::iter::from_fn(move || {
            guard.tick();
            match from.clone() {
                Ok(x) => match direction {
                    Ordering::Greater => x < to,
                    Ordering::Less => x > to,
                    Ordering::Equal => x != to,
                }
                .then(|| std::mem::replace(&mut from, (x + by.clone()).map_err(Exn::from))),
                error @ Err(_) => {
                    from = Ok(to.clone());
                    Some(error)
                }
            }
        }))
    });
    std::iter::once(native::run::<Kind>(range))
        .chain(jaq_core::funs())
        .chain(jaq_std::funs())
        .chain(jaq_json::funs())
        .filter(|(name, _, _)| !LEFT_OUT.contains(name))
}

/// The input as a jaq value.
fn json_to_val(value: &Value) -> Val {
    match value {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Val::Num(Num::from_integral(i))
            } else if let Some(u) = n.as_u64() {
                Val::Num(Num::from_integral(u))
            } else {
                Val::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => Val::from(s.clone()),
        Value::Array(items) => items.iter().map(json_to_val).collect(),
        Value::Object(map) => {
            let entries = map
                .iter()
                .map(|(k, v)| (Val::from(k.clone()), json_to_val(v)));
            Val::obj(entries.collect())
        }
    }
}

/// The output's conversion to JSON, charged against the size bound.
struct Budget<'g> {
    left: usize,
    max_bytes: usize,
    guard: &'g Guard,
}

impl Budget<'_> {
    fn charge(&mut self, bytes: usize) -> Result<(), RunError> {
        self.left = self
            .left
            .checked_sub(bytes)
            .ok_or(RunError::TooBig(self.max_bytes))?;
        Ok(())
    }

    fn convert(&mut self, val: &Val, depth: usize) -> Result<Value, RunError> {
        self.guard.tick();
        Ok(match val {
            Val::Null => {
                self.charge(4)?;
                Value::Null
            }
            Val::Bool(b) => {
                self.charge(5)?;
                Value::Bool(*b)
            }
            Val::Num(n) => {
                let (number, bytes) = num_to_json(n);
                self.charge(bytes)?;
                number
            }
            Val::TStr(bytes) | Val::BStr(bytes) => {
                self.charge(bytes.len().saturating_add(2))?;
                Value::String(String::from_utf8_lossy(bytes).into_owned())
            }
            Val::Arr(items) => {
                if depth >= MAX_OUTPUT_DEPTH {
                    return Err(RunError::TooNested);
                }
                self.charge(items.len().saturating_add(1))?;
                let items = items.iter().map(|item| self.convert(item, depth + 1));
                Value::Array(items.collect::<Result<_, _>>()?)
            }
            Val::Obj(entries) => {
                if depth >= MAX_OUTPUT_DEPTH {
                    return Err(RunError::TooNested);
                }
                self.charge(entries.len().saturating_add(1))?;
                let mut map = Map::new();
                for (key, value) in entries.iter() {
                    let key = match key {
                        Val::TStr(bytes) | Val::BStr(bytes) => {
                            self.charge(bytes.len().saturating_add(3))?;
                            String::from_utf8_lossy(bytes).into_owned()
                        }
                        other => {
                            let key = capped(other);
                            return Err(RunError::NotJson(format!(
                                "object key {key} is not a string"
                            )));
                        }
                    };
                    let value = self.convert(value, depth + 1)?;
                    map.insert(key, value);
                }
                Value::Object(map)
            }
        })
    }
}

/// A jaq number as JSON, and about how many bytes it takes serialized. Like jq, NaN is `null`
/// and the infinities are the largest finite doubles.
fn num_to_json(n: &Num) -> (Value, usize) {
    let float = |f: f64| {
        let f = if f.is_infinite() {
            f64::MAX.copysign(f)
        } else {
            f
        };
        serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
    };
    match n {
        Num::Int(i) => {
            let digits = i.unsigned_abs().checked_ilog10().unwrap_or(0) as usize + 1;
            (Value::from(*i), digits + usize::from(*i < 0))
        }
        Num::Float(f) => (float(*f), 24),
        Num::BigInt(i) => {
            let text = i.to_string();
            let len = text.len();
            let number = text.parse::<serde_json::Number>();
            (
                number.map_or_else(|_| float(n_as_f64(&text)), Value::Number),
                len,
            )
        }
        Num::Dec(text) => {
            let number = text.parse::<serde_json::Number>();
            let value = number.map_or_else(|_| float(n_as_f64(text)), Value::Number);
            (value, text.len())
        }
    }
}

fn n_as_f64(text: &str) -> f64 {
    text.parse().unwrap_or(f64::NAN)
}

/// A jq exception as a run error.
fn exn_error(exn: Exn<'_, Val>) -> RunError {
    match exn.get_err() {
        Ok(error) => {
            let message = capped(&error);
            // `error("x")` displays as the JSON string "x"; jq shows it unquoted.
            RunError::Jq(serde_json::from_str::<String>(&message).unwrap_or(message))
        }
        Err(exn) => match exn.get_halt() {
            Ok(code) => RunError::Halt(code),
            Err(_) => RunError::Jq("internal jaq exception escaped the program".to_owned()),
        },
    }
}

/// `value` displayed, at most [`MAX_MESSAGE`] bytes of it: jaq stops writing when the writer
/// refuses more, so a huge value costs no more than the cap.
fn capped(value: &dyn fmt::Display) -> String {
    struct Capped {
        text: String,
        full: bool,
    }
    impl fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            if self.full {
                return Err(fmt::Error);
            }
            let room = MAX_MESSAGE.saturating_sub(self.text.len());
            if s.len() <= room {
                self.text.push_str(s);
                return Ok(());
            }
            let mut end = room;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.text.push_str(&s[..end]);
            self.text.push('…');
            self.full = true;
            Err(fmt::Error)
        }
    }
    let mut out = Capped {
        text: String::new(),
        full: false,
    };
    // An error here is the cap, already marked with the ellipsis.
    let _ = fmt::write(&mut out, format_args!("{value}"));
    out.text
}

/// The load (lex, parse) errors, each with where it is.
fn load_message(errs: load::Errors<&str, ()>) -> String {
    let mut messages = Vec::new();
    for (file, err) in errs {
        let code = file.code;
        match err {
            load::Error::Io(errs) => {
                for (path, error) in errs {
                    messages.push(format!("cannot import {path}{}: {error}", at(code, path)));
                }
            }
            load::Error::Lex(errs) => {
                for (expected, found) in errs {
                    let expected = match expected {
                        load::lex::Expect::Delim(open) => format!("a match for `{open}`"),
                        other => other.as_str().to_owned(),
                    };
                    let what = match found.chars().next() {
                        None => "end of input".to_owned(),
                        Some(c) => format!("`{c}`"),
                    };
                    messages.push(format!(
                        "expected {expected}, found {what}{}",
                        at(code, found)
                    ));
                }
            }
            load::Error::Parse(errs) => {
                for (expected, found) in errs {
                    let what = if found.is_empty() {
                        "end of input".to_owned()
                    } else {
                        format!("`{found}`")
                    };
                    messages.push(format!(
                        "expected {}, found {what}{}",
                        expected.as_str(),
                        at(code, found)
                    ));
                }
            }
        }
    }
    messages.join("; ")
}

/// The compile errors (undefined filters, variables, modules), each with where it is.
fn compile_message(errs: compile::Errors<&str, ()>) -> String {
    let mut messages = Vec::new();
    for (file, errs) in errs {
        for (found, undefined) in errs {
            let what = match (found, undefined) {
                ("reduce", compile::Undefined::Filter(arity)) => {
                    format!("reduce takes 2 arguments, not {arity}")
                }
                ("foreach", compile::Undefined::Filter(arity)) => {
                    format!("foreach takes 2 or 3 arguments, not {arity}")
                }
                (name, compile::Undefined::Filter(arity)) => {
                    format!("undefined filter {name}/{arity}")
                }
                (name, undefined) => format!("undefined {} {name}", undefined.as_str()),
            };
            messages.push(format!("{what}{}", at(file.code, found)));
        }
    }
    messages.join("; ")
}

/// ` at line L, column C` of `part` (a slice of `code`), or nothing if it is not in `code`.
fn at(code: &str, part: &str) -> String {
    let start = code.as_ptr().addr();
    let offset = match part.as_ptr().addr().checked_sub(start) {
        Some(offset) if offset <= code.len() => offset,
        _ => return String::new(),
    };
    let Some(before) = code.get(..offset) else {
        return String::new();
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" at line {line}, column {column}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn program(source: &str) -> Program {
        Program::compile("adapter.test.request", source).unwrap()
    }

    fn run(source: &str, input: Value) -> Result<Option<Value>, RunError> {
        program(source).run(input, &Vars::default())
    }

    fn compile_error(source: &str) -> String {
        Program::compile("adapter.vllm.request", source)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn compile_error_names_the_field_and_jq_message() {
        let message = compile_error("foo");
        assert_eq!(
            message,
            "adapter.vllm.request: undefined filter foo/0 at line 1, column 1"
        );
        let message = compile_error("{model: .a,\n prompt: }");
        assert!(
            message.starts_with("adapter.vllm.request: expected "),
            "{message}"
        );
        assert!(message.contains("at line 2, column"), "{message}");
        let message = compile_error("\"abc");
        assert!(
            message.starts_with("adapter.vllm.request: expected "),
            "{message}"
        );
    }

    #[test]
    fn only_the_four_variables_are_bound() {
        let message = compile_error(".a + $foo");
        assert!(message.contains("undefined variable $foo"), "{message}");
        assert!(compile_error("$ENV").contains("undefined variable"));
        assert!(compile_error("env").contains("undefined filter env/0"));
        Program::compile("f", "[$method, $path, $query, $headers]").unwrap();
        let message = compile_error("import \"data\" as $data; $data");
        assert!(message.contains("not supported"), "{message}");
        let message = compile_error("include \"lib\"; .");
        assert!(message.contains("not supported"), "{message}");
    }

    #[test]
    fn spec_example_programs() {
        let request = program(
            r#"{model: "meta-llama/Llama-3.1-8B-Instruct", prompt: .input, max_tokens: (.max_length // 256)}"#,
        );
        let vars = Vars::default();
        assert_eq!(
            request.run(json!({"input": "hi"}), &vars).unwrap(),
            Some(
                json!({"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "hi", "max_tokens": 256})
            )
        );
        assert_eq!(
            request
                .run(json!({"input": "hi", "max_length": 12}), &vars)
                .unwrap()
                .unwrap()["max_tokens"],
            json!(12)
        );
        let response = program("{output: .choices[0].text, tokens: .usage.completion_tokens}");
        let body = json!({"choices": [{"text": "hello"}], "usage": {"completion_tokens": 7}});
        assert_eq!(
            response.run(body, &vars).unwrap(),
            Some(json!({"output": "hello", "tokens": 7}))
        );
        let event = program("{token: .choices[0].text}");
        assert_eq!(
            event
                .run(json!({"choices": [{"text": " wor"}]}), &vars)
                .unwrap(),
            Some(json!({"token": " wor"}))
        );
    }

    #[test]
    fn empty_is_none() {
        assert_eq!(run("empty", json!({})).unwrap(), None);
        assert_eq!(run("select(.done)", json!({"done": false})).unwrap(), None);
    }

    #[test]
    fn values_round_trip() {
        let input = json!({"n": null, "t": true, "i": -3, "u": u64::MAX, "f": 1.5,
            "s": "a\"\n", "a": [1, [2]], "o": {"k": {}}});
        assert_eq!(run(".", input.clone()).unwrap(), Some(input));
        assert_eq!(
            run("[1e1000, 1.5, 100000000000000000000000]", json!(null)).unwrap(),
            Some(json!([f64::MAX, 1.5, 1e23]))
        );
        assert_eq!(
            run("[nan, infinite]", json!(null)).unwrap(),
            Some(json!([null, f64::MAX]))
        );
    }

    #[test]
    fn request_variables_are_bound() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-api-key", http::HeaderValue::from_static("k1"));
        headers.append("accept", http::HeaderValue::from_static("a/b"));
        headers.append("accept", http::HeaderValue::from_static("c/d"));
        headers.insert("x-bin", http::HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        let vars = Vars::from_request(
            &http::Method::POST,
            "/v1/completions",
            Some("a=1&b=x+y%21&a=2&flag"),
            &headers,
        );
        let out = program(r#"[$method, $path, $query.a, $headers["x-api-key"]]"#)
            .run(json!(null), &vars)
            .unwrap();
        assert_eq!(out, Some(json!(["POST", "/v1/completions", "1", "k1"])));
        assert_eq!(
            vars.query,
            *json!({"a": "1", "b": "x y!", "flag": ""})
                .as_object()
                .unwrap()
        );
        assert_eq!(vars.headers["accept"], json!("a/b, c/d"));
        assert!(!vars.headers.contains_key("x-bin"));
        let none = Vars::from_request(&http::Method::GET, "/", None, &http::HeaderMap::new());
        assert_eq!(
            program("[$query, $headers]")
                .run(json!(null), &none)
                .unwrap(),
            Some(json!([{}, {}]))
        );
    }

    #[test]
    fn more_than_one_output_is_an_error() {
        let error = run("1, 2", json!(null)).unwrap_err();
        assert_eq!(error, RunError::TooMany(2));
        assert_eq!(error.to_string(), "produced more than one value (2 values)");
        let error = run(".[]", json!([1, 2, 3])).unwrap_err();
        assert_eq!(error, RunError::TooMany(3));
        let error = run("range(100)", json!(null)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "produced more than one value (at least 10 values)"
        );
    }

    #[test]
    fn runtime_errors_carry_jq_message() {
        let error = run(".a.b", json!("hi")).unwrap_err();
        assert!(
            matches!(&error, RunError::Jq(m) if m.contains("cannot index")),
            "{error}"
        );
        assert_eq!(
            run(r#"error("x")"#, json!(null)).unwrap_err(),
            RunError::Jq("x".into())
        );
        let error = run(r#"error({a: 1})"#, json!(null)).unwrap_err();
        assert!(
            matches!(&error, RunError::Jq(m) if m.contains("\"a\"")),
            "{error}"
        );
        assert_eq!(run("halt", json!(null)).unwrap_err(), RunError::Halt(0));
        // A message about a huge value is cut, not written out.
        let error = run("[range(100000)] | .a", json!(null)).unwrap_err();
        assert!(
            matches!(&error, RunError::Jq(m) if m.len() < 2 * MAX_MESSAGE),
            "{error}"
        );
    }

    #[test]
    fn a_repetition_past_isize_max_is_a_caught_panic() {
        let error = run(r#""ab" * 100000000000000000000"#, json!(null)).unwrap_err();
        assert!(matches!(error, RunError::Panic(_)), "{error}");
    }

    #[test]
    fn outputs_that_are_not_json_are_errors() {
        let error = run("reduce range(200) as $i (0; [.])", json!(null)).unwrap_err();
        assert_eq!(error, RunError::TooNested);
        let error = run("{(1): 2}", json!(null)).unwrap_err();
        assert!(matches!(error, RunError::NotJson(_)), "{error}");
    }

    #[test]
    fn unbounded_programs_end_with_an_error() {
        type Expected = fn(&RunError) -> bool;
        let cases: &[(&str, Expected)] = &[
            ("def f: f; f", |e| matches!(e, RunError::Timeout(_))),
            ("def f: 1 + f; f", |e| matches!(e, RunError::TooDeep)),
            ("def f: [f]; f", |e| matches!(e, RunError::TooDeep)),
            ("def f(x): f(x + 1) + 1; f(0)", |e| {
                matches!(e, RunError::TooDeep)
            }),
            ("repeat(1)", |e| matches!(e, RunError::TooMany(_))),
            ("range(1e12)", |e| matches!(e, RunError::TooMany(_))),
            ("[range(1e9)]", |e| matches!(e, RunError::Timeout(_))),
            ("[repeat(1)]", |e| matches!(e, RunError::Timeout(_))),
            ("last(range(1e12))", |e| matches!(e, RunError::Timeout(_))),
            ("[limit(1e12; repeat(.))] | length", |e| {
                matches!(e, RunError::Timeout(_))
            }),
            ("reduce range(1e12) as $i (0; . + $i)", |e| {
                matches!(e, RunError::Timeout(_))
            }),
            ("reduce range(1e12) as $i (null; [.]) | 0", |e| {
                matches!(e, RunError::Timeout(_))
            }),
            ("until(false; .)", |e| matches!(e, RunError::Timeout(_))),
            ("[recurse(.)] | length", |e| {
                matches!(e, RunError::Timeout(_))
            }),
            // 2^40 shared leaves: converting them runs into the size bound or, in a debug build,
            // into the deadline first.
            ("reduce range(40) as $i (0; [., .])", |e| {
                matches!(e, RunError::TooBig(_) | RunError::Timeout(_))
            }),
            // A 64 MiB string: past the size bound, or on a loaded host the deadline first.
            ("reduce range(26) as $i (\"x\"; . + .)", |e| {
                matches!(e, RunError::TooBig(_) | RunError::Timeout(_))
            }),
        ];
        for (source, expected) in cases {
            let started = Instant::now();
            let result = run(source, json!(null));
            let took = started.elapsed();
            let error = result.expect_err(source);
            assert!(expected(&error), "{source}: {error}");
            assert!(took < Duration::from_secs(2), "{source} took {took:?}");
            eprintln!("{source}: {error} after {took:?}");
        }
    }

    #[test]
    fn an_uninterruptible_operation_is_given_up_on() {
        // Comparing a value with 2^26 shared leaves to itself: one native call, no tick.
        let started = Instant::now();
        let error = run(
            "reduce range(26) as $i (0; [., .]) | [., .] | sort | 0",
            json!(null),
        )
        .unwrap_err();
        assert_eq!(error, RunError::Timeout(DEFAULT_TIME));
        assert!(started.elapsed() < Duration::from_secs(2));
        // The thread ends on its own at its next tick and is no longer counted.
        let until = Instant::now() + Duration::from_secs(120);
        while STRAYS.load(AtomicOrdering::Relaxed) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(STRAYS.load(AtomicOrdering::Relaxed), 0);
    }

    #[test]
    fn limits_are_adjustable() {
        let limits = Limits {
            time: Duration::from_millis(20),
            max_bytes: 10,
        };
        let error = program("[range(100)]")
            .run_with(json!(null), &Vars::default(), limits)
            .unwrap_err();
        assert_eq!(error, RunError::TooBig(10));
        assert_eq!(error.to_string(), "output is larger than 10 bytes");
        let error = program("def f: f; f")
            .run_with(json!(null), &Vars::default(), limits)
            .unwrap_err();
        assert_eq!(error.to_string(), "ran longer than 20 ms");
    }

    #[test]
    fn one_program_runs_on_many_threads_at_once() {
        let program = program(r#"{prompt: .input, n: ($query.n | tonumber)}"#);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let program = program.clone();
                scope.spawn(move || {
                    for i in 0..20 {
                        let vars = Vars::from_request(
                            &http::Method::POST,
                            "/",
                            Some(&format!("n={i}")),
                            &http::HeaderMap::new(),
                        );
                        let out = program.run(json!({"input": t}), &vars).unwrap();
                        assert_eq!(out, Some(json!({"prompt": t, "n": i})));
                    }
                });
            }
        });
        assert!(format!("{program:?}").contains("adapter.test.request"));
    }

    /// Bounds generous enough that a run waiting behind other tests' slow runs still answers.
    fn roomy() -> Limits {
        Limits {
            time: Duration::from_secs(20),
            ..Limits::default()
        }
    }

    fn expected(t: usize, i: usize) -> Option<Value> {
        Some(json!({"t": t, "i": i, "sum": t * 1000 + i}))
    }

    const SUM: &str = "{t: .t, i: .i, sum: (.t * 1000 + .i)}";

    #[test]
    fn many_runs_from_many_threads_get_their_own_answers() {
        let program = program(SUM);
        std::thread::scope(|scope| {
            for t in 0..8 {
                let program = program.clone();
                scope.spawn(move || {
                    for i in 0..100 {
                        let out = program
                            .run_with(json!({"t": t, "i": i}), &Vars::default(), roomy())
                            .unwrap();
                        assert_eq!(out, expected(t, i));
                    }
                });
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_runs_from_async_tasks_get_their_own_answers() {
        let program = program(SUM);
        // 8 tasks with two runs each in flight: queued before either is awaited. Not more, so
        // that the shared queue does not hold other tests' runs past their deadlines.
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let program = program.clone();
                tokio::spawn(async move {
                    for i in (0..100).step_by(2) {
                        let first =
                            program.run_async(json!({"t": t, "i": i}), &Vars::default(), roomy());
                        let second = program.run_async(
                            json!({"t": t, "i": i + 1}),
                            &Vars::default(),
                            roomy(),
                        );
                        assert_eq!(second.await.unwrap(), expected(t, i + 1));
                        assert_eq!(first.await.unwrap(), expected(t, i));
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn run_async_is_not_timed_by_a_paused_tokio_clock() {
        let out = program(".a")
            .run_async(json!({"a": 1}), &Vars::default(), Limits::default())
            .await
            .unwrap();
        assert_eq!(out, Some(json!(1)));
        // The deadline is std's clock: the run ends at its own tick, after its full time.
        let started = Instant::now();
        let error = program("def f: f; f")
            .run_async(json!(null), &Vars::default(), Limits::default())
            .await
            .unwrap_err();
        assert_eq!(error, RunError::Timeout(DEFAULT_TIME));
        assert!(started.elapsed() >= DEFAULT_TIME);
    }

    #[test]
    fn the_watchdog_answers_a_stuck_run_and_replaces_its_worker() {
        // A pool of its own, of one worker, so that the runs after the stuck one can only be
        // answered by the replacement.
        let pool = Pool::start(1).unwrap();
        // Sorting a value with 2^n shared leaves: one native call, no tick, several times longer
        // than 10 ms plus GRACE (about 1 s in a debug build, 0.7 s in a release one).
        let leaves = if cfg!(debug_assertions) { 24 } else { 26 };
        let stuck = program(&format!(
            "reduce range({leaves}) as $i (0; [., .]) | [., .] | sort | 0"
        ));
        let limits = Limits {
            time: Duration::from_millis(10),
            ..Limits::default()
        };
        let started = Instant::now();
        let error = stuck
            .run_on(&pool, json!(null), &Vars::default(), limits)
            .unwrap_err();
        assert_eq!(error, RunError::Timeout(limits.time));
        assert!(started.elapsed() < Duration::from_secs(2));
        // Counted before it was answered, and still sorting.
        assert!(STRAYS.load(AtomicOrdering::Relaxed) >= 1);
        let quick = program(".a");
        for i in 0..20 {
            let out = quick
                .run_on(&pool, json!({"a": i}), &Vars::default(), Limits::default())
                .unwrap();
            assert_eq!(out, Some(json!(i)));
        }
    }
}
