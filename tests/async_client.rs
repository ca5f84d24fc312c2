//! `AsyncClient` against a real daemon: requests, pipelining with ids given and checked,
//! probes, busy replies, and deadlines that end a connect or a request nobody answers; and
//! deadlines that bound a whole call, of both clients, against a server that is slow.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use common::{request, temp_dir, InProcess, CONFIG_ID};
use khived::{code, AsyncClient, Request};

const TIMEOUT: Duration = Duration::from_secs(10);

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    async_io::block_on(future)
}

#[test]
fn requests_probes_and_errors() {
    let daemon = InProcess::start(|_, _| {});
    block_on(async {
        let mut client = AsyncClient::connect(&daemon.socket, TIMEOUT).await?;
        let response = client.request(&request("hello")).await?;
        assert_eq!(response.result.as_deref(), Some("hello"));
        assert_eq!(
            response.request_id,
            Some(1),
            "an id is given when none is set"
        );
        assert_eq!(response.served_config_id.as_deref(), Some(CONFIG_ID));
        let failed = client.request(&request("fail:nope")).await?;
        assert_eq!(failed.error_code(), Some(code::DISPATCHER_ERROR));
        assert_eq!(failed.request_id, Some(2));
        // The caller's own id is kept.
        let mut own = request("mine");
        own.request_id = Some(77);
        assert_eq!(client.request(&own).await?.request_id, Some(77));
        let info = client.probe().await?;
        assert_eq!(info.pid, std::process::id());
        assert_eq!(info.namespace, common::NAMESPACE);
        io::Result::Ok(())
    })
    .unwrap();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let daemon = InProcess::start(|_, _| {});
    block_on(async {
        let mut client = AsyncClient::connect(&daemon.socket, TIMEOUT).await?;
        // A slow one first: the others wait behind it, and come back in order.
        let ops: Vec<String> = (0..50)
            .map(|i| match i {
                0 => "sleep:50".to_owned(),
                _ => format!("op {i}"),
            })
            .collect();
        let requests: Vec<Request<'_>> = ops.iter().map(|ops| request(ops)).collect();
        let responses = client.pipeline(&requests).await?;
        assert_eq!(responses.len(), 50);
        for (i, response) in responses.iter().enumerate() {
            assert_eq!(response.result.as_deref(), Some(ops[i].as_str()));
            assert_eq!(response.request_id, Some(i as u64 + 1));
        }
        // Sent one by one, received later.
        for ops in ["x", "y", "z"] {
            client.send(&request(ops)).await?;
        }
        assert_eq!(client.outstanding(), 3);
        let early = client.request(&request("too soon")).await.unwrap_err();
        assert_eq!(early.kind(), io::ErrorKind::InvalidInput, "{early}");
        for ops in ["x", "y", "z"] {
            assert_eq!(client.receive().await?.result.as_deref(), Some(ops));
        }
        let none = client.receive().await.unwrap_err();
        assert_eq!(none.kind(), io::ErrorKind::InvalidInput);
        // Large responses pipelined: sending and receiving at once, nothing stalls.
        let big = "b".repeat(1024 * 1024);
        let requests: Vec<Request<'_>> = (0..8).map(|_| request(&big)).collect();
        for response in client.pipeline(&requests).await? {
            assert_eq!(response.result.as_deref().map(str::len), Some(big.len()));
        }
        io::Result::Ok(())
    })
    .unwrap();
}

#[test]
fn an_answer_to_another_request_is_an_error() {
    let dir = temp_dir();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // A fake daemon that answers every request with request id 999.
    let fake = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let _ = common::read_response_raw(&mut stream).unwrap();
        let mut response = khived::Response::ok("x", "");
        response.request_id = Some(999);
        let frame = khived::encode_frame(&response).unwrap();
        io::Write::write_all(&mut stream, frame.as_bytes()).unwrap();
        stream
    });
    block_on(async {
        let mut client = AsyncClient::connect(&path, TIMEOUT).await.unwrap();
        let err = client.request(&request("x")).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("request id 999"), "{err}");
        let after = client.request(&request("y")).await.unwrap_err();
        assert_eq!(after.kind(), io::ErrorKind::NotConnected, "{after}");
    });
    drop(fake.join().unwrap());
}

#[test]
fn a_client_over_the_cap_gets_the_busy_reply() {
    let daemon = InProcess::start(|config, _| config.max_connections = 1);
    let _holder = daemon.hold_a_slot();
    block_on(async {
        let mut client = AsyncClient::connect(&daemon.socket, TIMEOUT).await.unwrap();
        let response = client.request(&request("x")).await.unwrap();
        assert_eq!(
            response.error_code(),
            Some(code::DAEMON_BUSY),
            "{response:?}"
        );
        assert!(response.is_retryable());
    });
}

