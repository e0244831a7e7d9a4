//! A relay as an introduction point and a rendezvous point for onion
//! services (doc/protocol.md section 11.4).
//!
//! Each circuit that asks for either role registers here, and its
//! [`Registration`] removes it when the circuit ends. Circuits meet only
//! through this table: an introduction circuit takes INTRODUCE2s from a
//! bounded queue, and a waiting rendezvous circuit gets the other circuit's
//! ends of two cell pipes ([`Joined`]) when the service's RENDEZVOUS1
//! names its cookie.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use allium_link::limits::CircAcct;
use allium_proto::cell::Cell;
use allium_proto::relaymsg::{COOKIE_LEN, Introduce, IntroduceStatus};
use allium_proto::service::intro::{MAX_BURST, MAX_RATE};
use tokio::sync::{mpsc, oneshot};

/// Introduction circuits one relay holds at most.
pub const MAX_INTROS: usize = 10_000;
/// Rendezvous circuits waiting at one relay at most.
pub const MAX_WAITING: usize = 10_000;
/// INTRODUCE2s queued for one introduction circuit.
const INTRO_QUEUE: usize = 32;

/// Cells passed from one joined circuit to the other, with the memory
/// account of the circuit that passed them (counted until taken).
pub type Pipe = (Vec<Cell>, Option<Arc<CircAcct>>);

/// Cells one joined circuit may have passed to the other and not yet
/// taken, as many as a circuit's inbox holds: a circuit past it loses
/// itself (DESTROY 14), as one whose inbox overflows.
pub const PIPE_CELLS: usize = allium_link::channel::CIRC_QUEUE;

/// A circuit waits at a cookie this long at most (a client waits for the
/// service for seconds).
pub const WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// One direction between joined circuits: the cells in it, counted.
pub struct PipeEnd<T> {
    pub chan: T,
    pub queued: Arc<AtomicUsize>,
}

/// A joined circuit's sending end, and its receiving end.
pub type PipeTx = PipeEnd<mpsc::UnboundedSender<Pipe>>;
pub type PipeRx = PipeEnd<mpsc::UnboundedReceiver<Pipe>>;

/// The rendezvous circuit's ends of the pipes to the service's circuit.
pub struct Joined {
    pub to_other: PipeTx,
    pub from_other: PipeRx,
    /// The service's handshake reply, for RENDEZVOUS2.
    pub reply: Vec<u8>,
}

