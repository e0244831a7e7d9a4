//! What a client tells its controllers: circuit, stream and bootstrap
//! events, published on a bounded broadcast channel (a controller that
//! falls behind loses events, and the client never holds more than
//! [`EVENT_QUEUE`] of them), and the tables and counters that `GETINFO
//! circuit-status`, `stream-status` and `traffic/*` read.
//!
//! Circuits and streams get ids here: small integers, counting from 1 per
//! client, that name them in every event. A circuit's id is given when it
//! is launched (every build attempt is a circuit of its own, as in Tor);
//! a stream's when its request arrives.
//!
//! The traffic counters count the application bytes of the client's
//! streams (SOCKS, HTTP CONNECT and library streams): what the exits
//! delivered (read) and what the applications sent (written). Cell
//! headers, padding, onion layers and link framing are not counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use allium_proto::ConsensusRelay;
use allium_proto::cell::DestroyReason;
use allium_proto::control::{
    CircLine, CircStatus, Hop, StreamLine, StreamStatus, circ_reason, stream_reason,
};
use allium_proto::relaymsg::EndReason;
use tokio::sync::broadcast;

use crate::ClientError;

/// Events a slow controller may fall behind by before it loses some.
pub const EVENT_QUEUE: usize = 1024;

/// One event for the controllers.
#[derive(Clone, Debug)]
pub enum ClientEvent {
    Circ(CircLine),
    Stream(StreamLine),
    /// A STATUS_CLIENT event: the text after `STATUS_CLIENT `.
    Status(String),
    /// A controller sent this signal (and it was acted on).
    Signal(&'static str),
    /// A controller changed configuration values: `Key=Value` each.
    ConfChanged(Vec<String>),
}

/// The client's event hub.
pub struct Events {
    tx: broadcast::Sender<ClientEvent>,
    circuits: Mutex<BTreeMap<u64, CircLine>>,
    streams: Mutex<BTreeMap<u64, StreamLine>>,
    next_circ: AtomicU64,
    next_stream: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("subscribers", &self.tx.receiver_count())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn hops(path: &[ConsensusRelay]) -> Vec<Hop> {
    path.iter()
        .map(|r| Hop::new(&r.identity, &r.nickname))
        .collect()
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(EVENT_QUEUE).0,
            circuits: Mutex::default(),
            streams: Mutex::default(),
            next_circ: AtomicU64::new(1),
            next_stream: AtomicU64::new(1),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }
}

impl Events {
    /// Every event from now on (a receiver that lags is told how many it
    /// lost, and goes on from the oldest kept).
    pub fn subscribe(&self) -> broadcast::Receiver<ClientEvent> {
        self.tx.subscribe()
    }

    /// The circuits being built or open, by id.
    pub fn circuit_status(&self) -> Vec<CircLine> {
        lock(&self.circuits).values().cloned().collect()
    }

    /// The streams not yet closed, by id.
    pub fn stream_status(&self) -> Vec<StreamLine> {
        lock(&self.streams).values().cloned().collect()
    }

    /// Application bytes read from and written to the network so far.
    pub fn traffic(&self) -> (u64, u64) {
        (
            self.read.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
        )
    }

    fn send(&self, ev: ClientEvent) {
        // No subscriber is not an error.
        let _ = self.tx.send(ev);
    }

    fn circ(&self, line: CircLine) {
        {
            let mut t = lock(&self.circuits);
            match line.status {
                CircStatus::Failed | CircStatus::Closed => t.remove(&line.id),
                _ => t.insert(line.id, line.clone()),
            };
        }
        self.send(ClientEvent::Circ(line));
    }

    fn stream(&self, line: StreamLine) {
        {
            let mut t = lock(&self.streams);
            match line.status {
                StreamStatus::Closed => t.remove(&line.id),
                _ => t.insert(line.id, line.clone()),
            };
        }
        self.send(ClientEvent::Stream(line));
    }

    pub(crate) fn status(&self, text: String) {
        self.send(ClientEvent::Status(text));
    }

    pub(crate) fn signal(&self, name: &'static str) {
        self.send(ClientEvent::Signal(name));
    }

    pub(crate) fn conf_changed(&self, values: Vec<String>) {
        self.send(ClientEvent::ConfChanged(values));
    }

    /// A new circuit: its id, and LAUNCHED.
    pub(crate) fn launch(self: &Arc<Self>) -> CircWatch {
        let w = CircWatch(Arc::new(CircState {
            events: self.clone(),
            id: self.next_circ.fetch_add(1, Ordering::Relaxed),
            created_us: now_us(),
            state: Mutex::new((Vec::new(), false)),
        }));
        w.0.emit(CircStatus::Launched, None, None);
        w
    }

