"""A pyepics (libca) client run in a subprocess and driven over stdin/stdout, one JSON object per line.

libca reads its environment once per process and runs its own threads, so the tests run
it here, beside the in-process server, with ``EPICS_CA_ADDR_LIST``/``EPICS_CA_SERVER_PORT``
set in this process's environment. Requests ``{"id": n, "op": ..., ...}`` are answered
``{"id": n, "ok": true, ...}`` (or ``"ok": false, "error": ...``); asynchronous results
(monitor updates, put completions, access-rights changes) arrive as ``{"event": ...}``
lines. Operations:

* ``connect pv`` -- native type, element count, host, read/write access.
* ``get pv [form=native|time|ctrl] [string]`` -- value and metadata (``string``: as DBR_STRING).
* ``put pv value`` -- ``ca_put`` (no completion); ``put_wait pv value`` -- pyepics's
  ``put(wait=True)``; ``put_callback pv value tag`` -- ``ca_put_callback`` with a callback
  that reports libca's completion status as event ``put_done``.
* ``monitor pv [mask] [form]`` -- a subscription; each update is event ``monitor``.
* ``access pv`` -- current access rights (changes also arrive as event ``access``).
* ``exceptions`` -- install a libca exception handler: each asynchronous error (such as
  a server's error message for a refused plain put) arrives as event ``exception`` with
  its ECA status and context text.
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
import threading
import traceback

import epics  # noqa: F401  (loads libca with this process's environment)
from epics import ca, dbr

_out_lock = threading.Lock()
_chids: dict[str, object] = {}
_keep: list[object] = []  # ctypes callbacks and subscription references must stay alive
FORMS = {"native": (False, False), "time": (True, False), "ctrl": (False, True)}


def emit(obj: dict) -> None:
    """Write one JSON line (from any thread)."""
    text = json.dumps(obj, default=_plain)
    with _out_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _clean(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def channel(pv: str, timeout: float = 5.0):
    chid = _chids.get(pv)
    if chid is None:
        chid = ca.create_channel(pv, connect=False, auto_cb=True)
        _chids[pv] = chid
        if not ca.connect_channel(chid, timeout=timeout):
            raise RuntimeError(f"{pv}: not connected within {timeout} s")

        def on_access(read_access, write_access, **kw):
            emit({"event": "access", "pv": pv, "read": bool(read_access), "write": bool(write_access)})

        _keep.append(on_access)
        ca.replace_access_rights_event(chid, callback=on_access)
    elif not ca.connect_channel(chid, timeout=timeout):
        raise RuntimeError(f"{pv}: not connected within {timeout} s")
    return chid


def op_connect(pv: str) -> dict:
    chid = channel(pv)
    return {
        "type": dbr.Name(ca.field_type(chid)),
        "count": ca.element_count(chid),
        "read": bool(ca.read_access(chid)),
        "write": bool(ca.write_access(chid)),
    }


def op_get(pv: str, form: str = "native", as_string: bool = False, string: bool = False) -> dict:
    """``string``: request DBR_(TIME_)STRING, the server converting (enum states, numbers)."""
    chid = channel(pv)
    use_time, use_ctrl = FORMS[form]
    if string:
        ftype = ca.promote_fieldtype(dbr.STRING, use_time=use_time or use_ctrl)
    else:
        ftype = ca.promote_type(chid, use_time=use_time, use_ctrl=use_ctrl)
    data = ca.get_with_metadata(chid, ftype=ftype, timeout=5.0, as_string=as_string)
    if data is None:
        raise RuntimeError(f"{pv}: get timed out")
    return {k: _clean(v) for k, v in data.items() if k != "chid"}


def op_access(pv: str) -> dict:
    chid = channel(pv)
    return {"read": bool(ca.read_access(chid)), "write": bool(ca.write_access(chid))}


def op_put(pv: str, value) -> dict:
    ca.put(channel(pv), value)
    ca.flush_io()
    return {}


def op_put_wait(pv: str, value) -> dict:
    return {"status": ca.put(channel(pv), value, wait=True, timeout=10.0)}


def op_put_callback(pv: str, value, tag: str) -> dict:
    """ca_put_callback whose callback reports the ECA status libca hands it."""
    chid = channel(pv)
    ftype = ca.field_type(chid)
    count = ca.element_count(chid)
    if isinstance(value, list):
        data = (len(value) * dbr.Map[ftype])()
        data[:] = value
        count = len(value)
    else:
        data = (1 * dbr.Map[ftype])()
        if ftype == dbr.STRING:
            data[0].value = str(value).encode("utf-8")
        else:
            data[0] = value
        count = 1

    def done(args):
        emit({"event": "put_done", "tag": tag, "status": args.status, "message": ca.message(args.status)})

    cb = dbr.make_callback(done, dbr.event_handler_args)
    _keep.extend([cb, data])
    status = ca.libca.ca_array_put_callback(ftype, count, chid, data, cb, None)
    ca.flush_io()
    return {"status": status, "message": ca.message(status)}


def op_monitor(pv: str, mask: int | None = None, form: str = "time", tag: str | None = None) -> dict:
    chid = channel(pv)
    use_time, use_ctrl = FORMS[form]

    def on_update(value=None, **kw):
        emit(
            {
                "event": "monitor",
                "pv": pv,
                "tag": tag or pv,
                "value": _clean(value),
                "severity": kw.get("severity"),
                "status": kw.get("status"),
                "timestamp": kw.get("timestamp"),
            }
        )

    _keep.append(on_update)
    _keep.append(ca.create_subscription(chid, use_time=use_time, use_ctrl=use_ctrl, mask=mask, callback=on_update))
    ca.flush_io()
    return {}


class ExceptionHandlerArgs(ctypes.Structure):
    """libca's ``struct exception_handler_args`` (cadef.h)."""

    _fields_ = [
        ("usr", ctypes.c_void_p),
        ("chid", ctypes.c_void_p),
        ("type", ctypes.c_long),
        ("count", ctypes.c_long),
        ("addr", ctypes.c_void_p),
        ("stat", ctypes.c_long),
        ("op", ctypes.c_long),
        ("ctx", ctypes.c_char_p),
        ("pFile", ctypes.c_char_p),
        ("lineNo", ctypes.c_uint),
    ]


def op_exceptions() -> dict:
    """ca_add_exception_event: report libca's asynchronous errors as events."""

    def handler(args):
        emit(
            {
                "event": "exception",
                "status": args.stat,
                "op": args.op,
                "ctx": (args.ctx or b"").decode("utf-8", "replace"),
            }
        )

    callback = ctypes.CFUNCTYPE(None, ExceptionHandlerArgs)(handler)
    _keep.append(callback)
    ca.libca.ca_add_exception_event(callback, None)
    return {}


OPS = {
    "connect": op_connect,
    "get": op_get,
    "access": op_access,
    "put": op_put,
    "put_wait": op_put_wait,
    "put_callback": op_put_callback,
    "monitor": op_monitor,
    "exceptions": op_exceptions,
}


def main() -> None:
    ca.initialize_libca()
    emit({"event": "ready"})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        rid = request.pop("id")
        op = OPS[request.pop("op")]
        try:
            result = op(**request)
        except Exception as e:  # report to the test, which decides
            emit({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
        else:
            emit({"id": rid, "ok": True, **result})
    ca.finalize_libca()


if __name__ == "__main__":
    main()