#[test]
fn connecting_to_nothing_names_the_path() {
    let dir = temp_dir();
    let path = dir.path().join("missing.sock");
    let err = block_on(AsyncClient::connect(&path, TIMEOUT)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(err.to_string().contains("missing.sock"), "{err}");
    // A socket file nobody listens on.
    drop(UnixListener::bind(&path).unwrap());
    let err = block_on(AsyncClient::connect(&path, TIMEOUT)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
}

// Linux only: there a full queue makes a non-blocking connect wait (EAGAIN); macOS refuses.
#[cfg(target_os = "linux")]
#[test]
fn a_connect_to_a_full_queue_ends_at_its_deadline() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let dir = temp_dir();
    let path = dir.path().join("full.sock");
    let addr = SocketAddrUnix::new(&path).unwrap();
    let socket = |flags| {
        rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None).unwrap()
    };
    // A listener that never accepts, with the shortest queue, filled up.
    let listener = socket(SocketFlags::CLOEXEC);
    rustix::net::bind(&listener, &addr).unwrap();
    rustix::net::listen(&listener, 0).unwrap();
    let mut queued = Vec::new();
    loop {
        let fd = socket(SocketFlags::CLOEXEC | SocketFlags::NONBLOCK);
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => queued.push(fd),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("filling the queue: {e}"),
        }
        assert!(queued.len() < 10_000, "the queue never filled");
    }
    let err = block_on(AsyncClient::connect(&path, Duration::from_millis(300))).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains("full.sock"), "{err}");
    // Once a place frees up, a connect that is still within its deadline gets in. Its first
    // poll tries at once and finds the queue full (it would be done otherwise): it waits.
    let mut connecting = std::pin::pin!(AsyncClient::connect(&path, TIMEOUT));
    let first = block_on(futures_lite::future::poll_once(connecting.as_mut()));
    assert!(
        first.is_none(),
        "connected to a full queue: {:?}",
        first.map(|r| r.is_ok())
    );
    let _accepted = rustix::net::accept(&listener).unwrap();
    block_on(connecting).unwrap();
}

#[test]
fn a_request_nobody_answers_ends_at_its_deadline() {
    let dir = temp_dir();
    let path = dir.path().join("silent.sock");
    // Connections complete into the queue; nobody ever reads or answers.
    let _listener = UnixListener::bind(&path).unwrap();
    block_on(async {
        let mut client = AsyncClient::connect(&path, Duration::from_millis(300))
            .await
            .unwrap();
        let err = client.request(&request("x")).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        // Half a frame may be on its way: the connection is not used again.
        let again = client.request(&request("x")).await.unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::NotConnected, "{again}");
    });
}

/// A server for one request: it reads the request `read_after` after the connection, then
/// answers it `answer_after` later, in `pieces` writes 100 ms apart.
fn slow_server(
    path: &Path,
    read_after: Duration,
    answer_after: Duration,
    pieces: usize,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        std::thread::sleep(read_after);
        let mut header = [0; 4];
        stream.read_exact(&mut header).unwrap();
        let mut body = vec![0; u32::from_be_bytes(header) as usize];
        stream.read_exact(&mut body).unwrap();
        std::thread::sleep(answer_after);
        let answer = serde_json::to_vec(&khived::Response::ok("x".repeat(64), CONFIG_ID));
        let frame = common::frame(&answer.unwrap());
        for piece in frame.chunks(frame.len().div_ceil(pieces)) {
            // An error: the client gave up.
            if stream.write_all(piece).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// A socket's timeout counts for each system call: an answer that comes in 30 pieces,
/// 100 ms apart, never keeps one read waiting for long. The blocking client's timeout bounds
/// the whole call all the same.
#[test]
fn an_answer_that_trickles_in_ends_at_the_deadline_of_the_whole_call() {
    let dir = temp_dir();
    let path = dir.path().join("slow.sock");
    let _server = slow_server(&path, Duration::ZERO, Duration::ZERO, 30);
    let answered = khived::Client::connect(&path, Duration::from_secs(1))
        .and_then(|mut client| client.request(&request("x")));
    let err = answered.expect_err("the answer takes 3 s, the timeout is 1 s");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
}

/// The async client's timeout bounds the write and the read together: a server that reads
/// a large request 0.7 s late and answers it 0.7 s later keeps neither waiting for its
/// whole timeout, and the call for more than it.
#[test]
fn a_request_written_slowly_and_answered_slowly_ends_at_its_deadline() {
    let dir = temp_dir();
    let path = dir.path().join("slow.sock");
    let late = Duration::from_millis(700);
    let _server = slow_server(&path, late, late, 1);
    // More than the socket's buffers hold: the write waits for the server to read.
    let ops = "x".repeat(4 << 20);
    let answered = block_on(async {
        let mut client = AsyncClient::connect(&path, Duration::from_secs(1)).await?;
        client.request(&request(&ops)).await
    });
    let err = answered.expect_err("the call takes 1.4 s, the timeout is 1 s");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
}
