"""`embps bench report results/*.json`: one markdown table of the `embps bench ... --out` results.

    | benchmark | setup | figures | machine |

Each bench's JSON is recognised by its "bench" field (table, train, serve) or, for the files that
carry none, by its shape (ps: "phases"; snapshot: "<target>.<phase>" entries; freshness before it
carried one: "end_to_end_seconds").
Known benches get their headline figures; any other bench gets its numeric fields, flattened. A
file that is none of these (no "bench" field, no known shape) is refused, naming it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

_GENERIC_FIELDS = 8  # numeric fields listed for a bench without its own renderer


def _m(value: float) -> str:
    """A rate in millions, or thousands below a million."""
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} k"


def kind_of(result: dict) -> str:
    """The bench that wrote result: its "bench" field, else guessed from its fields."""
    if isinstance(result.get("bench"), str):
        return result["bench"]
    if "phases" in result:
        return "ps"
    if any(isinstance(k, str) and k.endswith(".full_write") for k in result):
        return "snapshot"
    if "end_to_end_seconds" in result:
        return "freshness"
    return "unknown"


def _table(r: dict) -> tuple[str, str]:
    c = r["config"]
    setup = f"{c['rows']:,} rows x {c['dim']}, batch {c['batch']}, 1 thread"
    figures = (
        f"hash find {_m(r['hash_find_keys_per_s'])} keys/s; lookup {_m(r['uniform']['lookup_rows_per_s'])} rows/s "
        f"uniform, {_m(r['zipf']['lookup_rows_per_s'])} rows/s Zipf; row-wise Adagrad "
        f"{_m(r['uniform']['rowwise_adagrad_rows_per_s'])} rows/s uniform, "
        f"{_m(r['zipf']['rowwise_adagrad_rows_per_s'])} rows/s Zipf"
    )
    g = r.get("growth")
    if g:
        last = max((k for k in g["fill"] if k.startswith("to_")), key=lambda k: int(k[3:]))
        fill = g["fill"][last]
        readers = g["reader_under_grower"]
        figures += (
            f"; filling {int(last[3:]):,} keys: slowest call {fill['sub_maps']['max_over_median']:.1f}x the median "
            f"(single-array map {fill['flat']['max_over_median']:.1f}x); reader max beside a grower: "
            + ", ".join(f"{name.replace('_', ' ')} {v['reader']['max_s'] * 1e3:.1f} ms" for name, v in readers.items())
        )
    e = r.get("eviction")
    if e:
        full = [f"full LRU at {int(k):,} rows {v['full_ms_per_push']:.3f} ms ({v['full_vs_unbounded']:.2f}x)"
                for k, v in e.items() if isinstance(v, dict) and k != "ttl"]
        if "ttl" in e:
            t = e["ttl"]
            full.append(f"a TTL on {t['rows']:,} rows {t['ttl_ms_per_push']:.3f} ms ({t['ttl_vs_no_ttl']:.2f}x)")
        figures += f"; a {e['batch']}-key push (rate vs the table unbounded): " + ", ".join(full)
    return setup, figures


def _ps(r: dict) -> tuple[str, str]:
    c = r["config"]
    setup = f"{c['shards']} shards, batch {c['batch']}, Zipf {c['zipf']}, dim {c['dim']}"
    if c.get("tables", 1) > 1:
        setup += f", {c['tables']} tables per call (LookupMulti / PushMulti)"
    parts = []
    for verb in ("lookup", "push"):
        phases = [p for p in r["phases"] if p["verb"] == verb and not p.get("standby")]
        if phases:
            best = max(phases, key=lambda p: p["keys_per_s"])
            parts.append(
                f"{verb} {_m(best['keys_per_s'])} keys/s ({best['clients']} clients, p50 {best['p50_ms']:.1f} ms, "
                f"p99 {best['p99_ms']:.1f} ms)"
            )
    if "in_process" in r:
        parts.append(f"in-process lookup {_m(r['in_process']['lookup_keys_per_s'])} keys/s")
    pushes = [x for x in r.get("standby_ratios", []) if x["verb"] == "push"]
    if pushes:
        parts.append("push with standbys " + ", ".join(f"{x['ratio']:.2f}x ({x['clients']} clients)" for x in pushes))
    return setup, "; ".join(parts)


def _train(r: dict) -> tuple[str, str]:
    c = r["config"]
    layout = "one shared table" if c.get("shared_table") else f"{c['num_tables']} tables"
    setup = f"dim {c['dim']}, {layout}, global batch {c['batch']}, {c['workers']} workers + {c['shards']} shards"
    base = r["in_process"]["samples_per_s"]
    parts = [f"in-process {base:,.0f} samples/s"]
    for name in ("ps_sync", "ps_async"):
        if name in r:
            rate = r[name]["samples_per_s"]
            parts.append(f"{name.replace('_', ' ')} {rate:,.0f} samples/s ({rate / base:.2f}x)")
    if "ps_sync_standby" in r:
        ratio = r["ps_sync_standby"]["samples_per_s"] / r["ps_sync"]["samples_per_s"]
        parts.append(f"ps sync with standbys {ratio:.2f}x of without")
    if "torchrec" in r:
        peer = r["torchrec"]["samples_per_s"]
        parts.append(
            f"TorchRec {peer:,.0f} samples/s (embps / TorchRec: sync "
            f"{r['ps_sync']['samples_per_s'] / peer:.2f}x, async {r['ps_async']['samples_per_s'] / peer:.2f}x)"
        )
    rounds = {pair: ratios for pair, ratios in r.get("round_ratios", {}).items() if len(ratios) > 1}
    if rounds:
        medians = ", ".join(f"{pair.replace('/', ' / ')} {statistics.median(v):.2f}x" for pair, v in rounds.items())
        parts.append(f"medians of {len(next(iter(rounds.values())))} rounds' ratios: {medians}")
    return setup, "; ".join(parts)


def _snapshot(r: dict) -> tuple[str, str]:
    c = r["config"]
    setup = f"{c['rows']:,} rows x {c['dim']}, incremental {c['touched']:.0%} of rows"
    parts = []
    for target in c.get("targets", ("local", "s3")):
        if f"{target}.full_write" in r:
            parts.append(
                f"{target}: full write {r[f'{target}.full_write']['mb_per_s']:.0f} MB/s, full read "
                f"{r[f'{target}.full_read']['mb_per_s']:.0f} MB/s, incremental write "
                f"{r[f'{target}.incremental_write']['seconds']:.2f} s"
                + (
                    f", staged full write {r[f'{target}.full_staged_write']['seconds']:.2f} s of which pushes "
                    f"wait {r[f'{target}.full_staged_held']['seconds']:.2f} s"
                    if f"{target}.full_staged_write" in r else ""
                )
            )
    return setup, "; ".join(parts)


def _freshness(r: dict) -> tuple[str, str]:
    c = r["config"]
    if "end_to_end_seconds" in r:  # a result of the bench before it had 2 shards and 2 replicas
        setup = f"{c['rate']:,} rows/s pushed in batches of {c['batch']}, dim {c['dim']}, 1 shard + 1 replica"
        e = r["end_to_end_seconds"]
        return setup, (
            f"push acknowledged -> visible in the replica: p50 {e['p50'] * 1e3:.1f} ms, p99 {e['p99'] * 1e3:.1f} ms, "
            f"max {e['max'] * 1e3:.1f} ms ({e['measured_pushes']:,} pushes)"
        )
    setup = (
        f"{c['rate']:,} rows/s pushed in steps of {c['batch']}, dim {c['dim']}, {c['shards']} shards, "
        "replicas at `latest` and `step`"
    )
    cut, shard = r["consistent_cut_ack_to_visible_seconds"], r["per_shard_ack_to_visible_seconds"]
    commit = r["cut_commit_to_visible_histogram_seconds"]
    figures = (
        f"push acknowledged -> visible in the consistent cut: p50 {cut['p50'] * 1e3:.1f} ms, p99 "
        f"{cut['p99'] * 1e3:.1f} ms; commit -> visible p50 {commit['p50'] * 1e3:.1f} ms, p99 "
        f"{commit['p99'] * 1e3:.1f} ms; per shard on the `latest` replica, polled: p50 {shard['p50'] * 1e3:.1f} ms, "
        f"p99 {shard['p99'] * 1e3:.1f} ms ({r['pushes']:,} pushes)"
    )
    return setup, figures


def _serve(r: dict) -> tuple[str, str]:
    c = r["config"]
    keys = "uniform" if c["zipf"] == 0 else f"Zipf {c['zipf']:g}"
    objective = f"p99 <= {c['slo_ms']:g} ms" if c.get("rate") is None else f"{c['rate']:g} req/s offered"
    setup = f"{c['rows']:,} rows x {c['dim']}, batch {c['batch']}, {keys}, {objective}"
    parts = []
    for name, s in r["systems"].items():
        if s.get("status") != "ok":
            parts.append(f"{name}: skipped")
            continue
        p99 = s.get("p99_ms_at_slo")
        parts.append(
            f"{name} {s['max_qps_at_slo']:,.0f} req/s = {_m(s['keys_per_s_at_slo'])} keys/s"
            + (f" (p99 {p99:.1f} ms)" if p99 is not None else "")
        )
    ratio = r.get("ratios", {}).get("embps", {}).get("redis")
    if ratio is not None:
        parts.append(f"embps / Redis = {ratio:.2f}x")
    return setup, "; ".join(parts)


def _serve_overload(r: dict) -> tuple[str, str]:
    c = r["config"]
    setup = (
        f"{c['rows']:,} rows x {c['dim']}, batch {c['batch']}, {c['factor']:g}x capacity "
        f"({r['capacity_qps']:,.0f} req/s) offered open-loop"
    )
    if r.get("gate"):
        setup += "; behind the serving gate"
    elif r.get("core_refusal"):
        setup += f"; without the serving gate, gRPC's core refuses with {r['core_refusal']}"
    parts = []
    for name in ("bounded", "unbounded"):
        s = r[name]
        shed = f", shed p99 {s['shed_p99_ms']:.1f} ms" if s.get("shed_p99_ms") is not None else ""
        parts.append(
            f"max_queue {s['max_queue']}: answered {s['answered_qps']:,.0f} req/s, shed {s['shed_fraction']:.0%}, "
            f"answered p50 {s['answered_p50_ms']:.1f} ms p99 {s['answered_p99_ms']:.1f} ms{shed}"
            + (f", replica {s['replica_cores']:.2f} cores" if s.get("replica_cores") is not None else "")
        )
    return setup, "; ".join(parts)


def _soak(r: dict) -> tuple[str, str]:
    c = r["config"]
    setup = (
        f"1 shard, capacity {c['capacity']:,}, {c['hot']} hot + {c['fresh']} fresh keys a push, dim {c['dim']}, "
        f"LRU + count admission (max_pending {c['max_pending']:,}) + TTL {c['ttl_steps']}"
    )
    parts = [
        f"snapshots {name}: {p['pushes']} pushes, last/first tenth: shard CPU per push x{p['cpu_ratio']:.2f}, "
        f"wall x{p['wall_ratio']:.2f}, RSS x{p['rss_ratio']:.3f}"
        for name, p in r["phases"].items()
    ]
    return setup, "; ".join(parts)


def _numeric_fields(value: object, prefix: str = "") -> Iterable[tuple[str, float]]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in ("config", "machine", "bench"):
                yield from _numeric_fields(v, f"{prefix}{k}.")
    elif isinstance(value, list):  # a bench's rows (bench cut's "results": figures were left out)
        for i, v in enumerate(value):
            yield from _numeric_fields(v, f"{prefix}{i}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        yield prefix[:-1], float(value)


def _generic(r: dict) -> tuple[str, str]:
    c = r.get("config", {})
    setup = ", ".join(f"{k} {v}" for k, v in c.items() if isinstance(v, (int, float, str)) and k != "out")
    fields = list(_numeric_fields(r))
    shown = [f"{name} {value:,.4g}" for name, value in fields[:_GENERIC_FIELDS]]
    if len(fields) > _GENERIC_FIELDS:
        shown.append(f"... {len(fields) - _GENERIC_FIELDS} more fields")
    return setup, "; ".join(shown)


RENDERERS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "table": _table, "ps": _ps, "train": _train, "snapshot": _snapshot, "freshness": _freshness, "serve": _serve,
    "serve_overload": _serve_overload, "soak": _soak,
}
ORDER = ("table", "ps", "train", "snapshot", "freshness", "serve", "serve_overload", "soak")


def _machine(r: dict) -> str:
    m = r.get("machine") or {}
    memory = m.get("memory_bytes")
    gib = f", {memory / 2**30:.0f} GiB" if memory else ""
    return f"{m.get('cpu_count', '?')} cores{gib}, Python {m.get('python', '?')}"


def render(results: list[tuple[str, dict]]) -> str:
    """Markdown: one row per result file, in ORDER of benches (unknown ones last)."""
    rows = []
    for path, r in results:
        kind = kind_of(r)
        if kind == "unknown":
            raise ValueError(
                f"{path}: not an `embps bench ... --out` result: it has no \"bench\" field, nor the fields of a ps "
                "(\"phases\"), snapshot (\"<target>.full_write\") or freshness (\"end_to_end_seconds\") result"
            )
        try:
            setup, figures = RENDERERS.get(kind, _generic)(r)
        except KeyError as exc:
            raise ValueError(f"{path}: not a complete `embps bench {kind}` result (missing {exc})") from None
        except (TypeError, AttributeError, IndexError, ValueError) as exc:
            shape = f"a field of the wrong shape: {exc}"
            raise ValueError(f"{path}: not an `embps bench {kind}` result ({shape})") from None
        rank = ORDER.index(kind) if kind in ORDER else len(ORDER)
        rows.append((rank, path, f"| `embps bench {kind}` | {setup} | {figures} | {_machine(r)} |"))
    rows.sort(key=lambda row: (row[0], row[1]))
    lines = ["| benchmark | setup | figures | machine |", "|---|---|---|---|"]
    return "\n".join(lines + [row[2] for row in rows]) + "\n"


def run_report(paths: list[str], out: str | None = None) -> int:
    """Prints (or writes to `out`) the table of the result files at `paths`; ValueError names a
    file that is not a bench result, OSError one that cannot be read (exit 2 either way, embps.cli)."""
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not JSON: not UTF-8 text") from None
        except RecursionError:
            raise ValueError(f"{path}: not JSON: nested too deeply") from None
        if not isinstance(data, dict):
            shown = json.dumps(data)
            raise ValueError(
                f"{path}: not an `embps bench ... --out` result: expected a JSON object {{...}}, got {shown[:60]}"
                + ("..." if len(shown) > 60 else "")
            )
        results.append((path, data))
    text = render(results)
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    else:
        print(text, end="")
    return 0
