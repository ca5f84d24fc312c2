#!/usr/bin/env python3
"""Writes the hand-made fuzz seeds into fuzz/seeds/<target>/, named for what they are.

Run from anywhere: python3 fuzz/make_seeds.py. It rewrites the seed files it knows and leaves
other files alone. The seeds are committed; this script is how they were made, so that a
change of the input layouts (fuzz/oracles/src/) can regenerate them.
"""

import json
import os
import struct

CAP = 8 * 1024 * 1024  # MAX_FRAME_BYTES
NAMESPACE = "fuzz"  # khived_oracles::NAMESPACE
CONFIG_ID = "fuzz-config"  # khived_oracles::CONFIG_ID
SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def frame(body):
    return struct.pack(">I", len(body)) + body


def header(length):
    return struct.pack(">I", length)


def js(value):
    return json.dumps(value, separators=(",", ":")).encode()


def request(ops, namespace=NAMESPACE, config_id=CONFIG_ID, **extra):
    value = {"ops": ops, "presentation": None, "presentation_per_op": None,
             "namespace": namespace}
    if config_id is not None:
        value["config_id"] = config_id
    value.update(extra)
    return js(value)


def reader_input(pattern, stream):
    """frame_reader's layout: (len(pattern) - 1), the read pattern, then the stream.

    Pattern bytes, one per poll_read: 0 Interrupted, 1 Pending, 2..=200 up to b - 1 bytes,
    201..=255 up to (b - 200) * 4096 bytes.
    """
    assert 1 <= len(pattern) <= 8
    return bytes([len(pattern) - 1]) + bytes(pattern) + stream


def nested(depth):
    return b'{"ops":"x","namespace":"fuzz","extra":' + b"[" * depth + b"]" * depth + b"}"


def cap_request():
    """A request whose body is exactly CAP bytes: it fits, its echo does not."""
    empty = request("")
    return request("a" * (CAP - len(empty)))


def error_response(code, message, disposition, **extra):
    value = {"ok": False, "result": None, "error": message, "namespace_mismatch": False,
             "config_mismatch": False, "served_config_id": "c", "daemon_protocol_version": 1,
             "version_mismatch": False,
             "error_detail": {"code": code, "message": message, "disposition": disposition}}
    value.update(extra)
    return js(value)