/// A token bucket: `rate` a second, up to `burst`.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.clamp(1, MAX_BURST));
        Bucket {
            rate: f64::from(rate.clamp(1, MAX_RATE)),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Intro {
    id: u64,
    tx: mpsc::Sender<Introduce>,
    bucket: Bucket,
}

struct Waiting {
    id: u64,
    tx: oneshot::Sender<Joined>,
}

/// Counts, for the relay's metrics.
#[derive(Default)]
pub struct PointStats {
    pub intros_established: AtomicU64,
    pub introductions_sent: AtomicU64,
    pub introductions_refused: AtomicU64,
    pub rendezvous_established: AtomicU64,
    pub rendezvous_joined: AtomicU64,
}

/// The relay's introduction and rendezvous circuits.
#[derive(Default)]
pub struct Points {
    intros: Mutex<HashMap<[u8; 32], Intro>>,
    waiting: Mutex<HashMap<[u8; COOKIE_LEN], Waiting>>,
    next_id: AtomicU64,
    pub stats: PointStats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What a circuit holds here; dropping it removes the entry (if it is
/// still this circuit's).
pub enum Registration {
    Intro {
        points: Arc<Points>,
        key: [u8; 32],
        id: u64,
    },
    Rendezvous {
        points: Arc<Points>,
        cookie: [u8; COOKIE_LEN],
        id: u64,
    },
}

impl Drop for Registration {
    fn drop(&mut self) {
        match self {
            Registration::Intro { points, key, id } => {
                let mut m = lock(&points.intros);
                if m.get(key).is_some_and(|i| i.id == *id) {
                    m.remove(key);
                }
            }
            Registration::Rendezvous { points, cookie, id } => {
                let mut m = lock(&points.waiting);
                if m.get(cookie).is_some_and(|w| w.id == *id) {
                    m.remove(cookie);
                }
            }
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("this relay holds as many as it takes")]
    Full,
    #[error("the cookie is in use")]
    CookieInUse,
}

impl Points {
    /// Be the introduction point for `key` (replacing an earlier circuit
    /// for the same key, as a service that rebuilt it wants).
    pub fn establish_intro(
        self: &Arc<Self>,
        key: [u8; 32],
        rate: u32,
        burst: u32,
    ) -> Result<(Registration, mpsc::Receiver<Introduce>), Refused> {
        let mut m = lock(&self.intros);
        if m.len() >= MAX_INTROS && !m.contains_key(&key) {
            return Err(Refused::Full);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(INTRO_QUEUE);
        m.insert(
            key,
            Intro {
                id,
                tx,
                bucket: Bucket::new(rate, burst),
            },
        );
        inc(&self.stats.intros_established);
        Ok((
            Registration::Intro {
                points: self.clone(),
                key,
                id,
            },
            rx,
        ))
    }

    /// Pass a client's INTRODUCE1 to the service's circuit, if there is
    /// one and its rate allows.
    pub fn introduce(&self, intro: Introduce) -> IntroduceStatus {
        let status = {
            let mut m = lock(&self.intros);
            match m.get_mut(&intro.auth_key) {
                None => IntroduceStatus::UNKNOWN_SERVICE,
                Some(i) => {
                    if !i.bucket.take(Instant::now()) {
                        IntroduceStatus::RATE_LIMITED
                    } else if i.tx.try_send(intro).is_ok() {
                        IntroduceStatus::SENT
                    } else {
                        IntroduceStatus::RATE_LIMITED
                    }
                }
            }
        };
        inc(if status == IntroduceStatus::SENT {
            &self.stats.introductions_sent
        } else {
            &self.stats.introductions_refused
        });
        status
    }

    /// Wait for the service at `cookie`.
    pub fn establish_rendezvous(
        self: &Arc<Self>,
        cookie: [u8; COOKIE_LEN],
    ) -> Result<(Registration, oneshot::Receiver<Joined>), Refused> {
        let mut m = lock(&self.waiting);
        if m.contains_key(&cookie) {
            return Err(Refused::CookieInUse);
        }
        if m.len() >= MAX_WAITING {
            return Err(Refused::Full);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        m.insert(cookie, Waiting { id, tx });
        inc(&self.stats.rendezvous_established);
        Ok((
            Registration::Rendezvous {
                points: self.clone(),
                cookie,
                id,
            },
            rx,
        ))
    }

    /// The service's RENDEZVOUS1: join its circuit to the one waiting at
    /// `cookie`. Returns the service circuit's pipe ends, or `None` if no
    /// circuit waits there (any more).
    pub fn rendezvous(
        &self,
        cookie: &[u8; COOKIE_LEN],
        reply: Vec<u8>,
    ) -> Option<(PipeTx, PipeRx)> {
        let w = lock(&self.waiting).remove(cookie)?;
        let (to_client, from_service) = mpsc::unbounded_channel();
        let (to_service, from_client) = mpsc::unbounded_channel();
        let (down, up) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        w.tx.send(Joined {
            to_other: PipeEnd {
                chan: to_service,
                queued: up.clone(),
            },
            from_other: PipeEnd {
                chan: from_service,
                queued: down.clone(),
            },
            reply,
        })
        .ok()?;
        inc(&self.stats.rendezvous_joined);
        Some((
            PipeEnd {
                chan: to_client,
                queued: down,
            },
            PipeEnd {
                chan: from_client,
                queued: up,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_introduction_point_passes_on_within_its_rate_and_forgets_a_closed_circuit() {
        let p = Arc::new(Points::default());
        let intro = |k| Introduce {
            auth_key: k,
            encrypted: vec![],
        };
        assert_eq!(
            p.introduce(intro([1; 32])),
            IntroduceStatus::UNKNOWN_SERVICE
        );
        let (reg, mut rx) = p.establish_intro([1; 32], 1, 3).unwrap();
        let got: Vec<_> = (0..5).map(|_| p.introduce(intro([1; 32]))).collect();
        assert_eq!(&got[..3], &[IntroduceStatus::SENT; 3]);
        assert_eq!(&got[3..], &[IntroduceStatus::RATE_LIMITED; 2]);
        assert!(rx.try_recv().is_ok());
        drop(reg);
        assert_eq!(
            p.introduce(intro([1; 32])),
            IntroduceStatus::UNKNOWN_SERVICE
        );
    }

    #[test]
    fn a_rendezvous_joins_once() {
        let p = Arc::new(Points::default());
        assert!(p.rendezvous(&[1; COOKIE_LEN], vec![]).is_none());
        let (reg, mut rx) = p.establish_rendezvous([1; COOKIE_LEN]).unwrap();
        assert!(p.establish_rendezvous([1; COOKIE_LEN]).is_err());
        let (to_client, _from_client) = p.rendezvous(&[1; COOKIE_LEN], vec![9]).unwrap();
        let joined = rx.try_recv().unwrap();
        assert_eq!(joined.reply, vec![9]);
        to_client.chan.send((vec![], None)).unwrap();
        // The two ends of each direction count the same cells.
        to_client.queued.fetch_add(3, Ordering::Relaxed);
        assert_eq!(joined.from_other.queued.load(Ordering::Relaxed), 3);
        assert!(
            p.rendezvous(&[1; COOKIE_LEN], vec![]).is_none(),
            "once only"
        );
        drop(reg);
        let (_r, _rx) = p.establish_rendezvous([1; COOKIE_LEN]).unwrap();
    }
}
