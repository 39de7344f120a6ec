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
//! - **Its own thread.** Every run evaluates on a fresh thread with a [`STACK_SIZE`] stack
//!   (address space; only the pages a run touches are used, and freed when it ends); the caller
//!   blocks until the result arrives or until the deadline plus [`GRACE`] has passed. Starting
//!   and ending the thread costs about 50 µs a run.
//! - **A tick inside the interpreter.** jaq clones its evaluation context (which holds our
//!   per-run data) at every filter call, pipe, comma, binding and loop step, so that clone is
//!   where we check: each tick compares the stack pointer with the thread's start (more than
//!   [`STACK_LIMIT`] used: [`RunError::TooDeep`]) and every [`TIME_CHECK_EVERY`] ticks reads the
//!   clock ([`Limits::time`], default [`DEFAULT_TIME`], passed: [`RunError::Timeout`]). A check
//!   that fails unwinds out of the interpreter with [`std::panic::resume_unwind`] (no panic
//!   message is printed) and the run's thread catches it, so nothing is left behind; this needs
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
//!   the caller gets [`RunError::Timeout`] and the thread is left to finish on its own (it stops
//!   at its next tick); while [`MAX_STRAYS`] such threads are still running, further runs are
//!   refused with [`RunError::Busy`] instead of piling up.
//! - **Memory is bounded only through time.** There is no allocation limit: within the deadline
//!   jaq can build values of hundreds of MB (a string doubled at every step grows at memcpy
//!   speed), and the check after the deadline may come one doubling late. A string repeated
//!   with `*` (`"x" * $n`) is allocated in one step, whatever its size: a count so large that
//!   the allocation fails makes Rust abort the process (a count past `isize::MAX` bytes is a
//!   panic, caught as [`RunError::Panic`]), and a smaller one is granted in full. Programs that
//!   repeat a string by a number from the input should clamp the number first.
//! - **Deep values are dropped recursively.** A value nested a million levels deep, built by a
//!   loop within the deadline, is dropped (and printed by `tojson`) by recursion on the run's
//!   thread; [`STACK_SIZE`] leaves room above [`STACK_LIMIT`] for that (a debug build drops a
//!   value a million levels deep in it), sized for the default deadline, not for one of many
//!   seconds.
//! - **The deadline is wall-clock time**, so a run starved of CPU can time out with little work.
//!
//! A run blocks the calling thread for up to the deadline plus [`GRACE`] (200 ms by default);
//! the proxy's async code should call it from `tokio::task::spawn_blocking`.

use std::cell::Cell;
use std::cmp::Ordering;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
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
/// The stack of a run's thread: mostly address space, touched only as deep as the run goes.
pub const STACK_SIZE: usize = 256 << 20;
/// The stack a run's evaluation may use before it is stopped with [`RunError::TooDeep`]; the rest
/// of [`STACK_SIZE`] is headroom for recursion that has no tick (dropping or printing a deep
/// value).
pub const STACK_LIMIT: usize = 32 << 20;
/// How long past its deadline the caller waits for a run before it gives up on it.
pub const GRACE: Duration = Duration::from_millis(100);
/// How many given-up runs may still be running before [`Program::run`] refuses new ones.
pub const MAX_STRAYS: usize = 4;
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

