//! The proxy's relay engine: once a relayed stream's instance has answered, its bytes move here, on one thread of
//! the proxy's own, and never through the Python event loop.
//!
//! Why: a relay in Python pays a callback, a new `bytes` object and a `transport.write` per chunk in each direction;
//! that user-space work is what put the relay over tuned nginx in CPU per round trip (bench/NOTES.md). Here a chunk
//! costs one `recv` into a buffer shared by every stream and one `send`, nothing more.
//!
//! The Python side (`aube.proxy.native_relay`) hands over the two connected sockets, as file descriptors it
//! duplicated for this engine, and keeps what it needs to supervise the stream: the byte counters (idle and hung
//! instance detection, metrics), whether the client leg is full (then the instance's silence is the client's doing),
//! why the stream ended, and `close` (a limit, shutdown). The engine owns the descriptors from `start` on and closes
//! both when the stream ends, whichever way it ends.
//!
//! Flow control: a direction stops reading its source while it holds bytes its destination would not take, so a
//! stream holds at most one chunk per direction in memory, and only while its reader is slow; an idle or flowing
//! stream holds none (the read buffer is the thread's, shared).
//!
//! Copies, not splice(2): splicing through a pipe was tried for large chunks and measured no cheaper on loopback TCP
//! (52 µs per 64 KiB round trip either way), so the simpler path stayed.
//!
//! Ends are announced through an eventfd the Python loop watches: each ended stream's id is queued, then the eventfd
//! is bumped; `take_ended` hands the queue over. No Python object is touched from the engine's thread.

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

/// How long a stream that ended may take to deliver what the engine still holds for its peers (the proxy's own
/// close grace for the event loop's transports).
const FLUSH_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The read buffer's size: as large as a loopback segment train gets, so a 64 KiB message is one read.
const CHUNK: usize = 256 * 1024;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0u8; CHUNK]);
}

// How a stream ended (`Pump.end`); 0 while it runs.
const RUNNING: u8 = 0;
const CLIENT_CLOSED: u8 = 1;
const INSTANCE_CLOSED: u8 = 2;
const CLOSED_HERE: u8 = 3;
const CLIENT_ERROR: u8 = 4;
const INSTANCE_ERROR: u8 = 5;

fn end_name(code: u8) -> Option<&'static str> {
    match code {
        CLIENT_CLOSED => Some("client_closed"),
        INSTANCE_CLOSED => Some("instance_closed"),
        CLOSED_HERE => Some("closed"),
        CLIENT_ERROR => Some("client_error"),
        INSTANCE_ERROR => Some("instance_error"),
        _ => None,
    }
}

struct Counters {
    bytes_in: AtomicU64,  // client -> instance
    bytes_out: AtomicU64, // instance -> client
    client_full: AtomicBool,
    end: AtomicU8,
    cancel: Notify,
}

struct Shared {
    ended: Mutex<Vec<u64>>,
    eventfd: OwnedFd,
    total_in: AtomicU64,
    total_out: AtomicU64,
}

impl Shared {
    fn announce(&self, id: u64) {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        let one: u64 = 1;
        // Nonblocking; it fails only when the counter would overflow, and then the reader is woken anyway.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // MSG_DONTWAIT: the thread carries every stream, so no call may block, whatever the descriptor's own mode.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(errno())
    } else {
        Ok(n as usize)
    }
}

/// Send what the socket takes now; 0 when it takes nothing. MSG_NOSIGNAL: a peer gone is an error, not a SIGPIPE.
fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = errno();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

enum Outcome {
    SourceEnded,
    SourceFailed,
    DestinationFailed,
}

/// Bytes read from one side that the other has not taken yet: the rest of one chunk at most.
#[derive(Default)]
struct Held {
    bytes: Vec<u8>,
    sent: usize,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.sent >= self.bytes.len()
    }
}

