//! Protocol version 1 over real sockets (PROTOCOL.md): old clients served as before, newer
//! versions refused without dispatch, request ids echoed, every runtime error with its code
//! and disposition, answers in order, and the drain's `daemon_draining` replies.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{frame, is_closed, raw_exchange, read_response, request, InProcess, CONFIG_ID};
use khived::{code, Disposition, Request, Response, MAX_FRAME_BYTES, PROTOCOL_VERSION};

/// A daemon whose dispatch calls are counted.
fn counted(tweak: impl FnOnce(&mut khived::Config)) -> (InProcess, Arc<AtomicUsize>) {
    let mut dispatched = None;
    let daemon = InProcess::start(|config, dispatch| {
        dispatched = Some(Arc::clone(&dispatch.dispatched));
        tweak(config);
    });
    (daemon, dispatched.unwrap())
}

/// Asserts that `response` is an error with `code` and `disposition`, its message the same
/// as its `error` text, from a version 1 daemon.
fn assert_error(response: &Response, code: &str, disposition: Disposition) {
    assert!(!response.ok, "{response:?}");
    let detail = response.error_detail.as_ref().expect("an error_detail");
    assert_eq!(
        (detail.code.as_str(), detail.disposition),
        (code, disposition),
        "{response:?}"
    );
    assert_eq!(Some(&detail.message), response.error.as_ref());
    assert_eq!(response.daemon_protocol_version, PROTOCOL_VERSION);
    assert_eq!(response.served_config_id.as_deref(), Some(CONFIG_ID));
}

fn raw(body: &str) -> Vec<u8> {
    frame(body.as_bytes())
}

/// The response as JSON, to look at the fields as a client in another language sees them.
fn json_of(stream: &mut std::os::unix::net::UnixStream, bytes: &[u8]) -> serde_json::Value {
    stream.write_all(bytes).unwrap();
    serde_json::from_slice(&common::read_response_raw(stream).unwrap()).unwrap()
}

#[test]
fn seed_era_frames_are_served_with_the_old_fields() {
    let daemon = InProcess::start(|_, dispatch| dispatch.config_id = Some(""));
    // Written by hand as the original clients write them: no version, no config_id.
    let body =
        r#"{"ops":"hello","presentation":null,"presentation_per_op":null,"namespace":"test"}"#;
    let mut stream = daemon.connect_raw();
    let value = json_of(&mut stream, &raw(body));
    assert_eq!(value["ok"], true, "{value}");
    assert_eq!(value["result"], "hello");
    assert_eq!(value["error"], serde_json::Value::Null);
    assert_eq!(value["namespace_mismatch"], false);
    assert_eq!(value["config_mismatch"], false);
    assert_eq!(value["served_config_id"], "");
    // The additions an old client ignores; no id was sent, none comes back.
    assert_eq!(value["daemon_protocol_version"], PROTOCOL_VERSION);
    assert_eq!(value["version_mismatch"], false);
    assert_eq!(value["error_detail"], serde_json::Value::Null);
    assert!(value.get("request_id").is_none(), "{value}");
    // The same connection serves the next seed frame, and its error keeps the old text.
    let body = r#"{"ops":"fail:no such pack","namespace":"test"}"#;
    let value = json_of(&mut stream, &raw(body));
    assert_eq!(value["ok"], false);
    assert_eq!(value["error"], "no such pack");
    // A seed probe.
    let value = json_of(
        &mut stream,
        &raw(r#"{"ops":"","namespace":"","probe":true}"#),
    );
    assert_eq!(value["ok"], true);
    assert!(value["result"].as_str().unwrap().contains("\"pid\""));
}

#[test]
fn a_seed_frame_without_config_id_still_means_empty() {
    let daemon = InProcess::start(|_, _| {});
    let body = r#"{"ops":"x","namespace":"test"}"#;
    let response = raw_exchange(&mut daemon.connect_raw(), &raw(body)).unwrap();
    assert!(response.config_mismatch && !response.ok);
    assert_eq!(response.error_detail, None, "a mismatch is not an error");
}

#[test]
fn a_future_version_is_refused_without_dispatch() {
    let (daemon, dispatched) = counted(|_| {});
    let mut stream = daemon.connect_raw();
    // What the original project's protocol 8 client sends: `plan` means "parse only".
    let body = r#"{"ops":"x","namespace":"test","config_id":"cfg-1","protocol_version":8,
                   "plan":true,"request_id":42}"#;
    let response = raw_exchange(&mut stream, &raw(body)).unwrap();
    assert_error(&response, code::VERSION_MISMATCH, Disposition::NotCommitted);
    assert!(response.version_mismatch);
    assert_eq!(response.request_id, Some(42));
    let error = response.error.unwrap();
    assert!(error.starts_with("version mismatch: "), "{error}");
    assert!(error.contains("version 8"), "{error}");
    // Its identity probe too, and a probe of ours under version 8.
    for body in [
        r#"{"ops":"","namespace":"test","config_id":"cfg-1","protocol_version":8,"probe_only":true}"#,
        r#"{"ops":"","namespace":"","protocol_version":8,"probe":true}"#,
    ] {
        let response = raw_exchange(&mut stream, &raw(body)).unwrap();
        assert!(response.version_mismatch, "{response:?}");
        assert_eq!(response.result, None);
    }
    // The connection stays usable, and versions up to ours are served.
    for version in 0..=PROTOCOL_VERSION {
        let body = format!(
            r#"{{"ops":"v","namespace":"test","config_id":"cfg-1","protocol_version":{version}}}"#
        );
        assert!(raw_exchange(&mut stream, &raw(&body)).unwrap().ok);
    }
    assert_eq!(
        dispatched.load(Ordering::SeqCst),
        2,
        "only the last two ran"
    );
}

