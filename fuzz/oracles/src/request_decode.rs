//! Decoding requests and responses round-trips.

use khived::{encode_frame, Request, Response};

/// Decodes the input as a [`Request`] and as a [`Response`]; whatever decodes must encode,
/// as JSON and as a frame, and decode back to the same value. A response must also come
/// out of the daemon's own writer as the same bytes.
pub fn request_decode(data: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<Request<'_>>(data) {
        let json = serde_json::to_vec(&request).expect("a decoded request failed to encode");
        let back: Request<'_> = serde_json::from_slice(&json)
            .unwrap_or_else(|e| panic!("re-encoded request does not decode ({e}): {request:?}"));
        assert_eq!(
            back, request,
            "the request changed through encode and decode"
        );
        check_frame(&request, &json);
    }
    if let Ok(response) = serde_json::from_slice::<Response>(data) {
        let json = serde_json::to_vec(&response).expect("a decoded response failed to encode");
        let back: Response = serde_json::from_slice(&json)
            .unwrap_or_else(|e| panic!("re-encoded response does not decode ({e}): {response:?}"));
        assert_eq!(
            back, response,
            "the response changed through encode and decode"
        );
        check_frame(&response, &json);
        let daemons = khived::fuzzing::response_frame(&response)
            .expect("a decoded response failed to encode with the daemon's writer");
        check_frame_bytes(&daemons, &json, "the daemon's writer");
    }
}

/// Checks that `encode_frame` gives `json` behind a header holding its length.
fn check_frame<T: serde::Serialize>(value: &T, json: &[u8]) {
    let frame = encode_frame(value).expect("a decoded value failed to encode as a frame");
    check_frame_bytes(frame.as_bytes(), json, "encode_frame");
}

/// Checks that `frame`, made by `whose`, is `json` behind a header holding its length.
fn check_frame_bytes(frame: &[u8], json: &[u8], whose: &str) {
    assert!(
        frame[4..] == *json,
        "{whose}'s frame body is not serde_json's JSON:\n{}\n{}",
        String::from_utf8_lossy(&frame[4..]),
        String::from_utf8_lossy(json)
    );
    assert_eq!(
        u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize,
        json.len(),
        "{whose}'s frame header does not give the body's length"
    );
}