    /// A new stream to `target` (`host:port`): its id, and NEW (or
    /// NEWRESOLVE). It is CLOSED when the watch drops.
    pub(crate) fn new_stream(self: &Arc<Self>, target: String, resolve: bool) -> StreamWatch {
        let w = StreamWatch {
            events: self.clone(),
            id: self.next_stream.fetch_add(1, Ordering::Relaxed),
            target,
            resolve,
            circ: 0,
            end: (Some("DONE"), None),
        };
        w.emit(
            if resolve {
                StreamStatus::NewResolve
            } else {
                StreamStatus::New
            },
            None,
            None,
        );
        w
    }
}

/// A circuit as its controllers see it, from launch to close. Clones
/// share one circuit; one dropped by all before it was said to have failed
/// or closed (a build given up half-way) fails with REASON=FINISHED, so no
/// circuit stays in `circuit-status` for good.
#[derive(Clone)]
pub(crate) struct CircWatch(Arc<CircState>);

struct CircState {
    events: Arc<Events>,
    id: u64,
    created_us: u64,
    /// The hops built so far, and whether FAILED or CLOSED was sent.
    state: Mutex<(Vec<Hop>, bool)>,
}

impl CircState {
    fn emit(&self, status: CircStatus, reason: Option<&'static str>, remote: Option<&'static str>) {
        let path = {
            let mut st = lock(&self.state);
            if matches!(status, CircStatus::Failed | CircStatus::Closed) {
                st.1 = true;
            }
            st.0.clone()
        };
        self.events.circ(CircLine {
            id: self.id,
            status,
            path,
            created_us: self.created_us,
            reason,
            remote_reason: remote,
        });
    }
}

impl Drop for CircState {
    fn drop(&mut self) {
        if !lock(&self.state).1 {
            self.emit(CircStatus::Failed, Some("FINISHED"), None);
            self.emit(CircStatus::Closed, Some("FINISHED"), None);
        }
    }
}

impl CircWatch {
    /// The circuit's id.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Every hop of `path` is built.
    pub fn built(&self, path: &[ConsensusRelay]) {
        lock(&self.0.state).0 = hops(path);
        self.0.emit(CircStatus::Built, None, None);
    }

    /// The build failed with only `built` made: FAILED, then CLOSED.
    pub fn failed(&self, built: &[ConsensusRelay], reason: &'static str) {
        lock(&self.0.state).0 = hops(built);
        self.0.emit(CircStatus::Failed, Some(reason), None);
        self.0.emit(CircStatus::Closed, Some(reason), None);
    }

    /// The circuit closed: for `reason`, or because a relay destroyed it
    /// saying `remote`.
    pub fn closed(&self, reason: DestroyReason, remote: Option<DestroyReason>) {
        self.0.emit(
            CircStatus::Closed,
            Some(circ_reason(reason)),
            remote.map(circ_reason),
        );
    }
}

/// A stream as its controllers see it; CLOSED when dropped.
pub(crate) struct StreamWatch {
    events: Arc<Events>,
    id: u64,
    target: String,
    resolve: bool,
    circ: u64,
    /// REASON and REMOTE_REASON of its CLOSED.
    end: (Option<&'static str>, Option<&'static str>),
}

impl StreamWatch {
    fn emit(
        &self,
        status: StreamStatus,
        reason: Option<&'static str>,
        remote: Option<&'static str>,
    ) {
        self.events.stream(StreamLine {
            id: self.id,
            status,
            circ: self.circ,
            target: self.target.clone(),
            reason,
            remote_reason: remote,
        });
    }

    /// Its BEGIN (or RESOLVE) went out on circuit `circ`.
    pub fn sent(&mut self, circ: u64) {
        self.circ = circ;
        self.emit(
            if self.resolve {
                StreamStatus::SentResolve
            } else {
                StreamStatus::SentConnect
            },
            None,
            None,
        );
    }

    /// Taken off its circuit for `reason`, to be tried on another.
    pub fn detached(&mut self, reason: &'static str) {
        self.emit(StreamStatus::Detached, Some(reason), None);
        self.circ = 0;
    }

    pub fn succeeded(&self) {
        self.emit(StreamStatus::Succeeded, None, None);
    }

    /// It could not be opened, for `reason`.
    pub fn failed(&mut self, reason: &'static str) {
        self.emit(StreamStatus::Failed, Some(reason), None);
        self.end = (Some(reason), None);
    }

    /// The exit ended it with `r`.
    pub fn ended_by_exit(&mut self, r: EndReason) {
        self.end = (Some("END"), Some(stream_reason(r)));
    }