#[test]
fn probe_only_checks_identity_without_dispatch() {
    let (daemon, dispatched) = counted(|_| {});
    let mut client = daemon.client();
    let mut probe = request("fail:must not run");
    probe.probe_only = true;
    let response = client.request(&probe).unwrap();
    assert!(response.ok);
    assert_eq!(response.result, None);
    let mut elsewhere = Request::new("x", "other", CONFIG_ID);
    elsewhere.probe_only = true;
    assert!(client.request(&elsewhere).unwrap().namespace_mismatch);
    let mut other_config = Request::new("x", common::NAMESPACE, "cfg-2");
    other_config.probe_only = true;
    assert!(client.request(&other_config).unwrap().config_mismatch);
    assert_eq!(dispatched.load(Ordering::SeqCst), 0);
}

#[test]
fn request_ids_are_echoed_on_every_kind_of_answer() {
    let daemon = InProcess::start(|_, _| {});
    let mut client = daemon.client();
    let with_id = |mut request: Request<'static>, id: u64| {
        request.request_id = Some(id);
        request
    };
    let ok = client.request(&with_id(request("a"), 1)).unwrap();
    assert_eq!((ok.ok, ok.request_id), (true, Some(1)));
    let failed = client.request(&with_id(request("fail:x"), 2)).unwrap();
    assert_eq!((failed.ok, failed.request_id), (false, Some(2)));
    let mismatch = client
        .request(&with_id(Request::new("a", "other", CONFIG_ID), 3))
        .unwrap();
    assert_eq!(
        (mismatch.namespace_mismatch, mismatch.request_id),
        (true, Some(3))
    );
    let mut newer = with_id(request("a"), u64::MAX);
    newer.protocol_version = PROTOCOL_VERSION + 1;
    let refused = client.request(&newer).unwrap();
    assert_eq!(
        (refused.version_mismatch, refused.request_id),
        (true, Some(u64::MAX))
    );
    let probe = client.request(&with_id(Request::probe(), 5)).unwrap();
    assert_eq!((probe.ok, probe.request_id), (true, Some(5)));
    // A frame that is an object with an id but not a valid request: the id still comes back.
    let mut stream = daemon.connect_raw();
    let bad = raw_exchange(
        &mut stream,
        &raw(r#"{"ops":1,"namespace":"test","request_id":6}"#),
    );
    let bad = bad.unwrap();
    assert_error(&bad, code::BAD_REQUEST, Disposition::NotCommitted);
    assert_eq!(bad.request_id, Some(6));
    assert!(is_closed(&mut stream));
    // Not an object, or no valid id: none.
    for body in [r#"[6]"#, r#"{"ops":1,"request_id":-1}"#, "not json"] {
        let response = raw_exchange(&mut daemon.connect_raw(), &raw(body)).unwrap();
        assert_eq!(response.request_id, None, "{body}");
        assert_eq!(response.error_code(), Some(code::BAD_REQUEST));
    }
}

