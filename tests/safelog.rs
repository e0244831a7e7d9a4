//! Safe logging, whole-system: with the network logging everything at
//! DEBUG, no destination a client asked for appears in any log line unless
//! unsafe logging is on, and no relay (a service directory, an
//! introduction or rendezvous point) logs an onion service's address. Its
//! own test binary: it installs the process's log subscriber.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Every log line of the process, as written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn contains(&self, s: &str) -> bool {
        String::from_utf8_lossy(&self.0.lock().unwrap()).contains(s)
    }

    /// The lines that contain `s`.
    fn lines_with(&self, s: &str) -> String {
        let all = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        all.lines()
            .filter(|l| l.contains(s))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn socks_host(proxy: SocketAddr, host: &str, port: u16) -> u8 {
    common::socks5(proxy, host, port).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_stay_out_of_the_logs() {
    let logs = Captured::default();
    let w = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter(allium::log_filter(Some("debug")))
        .with_ansi(false)
        .with_writer(move || w.clone())
        .init();
    let mut net = common::small_net(6).await;
    let proxy = net.socks_addr;
    // No exit takes port 25 (refused at the client), and no name under
    // .invalid resolves (refused at the exit).
    assert_ne!(socks_host(proxy, "secret-one.invalid", 25).await, 0);
    assert_ne!(socks_host(proxy, "secret-two.invalid", 80).await, 0);
    assert!(logs.contains("[scrubbed]"), "the failures were logged");
    for s in ["secret-one", "secret-two"] {
        assert!(
            !logs.contains(s),
            "{s} in the logs:\n{}",
            logs.lines_with(s)
        );
    }

    // An onion service, reached through the SOCKS port: only the service
    // itself logs its address (it says what it serves); the directories
    // that file its descriptor and the relays on its circuits never see
    // it, in any form.
    let address = net.host_demo_service().await.unwrap();
    let name = address.to_string();
    let mut reached = false;
    for _ in 0..120 {
        if socks_host(proxy, &name, 80).await == 0 {
            reached = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(reached, "the service was not reachable within a minute");
    let key = hex::encode(address.key());
    let label = name.split('.').next().unwrap().to_string();
    for s in [&label, &key] {
        let outside: Vec<String> = logs
            .lines_with(s)
            .lines()
            .filter(|l| !l.contains(" service:") && !l.contains(" service{"))
            .map(str::to_string)
            .collect();
        assert!(
            outside.is_empty(),
            "{s} logged outside the service:\n{outside:?}"
        );
    }
    assert!(logs.contains(&name), "the service names itself");

    // With unsafe logging the same failures name their destinations.
    allium_link::safelog::set_unsafe_logging(true);
    assert_ne!(socks_host(proxy, "shown-one.invalid", 25).await, 0);
    assert!(logs.contains("shown-one.invalid:25"));
}
