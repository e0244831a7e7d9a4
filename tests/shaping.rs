//! A network whose every link delays what it sends by 20 ms (link shaping,
//! as `allium testnet --link-delay 20`): it bootstraps, circuits take the
//! round trips the delay implies, a download and an upload arrive intact,
//! congestion control opens the client's window past the old fixed
//! window of 1000 cells, and a request sent with the SOCKS request
//! (optimistic data) reaches the server before the SOCKS reply is back. Its own test binary: shaping is set for the whole
//! process.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use allium::testnet::{Testnet, TestnetOptions};
use allium_client::path::ExitTarget;
use allium_link::shaping::Shaping;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LEN: usize = 20 << 20;

fn byte(i: usize) -> u8 {
    (i * 31 % 253) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_network_works_and_takes_its_round_trips() {
    let delay = Duration::from_millis(20);
    let net = Testnet::start(TestnetOptions {
        authorities: 1,
        shaping: Some(Shaping { delay, rate: None }),
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(120)).await.unwrap();

    // Hop k of a build waits for k round trips of 2 x 20 ms: 240 ms at least.
    let t = Instant::now();
    net.client.build_circuit(&ExitTarget::Any).await.unwrap();
    assert!(t.elapsed() >= 12 * delay, "built in {:?}", t.elapsed());

    // A server that sends LEN known bytes to whoever connects.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let data: Vec<u8> = (0..LEN).map(byte).collect();
        s.write_all(&data).await.unwrap();
    });
    let (code, mut s) = common::socks5(net.socks_addr, "localhost", port).await;
    assert_eq!(code, 0);
    let mut got = Vec::with_capacity(LEN);
    tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut got))
        .await
        .expect("the download finished")
        .unwrap();
    assert_eq!(got.len(), LEN);
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == byte(i)),
        "corrupted"
    );

    // The other way: a server that checks what it is sent.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let sink = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        // A half-closed SOCKS connection ends no stream (as in Tor): the
        // server reads what it expects.
        let mut got = vec![0u8; LEN];
        s.read_exact(&mut got).await.unwrap();
        got.iter().enumerate().all(|(i, b)| *b == byte(i))
    });
    let (code, mut s) = common::socks5(net.socks_addr, "localhost", port).await;
    assert_eq!(code, 0);
    let data: Vec<u8> = (0..LEN).map(byte).collect();
    tokio::time::timeout(Duration::from_secs(120), s.write_all(&data))
        .await
        .expect("the upload finished")
        .unwrap();
    let intact = tokio::time::timeout(Duration::from_secs(120), sink)
        .await
        .expect("the server got it all")
        .unwrap();
    assert!(intact, "the upload arrived short or corrupted");
    // The window that carried it grew past what a fixed window allows.
    let most = net.client.circuit_cwnds().into_iter().max().unwrap_or(0);
    assert!(most > 1000, "largest congestion window {most} cells");

    // Optimistic data: a request written with the SOCKS request goes with
    // the BEGIN, so the server has it before CONNECTED is back at the
    // client (half a circuit round trip, 120 ms, sooner); otherwise it
    // would leave only after.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut req = [0u8; 7];
        s.read_exact(&mut req).await.unwrap();
        let at = Instant::now();
        s.write_all(b"answer").await.unwrap();
        (req, at)
    });
    let (code, mut s) =
        common::socks5_early(net.socks_addr, "localhost", port, None, b"request").await;
    let replied = Instant::now();
    assert_eq!(code, 0);
    let mut answer = [0u8; 6];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"answer");
    let (req, got_at) = server.await.unwrap();
    assert_eq!(&req, b"request");
    assert!(
        got_at < replied,
        "the server had the request {:?} after the SOCKS reply",
        got_at - replied
    );
    net.shutdown().await;
}