/// Runs given up on (caller timed out) that are still running.
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
    /// The run's thread could not be started.
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

    /// [`Program::run_with`] for async callers: the run is handed off at once (the variables
    /// converted before this returns), and the future, `'static`, resolves to its result without
    /// blocking an async worker thread.
    pub fn run_async(
        &self,
        input: Value,
        vars: &Vars,
        limits: Limits,
    ) -> impl std::future::Future<Output = Result<Option<Value>, RunError>> + Send + 'static {
        let program = self.clone();
        let vars = vars.clone();
        async move {
            tokio::task::spawn_blocking(move || program.run_with(input, &vars, limits))
                .await
                .unwrap_or_else(|e| Err(RunError::Panic(e.to_string())))
        }
    }

    /// [`Program::run`] within the given bounds.
    pub fn run_with(
        &self,
        input: Value,
        vars: &Vars,
        limits: Limits,
    ) -> Result<Option<Value>, RunError> {
        let strays = STRAYS.load(AtomicOrdering::Relaxed);
        if strays >= MAX_STRAYS {
            return Err(RunError::Busy(strays));
        }
        let now = Instant::now();
        // A time too long for an `Instant` (`Duration::MAX`) is an hour.
        let deadline = (now.checked_add(limits.time))
            .filter(|deadline| deadline.checked_add(GRACE).is_some())
            .unwrap_or(now + Duration::from_secs(3600));
        let slot = Arc::new(Slot::default());
        let job = Job {
            program: Arc::clone(&self.inner),
            input,
            vars: vars.to_vals(),
            limits,
            deadline,
            slot: Arc::clone(&slot),
        };
        std::thread::Builder::new()
            .name("jq-run".to_owned())
            .stack_size(STACK_SIZE)
            .spawn(move || job.run())
            .map_err(|e| RunError::Spawn(e.to_string()))?;
        slot.wait(deadline + GRACE, limits.time)
    }
}

/// Everything a run's thread needs, owned.
struct Job {
    program: Arc<Compiled>,
    input: Value,
    vars: [Val; 4],
    limits: Limits,
    deadline: Instant,
    slot: Arc<Slot>,
}

impl Job {
    fn run(self) {
        let Job {
            program,
            input,
            vars,
            limits,
            deadline,
            slot,
        } = self;
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            evaluate(&program.filter, input, vars, limits, deadline)
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
        slot.put(result);
    }
}

/// Where a run's thread leaves its result for the caller.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

#[derive(Default)]
struct SlotState {
    result: Option<Result<Option<Value>, RunError>>,
    /// The caller gave up waiting (and counted this run in [`STRAYS`]).
    abandoned: bool,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn put(&self, result: Result<Option<Value>, RunError>) {
        let mut state = self.lock();
        if state.abandoned {
            STRAYS.fetch_sub(1, AtomicOrdering::Relaxed);
        } else {
            state.result = Some(result);
            self.ready.notify_one();
        }
    }

    fn wait(&self, until: Instant, time: Duration) -> Result<Option<Value>, RunError> {
        let mut state = self.lock();
        loop {
            if let Some(result) = state.result.take() {
                return result;
            }
            let now = Instant::now();
            if now >= until {
                state.abandoned = true;
                STRAYS.fetch_add(1, AtomicOrdering::Relaxed);
                return Err(RunError::Timeout(time));
            }
            state = match self.ready.wait_timeout(state, until - now) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// Runs the filter on the current thread (the run's own); a failed check unwinds with [`Stop`].
fn evaluate(
    filter: &jaq_core::Filter<Kind>,
    input: Value,
    vars: [Val; 4],
    limits: Limits,
    deadline: Instant,
) -> Result<Option<Value>, RunError> {
    let guard = Guard::new(deadline);
    let data = Data {
        lut: &filter.lut,
        guard: &guard,
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
        guard: &guard,
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
    /// The stack address where the run started.
    base: usize,
    ticks: Cell<u32>,
}

impl Guard {
    fn new(deadline: Instant) -> Guard {
        Guard {
            deadline,
            base: stack_address(),
            ticks: Cell::new(0),
        }
    }

    /// One step of evaluation: checks the stack, and the clock every [`TIME_CHECK_EVERY`] ticks.
    fn tick(&self) {
        if stack_address().abs_diff(self.base) > STACK_LIMIT {
            panic::resume_unwind(Box::new(Stop::Stack));
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
            ("reduce range(26) as $i (\"x\"; . + .)", |e| {
                matches!(e, RunError::TooBig(_))
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
}