#[test]
fn pipelined_answers_come_in_order_with_their_ids() {
    let daemon = InProcess::start(|_, _| {});
    let mut stream = daemon.connect_raw();
    let mut bytes = Vec::new();
    // A slow one first, an error, a mismatch: the order holds whatever each one is.
    let ops = ["sleep:100", "b", "fail:c", "d", "panic", "f"];
    for (i, ops) in ops.iter().enumerate() {
        let mut request = request(ops);
        request.request_id = Some(100 + i as u64);
        if i == 3 {
            request.namespace = "other".into();
        }
        bytes.extend(khived::encode_frame(&request).unwrap().into_bytes());
    }
    stream.write_all(&bytes).unwrap();
    for i in 0..ops.len() {
        let response = read_response(&mut stream).unwrap();
        assert_eq!(response.request_id, Some(100 + i as u64), "{response:?}");
    }
}

#[test]
fn each_runtime_error_carries_its_code_and_disposition() {
    let (daemon, dispatched) = counted(|_| {});
    let not_committed = Disposition::NotCommitted;

    let bad = raw_exchange(&mut daemon.connect_raw(), &raw("not json")).unwrap();
    assert_error(&bad, code::BAD_REQUEST, not_committed);
    assert!(bad.error.unwrap().starts_with("bad request: "));
    // A request is an object: the field values in an array are not one, and are not run.
    let array = r#"["x",null,null,"test"]"#;
    let array = raw_exchange(&mut daemon.connect_raw(), &raw(array)).unwrap();
    assert_error(&array, code::BAD_REQUEST, not_committed);
    let message = array.error.unwrap();
    assert!(message.contains("expected a request object"), "{message}");

    let mut stream = daemon.connect_raw();
    stream
        .write_all(&raw(r#"{"ops":"x","namespace":"test"}"#)[..10])
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let truncated = read_response(&mut stream).unwrap();
    assert_error(&truncated, code::BAD_REQUEST, not_committed);

    let header = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
    let too_large = raw_exchange(&mut daemon.connect_raw(), &header).unwrap();
    assert_error(&too_large, code::FRAME_TOO_LARGE, not_committed);
    assert_eq!(
        too_large.error.as_deref(),
        Some("frame too large: 8388609 bytes (limit 8388608)")
    );
    assert_eq!(dispatched.load(Ordering::SeqCst), 0, "nothing ran so far");

    let mut client = daemon.client();
    let mut big = request("big");
    big.request_id = Some(9);
    let response = client.request(&big).unwrap();
    assert_error(&response, code::RESPONSE_TOO_LARGE, Disposition::Unknown);
    assert_eq!(response.request_id, Some(9));
    assert!(response.error.unwrap().starts_with("response too large: "));

    let panicked = client.request(&request("panic")).unwrap();
    assert_error(&panicked, code::DISPATCHER_PANICKED, Disposition::Unknown);
    assert_eq!(
        panicked.error.as_deref(),
        Some("dispatcher panicked: asked to panic")
    );

    let failed = client.request(&request("fail:no such pack")).unwrap();
    assert_error(&failed, code::DISPATCHER_ERROR, Disposition::Unknown);
    assert_eq!(failed.error.as_deref(), Some("no such pack"));
    assert!(!failed.is_retryable());

    // A dispatcher's own code, declared not committed.
    let refused = client.request(&request("refuse:index_rebuilding")).unwrap();
    assert_error(&refused, "index_rebuilding", not_committed);
    assert_eq!(refused.error.as_deref(), Some("refused: index_rebuilding"));
}

#[test]
fn a_client_over_the_cap_is_told_busy_with_its_code() {
    let daemon = InProcess::start(|config, _| config.max_connections = 1);
    let _holder = daemon.hold_a_slot();
    let response = daemon.client().request(&request("x")).unwrap();
    assert_error(&response, code::DAEMON_BUSY, Disposition::NotCommitted);
    assert!(response.is_retryable());
    assert!(response
        .error
        .unwrap()
        .starts_with("daemon_busy: 1 connections open"));
    assert_eq!(response.request_id, None, "the request was never read");
}

#[test]
fn a_draining_daemon_answers_the_frames_behind_the_request_in_hand() {
    let mut handles = None;
    let daemon = InProcess::start(|_, dispatch| {
        handles = Some((
            Arc::clone(&dispatch.dispatched),
            Arc::clone(&dispatch.at_gate),
            Arc::clone(&dispatch.gate_open),
        ));
    });
    let (dispatched, at_gate, gate_open) = handles.unwrap();
    // An idle connection: it is closed the moment the drain starts, which tells us when.
    let mut idle = daemon.connect_raw();
    assert!(
        raw_exchange(
            &mut idle,
            &khived::encode_frame(&request("x")).unwrap().into_bytes()
        )
        .unwrap()
        .ok
    );
    // Three frames in one write: the first waits at the gate, the two behind it arrive.
    let mut stream = daemon.connect_raw();
    let mut bytes = Vec::new();
    for (id, ops) in [(1, "gate"), (2, "b"), (3, "c")] {
        let mut request = request(ops);
        request.request_id = Some(id);
        bytes.extend(khived::encode_frame(&request).unwrap().into_bytes());
    }
    stream.write_all(&bytes).unwrap();
    common::wait_until("the gate request never arrived", || {
        at_gate.load(Ordering::SeqCst) == 1
    });
    let stop = daemon.stop.clone();
    stop.shutdown();
    assert!(is_closed(&mut idle), "the drain closes idle connections");
    gate_open.store(true, std::sync::atomic::Ordering::SeqCst);

    let first = read_response(&mut stream).unwrap();
    assert_eq!((first.ok, first.request_id), (true, Some(1)), "{first:?}");
    for id in [2, 3] {
        let refused = read_response(&mut stream).unwrap();
        assert_error(&refused, code::DAEMON_DRAINING, Disposition::NotCommitted);
        assert_eq!(refused.request_id, Some(id));
        assert!(refused.is_retryable());
        assert!(refused.error.unwrap().starts_with("daemon_draining: "));
    }
    assert!(is_closed(&mut stream));
    assert_eq!(dispatched.load(Ordering::SeqCst), 2, "x and gate only");
    assert_eq!(daemon.shutdown().unwrap(), khived::Stopped::Drained);
}

/// A bad request's error quotes what was wrong with it, but not a field's whole value: a
/// 5 MiB string where a flag goes is answered `bad_request` in a short message (quoted whole,
/// twice, in `error` and `error_detail`, it made an answer over the frame limit, so the client
/// got `response_too_large`, outcome unknown, for a request that never ran).
#[test]
fn a_bad_request_is_answered_briefly_however_large_the_value_it_names() {
    let (daemon, dispatched) = counted(|_| {});
    let huge = "A".repeat(5 << 20);
    let body = format!(r#"{{"ops":"x","namespace":"test","probe":"{huge}"}}"#);
    let bad = raw_exchange(&mut daemon.connect_raw(), &raw(&body)).unwrap();
    assert_error(&bad, code::BAD_REQUEST, Disposition::NotCommitted);
    let message = bad.error.unwrap();
    assert!(
        message.len() < 400,
        "{} bytes: {}",
        message.len(),
        &message[..400]
    );
    assert!(
        message.starts_with("bad request: invalid type: string \"AAAA"),
        "{message}"
    );
    assert!(
        message.contains("[cut]") && message.contains("at line 1 column"),
        "{message}"
    );
    assert_eq!(dispatched.load(Ordering::SeqCst), 0);
}
