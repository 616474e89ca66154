//! The scheduler: a [`Batch`](super::Batch) stepped on its own thread while requests are submitted from any
//! thread, each request's tokens streamed to it as they are produced, and a request whose
//! receiver went away (a client that disconnected) cancelled at its next token.

use super::{Budget, Engine, Generation, Ready, Request};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What a submitted request receives, in order: its tokens, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// A new token and the text it released (see [`super::Update::text`]).
    Token { token: u32, text: String },
    /// It finished: the whole generation, with its stop reason and metrics.
    Done(Box<Generation>),
    /// It failed: alone ([`Error::NonFinite`]), with its step ([`Error::Step`]), or because the
    /// engine stopped ([`Error::Stopped`]).
    Failed(Error),
}

/// Where a request's events go; returning `false` says nobody listens any more, and the
/// request is cancelled.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// A snapshot of the scheduler's work, updated after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Requests waiting for admission, and running.
    pub waiting: usize,
    pub running: usize,
    /// KV cache bytes the running requests hold.
    pub kv_bytes: usize,
    /// Steps run, tokens generated, and requests cancelled because their receiver went away.
    pub steps: u64,
    pub tokens: u64,
    pub cancelled: u64,
}

enum Command {
    Add(Box<Ready>, Sink),
    Stop,
}

/// Runs a continuous [`Batch`](super::Batch) on a thread of its own. `Send + Sync`: share it (in an `Arc`)
/// between the threads or tasks that take requests. Dropping it stops the thread; requests
/// still running then fail with [`Error::Stopped`].
///
/// ```no_run
/// # use fineprune::{Engine, Model, Request, engine::{Budget, Event, Scheduler}};
/// # use std::sync::Arc;
/// let engine = Engine::new(Arc::new(Model::load("model-dir")?));
/// let scheduler = Scheduler::start(engine, Budget::default());
/// for event in scheduler.submit(Request::new("Tell me a story.", None))? {
///     match event {
///         Event::Token { text, .. } => print!("{text}"),
///         Event::Done(g) => println!("\n[{:?}, {:.3} s to first token]", g.stop, g.metrics.ttft_secs),
///         Event::Failed(e) => eprintln!("{e}"),
///     }
/// }
/// # Ok::<(), fineprune::Error>(())
/// ```
pub struct Scheduler {
    engine: Engine,
    tx: Sender<Command>,
    load: Arc<Mutex<Load>>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the stepping thread over `engine`, admitting requests within `budget`.
    pub fn start(engine: Engine, budget: Budget) -> Scheduler {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(Mutex::new(Load::default()));
        let thread = {
            let (engine, load) = (engine.clone(), load.clone());
            std::thread::Builder::new()
                .name("fineprune-scheduler".into())
                .spawn(move || run(engine, budget, rx, load))
                .expect("spawning the scheduler thread")
        };
        Scheduler {
            engine,
            tx,
            load,
            thread: Some(thread),
        }
    }

    /// The engine it runs.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Checks and prepares `req` on the calling thread ([`Engine::ready`]: an error is the
    /// request's own, returned here), then queues it; its events arrive on the returned
    /// [`Stream`]. Dropping the stream cancels the request.
    pub fn submit(&self, req: Request) -> Result<Stream> {
        let ready = self.engine.ready(req)?;
        let (tx, rx) = mpsc::channel();
        self.submit_ready(ready, Box::new(move |e| tx.send(e).is_ok()))?;
        Ok(Stream { rx, done: false })
    }

    /// Queues a prepared request whose events go to `sink` (called on the scheduler thread;
    /// it must not block).
    pub fn submit_ready(&self, ready: Ready, sink: Sink) -> Result<()> {
        self.tx
            .send(Command::Add(Box::new(ready), sink))
            .map_err(|_| Error::Stopped("the scheduler thread has ended".into()))
    }

    /// Its work now.
    pub fn load(&self) -> Load {
        *self.load.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request's events ([`Scheduler::submit`]), an iterator that ends after `Done` or
/// `Failed`. Dropping it cancels the request at its next token.
pub struct Stream {
    rx: Receiver<Event>,
    done: bool,
}

impl Stream {
    /// Waits for the end: the generation, or the error it failed with.
    pub fn wait(self) -> Result<Generation> {
        for event in self {
            match event {
                Event::Token { .. } => {}
                Event::Done(g) => return Ok(*g),
                Event::Failed(e) => return Err(e),
            }
        }
        Err(Error::Stopped("the request ended without a result".into()))
    }
}

impl Iterator for Stream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let event = self.rx.recv().unwrap_or_else(|_| {
            Event::Failed(Error::Stopped(
                "the scheduler ended before the request finished".into(),
            ))
        });
        self.done = !matches!(event, Event::Token { .. });
        Some(event)
    }
}

/// The scheduler thread: takes commands (blocking while idle), steps, sends events.
fn run(engine: Engine, budget: Budget, rx: Receiver<Command>, load: Arc<Mutex<Load>>) {
    let new_batch = || {
        let mut b = engine.batch();
        b.set_budget(budget);
        b
    };
    let mut batch = new_batch();
    let mut sinks: HashMap<u64, Sink> = HashMap::new();
    let mut stats = Load::default();
    let mut stopping = false;
    while !stopping {
        // Commands: wait for one while idle, then take all that are there.
        let mut first = match batch.is_idle() {
            true => rx.recv().ok(),
            false => None,
        };
        loop {
            let cmd = match first.take() {
                Some(c) => c,
                None => match rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => Command::Stop,
                },
            };
            match cmd {
                Command::Add(ready, sink) => {
                    sinks.insert(batch.add_ready(*ready), sink);
                }
                Command::Stop => {
                    stopping = true;
                    break;
                }
            }
        }
        if stopping {
            break;
        }
        let step = catch_unwind(AssertUnwindSafe(|| batch.step()));
        match step {
            Ok(Ok(updates)) => {
                stats.steps += 1;
                for u in updates {
                    stats.tokens += 1;
                    let Some(sink) = sinks.get_mut(&u.id) else {
                        continue;
                    };
                    let event = Event::Token {
                        token: u.token,
                        text: u.text,
                    };
                    if !sink(event) {
                        // A request that finished with this token is not cancelled.
                        if batch.cancel(u.id) {
                            stats.cancelled += 1;
                        }
                        sinks.remove(&u.id);
                    }
                }
            }
            // The step's requests got the error; they are in take_finished.
            Ok(Err(_)) => stats.steps += 1,
            Err(panic) => {
                // A bug, not an input: every request in the batch fails, the thread goes on.
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                for (_, mut sink) in sinks.drain() {
                    sink(Event::Failed(Error::Step(format!("panicked: {msg}"))));
                }
                batch = new_batch();
            }
        }
        for (id, result) in batch.take_finished() {
            if let Some(mut sink) = sinks.remove(&id) {
                sink(match result {
                    Ok(g) => Event::Done(Box::new(g)),
                    Err(e) => Event::Failed(e),
                });
            }
        }
        stats.waiting = batch.waiting();
        stats.running = batch.running();
        stats.kv_bytes = batch.kv_bytes();
        *load.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }
    for (_, mut sink) in sinks.drain() {
        sink(Event::Failed(Error::Stopped(
            "the scheduler was shut down".into(),
        )));
    }
}
