//! A dispatcher whose requests hold their thread or wait until the test lets them go, and
//! report when they start, finish and are dropped; and a daemon running it in this process.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_listener::Event;
use khived::{Client, Config, Daemon, Dispatch, DispatchError, Request, Response, ShutdownHandle};

use crate::common::{frame, temp_dir, wait_until_serving};

pub const WAIT: Duration = Duration::from_secs(30);

/// Echoes `ops`, except:
/// - `block:ID` blocks its thread (no await) until the blocking gate opens;
/// - `await:ID` awaits until the async gate opens;
///
/// and reports on a channel: `started ID` when the dispatch first runs, `finished ID` when
/// it answers, `dropped ID` when its future is dropped (also if it never ran). It also counts
/// the polls of each dispatch future ([`polls`](Gated::polls)).
#[derive(Clone)]
pub struct Gated {
    events: Arc<Mutex<Sender<String>>>,
    blocking: Arc<(Mutex<bool>, Condvar)>,
    open: Arc<AtomicBool>,
    opened: Arc<Event>,
    polls: Arc<Mutex<HashMap<String, usize>>>,
}

impl Gated {
    fn new() -> (Gated, Receiver<String>) {
        let (events, received) = mpsc::channel();
        let gated = Gated {
            events: Arc::new(Mutex::new(events)),
            blocking: Arc::default(),
            open: Arc::default(),
            opened: Arc::new(Event::new()),
            polls: Arc::default(),
        };
        (gated, received)
    }

    fn report(&self, event: String) {
        let _ = self.events.lock().unwrap().send(event);
    }

    pub fn open_blocking_gate(&self) {
        let (open, changed) = &*self.blocking;
        *open.lock().unwrap() = true;
        changed.notify_all();
    }

    pub fn open_async_gate(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.opened.notify(usize::MAX);
    }

    /// How many polls of the dispatch of `ID` have returned so far. The daemon polls a
    /// request's task only when something woke it: while an `await:ID` waits at the closed
    /// gate, only the daemon's watch of its client does, and it looks at the client in the
    /// same poll of the task, just after the dispatch's.
    pub fn polls(&self, id: &str) -> usize {
        self.polls.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

/// Reports `dropped ID` when the dispatch future holding it goes away.
struct DropReport(Gated, String);

impl Drop for DropReport {
    fn drop(&mut self) {
        self.0.report(format!("dropped {}", self.1));
    }
}

impl Dispatch for Gated {
    fn dispatch(
        &self,
        request: &Request<'_>,
    ) -> impl Future<Output = Result<String, DispatchError>> + Send {
        // Made before the future is first polled, so that dropping a future that never ran is
        // seen too.
        let ops = request.ops.to_string();
        let id = ops
            .split_once(':')
            .map_or(ops.as_str(), |(_, id)| id)
            .to_owned();
        let guard = DropReport(self.clone(), id.clone());
        let gated = self.clone();
        let counted = (self.clone(), id.clone());
        let mut dispatch = Box::pin(async move {
            let _guard = guard;
            gated.report(format!("started {id}"));
            if ops.starts_with("block:") {
                let (open, changed) = &*gated.blocking;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = changed.wait(open).unwrap();
                }
            } else if ops.starts_with("await:") {
                loop {
                    if gated.open.load(Ordering::SeqCst) {
                        break;
                    }
                    let listener = gated.opened.listen();
                    if gated.open.load(Ordering::SeqCst) {
                        break;
                    }
                    listener.await;
                }
            }
            gated.report(format!("finished {id}"));
            Ok(ops)
        });
        std::future::poll_fn(move |cx| {
            let polled = dispatch.as_mut().poll(cx);
            let (gated, id) = &counted;
            *gated.polls.lock().unwrap().entry(id.clone()).or_default() += 1;
            polled
        })
    }

    fn namespace(&self) -> &str {
        "gated"
    }

    fn config_id(&self) -> &str {
        ""
    }
}

pub struct Running {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<Result<khived::Stopped, khived::Error>>>,
    pub gated: Gated,
    pub events: Receiver<String>,
}

impl Running {
    pub fn start(tweak: impl FnOnce(&mut Config)) -> Running {
        let dir = temp_dir();
        let socket = dir.path().join("run").join("k.sock");
        let mut config = Config::at(&socket);
        config.handle_signals = false;
        config.threads = 2;
        tweak(&mut config);
        let (gated, events) = Gated::new();
        let daemon = Daemon::new(config, gated.clone());
        let stop = daemon.shutdown_handle();
        let thread = std::thread::spawn(move || daemon.run_blocking());
        wait_until_serving(&socket);
        Running {
            _dir: dir,
            socket,
            stop,
            thread: Some(thread),
            gated,
            events,
        }
    }

    /// Sends `ops` on a new connection without waiting for the answer.
    pub fn send(&self, ops: &str) -> UnixStream {
        use std::io::Write;
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let body = serde_json::to_vec(&Request::new(ops, "gated", "")).unwrap();
        stream.write_all(&frame(&body)).unwrap();
        stream
    }

    pub fn call(&self, ops: &str) -> Response {
        let mut client = Client::connect(&self.socket, WAIT).unwrap();
        client.request(&Request::new(ops, "gated", "")).unwrap()
    }

    /// Waits for `event`, failing on any other event first or after [`WAIT`].
    pub fn expect(&self, event: &str) {
        match self.events.recv_timeout(WAIT) {
            Ok(got) => assert_eq!(got, event),
            Err(e) => panic!("no {event:?}: {e}"),
        }
    }

    /// Waits until `count` requests wait for a dispatch thread, as probes tell.
    pub fn wait_until_waiting(&self, count: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let info = khived::probe(&self.socket, WAIT).unwrap();
            if info.waiting == count {
                return;
            }
            assert!(Instant::now() < deadline, "{info:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the daemon, checks that `event` came before `run` returned, and returns once the
    /// daemon's thread has ended.
    pub fn stop_and_expect(mut self, event: &str) {
        self.stop.shutdown();
        self.thread.take().unwrap().join().unwrap().unwrap();
        assert_eq!(self.events.try_recv().as_deref(), Ok(event));
    }

    pub fn stop(mut self) {
        self.stop.shutdown();
        self.thread.take().unwrap().join().unwrap().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.gated.open_blocking_gate();
        self.gated.open_async_gate();
        self.stop.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
