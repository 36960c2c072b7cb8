"""The human summary: report.md and the short table printed at the end of a run."""

from __future__ import annotations

from prunelab.report import runtimes
from prunelab.report.stats import speed_text


def _acc(a: dict | None) -> str:
    if not a:
        return "-"
    return f"{a['value']:.2f}% [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] (n={a['n']})"


def _ms(lat: dict | None, key: str) -> str:
    return f"{lat[key]:.2f}" if lat and key in lat else "-"


def _int(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "-"


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    d, p = report["dense"], report.get("pruned") or {}
    dl, pl = d.get("latency_ms"), p.get("latency_ms")
    rows = [
        ("ratio", "0", (f"{p['ratio']:.2f}" + (f" asked, {p['ratio_reached']:.3f} reached"
                                                if p.get("ratio_reached") is not None else "")) if p else "-"),
        ("val acc", _acc(d.get("val_acc")), _acc(p.get("val_acc"))),
        ("test acc", _acc(d.get("test_acc")), _acc(p.get("test_acc"))),
        ("nonzero weights", _int(d.get("nonzero")), _int(p.get("nonzero"))),
        ("params", _int(d.get("params")), _int(p.get("params", d.get("params")))),
        ("p50 ms", _ms(dl, "p50"), _ms(pl, "p50")),
        ("p90 ms", _ms(dl, "p90"), _ms(pl, "p90")),
        ("p99 ms", _ms(dl, "p99"), _ms(pl, "p99")),
    ]
    sp = p.get("speedup")
    if isinstance(sp, dict):  # only where the method can run faster here (never for unstructured zeros)
        rows.append(("speed vs dense (p50)", "1.00x", speed_text(sp["value"], sp["paired_5_95"])))
    return rows


def _ratio(r: float) -> str:
    """A ratio to two decimals, or three where two would hide a finer grid step."""
    return f"{r:.2f}" if round(r, 2) == r else f"{r:.3f}"


def _speed(c: dict) -> str:
    """A candidate's one speedup, where it was measured for the record."""
    return speed_text(c["speedup"], c["speedup_paired_5_95"]) if c.get("speedup_paired_5_95") else "-"


def table(headers: list[str], rows: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [fmt.format(*headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(out)


def summary_table(report: dict) -> str:
    return table(["", "dense", "pruned"], summary_rows(report))


def _paired(c: dict) -> str:
    pd = c.get("paired")
    return f"{pd['drop']:+.2f} [{pd['ci'][0]:+.2f}, {pd['ci'][1]:+.2f}]" if pd else "-"


def across_section(s: dict) -> list[str]:
    """A search across methods: every candidate, the Pareto front, and the choice."""
    chosen = s.get("chosen")
    conf = s.get("confidence")
    rule = (f"its paired drop's {conf:.0%} upper bound within the tolerance" if conf else
            "its validation accuracy within the tolerance (point rule)")
    speed = f" ({_speed(chosen)}, measured in the {chosen['speedup_measured_in']})" \
        if chosen and chosen.get("speedup_paired_5_95") else ""
    lines = ["## Search across methods", "",
             f"Objective `{s['objective']}` over {', '.join(s['methods'])}; a candidate passes with {rule} "
             f"({s['tolerance']} points below dense val {s['dense_val_acc']:.2f}%). "
             + (f"Chosen: **{chosen['method']} at {chosen['ratio']:.2f}**{speed}." if chosen else
                "Nothing passed: the dense model stands."), ""]
    if chosen and chosen.get("paired"):
        lo, hi = chosen["paired"]["ci"]
        if lo <= 0.0 <= hi:
            lines += [f"The chosen model's drop is indistinguishable from zero on these images "
                      f"(95% paired interval {lo:+.2f} to {hi:+.2f} points).", ""]
    for method, why in (s.get("skipped_methods") or {}).items():
        lines += [f"- `{method}` not walked: {why} (`search.walk_all=true` walks it).", ""]
    headers = ["method", "ratio", "val acc %", "drop vs dense (paired 95%)", "screening p50 ms",
               "screening dense/model", "speedup (paired 5-95%)", "MACs", "nonzero params", "bytes", "verdict", "front"]
    rows = [(c["method"], _ratio(c["ratio"]), ("≤ " if c["acc_is_bound"] else "") + f"{c['val_acc']:.2f}"
             + (f" ({c['val_acc_before_recovery']:.2f} before recovery)" if "val_acc_before_recovery" in c else ""),
             _paired(c), f"{c['p50_ms']:.2f}" if c.get("p50_ms") is not None else "-",
             (f"{c['screening_ratio']:.2f}" if c.get("screening_ratio") else "-")
             + (f" (= {c['same_as']['method']} {_ratio(c['same_as']['ratio'])})" if c.get("same_as") else ""),
             _speed(c), _int(c.get("macs")), _int(c.get("params")),
             _int(c.get("bytes")), "pass" if c["passed"] else "fail", "*" if c.get("on_pareto_front") else "")
            for c in s["candidates"]]
    lines += ["Screening: each passing candidate timed in its own short session in turns with the dense model; "
              "it ranks candidates and is not a speedup. A speedup is quoted only where a model was measured "
              "for the record (the final round, or the final timing of the chosen model). "
              "\"(= method ratio)\": the same network as that candidate, not timed again.", "",
              table(headers, rows), ""]
    final = s.get("final_round")
    if final:
        lines += _final_round(final)
    if s.get("pareto"):
        lines += ["Pareto front (validation accuracy against p50 latency; no other candidate is both more "
                  "accurate and faster at screening): " + ", ".join(
                      f"{c['method']} {c['ratio']:.2f} ({c['val_acc']:.2f}%, screening p50 {c['p50_ms']:.2f} ms)"
                      for c in s["pareto"]), ""]
    return lines


def _final_round(f: dict) -> list[str]:
    """The shortlist timed together in one session, and whether that changed the answer."""
    rows = [(c["method"], f"{c['ratio']:.2f}", f"{c['p50_ms']:.2f}", speed_text(c["speedup"], c["paired_ratio_5_95"]),
             "yes" if c["speedup_beyond_noise"] else "no") for c in f["shortlist"]]
    before, chosen = f.get("before"), f.get("chosen")
    if chosen is None and before is None:
        verdict = "nothing was faster than the dense model beyond the noise: the dense model stands"
    elif f["changed_choice"]:
        verdict = ("it changed the answer from " + (f"{before['method']} {before['ratio']:.2f}" if before else
                                                     "the dense model")
                   + " to " + (f"{chosen['method']} {chosen['ratio']:.2f}" if chosen else "the dense model"))
    else:
        verdict = "it confirmed the answer"
    tied = f.get("within_noise_of_fastest") or []
    if tied and chosen and f.get("fastest") != chosen:
        verdict += (f" ({chosen['method']} {chosen['ratio']:.2f} is within this timing's noise of the fastest, "
                    f"{f['fastest']['method']} {f['fastest']['ratio']:.2f}, and more accurate)")
    return [f"Final round: the {len(rows)} candidates with the best screening ratio, timed together in turns "
            f"with the dense model (p50 {f['dense_p50_ms']:.2f} ms) at batch {f['batch_size']}, {f['iters']} "
            f"iterations; {verdict}.", "",
            table(["method", "ratio", "p50 ms", "speedup (paired 5-95%)", "beyond noise"], rows), ""]


def _spread(cv: dict | None) -> str:
    if not cv:
        return ""
    return "; timing spread (coefficient of variation) " + ", ".join(f"{t} {v:.1%}" for t, v in cv.items())


def files_section(files: dict, p: dict) -> list[str]:
    """Bytes on disk (as saved, and sparse weights stored compactly), MACs and channels removed."""
    if not files:
        return []
    lines = ["## Size and deployment", ""]
    rows = [("bytes on disk", _int(files.get("dense_bytes")), _int(files.get("pruned_bytes")))]
    if "pruned_compressed_bytes" in files:
        rows.append(("bytes, sparse weights stored compactly", "-", _int(files["pruned_compressed_bytes"])))
    if "macs" in p:
        rows.append(("MACs per image", _int(p.get("dense_macs")), _int(p.get("macs"))))
    if p.get("channels_removed") is not None:
        rows.append(("share of channels removed (hidden units too, with prune.linears)", "0", f"{p['channels_removed']:.3f}"))
    lines += [table(["", "dense", "pruned"], rows), ""]
    return lines


def search_section(s: dict) -> list[str]:
    """One method's ratio search: the rules' answers and the curve, a row per candidate."""
    highest = s.get("best_ratio_highest")
    highest = (f"gives {highest:.2f}" if highest is not None else
               "is not known (each phase stopped at its first failure; `search.full_curve=true` evaluates it)")
    lines = [
        "## Search",
        "",
        f"Tolerance {s['tolerance']} points below dense val {s['dense_val_acc']:.2f}% "
        f"(threshold {s['threshold']:.2f}%). Rule `{s['rule']}` chose **{s['best_ratio']:.2f}**; "
        f"`contiguous` gives {s['best_ratio_contiguous']:.2f}, `highest` (the notebook's rule) {highest}.",
        "",
    ]
    recovered = any("recovered_val_acc" in c for c in s["curve"])
    headers = ["ratio", "val acc %"] + (["after recovery %"] if recovered else []) + ["images used", "nonzero"]
    channel = any("macs" in c for c in s["curve"])
    headers += (["channels removed", "params", "MACs"] if channel else []) + ["verdict"]
    rows = []
    for c in s["curve"]:
        row = [f"{c['ratio']:.2f}", ("≤ " if c["acc_is_bound"] else "") + f"{c['val_acc']:.2f}"]
        row += [f"{c['recovered_val_acc']:.2f}"] if recovered else []
        row += [f"{c['seen']}/{c['total']}", _int(c.get("nonzero"))]
        removed = c.get("channels_removed")
        row += [f"{removed:.3f}" if removed is not None else "-", _int(c.get("params")), _int(c.get("macs"))] \
            if channel else []
        rows.append(tuple(row + ["pass" if c["passed"] else "fail"]))
    lines += [table(headers, rows), ""]
    return lines


def render(report: dict, plots: dict[str, str]) -> str:
    p = report.get("pruned") or {}
    lines = [
        "# prunelab report",
        "",
        f"Device: {report['device']['name']} · method: "
        f"{p.get('method', '-') if p.get('ratio', 1) else 'none (nothing within the tolerance: the dense model stands)'}"
        f" · scope: {p.get('scope', '-')}"
        f" · fine-tune: {'reused ' + report['finetune']['source'] if report['finetune']['reused'] else 'trained in this run'}",
        "",
        summary_table(report),
        "",
    ]
    rt = (report.get("latency") or {}).get("runtime")
    if rt:
        extras = "".join(text for key, text in (("graph", ", CUDA graph"), ("fused_conv_relu", ", conv+ReLU fused"))
                         if rt.get(key))
        lines += [f"Latency: `{rt['runtime']}` runtime, {rt.get('dtype')}, {rt.get('layout')}{extras}, batch "
                  f"{report['latency']['batch_size']} (also {', '.join(map(str, rt.get('batch_sizes', [])))}), on "
                  f"{rt.get('hardware') or rt.get('device')}; "
                  + ("dense and pruned timed in turns" if p.get("latency_ms") else "the dense model timed alone")
                  + (f" (batch {report['latency']['batch_size']}: the search's final round)"
                     if report["latency"].get("measured_in") == "final round of the search" else "")
                  + _spread(report["latency"].get("cv")) + ".", ""]
        agreed = report["latency"].get("agreement") or {}
        if agreed:
            lines += ["Deploy forms' top-1 answers against the eager fp32 model: " + ", ".join(
                f"{tag} {a['agree']}/{a['images']} ({a['flips_beyond_rounding']} beyond rounding)"
                for tag, a in agreed.items()) + ".", ""]
    lines += runtimes.choice_section(report) + runtimes.shipped_section(report)
    if report.get("notes"):
        lines += [f"- {n}" for n in report["notes"]] + [""]
    s = report.get("search")
    if s and "candidates" in s:
        lines += across_section(s)
    elif s:
        lines += search_section(s)
    sched = report.get("schedule")
    if sched:
        lines += ["## Iterative schedule", "", table(["ratio", "after pruning %", "after recovery %"],
                  [(f"{c['ratio']:.2f}", f"{c['val_acc']:.2f}", f"{c['recovered_val_acc']:.2f}") for c in sched]), ""]
    lines += files_section(report.get("files") or {}, p)
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    t = report.get("timing_s", {})
    lines += ["## Time", "", ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if v is not None), ""]
    return "\n".join(lines)
