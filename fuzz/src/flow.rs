//! `flow`: circuit parameters and the circuit windows with their
//! congestion controller, driven by a script of sends, deliveries,
//! releases and SENDMEs (right or wrong) over a path whose round trip the
//! script sets.
//!
//! Nothing panics or overflows; the receiver never lets more cells in than
//! its window; a SENDME carrying the right tag is always taken; the
//! congestion window stays within its bounds.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use allium_proto::congestion::{Params, Vegas};
use allium_proto::flow::{CWND_MAX, CircParams, CircRecvWindow, CircSendWindow};

use crate::input::Input;

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let pc = inp.array::<2>();
    let params = match CircParams::decode(pc) {
        Ok(p) => {
            assert_eq!(p.encode(), pc);
            p
        }
        Err(_) => CircParams::default(),
    };
    if inp.bool() {
        return vegas(params, &mut inp);
    }
    let start = Instant::now();
    let mut now = start;
    let mut s = CircSendWindow::new(params);
    let mut r = CircRecvWindow::new(params);
    let mut next_tag = 0u64;
    // Cells in flight to the receiver, SENDMEs in flight back.
    let mut to_r: VecDeque<[u8; 16]> = VecDeque::new();
    let mut to_s: VecDeque<[u8; 16]> = VecDeque::new();
    let mut delivered = 0u64;
    let mut released = 0u64;
    let mut acked = 0u64;
    let mut rogue = false;
    while !inp.is_empty() {
        let op = inp.u8() % 7;
        match op {
            0 => {
                for _ in 0..inp.u16() {
                    if s.available() == 0 {
                        s.held_back();
                        break;
                    }
                    next_tag += 1;
                    let tag = tag(next_tag);
                    let _ = s.next_is_acked();
                    s.on_data_sent(now, &tag).expect("room in the window");
                    to_r.push_back(tag);
                }
            }
            1 => {
                for _ in 0..inp.u16() {
                    let Some(t) = to_r.pop_front() else { break };
                    let ok = r.on_data_received(&t).is_ok();
                    assert!(ok || rogue, "an honest sender keeps to the window");
                    delivered += 1;
                }
            }
            2 => {
                let n = u32::from(inp.u16());
                let mut tags = Vec::new();
                r.release(n, &mut tags);
                released = (released + u64::from(n)).min(delivered);
                to_s.extend(tags);
            }
            3 | 4 => {
                // The receiver's next SENDME, or one the peer made up:
                // taken exactly when it carries the tag owed next.
                let t = match (op, to_s.pop_front()) {
                    (3, Some(t)) => t,
                    _ => inp.array::<16>(),
                };
                let owed = u64::from(params.inc()) * (acked + 1);
                let ok = s.on_sendme(now, &t).is_ok();
                assert_eq!(ok, owed <= next_tag && t == tag(owed), "SENDME {t:?}");
                if ok {
                    acked += 1;
                }
            }
            5 => now += Duration::from_millis(u64::from(inp.u16())),
            _ => {
                // A peer that ignores the window: refused once it is full.
                rogue = true;
                let _ = r.on_data_received(&inp.array::<16>());
            }
        }
        assert!(s.cwnd() <= CWND_MAX && s.cwnd() > 0);
        assert!(released <= delivered);
    }
    let _ = (s.rtt(), now.duration_since(start));
}

fn tag(i: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&i.to_be_bytes());
    t
}

/// The controller alone, with any increment, round trips and fullness.
fn vegas(params: CircParams, inp: &mut Input<'_>) {
    let inc = match inp.u8() {
        0 => params.inc(),
        i => u32::from(i),
    };
    let p = Params::with_inc(inc);
    let mut v = Vegas::new(p);
    let mut now = Instant::now();
    while !inp.is_empty() {
        now += Duration::from_micros(u64::from(inp.u32()));
        let rtt = Duration::from_micros(u64::from(inp.u32()));
        v.on_sendme(now, rtt, inp.bool());
        assert!(
            v.cwnd() >= p.cwnd_min && v.cwnd() <= p.cwnd_max,
            "{}",
            v.cwnd()
        );
        let _ = (v.in_slow_start(), v.min_rtt());
    }
}
