//! The README's browser instructions, followed by a real headless Chromium:
//! with `--proxy-bypass-list="<-loopback>"` a page on this machine loads
//! through the network (its bytes pass an exit); without it Chromium
//! fetches loopback pages directly, around the proxy.
//!
//! Needs Debian's `chromium`; without it the test says so and passes,
//! unless `ALLIUM_CI_TOOLS` is set (as `.ci/run` does), when it fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MARK: &str = "onion-layers-peeled-here";
/// Padding that makes the page's passage through an exit plain to see.
const PAD: usize = 256 << 10;

/// A web server answering every request with a page holding [`MARK`].
async fn page() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = format!(
                    "<html><head><title>t</title></head><body><p>{MARK}</p><!-- {} --></body></html>",
                    "x".repeat(PAD)
                );
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    addr
}

/// True (and said) if Chromium is not installed, which only a run outside
/// CI may skip.
fn chromium_missing() -> bool {
    if std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok()
    {
        return false;
    }
    assert!(
        std::env::var_os("ALLIUM_CI_TOOLS").is_none(),
        "chromium is not installed (apt-get install chromium)"
    );
    eprintln!("chromium is not installed: skipped");
    true
}

/// The DOM Chromium renders for `url` with `proxy_args`.
async fn chromium(proxy_args: &[String], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(proxy_args)
        .args(["--dump-dom", url])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium finished")
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_local_page_through_the_network() {
    if chromium_missing() {
        return;
    }
    let web = page().await;
    let net = common::small_net(3).await;
    let url = format!("http://127.0.0.1:{}/", web.port());
    // Bytes the exits exchanged with destinations.
    let exited = || -> u64 {
        net.relays
            .iter()
            .map(|r| r.stats.exit_bytes.load(Ordering::Relaxed))
            .sum()
    };
    let proxy = format!("--proxy-server=socks5://{}", net.socks_addr);

    // As the README says: the page comes, through an exit.
    let before = exited();
    let dom = chromium(
        &[proxy.clone(), "--proxy-bypass-list=<-loopback>".into()],
        &url,
    )
    .await;
    assert!(dom.contains(MARK), "{dom}");
    assert!(
        exited() - before >= PAD as u64,
        "the page did not come through an exit"
    );

    // Without the bypass rule Chromium goes around the proxy for loopback
    // (what it sends through the proxy of its own accord is not the page).
    let before = exited();
    let dom = chromium(&[proxy], &url).await;
    assert!(dom.contains(MARK), "{dom}");
    assert!(
        exited() - before < PAD as u64,
        "Chromium used the proxy for loopback"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_the_testnet_demo_service_by_its_address() {
    if chromium_missing() {
        return;
    }
    let mut net = common::small_net(5).await;
    let address = net.host_demo_service().await.unwrap();
    let url = format!("http://{address}/");
    let proxy = format!("--proxy-server=socks5://{}", net.socks_addr);
    // The service publishes within a second or two of its client's
    // bootstrap; until then the page does not load.
    let started = std::time::Instant::now();
    loop {
        let dom = chromium(std::slice::from_ref(&proxy), &url).await;
        if dom.contains("Hello from an Allium onion service.") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the demo service did not load: {dom}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "loaded the demo service {:?} after it started",
        started.elapsed()
    );
    net.shutdown().await;
}