/// Write what is held until the destination took all of it; Err when the destination fails.
async fn flush(destination: &AsyncFd<OwnedFd>, held: &mut Held) -> io::Result<()> {
    while !held.is_empty() {
        let mut ready = destination.writable().await?;
        match ready.try_io(|fd| {
            let n = send_now(fd.as_raw_fd(), &held.bytes[held.sent..])?;
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        }) {
            Ok(Ok(n)) => held.sent += n,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    *held = Held::default(); // give the memory back: a held chunk is the exception
    Ok(())
}

/// One direction: read `source`, write `destination`, until the source ends or either side fails. What the
/// destination has not taken stays in `held` (the caller's, so that it outlives this direction's end).
async fn pump(
    source: &AsyncFd<OwnedFd>,
    destination: &AsyncFd<OwnedFd>,
    held: &mut Held,
    count: &AtomicU64,
    total: &AtomicU64,
    full: Option<&AtomicBool>,
) -> Outcome {
    loop {
        if !held.is_empty() {
            if let Some(flag) = full {
                flag.store(true, Ordering::Relaxed);
            }
            if flush(destination, held).await.is_err() {
                return Outcome::DestinationFailed;
            }
            if let Some(flag) = full {
                flag.store(false, Ordering::Relaxed);
            }
        }
        // Readiness waits do not count against tokio's cooperative budget: without this a stream whose two ends
        // are always ready would keep the thread, and every other stream, to itself.
        tokio::task::consume_budget().await;
        let mut ready = match source.readable().await {
            Ok(r) => r,
            Err(_) => return Outcome::SourceFailed,
        };
        // Read and write in one step, so the shared buffer is never held across an await.
        let step = ready.try_io(|fd| {
            BUFFER.with(|cell| {
                let mut buf = cell.borrow_mut();
                let n = recv(fd.as_raw_fd(), &mut buf)?;
                if n == 0 {
                    return Ok(None);
                }
                let sent = send_now(destination.get_ref().as_raw_fd(), &buf[..n]);
                Ok(Some((n, sent.map(|s| buf[s..n].to_vec()))))
            })
        });
        match step {
            Err(_would_block) => continue,
            Ok(Err(_)) => return Outcome::SourceFailed,
            Ok(Ok(None)) => return Outcome::SourceEnded,
            Ok(Ok(Some((n, sent)))) => {
                if n < CHUNK {
                    // A short read drained the socket: wait for the next edge rather than paying a recv to learn
                    // it (tokio's own streams do the same). Data that came meanwhile raises a new edge. The one
                    // exception is a read that stops at urgent (TCP out-of-band) data: that direction then waits
                    // for its sender's next bytes. WebSocket has no use for urgent data, so only a peer that sends
                    // it is delayed, itself.
                    ready.clear_ready();
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
                total.fetch_add(n as u64, Ordering::Relaxed);
                match sent {
                    Ok(rest) => {
                        *held = Held {
                            bytes: rest,
                            sent: 0,
                        }
                    }
                    Err(_) => return Outcome::DestinationFailed,
                }
            }
        }
    }
}

/// Announces the stream's end when dropped: at the end of `carry`, and also should its task unwind or be dropped with
/// the runtime, so the Python side never waits for an end that will not come.
struct EndOfStream {
    counters: Arc<Counters>,
    shared: Arc<Shared>,
    id: u64,
    code: u8,
}

impl Drop for EndOfStream {
    fn drop(&mut self) {
        let code = if self.code == RUNNING {
            CLOSED_HERE
        } else {
            self.code
        };
        self.counters.end.store(code, Ordering::Release);
        self.shared.announce(self.id);
    }
}

/// Relay one stream until it ends. The guard comes in made (not made here) so that it is dropped, and the end
/// announced, even when the task is dropped before it first runs.
async fn carry(client: OwnedFd, instance: OwnedFd, mut end_of_stream: EndOfStream) {
    let counters = end_of_stream.counters.clone();
    let shared = end_of_stream.shared.clone();
    let both = Interest::READABLE | Interest::WRITABLE;
    // SAFETY: each descriptor is an OwnedFd this engine alone holds; it stays open while registered and is closed
    // only by dropping its AsyncFd, which deregisters it first.
    let registered = unsafe {
        (
            AsyncFd::register_with_interest(client, both),
            AsyncFd::register_with_interest(instance, both),
        )
    };
    let end = match registered {
        (Ok(client), Ok(instance)) => {
            let (mut upward, mut downward) = (Held::default(), Held::default());
            let end = tokio::select! {
                outcome = pump(&client, &instance, &mut upward, &counters.bytes_in, &shared.total_in, None) => match outcome {
                    Outcome::SourceEnded => CLIENT_CLOSED,
                    Outcome::SourceFailed => CLIENT_ERROR,
                    Outcome::DestinationFailed => INSTANCE_ERROR,
                },
                outcome = pump(&instance, &client, &mut downward, &counters.bytes_out, &shared.total_out, Some(&counters.client_full)) => match outcome {
                    Outcome::SourceEnded => INSTANCE_CLOSED,
                    Outcome::SourceFailed => INSTANCE_ERROR,
                    Outcome::DestinationFailed => CLIENT_ERROR,
                },
                _ = counters.cancel.notified() => CLOSED_HERE,
            };
            // What a direction still holds was read from one side and is the other's: deliver it before closing,
            // as the event loop's transports flush when closed, within the same bound. A side that failed fails
            // its flush at once.
            let _ = tokio::time::timeout(FLUSH_GRACE, async {
                tokio::join!(flush(&instance, &mut upward), flush(&client, &mut downward))
            })
            .await;
            end
            // Both descriptors are closed here, as `client` and `instance` go out of scope.
        }
        _ => CLOSED_HERE, // not a pollable descriptor: dropping what was made closes both
    };
    end_of_stream.code = end; // announced as it drops, after both descriptors were closed above
}

/// One relayed stream, as the Python side sees it.
#[pyclass(frozen, module = "aube.proxy._native_relay")]
struct Pump {
    #[pyo3(get)]
    id: u64,
    counters: Arc<Counters>,
}

#[pymethods]
impl Pump {
    /// Bytes relayed from the client to the instance.
    #[getter]
    fn bytes_in(&self) -> u64 {
        self.counters.bytes_in.load(Ordering::Relaxed)
    }

    /// Bytes relayed from the instance to the client.
    #[getter]
    fn bytes_out(&self) -> u64 {
        self.counters.bytes_out.load(Ordering::Relaxed)
    }

    /// The client leg holds bytes the client has not taken: the instance is not being read meanwhile.
    #[getter]
    fn client_full(&self) -> bool {
        self.counters.client_full.load(Ordering::Relaxed)
    }

    /// Why the stream ended, or None while it runs.
    #[getter]
    fn end(&self) -> Option<&'static str> {
        end_name(self.counters.end.load(Ordering::Acquire))
    }

    /// End the stream now: what the engine holds for either side is delivered (within 2 s), both sockets are closed
    /// and the end announced. As with any close, bytes a peer sent that were not read yet are dropped, and then its
    /// kernel may reset the connection rather than end it.
    fn close(&self) {
        self.counters.cancel.notify_one();
    }
}

/// The engine: one thread, one event loop, every relayed stream of the process.
#[pyclass(frozen, module = "aube.proxy._native_relay")]
struct Engine {
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    stop: Arc<Notify>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop.notify_one(); // the thread ends and every stream still running with it (their sockets closed)
    }
}

#[pymethods]
impl Engine {
    #[new]
    fn new() -> PyResult<Self> {
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(PyOSError::new_err(format!("eventfd: {}", errno())));
        }
        let shared = Arc::new(Shared {
            ended: Mutex::new(Vec::new()),
            eventfd: unsafe { OwnedFd::from_raw_fd(efd) },
            total_in: AtomicU64::new(0),
            total_out: AtomicU64::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| PyOSError::new_err(format!("relay engine: {e}")))?;
        let handle = runtime.handle().clone();
        let stop = Arc::new(Notify::new());
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("aube-relay".into())
            // Dropping the runtime when `stop` is notified drops every stream's task, closing its sockets.
            .spawn(move || runtime.block_on(stopped.notified()))
            .map_err(|e| PyOSError::new_err(format!("relay engine thread: {e}")))?;
        Ok(Engine {
            handle,
            shared,
            next_id: AtomicU64::new(1),
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The eventfd that becomes readable when streams ended (read 8 bytes from it, then call `take_ended`).
    #[getter]
    fn notify_fd(&self) -> i32 {
        self.shared.eventfd.as_raw_fd()
    }

    /// Relay between two connected stream sockets. Once the two descriptors passed the check for two distinct
    /// open ones, the engine owns both, whatever happens next: the caller must not use or close them.
    fn start(&self, client_fd: i32, instance_fd: i32) -> PyResult<Pump> {
        if client_fd < 0 || instance_fd < 0 || client_fd == instance_fd {
            return Err(PyOSError::new_err(
                "start: two distinct open descriptors are needed",
            ));
        }
        let client = unsafe { OwnedFd::from_raw_fd(client_fd) };
        let instance = unsafe { OwnedFd::from_raw_fd(instance_fd) };
        if self
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Err(PyOSError::new_err("start: the relay engine is shut down"));
            // both descriptors closed
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let counters = Arc::new(Counters {
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            client_full: AtomicBool::new(false),
            end: AtomicU8::new(RUNNING),
            cancel: Notify::new(),
        });
        let end_of_stream = EndOfStream {
            counters: counters.clone(),
            shared: self.shared.clone(),
            id,
            code: RUNNING,
        };
        self.handle.spawn(carry(client, instance, end_of_stream));
        Ok(Pump { id, counters })
    }

    /// Stop the engine's thread; streams still running end with it (their sockets closed, their end "closed").
    fn shutdown(&self, py: Python<'_>) {
        self.stop.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = py.allow_threads(move || thread.join());
        }
    }

    /// The ids of the streams that ended since the last call.
    fn take_ended(&self) -> Vec<u64> {
        std::mem::take(&mut *self.shared.ended.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Bytes relayed client -> instance over the engine's life, every stream included (running ones too).
    #[getter]
    fn total_in(&self) -> u64 {
        self.shared.total_in.load(Ordering::Relaxed)
    }

    /// Bytes relayed instance -> client over the engine's life.
    #[getter]
    fn total_out(&self) -> u64 {
        self.shared.total_out.load(Ordering::Relaxed)
    }
}

#[pymodule]
fn _native_relay(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Pump>()?;
    Ok(())
}
