"""The function-task handler runner: one warm worker, inside a job's sandbox.

Standard library only, any Python 3.8+: it runs under the image's own python3 (openhtc
bind-mounts this file into the sandbox). Usage: ``python3 runner.py HANDLER``, with
``OPENHTC_FN_PIPES`` naming a directory holding two named pipes, ``calls`` (read) and
``replies`` (written), and ``OPENHTC_FN_CODE`` (optional) the unpacked code zip, put first on
``sys.path``.

Frames on both pipes: one tag byte, a 4-byte big-endian length, the payload. The executor may
write several calls at once (a chunk); each is answered as soon as it ends, in order.
  runner -> executor  ``H`` ready (the handler is imported, or failed to: calls then get that error)
  executor -> runner  ``C`` a call: a JSON header line ({index, attempt, taskId, requestId,
                      functionName, memoryMb, timeoutMs}), a newline, then the event's JSON text
  runner -> executor  ``L`` what the call printed or logged (only if it did), ``D`` how long
                      the handler took (a big-endian double, seconds), then ``R`` the result's
                      JSON text, or ``E`` the error's JSON ({type, message, traceback})
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import struct
import sys
import time
import traceback

_HEAD = struct.Struct(">cI")
_SECONDS = struct.Struct(">d")


class _Calls:
    """The calls pipe, read a chunk at a time: the executor writes several calls at once."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = bytearray()

    def next(self):
        """The next frame (tag, payload), or None at the end of the pipe."""
        while True:
            if len(self.buf) >= _HEAD.size:
                tag, size = _HEAD.unpack_from(self.buf)
                end = _HEAD.size + size
                if len(self.buf) >= end:
                    payload = bytes(self.buf[_HEAD.size : end])
                    del self.buf[:end]
                    return tag, payload
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk


def _send(fd, *frames):
    """Frames (tag, payload), in one write."""
    data = b"".join(_HEAD.pack(tag, len(payload)) + payload for tag, payload in frames)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Context:
    """What AWS Lambda passes as ``context``, for one call."""

    function_version = "$LATEST"

    def __init__(self, header, logger):
        self.aws_request_id = header["requestId"]
        self.function_name = header["functionName"]
        self.memory_limit_in_mb = header.get("memoryMb")
        self.log_group_name = "openhtc/" + header["taskId"]
        self.log_stream_name = header["requestId"]
        self.invoked_function_arn = "openhtc:function:" + header["functionName"]
        self.task_id = header["taskId"]
        self.index = header["index"]
        self.attempt = header["attempt"]
        self.logger = logger
        self._deadline = time.monotonic() + header["timeoutMs"] / 1000.0

    def get_remaining_time_in_millis(self):
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def log(self, message):
        sys.stdout.write(str(message))
        if not str(message).endswith("\n"):
            sys.stdout.write("\n")


def _error(exc):
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def _load(name, code_dir):
    if code_dir:
        sys.path.insert(0, code_dir)
    module_name, _, attr = name.rpartition(".")
    module = importlib.import_module(module_name)
    handler = getattr(module, attr)
    if not callable(handler):
        raise TypeError(f"{name} is not callable")
    return handler


def main():
    handler_name = sys.argv[1]
    pipes = os.environ["OPENHTC_FN_PIPES"]
    calls = os.open(os.path.join(pipes, "calls"), os.O_RDONLY)
    replies = os.open(os.path.join(pipes, "replies"), os.O_WRONLY)
    captured = io.StringIO()
    log_handler = logging.StreamHandler(captured)
    log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("openhtc.function")
    logger.setLevel(logging.INFO)
    logging.getLogger().addHandler(log_handler)
    failure = None
    handler = None
    try:
        handler = _load(handler_name, os.environ.get("OPENHTC_FN_CODE") or "")
    except BaseException as exc:  # every call then fails with it
        failure = json.dumps(_error(exc)).encode()
    _send(replies, (b"H", b""))
    real_out, real_err = sys.stdout, sys.stderr
    pipe = _Calls(calls)
    while True:
        frame = pipe.next()
        if frame is None or frame[0] != b"C":
            return
        payload = frame[1]
        if failure is not None or handler is None:
            _send(replies, (b"E", failure or b"{}"))
            continue
        line, _, event_text = payload.partition(b"\n")
        header = json.loads(line)
        captured.seek(0)
        captured.truncate()
        sys.stdout = sys.stderr = captured
        began = time.monotonic()
        try:
            result = handler(json.loads(event_text), Context(header, logger))
            try:
                reply = (b"R", json.dumps(result, allow_nan=False, separators=(",", ":")).encode())
            except (TypeError, ValueError) as exc:
                problem = TypeError(f"the handler's result is not JSON-serialisable: {exc}")
                reply = (b"E", json.dumps(_error(problem)).encode())
        except BaseException as exc:  # an exception fails the call; it is never a success
            reply = (b"E", json.dumps(_error(exc)).encode())
        finally:
            sys.stdout, sys.stderr = real_out, real_err
        took = (b"D", _SECONDS.pack(time.monotonic() - began))
        output = captured.getvalue()
        if output:  # with the reply, in the same write
            _send(replies, (b"L", output.encode("utf-8", "replace")), took, reply)
        else:
            _send(replies, took, reply)


if __name__ == "__main__":
    main()