    /// The application received `n` bytes from the exit.
    pub fn read(&self, n: usize) {
        self.events.read.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The application sent `n` bytes toward the exit.
    pub fn wrote(&self, n: usize) {
        self.events.written.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// What counts the bytes the application sends, for the stream's
    /// sending half.
    pub fn write_count(&self) -> WriteCount {
        WriteCount(self.events.clone())
    }
}

/// Counts what a stream's application sends ([`StreamWatch::wrote`]).
#[derive(Clone)]
pub(crate) struct WriteCount(Arc<Events>);

impl WriteCount {
    pub fn wrote(&self, n: usize) {
        self.0.written.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        let (reason, remote) = self.end;
        self.emit(StreamStatus::Closed, reason, remote);
    }
}

/// Tor's name for why a circuit build failed (control-spec 4.1.1).
pub(crate) fn build_failure_reason(e: &ClientError) -> &'static str {
    match e {
        ClientError::Timeout(_) => "TIMEOUT",
        ClientError::Link(_) | ClientError::Io(_) => "CHANNEL_CLOSED",
        ClientError::ExtendFailed { .. } | ClientError::Build(_) | ClientError::CircuitClosed => {
            "DESTROYED"
        }
        ClientError::Proto(_) => "TORPROTOCOL",
        _ => "INTERNAL",
    }
}

/// Tor's name for why a stream could not be opened (control-spec 4.1.2).
pub(crate) fn stream_failure_reason(e: &ClientError) -> &'static str {
    match e {
        ClientError::StreamEnded(r) => stream_reason(*r),
        ClientError::Timeout(_) => "TIMEOUT",
        ClientError::CircuitClosed => "DESTROY",
        ClientError::NoExit(_) => "EXITPOLICY",
        ClientError::NoConsensus(_)
        | ClientError::NoPath(_)
        | ClientError::CannotEndAt { .. }
        | ClientError::Build(_) => "NOROUTE",
        _ => "MISC",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::tests::relay;

    #[test]
    fn tables_follow_the_events() {
        let ev = Arc::new(Events::default());
        let mut rx = ev.subscribe();
        let c = ev.launch();
        assert_eq!(c.id(), 1);
        let abandoned = ev.launch();
        assert_eq!(abandoned.id(), 2);
        let path = [relay(1, 1, 0), relay(2, 1, 0), relay(3, 1, 0)];
        c.built(&path);
        let t = ev.circuit_status();
        assert_eq!(t.len(), 2);
        drop(abandoned.clone());
        assert_eq!(ev.circuit_status().len(), 2, "a clone is still held");
        assert_eq!((t[0].status, t[0].path.len()), (CircStatus::Built, 3));
        let mut s = ev.new_stream("example.com:80".into(), false);
        s.sent(1);
        s.succeeded();
        s.read(10);
        s.wrote(3);
        assert_eq!(ev.stream_status()[0].status, StreamStatus::Succeeded);
        s.ended_by_exit(EndReason::DONE);
        drop(s);
        assert!(ev.stream_status().is_empty());
        assert_eq!(ev.traffic(), (10, 3));
        c.closed(DestroyReason::FINISHED, None);
        drop(c);
        assert_eq!(ev.circuit_status().len(), 1);
        drop(abandoned);
        assert!(ev.circuit_status().is_empty());

        let mut seen = Vec::new();
        while let Ok(e) = rx.try_recv() {
            seen.push(match e {
                ClientEvent::Circ(l) => format!("CIRC {} {}", l.id, l.status.name()),
                ClientEvent::Stream(l) => l.to_string(),
                other => format!("{other:?}"),
            });
        }
        assert_eq!(
            seen,
            [
                "CIRC 1 LAUNCHED",
                "CIRC 2 LAUNCHED",
                "CIRC 1 BUILT",
                "1 NEW 0 example.com:80",
                "1 SENTCONNECT 1 example.com:80",
                "1 SUCCEEDED 1 example.com:80",
                "1 CLOSED 1 example.com:80 REASON=END REMOTE_REASON=DONE",
                "CIRC 1 CLOSED",
                "CIRC 2 FAILED",
                "CIRC 2 CLOSED",
            ]
        );
    }

    #[test]
    fn a_lagging_controller_loses_events_not_memory() {
        let ev = Arc::new(Events::default());
        let mut rx = ev.subscribe();
        for _ in 0..EVENT_QUEUE + 10 {
            ev.status("NOTICE CIRCUIT_ESTABLISHED".into());
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn a_failed_stream_closes_with_its_reason() {
        let ev = Arc::new(Events::default());
        let mut rx = ev.subscribe();
        let mut s = ev.new_stream("example.com:0".into(), true);
        s.sent(4);
        s.detached("TIMEOUT");
        s.sent(5);
        s.failed("RESOLVEFAILED");
        drop(s);
        let lines: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| match e {
                ClientEvent::Stream(l) => l.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            lines,
            [
                "1 NEWRESOLVE 0 example.com:0",
                "1 SENTRESOLVE 4 example.com:0",
                "1 DETACHED 4 example.com:0 REASON=TIMEOUT",
                "1 SENTRESOLVE 5 example.com:0",
                "1 FAILED 5 example.com:0 REASON=RESOLVEFAILED",
                "1 CLOSED 5 example.com:0 REASON=RESOLVEFAILED",
            ]
        );
    }
}
