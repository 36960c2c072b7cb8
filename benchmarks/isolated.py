"""One measurement in a freshly spawned interpreter (``run_child``), and what a process can say of
its own memory and CPU time: each procedure's peak is its own, and no allocator, thread pool or
autocast state leaks from one measurement into the next."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import resource
import sys
import time
import traceback

import torch


def _rss_now() -> int:
    """Resident bytes of this process now (Linux /proc; else the high-water mark)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _rss_peak()


def _rss_peak() -> int:
    """The process's lifetime peak RSS, ``ru_maxrss`` in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def start_peak_window() -> tuple[int, bool]:
    """The RSS now (the baseline), and whether the peak since now can be read on its own: on
    Linux, writing 5 to clear_refs resets the high-water mark (VmHWM) to the current RSS, so the
    data loading before the baseline cannot count as the search's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False
    return _rss_now(), reset


def peak_since(baseline: int, reset: bool) -> dict:
    """Absolute ``ru_maxrss``, and the peak above ``baseline`` (from VmHWM when it was reset)."""
    absolute = _rss_peak()
    hwm = _status_bytes("VmHWM") if reset else None
    peak = hwm if hwm is not None else absolute
    return {"search_peak_rss": absolute, "search_rss_baseline": baseline,
            "search_peak_rss_above_baseline": max(0, peak - baseline),
            "search_peak_rss_above_baseline_source": "VmHWM reset at the baseline" if hwm is not None
            else "ru_maxrss (lifetime peak; may overstate)"}



def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its reaped children (loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _child_entry(conn, target: str, spec: dict) -> None:
    try:
        # A spawned child inherits "spawn" as its default start method, so its DataLoader workers
        # would re-import this module at every loader iteration. Give it the platform's default
        # (fork on Linux, as the notebook's kernel had) so loaders behave as they do in a script.
        if sys.platform.startswith("linux"):
            mp.set_start_method("fork", force=True)
        torch.set_num_threads(spec["threads"])
        load = os.getloadavg()[0]
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(spec)
        result["process_peak_rss"] = _rss_peak()
        result["process_cpu_s"] = cpu_seconds()
        result["loadavg_1min"] = [load, os.getloadavg()[0]]
        conn.send({"ok": True, "result": result})
    except BaseException:
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


def run_child(target: str, spec: dict) -> dict:
    """Run ``module:function(spec)`` in a freshly spawned interpreter and return its dict."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_entry, args=(send, target, spec), daemon=False)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    try:
        msg = recv.recv()
    except EOFError:
        msg = {"ok": False, "error": "the child process died without a result"}
    proc.join()
    if not msg["ok"]:
        raise RuntimeError(f"{target} failed (exit code {proc.exitcode}):\n{msg['error']}")
    result = msg["result"]
    result["child_wall_s"] = time.perf_counter() - t0
    print(f"  {target.split(':')[1]}: {result['child_wall_s']:.1f} s", flush=True)
    return result