SEED_SETS = {
    "frame_reader": {
        "empty_stream": reader_input([255], b""),
        "valid_request_big_chunks": reader_input([255], frame(request("search foo"))),
        "valid_request_byte_by_byte": reader_input([2], frame(request("search foo"))),
        "len_0": reader_input([255], frame(b"")),
        "len_1": reader_input([255], frame(b"x")),
        "len_cap_full": reader_input([255], frame(b"a" * CAP)),
        "len_cap_truncated_body": reader_input([201], header(CAP) + b"a" * 100_000),
        "len_cap_plus_1": reader_input([255], header(CAP + 1) + b"abc"),
        "len_u32_max": reader_input([255], b"\xff\xff\xff\xff"),
        "truncated_header": reader_input([255], b"\x00\x00"),
        "truncated_body": reader_input([255], header(10) + b"abc"),
        "two_frames_back_to_back": reader_input(
            [0, 1, 4, 255], frame(request("one")) + frame(request("two"))),
        "interrupted_and_pending_stalls": reader_input([0, 1, 0, 1, 3], frame(b"{}") * 3),
        "frame_200k_odd_chunks": reader_input([201, 255, 100, 2], frame(b"b" * 200_000)),
        "bad_json_frame": reader_input([255], frame(b"{not json")),
        "frame_then_too_large": reader_input([255], frame(b"{}") + header(CAP + 1)),
    },
    "request_decode": {
        "request_full": request("search foo", presentation="json",
                                presentation_per_op=["text", None]),
        "request_no_config_id": request("x", config_id=None),
        "request_only_required": b'{"ops":"x","namespace":"khive"}',
        "request_probe": b'{"ops":"","namespace":"","config_id":"","probe":true}',
        "request_escapes": br'{"ops":"a\"b\\c\n\u00e9\ud83d\ude00","namespace":"\u0066uzz"}',
        "request_unknown_fields": b'{"ops":"x","namespace":"n","future":{"a":[1,2.5e3,null]}}',
        "request_duplicate_field": b'{"ops":"x","ops":"y","namespace":"n"}',
        "request_lone_surrogate": br'{"ops":"\ud800","namespace":"n"}',
        "request_wrong_type": b'{"ops":1,"namespace":"n"}',
        "request_v1_full": request("x", protocol_version=1, request_id=2**64 - 1,
                                   probe_only=False),
        "request_v1_probe_only": request("", protocol_version=1, request_id=1, probe_only=True),
        "request_future_version": request("x", protocol_version=8, request_id=42, plan=True,
                                          metrics_only=True),
        "request_id_negative": request("x", request_id=-1),
        "request_id_above_u64": request("x").replace(b"}", b',"request_id":%d}' % 2**64),
        "request_id_null": request("x", request_id=None),
        "request_version_float": request("x", protocol_version=1.5),
        "request_version_string": request("x", protocol_version="1"),
        "response_v1_ok": js({"ok": True, "result": "hi", "error": None,
                              "namespace_mismatch": False, "config_mismatch": False,
                              "served_config_id": "c", "daemon_protocol_version": 1,
                              "version_mismatch": False, "request_id": 7,
                              "error_detail": None}),
        "response_v1_busy": error_response("daemon_busy", "daemon_busy: 1 connections open",
                                           "not_committed"),
        "response_v1_version_mismatch": error_response(
            "version_mismatch", "version mismatch: 8", "not_committed",
            version_mismatch=True, request_id=42),
        "response_unknown_disposition": error_response("x", "m", "committed"),
        "response_detail_missing_code": js({"ok": False, "error_detail": {"message": "m"}}),
        "response_ok": js({"ok": True, "result": "hi", "error": None,
                           "namespace_mismatch": False, "config_mismatch": False,
                           "served_config_id": "c"}),
        "response_old_daemon": b'{"ok":true,"result":"hi","error":null,"namespace_mismatch":false}',
        # Every kind of character the daemon's response writer treats apart: quote,
        # backslash, the short escapes, other control characters, DEL, multi-byte text.
        "response_every_escape": error_response(
            "c\u0001", "q\"b\\n\nr\rt\tb\bf\f\u0000\u001f\u007f\u00e9\u2028\U0001f600",
            "unknown", result="\\\"\u0010", request_id=0),
        "bad_json": b'{"ops":"x",',
        "deep_nesting": nested(5000),
        "empty": b"",
        "not_an_object": b'["ops","namespace"]',
    },
    "connection": {
        "empty": b"",
        "echo_one": frame(request("hello")),
        "two_frames_back_to_back": frame(request("one")) + frame(request("two")),
        "probe_then_echo": frame(js({"ops": "", "namespace": "", "probe": True}))
        + frame(request("after probe")),
        "namespace_mismatch": frame(request("x", namespace="other")),
        "config_mismatch_missing_id": frame(request("x", config_id=None)),
        "dispatcher_fail": frame(request("fail:no such verb")),
        "dispatcher_panic_then_echo": frame(request("panic")) + frame(request("still here")),
        "len_0": frame(b""),
        "len_1": frame(b"x"),
        "bad_json_then_echo": frame(b"{not json") + frame(request("never answered")),
        "deep_nesting": frame(nested(5000)),
        "truncated_header_after_frame": frame(request("one")) + b"\x00\x00",
        "truncated_body_after_frame": frame(request("one")) + header(100) + b"{",
        "len_cap_plus_1": header(CAP + 1) + b"{}",
        "len_cap_truncated_body": header(CAP) + b"a" * 70_000,
        "len_cap_response_too_large_then_echo": frame(cap_request()) + frame(request("next")),
        "fifty_frames": b"".join(frame(request("op %d" % i)) for i in range(50)),
        "v1_ids_pipelined": b"".join(
            frame(request(ops, protocol_version=1, request_id=i))
            for i, ops in enumerate(["a", "fail:b", "panic", "d"])),
        "v1_future_version_then_echo": frame(request("x", protocol_version=8, plan=True,
                                                     request_id=7))
        + frame(request("after", protocol_version=1, request_id=8)),
        "v1_probe_only": frame(request("fail:must not run", protocol_version=1,
                                       probe_only=True, request_id=3)),
        "v1_probe_only_namespace_mismatch": frame(request("x", namespace="other",
                                                          probe_only=True, request_id=4)),
        "v1_probe_with_id": frame(js({"ops": "", "namespace": "", "probe": True,
                                      "request_id": 5})),
        "v1_bad_request_with_id": frame(b'{"ops":1,"namespace":"fuzz","request_id":9}'),
        "v1_bad_request_array": frame(b"[9]"),
        "v1_bad_request_id_negative": frame(b'{"ops":"x","namespace":"fuzz","request_id":-1}'),
    },
    "worker_reply": {
        "ok_result": b'{"ok":true,"result":"HELLO"}',
        "ok_without_result": b'{"ok":true}',
        "error": b'{"ok":false,"error":"unknown verb"}',
        "error_without_message": b'{"ok":false}',
        "ok_null_result": b'{"ok":true,"result":null}',
        "escapes_and_newline": br'{"ok":true,"result":"a\nb\u0000\ud83d\ude00"}',
        "extra_fields": b'{"ok":true,"result":"x","took_ms":12,"log":["a"]}',
        "ok_not_bool": b'{"ok":"yes","result":"x"}',
        "result_not_string": b'{"ok":true,"result":42}',
        "not_json": b"this is not JSON",
        "python_repr": b"{'ok': True, 'result': 'x'}",
        "truncated": b'{"ok":true,"res',
        "two_objects": b'{"ok":true}{"ok":false}',
        "deep_nesting": b'{"ok":true,"extra":' + nested(5000) + b"}",
        "invalid_utf8": b'{"ok":true,"result":"\xff\xfe"}',
        "empty": b"",
    },
}


def main():
    for target, seeds in SEED_SETS.items():
        directory = os.path.join(SEEDS, target)
        os.makedirs(directory, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        print("%s: %d seeds" % (target, len(seeds)))


if __name__ == "__main__":
    main()
