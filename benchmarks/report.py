"""The benchmark report: tables per suite, a summary against the targets, JSON, a PNG chart and a markdown page.

Input is a raw results folder written by the runner (``python -m benchmarks``):
``<contender>.json`` (pytest-benchmark's ``--benchmark-json``),
``<contender>.info.json`` (versions, thread pools, skips, checks),
``probes.json`` (memory and first-call probes), ``meta.json``, and the idle runs' ``<tag>.json``
(``nbconv.idle``, ``nbconv.idle.t1``, ...: each case once per idle gap, listed in ``meta["idle"]``).

Regenerate a report from such a folder with ``python -m benchmarks.report [--min] <folder>`` (``--min``: the
fastest round instead of the median, for a shared, noisy machine).  Both the runner and this command also write
the markdown page ``docs/benchmarks.md`` (environment, targets, summary, chart and tables; ``--markdown PATH`` or
``none`` to change that), which the README links to instead of quoting a run.

Definitions used throughout:

* time = pytest-benchmark's median of one call, in ms;
* speedup over a peer = t(peer) / t(nbconv) (> 1: nbconv is faster);
* targets (:data:`TARGETS`, one table) are stated in the direction the summary prints them
  (e.g. t(nbconv)/t(best peer) <= 1, t(Keras's op)/t(nbconv) >= 20);
* GFLOP/s = 2 * (depthwise MACs + pointwise MACs) / t(nbconv) (3x the forward for forward+backward);
* % of peak = nbconv's GFLOP/s / the sgemm GFLOP/s of NumPy's 4096x4096 float32 matmul measured in
  the same run, in its own process.
"""
import argparse
import json
import math
import os
import sys
from typing import NamedTuple

from . import ROOT
from . import cases as _cases
from .contenders import CONTENDERS, MODEL_BACKENDS, PEERS, SUITE_ROLES

__all__ = ["Target", "TARGETS", "MARKDOWN_PAGE", "build", "format_text", "format_markdown", "text_table", "format_ms",
           "plot", "save", "main"]

#: the page a finished run writes, linked from the README
MARKDOWN_PAGE = os.path.join(ROOT, "docs", "benchmarks.md")


class Target(NamedTuple):
    """A goal a run is checked against: the measured figure must be ``direction`` (``"<="`` or ``">="``)
    ``value``; ``unit`` is how the summary prints the value ("x" for a speedup, "%", " us")."""

    value: float
    direction: str
    description: str
    unit: str = ""

    def met(self, measured):
        """Whether ``measured`` meets the target."""
        return measured <= self.value if self.direction == "<=" else measured >= self.value

    def __str__(self):
        return f"target {self.direction} {self.value:g}{self.unit}"


#: every target of the summary, by name (the summary lines and the markdown page's table read them here)
TARGETS = {
    "separable_vs_best_peer": Target(
        1.0, "<=", "MobileNetV1 + Xception layers: geomean t(nbconv)/t(best peer)"),
    "separable_vs_best_peer_worst": Target(
        1.3, "<=", "MobileNetV1 + Xception layers: t(nbconv)/t(best peer) of the worst shape"),
    "hard_cases_speedup": Target(
        1.5, ">=", "cases peers handle poorly (dilation, depth multiplier, 5x5 and 7x7, NCHW, large activations): "
                   "geomean t(best peer)/t(nbconv)", "x"),
    "pct_of_sgemm_peak": Target(
        85, ">=", "MobileNetV1 + Xception layers with a pointwise part of C*dm >= 256: nbconv's lowest GFLOP/s, "
                  "in % of the run's sgemm peak", "%"),
    "keras_op_speedup": Target(
        20, ">=", "separable shapes: geomean t(Keras's op)/t(nbconv), Keras on jax", "x"),
    "channels_first_cost": Target(
        1.2, "<=", "nbconv: t(channels_first)/t(channels_last) of the same shape, worst pair"),
    "call_overhead_us": Target(
        20, "<=", "nbconv: a whole call on a 1x4x4x8->8 shape, in microseconds", " us"),
    "backward_vs_torch": Target(
        1.0, "<=", "forward + backward at batch 8: geomean t(nbconv)/t(torch channels_last)"),
    "backward_vs_keras": Target(
        10, ">=", "forward + backward at batch 8: geomean t(jax.grad of Keras's op)/t(nbconv)", "x"),
    "keras_model_jax": Target(
        10, ">=", "Keras model of MobileNetV1's 13 blocks (+ BatchNorm + ReLU) on jax: t(Keras's layers)/t(nbconv's "
                  "layers), lowest of predict b1, predict b8 and the b8 training step", "x"),
    "keras_model_tensorflow": Target(
        2.0, ">=", "the same Keras model on tensorflow: t(Keras's layers)/t(nbconv's layers), lowest", "x"),
    "keras_model_torch": Target(
        1.3, ">=", "the same Keras model on torch: t(Keras's layers)/t(nbconv's layers), lowest", "x"),
    "keras_bridge": Target(
        1.15, "<=", "the bridge, per backend: t(the bare layers' predict at batch 8)/t(the same 13 calls made "
                    "directly)", "x"),
    "models_xception_jax": Target(
        3.0, ">=", "keras.applications Xception on jax: t(original)/t(keras_layers.convert(model)) in predict, "
                   "lowest of b1 224x224, b2 and b8 96x96", "x"),
    "models_mobilenets_jax": Target(
        2.0, ">=", "keras.applications MobileNet and MobileNetV2 on jax: t(original)/t(converted) in predict, "
                   "lowest", "x"),
    "models_tensorflow": Target(
        1.0, ">=", "keras.applications Xception, MobileNet, MobileNetV2 on tensorflow: t(original)/t(converted) in "
                   "predict, lowest of every model and batch (never slower)", "x"),
    "models_tensorflow_folded": Target(
        1.3, ">=", "the same, t(original)/t(convert(model, fold_batchnorm=True)), lowest", "x"),
    "models_tensorflow_fit": Target(
        1.0, ">=", "the same, a training step (train_on_batch): t(original)/t(converted), lowest (never slower)",
        "x"),
    "models_torch": Target(
        1.0, ">=", "keras.applications Xception, MobileNet, MobileNetV2 on torch: t(original)/t(converted) in "
                   "predict, lowest of every model and batch (never slower)", "x"),
    "models_torch_folded": Target(
        1.3, ">=", "the same, t(original)/t(convert(model, fold_batchnorm=True)), lowest", "x"),
    "models_torch_fit": Target(
        1.0, ">=", "the same, a training step (train_on_batch): t(original)/t(converted), lowest (never slower)",
        "x"),
    "idle_vs_best_peer": Target(
        1.0, "<=", "MobileNetV1 + Xception with 5 or 20 ms idle before each call: geomean t(nbconv)/t(best of "
                   "torch, ONNX Runtime)"),
    "idle_vs_best_peer_worst": Target(
        1.3, "<=", "the same, worst shape"),
    "idle_thread_speedup": Target(
        1.5, ">=", "per idle gap: t(nbconv, 1 thread)/t(nbconv, 2 threads), lowest over the shapes of 50 M MAC or "
                   "more"),
    "bf16_vs_float32": Target(
        1.7, ">=", "bfloat16 MobileNetV1 + Xception layers of 256+ channels: t(nbconv float32)/t(nbconv bfloat16), "
                   "lowest", "x"),
    "bf16_vs_torch": Target(
        1.4, ">=", "bfloat16 MobileNetV1 + Xception layers: geomean t(torch bfloat16, better layout)/t(nbconv)", "x"),
    "bf16_vs_torch_worst": Target(
        1.0, ">=", "the same, worst shape (never slower)", "x"),
    "bf16_backward_vs_torch": Target(
        1.3, ">=", "bfloat16 forward + backward at batch 8: geomean t(torch bfloat16, better layout)/t(nbconv)", "x"),
    "bf16_keras_model": Target(
        1.5, ">=", "Keras model of MobileNetV1's 13 blocks under mixed_bfloat16 on jax: t(nbconv's layers in "
                   "float32)/t(nbconv's layers in mixed_bfloat16), lowest", "x"),
    "first_call_s": Target(
        5, "<=", "fresh install, empty kernel cache, new process: import nbconv + the first separable_conv2d, in "
                 "seconds"),
    "other_first_call_s": Target(
        3, "<=", "the same process: the slowest first call of each other function and variant, in seconds"),
    "first_predict_ratio": Target(
        1.5, "<=", "first predict of a converted MobileNet (96x96, batch 2) on an empty kernel cache, against "
                   "Keras's own layers, per backend", "x"),
}
#: the models suite's targets: name -> (backend, speedup ("converted", "folded" or "fit"), models or None for all)
MODEL_TARGETS = {
    "models_xception_jax": ("jax", "converted", ("xception",)),
    "models_mobilenets_jax": ("jax", "converted", ("mobilenet", "mobilenetv2")),
    "models_tensorflow": ("tensorflow", "converted", None),
    "models_tensorflow_folded": ("tensorflow", "folded", None),
    "models_tensorflow_fit": ("tensorflow", "fit", None),
    "models_torch": ("torch", "converted", None),
    "models_torch_folded": ("torch", "folded", None),
    "models_torch_fit": ("torch", "fit", None),
}
#: suites of the MobileNetV1 + Xception targets
TARGET_SUITES = ("mobilenet", "xception")
#: shapes of at least this many multiply-adds count for ``idle_thread_speedup``
IDLE_THREAD_MIN_MACS = 50e6

#: contenders that are not peers but get a column, per suite
EXTRA_COLUMNS = {"fused": ("nbconv_2step",),
                 **{suite: ("nbconv_packed",) for suite in ("mobilenet", "xception", "pointwise", "bf16")},
                 **{suite: ("nbconv",) for suite in _cases.KERAS_MODEL_SUITES.values()}}
#: idle runs compared against nbconv (the first three are its peers there), in the table's column order
IDLE_COLUMNS = (("nbconv.idle.t1", "nbconv 1 thread"), ("nbconv_packed.idle", "nbconv packed"),
                ("torch_nchw.idle", "torch NCHW"), ("torch_nhwc.idle", "torch ch_last"),
                ("onnxruntime.idle", "ONNX Runtime"))
IDLE_PEERS = ("torch_nchw.idle", "torch_nhwc.idle", "onnxruntime.idle")
#: bfloat16 layers of at least this many channels count for ``bf16_vs_float32``
BF16_MIN_CHANNELS = 256
#: torch's layouts, the better of which the bfloat16 targets compare with
BF16_TORCH = ("torch_nchw", "torch_nhwc")
SUITE_NOTES = {
    "classic": "the input arrives NCHW (torch ch_last converts inside the timing); the NHWC row is its "
               "channels_last twin for nbconv's channels_first/channels_last ratio",
    "hard": "NCHW rows: the input arrives NCHW; nbconv and Keras take it as channels_first, torch NCHW and ONNX "
            "Runtime natively, torch ch_last converts inside the timing",
    "fused": "nbconv dw+pw = nbconv.depthwise_conv2d then nbconv.pointwise_conv2d (materialises the intermediate); "
             "not a peer",
    "overhead": "the whole call on a tiny shape: for nbconv, the Python-side overhead plus one kernel launch",
    "models": "ms per model.predict_on_batch(x) (jax.jit on jax, tf.function on tensorflow, eager on torch) and "
              "per model.train_on_batch(x, y) (fit: SGD at learning rate 0, mse), each backend in its own process; "
              "batch norms calibrated on the input; converted = keras_layers.convert(model), folded = "
              "convert(model, fold_batchnorm=True); speedup = t(original)/t(variant), the two timed in "
              "alternating blocks in the contender's process (the ms columns are each case's own timing); max "
              "rel err = the converted predictions against the original's, relative to their scale, checked "
              "before timing; torch runs with OMP_WAIT_POLICY=PASSIVE (unless set) for both the original and "
              "the converted models",
    "backward": "one forward plus the gradients with respect to x, the depthwise and the pointwise kernels; "
                "GFLOP/s counts 3x the forward FLOPs; PyTorch via torch.autograd.grad, Keras via "
                "jax.jit(jax.value_and_grad(...)) of keras.ops.separable_conv",
}
SEPARABLE_SUITES = ("mobilenet", "xception", "classic", "hard", "fused")


def _load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def build(raw_dir, stat=None):
    """Read a raw results folder and compute every table and summary figure; returns a JSON-able dict.

    ``stat`` is the statistic of the rounds used for every time: "median" (the default, the targets') or
    "min" (less sensitive to other processes on a shared machine).
    """
    meta = _load(os.path.join(raw_dir, "meta.json")) or {}
    stat = stat or meta.get("stat") or "median"
    meta["stat"] = stat
    probes = _load(os.path.join(raw_dir, "probes.json")) or {}
    contenders = {}
    times = {}  # (contender, case id) -> stats dict
    for name in meta.get("contenders", list(CONTENDERS)):
        info = _load(os.path.join(raw_dir, f"{name}.info.json"))
        data = _load(os.path.join(raw_dir, f"{name}.json"))
        entry = {"name": name, "label": CONTENDERS[name].label if name in CONTENDERS else name,
                 "ran": info is not None, "returncode": (meta.get("returncodes") or {}).get(name)}
        if info:
            entry.update({k: info.get(k) for k in ("available", "note", "version", "info", "threadpools",
                                                    "skips", "checks", "errors", "pinned_cpus", "check_tol")})
        contenders[name] = entry
        for b in (data or {}).get("benchmarks", []):
            cid = b.get("extra_info", {}).get("case") or b.get("param")
            st = b["stats"]
            times[(name, cid)] = {"time": st[stat], "median": st["median"], "min": st["min"], "iqr": st.get("iqr"),
                                  "rounds": st["rounds"], "check": b.get("extra_info", {}).get("check_rel_err"),
                                  "bridge": b.get("extra_info", {}).get("bridge"),
                                  "paired": b.get("extra_info", {}).get("paired")}

    peak = times.get(("sgemm", "sgemm-4096"))
    peak_gflops = CONTENDERS["sgemm"].flops / peak["time"] / 1e9 if peak else None

    suites_sel = meta.get("suites") or list(_cases.SUITES)
    selected = _cases.select(suites_sel, meta.get("quick", False))
    suites = {}
    for case in selected:
        row = {"case": case.to_dict(), "times_ms": {}, "min_ms": {}, "skips": {}, "errors": {}, "checks": {}}
        for name, entry in contenders.items():
            if name == "sgemm":
                continue
            st = times.get((name, case.id))
            if st:
                row["times_ms"][name] = st["time"] * 1e3
                row["median_ms"] = row.get("median_ms", {})
                row["median_ms"][name] = st["median"] * 1e3
                row["min_ms"][name] = st["min"] * 1e3
                if st["bridge"]:
                    # the subject against the direct calls, timed in the subject's own process
                    row.setdefault("bridge", {})[name] = st["bridge"]
                if st.get("paired"):
                    # a models-suite variant against the original, alternating in the contender's process
                    row.setdefault("paired", {})[name] = st["paired"]
                if st["check"] is not None:
                    row["checks"][name] = st["check"]
                    tol = _cases.BF16_CHECK_TOL if case.bf16 else (entry.get("check_tol") or 1e-4)
                    if st["check"] > tol:
                        row.setdefault("check_failed", []).append(name)
            elif (entry.get("errors") or {}).get(case.id):
                row["errors"][name] = entry["errors"][case.id]
            elif (entry.get("skips") or {}).get(case.id):
                row["skips"][name] = entry["skips"][case.id]
        subject, peer_names = _roles(case.suite)
        row["subject"] = subject
        t_nb = row["times_ms"].get(subject)
        peers = {p: t for p, t in row["times_ms"].items() if p in peer_names}
        row["speedup"] = {p: t / t_nb for p, t in row["times_ms"].items() if t_nb and p != subject}
        if peers:
            best = min(peers, key=peers.get)
            row["best_peer"] = best
            row["best_peer_ms"] = peers[best]
            row["speedup_best"] = peers[best] / t_nb if t_nb else None
        if t_nb:
            row["nbconv_gflops"] = case.flops / (t_nb * 1e-3) / 1e9
            # the sgemm peak is float32's: bfloat16 products have another
            if peak_gflops and case.op not in ("separable_fwdbwd", "model_train") and not case.bf16:
                row["pct_peak"] = 100 * row["nbconv_gflops"] / peak_gflops
        suites.setdefault(case.suite, []).append(row)

    report = {"meta": meta, "peak": {"gflops": peak_gflops, "median_s": peak["time"] if peak else None,
                                     "size": CONTENDERS["sgemm"].size},
              "contenders": contenders, "suites": suites, "probes": probes, "idle": _idle(raw_dir, meta, stat)}
    report["summary"] = _summary(report)
    return report


def _idle(raw_dir, meta, stat):
    """The idle runs: ``{"gaps_ms", "rounds", "rows": [{"case", "ms": {tag: {gap: ms}}}]}``, or None."""
    idle = meta.get("idle") or {}
    gaps = idle.get("gaps_ms") or []
    if not gaps or not idle.get("runs"):
        return None
    times = {}
    for tag in idle["runs"]:
        for b in (_load(os.path.join(raw_dir, f"{tag}.json")) or {}).get("benchmarks", []):
            ex = b.get("extra_info", {})
            if ex.get("idle_ms") is not None and ex.get("case"):
                times.setdefault(ex["case"], {}).setdefault(tag, {})[f"{ex['idle_ms']:g}"] = b["stats"][stat] * 1e3
    rows = [{"case": c.to_dict(), "ms": times[c.id]} for c in _cases.CASES if c.id in times]
    return {"gaps_ms": gaps, "rounds": idle.get("rounds"), "passes": idle.get("passes"), "runs": idle["runs"],
            "rows": rows}


def _idle_summary(idle):
    """Per gap: nbconv against the best idle peer (geomean, worst shape) and its 2-thread over 1-thread speedup
    on the shapes of at least :data:`IDLE_THREAD_MIN_MACS` multiply-adds (the lowest, and where)."""
    out = {}
    for gap in (f"{g:g}" for g in idle["gaps_ms"]):
        ratios, threads = [], []
        for r in idle["rows"]:
            nb = r["ms"].get("nbconv.idle", {}).get(gap)
            if not nb:
                continue
            peers = [r["ms"][p][gap] for p in IDLE_PEERS if gap in r["ms"].get(p, {})]
            if peers:
                ratios.append((nb / min(peers), r["case"]["shape"]))
            t1 = r["ms"].get("nbconv.idle.t1", {}).get(gap)
            if t1 and sum(r["case"]["macs"]) >= IDLE_THREAD_MIN_MACS:
                threads.append((t1 / nb, r["case"]["shape"]))
        entry = {}
        if ratios:
            entry.update(ratio_geomean=_geomean([x for x, _ in ratios]), n=len(ratios))
            entry["ratio_max"], entry["ratio_max_case"] = max(ratios)
        if threads:
            entry["thread_speedup_min"], entry["thread_speedup_min_case"] = min(threads)
            entry["thread_n"] = len(threads)
        if entry:
            out[gap] = entry
    return out


def _roles(suite):
    """(subject, peers) of a suite: nbconv against PEERS unless :data:`SUITE_ROLES` says otherwise."""
    return SUITE_ROLES.get(suite, ("nbconv", PEERS))


def _rows(report, suites):
    for s in suites:
        yield from report["suites"].get(s, [])


def _summary(report):
    s = {}
    # 1. MobileNetV1 + Xception vs the best peer
    ratios = [(1 / r["speedup_best"], r["case"]["id"]) for r in _rows(report, TARGET_SUITES)
              if r.get("speedup_best")]
    if ratios:
        worst = max(ratios)
        s["target_ratio_geomean"] = _geomean([r for r, _ in ratios])
        s["target_ratio_max"] = worst[0]
        s["target_ratio_max_case"] = worst[1]
        s["target_ratio_n"] = len(ratios)
    # 1b. the same with the pointwise weights packed once (not the target's subject: shown beside it)
    packed = [(r["times_ms"]["nbconv_packed"] / r["best_peer_ms"], r["case"]["id"])
              for r in _rows(report, TARGET_SUITES) if r.get("best_peer_ms") and r["times_ms"].get("nbconv_packed")]
    if packed:
        s["packed_ratio_geomean"] = _geomean([r for r, _ in packed])
        s["packed_ratio_max"], s["packed_ratio_max_case"] = max(packed)
        s["packed_n"] = len(packed)
    # 2. cases peers handle poorly
    hard = [r["speedup_best"] for r in _rows(report, ("hard",)) if r.get("speedup_best")]
    if hard:
        s["poorly_speedup_geomean"] = _geomean(hard)
        s["poorly_n"] = len(hard)
    # 3. % of the sgemm peak where the pointwise part has C*dm >= 256
    pct = [(r["pct_peak"], r["case"]["id"]) for r in _rows(report, TARGET_SUITES)
           if r.get("pct_peak") and r["case"]["c"] * r["case"]["dm"] >= 256]
    if pct:
        s["pct_peak_c256_min"] = min(pct)[0]
        s["pct_peak_c256_min_case"] = min(pct)[1]
        s["pct_peak_c256_median"] = _median([p for p, _ in pct])
        s["pct_peak_c256_n"] = len(pct)
    # 4. vs Keras's op
    keras = [r["speedup"]["keras"] for r in _rows(report, SEPARABLE_SUITES[:-1]) if "keras" in r.get("speedup", {})]
    if keras:
        s["keras_speedup_geomean"] = _geomean(keras)
        s["keras_speedup_min"] = min(keras)
        s["keras_n"] = len(keras)
    # 5. channels_first vs channels_last twins (same geometry, nbconv)
    def geom(c):
        return (c["op"], c["n"], c["h"], c["w"], c["c"], c["f"], c["k"], c["stride"], c["dilation"], c["dm"],
                json.dumps(c["pads"]), c.get("dtype"))
    by_geom = {}
    for r in _rows(report, _cases.SUITES):
        t = r["times_ms"].get("nbconv")
        if t:
            by_geom.setdefault(geom(r["case"]), {}).setdefault(r["case"]["data_format"], (t, r["case"]["id"]))
    pairs = []
    for g, d in by_geom.items():
        if "channels_first" in d and "channels_last" in d:
            pairs.append({"cf": d["channels_first"][1], "cl": d["channels_last"][1],
                          "ratio": d["channels_first"][0] / d["channels_last"][0]})
    if pairs:
        s["cf_cl_pairs"] = pairs
        s["cf_cl_ratio_max"] = max(p["ratio"] for p in pairs)
        s["cf_cl_ratio_geomean"] = _geomean([p["ratio"] for p in pairs])
    # 6. per-call overhead on the tiny shape
    for r in _rows(report, ("overhead",)):
        s["overhead_us"] = {k: v * 1e3 for k, v in r["times_ms"].items()}
    # 7. fused vs nbconv's own two-step path
    two = [r["speedup"]["nbconv_2step"] for r in _rows(report, ("fused",)) if "nbconv_2step" in r.get("speedup", {})]
    if two:
        s["fused_vs_two_step_geomean"] = _geomean(two)
    # 8. forward + backward
    bw = list(_rows(report, ("backward",)))
    if bw:
        tn = [r["speedup"]["torch_nhwc"] for r in bw if "torch_nhwc" in r.get("speedup", {})]
        tk = [r["speedup"]["keras"] for r in bw if "keras" in r.get("speedup", {})]
        if tn or tk:
            s["backward_ratio_vs_torch_nhwc_geomean"] = 1 / _geomean(tn) if tn else None
            s["backward_speedup_vs_keras_geomean"] = _geomean(tk)
        else:
            notes = {r["skips"].get("nbconv") or r["errors"].get("nbconv") for r in bw} - {None}
            s["backward_note"] = "; ".join(sorted(notes)) or "nbconv not measured"
    # 9. Keras model, per backend: our layers against Keras's, and against direct nbconv calls
    for backend, suite in _cases.KERAS_MODEL_SUITES.items():
        subject, (keras_name,) = _roles(suite)
        km = list(_rows(report, (suite,)))
        if not km:
            continue
        rows = []
        for r in km:
            same = (r.get("bridge") or {}).get(subject)
            cross = (1 / r["speedup"]["nbconv"]) if r["speedup"].get("nbconv") else None
            rows.append({"case": r["case"]["id"], "shape": r["case"]["shape"], "bare": r["case"]["op"] == "model_bare",
                         "bf16": r["case"].get("dtype") == "bfloat16",
                         "speedup_vs_keras_layers": r["speedup"].get(keras_name),
                         # both sides in one process share the machine's spells; two processes each have their own
                         "ratio_vs_direct": same["ratio"] if same else cross,
                         "same_process": bool(same), "ratio_vs_direct_other_process": cross})
        entry = {"backend": backend, "rows": rows}
        # the target's model has BatchNorm + ReLU: the bare row only measures the bridge
        speedups = [(k["speedup_vs_keras_layers"], k["shape"]) for k in rows
                    if k["speedup_vs_keras_layers"] and not k["bare"] and not k["bf16"]]
        if speedups:
            entry["speedup_min"], entry["speedup_min_case"] = min(speedups)
        # the bridge alone: the bare layers against the same convolutions called directly (with BatchNorm, the
        # model also pays the framework's own BatchNorm and ReLU passes, which the direct calls fold away)
        bare = [k["ratio_vs_direct"] for k in rows if k["ratio_vs_direct"] and k["bare"]]
        bridge = bare or [k["ratio_vs_direct"] for k in rows if k["ratio_vs_direct"] and k["shape"].startswith("b8")]
        if bridge:
            entry["bridge_b8"], entry["bridge_bare"] = max(bridge), bool(bare)
        notes = {r["skips"].get(subject) or r["errors"].get(subject) for r in km} - {None}
        for name in (subject, keras_name):
            c = report["contenders"].get(name) or {}
            if c.get("available") is False:
                notes.add(c.get("note"))
        if notes:
            entry["note"] = "; ".join(sorted(n for n in notes if n))
        s.setdefault("keras_model", []).append(entry)
    # 10. bfloat16
    bf16 = _bf16_summary(report)
    if bf16:
        s["bf16"] = bf16
    # 10b. idle gaps before each call
    if report.get("idle"):
        s["idle"] = _idle_summary(report["idle"])
    # 11. keras.applications models: original vs converted vs folded, per backend
    models = _models(report)
    if models:
        s["models"] = models
    ceilings = _ceilings(report, s)
    if ceilings:
        s["ceilings"] = ceilings
    s["targets"] = _target_results(report, s)
    return s


def _target_results(report, s):
    """This run's figure for each target of :data:`TARGETS` that it measured: a list of ``{"target", "scope",
    "value", "where", "met"}`` (``scope``: the backend or idle gap a target is measured per, else None;
    ``where``: the shape or call that gave the value, if one did)."""
    out = []

    def add(name, value, where=None, scope=None):
        if value is not None:
            out.append({"target": name, "scope": scope, "value": value, "where": where,
                        "met": TARGETS[name].met(value)})

    add("separable_vs_best_peer", s.get("target_ratio_geomean"))
    add("separable_vs_best_peer_worst", s.get("target_ratio_max"), s.get("target_ratio_max_case"))
    add("hard_cases_speedup", s.get("poorly_speedup_geomean"))
    add("pct_of_sgemm_peak", s.get("pct_peak_c256_min"), s.get("pct_peak_c256_min_case"))
    add("keras_op_speedup", s.get("keras_speedup_geomean"))
    if s.get("cf_cl_pairs"):
        worst = max(s["cf_cl_pairs"], key=lambda p: p["ratio"])
        add("channels_first_cost", worst["ratio"], worst["cf"])
    add("call_overhead_us", (s.get("overhead_us") or {}).get("nbconv"))
    add("backward_vs_torch", s.get("backward_ratio_vs_torch_nhwc_geomean"))
    add("backward_vs_keras", s.get("backward_speedup_vs_keras_geomean"))
    for entry in s.get("keras_model") or []:
        add(f"keras_model_{entry['backend']}", entry.get("speedup_min"), entry.get("speedup_min_case"))
        add("keras_bridge", entry.get("bridge_b8"), "b8, bare layers" if entry.get("bridge_bare") else "b8",
            entry["backend"])
    for name, (backend, variant, models) in MODEL_TARGETS.items():
        rows = [m for m in s.get("models") or [] if m["backend"] == backend and variant in m["speedup"]
                and (models is None or m["model"] in models)]
        mine = min(((m["speedup"][variant], m["shape"]) for m in rows), default=None)
        add(name, *(mine or (None,)))
    for gap, e in (s.get("idle") or {}).items():
        scope = "no gap" if gap == "0" else f"{gap} ms"
        if gap != "0":  # the runs without a gap give the baseline, not a target
            add("idle_vs_best_peer", e.get("ratio_geomean"), scope=scope)
            add("idle_vs_best_peer_worst", e.get("ratio_max"), e.get("ratio_max_case"), scope)
        add("idle_thread_speedup", e.get("thread_speedup_min"), e.get("thread_speedup_min_case"), scope)
    cold = (report["probes"].get("first_call") or {}).get("cold") or {}
    if "error" not in cold and cold.get("calls") is not None:
        add("first_call_s", cold.get("import_plus_first_call_s"), "import + separable_conv2d")
        others = {k: v for k, v in cold["calls"].items() if k != "separable"}
        if others:
            slowest = max(others, key=others.get)
            add("other_first_call_s", others[slowest], slowest)
    for backend, res in (report["probes"].get("first_predict") or {}).items():
        own, ours = (res.get("keras") or {}).get("first_predict_s"), (res.get("converted") or {}).get("first_predict_s")
        if own and ours:
            add("first_predict_ratio", ours / own, scope=backend)
    b = s.get("bf16") or {}
    add("bf16_vs_float32", b.get("fp32_speedup_min"), b.get("fp32_speedup_min_case"))
    add("bf16_vs_torch", b.get("torch_speedup_geomean"))
    add("bf16_vs_torch_worst", b.get("torch_speedup_min"), b.get("torch_speedup_min_case"))
    add("bf16_backward_vs_torch", b.get("backward_torch_speedup_geomean"))
    add("bf16_keras_model", b.get("keras_model_speedup_min"), b.get("keras_model_speedup_min_case"))
    return out


def _bf16_summary(report):
    """bfloat16 against nbconv's float32 (same shapes, same run) and torch's bfloat16; the Keras model under
    mixed_bfloat16 against its float32 twin."""
    out = {}

    def key(c):
        return c["n"], c["h"], c["c"], c["f"], c["stride"]

    fp32 = {key(r["case"]): r["times_ms"]["nbconv"] for r in _rows(report, TARGET_SUITES)
            if r["times_ms"].get("nbconv")}
    vs_fp32, vs_torch = [], []
    for r in _rows(report, ("bf16",)):
        c, nb = r["case"], r["times_ms"].get("nbconv")
        if not nb:
            continue
        if key(c) in fp32 and c["c"] * c["dm"] >= BF16_MIN_CHANNELS:
            vs_fp32.append((fp32[key(c)] / nb, c["shape"]))
        torch = [r["times_ms"][p] for p in BF16_TORCH if r["times_ms"].get(p)]
        if torch:
            vs_torch.append((min(torch) / nb, c["shape"]))
    if vs_fp32:
        out.update(fp32_speedup_geomean=_geomean([x for x, _ in vs_fp32]), fp32_n=len(vs_fp32))
        out["fp32_speedup_min"], out["fp32_speedup_min_case"] = min(vs_fp32)
    if vs_torch:
        out.update(torch_speedup_geomean=_geomean([x for x, _ in vs_torch]), torch_n=len(vs_torch))
        out["torch_speedup_min"], out["torch_speedup_min_case"] = min(vs_torch)
    bw = []
    for r in _rows(report, ("bf16_backward",)):
        nb = r["times_ms"].get("nbconv")
        torch = [r["times_ms"][p] for p in BF16_TORCH if r["times_ms"].get(p)]
        if nb and torch:
            bw.append(min(torch) / nb)
    if bw:
        out.update(backward_torch_speedup_geomean=_geomean(bw), backward_n=len(bw))
    subject = _roles("keras_model")[0]
    model, direct = {}, {}
    for r in _rows(report, ("keras_model",)):
        c, t_ = r["case"], r["times_ms"].get(subject)
        dtype = c.get("dtype", "float32")
        if t_:
            model.setdefault((c["n"], c["op"]), {})[dtype] = (t_, c["shape"])
        # the same 13 calls made directly (the "nbconv" column): what the kernels alone gain in bfloat16
        if r["times_ms"].get("nbconv"):
            direct.setdefault((c["n"], c["op"]), {})[dtype] = (r["times_ms"]["nbconv"], c["shape"])
    km = [(d["float32"][0] / d["bfloat16"][0], d["bfloat16"][1]) for d in model.values()
          if "float32" in d and "bfloat16" in d]
    if km:
        out["keras_model_rows"] = [{"shape": shape, "speedup": x} for x, shape in km]
        out["keras_model_speedup_min"], out["keras_model_speedup_min_case"] = min(km)
    kd = [(d["float32"][0] / d["bfloat16"][0], d["bfloat16"][1]) for d in direct.values()
          if "float32" in d and "bfloat16" in d]
    if kd:
        out["keras_model_direct_rows"] = [{"shape": shape, "speedup": x} for x, shape in kd]
    return out


#: suites whose FLOP counts every contender performs (the same convolution), for the fastest rate of a run
RATE_SUITES = ("mobilenet", "xception", "classic", "hard", "pointwise")


def _ceilings(report, s):
    """Upper bounds on the speedups the targets ask for, from this run's own measurements.

    ``rate`` is the highest GFLOP/s of the run: the sgemm peak, or any contender on any shape of
    :data:`RATE_SUITES` if one ran faster (a moment of less contention).  A kernel doing a shape's FLOPs at
    that rate, depthwise MACs included (they are memory-bound and run far slower in practice), takes
    ``flops / rate``; its speedup over a peer's measured time is the most any implementation could show on this
    machine.  For the Keras model, ``direct`` is what the model would gain if the bridge, BatchNorm and ReLU cost
    nothing and the convolutions ran at the direct nbconv calls' speed: t(Keras's layers) / t(direct calls).
    """
    peak = report["peak"]["gflops"]
    rates = [r["case"]["flops"] / (t * 1e-3) / 1e9 for r in _rows(report, RATE_SUITES)
             for t in r["times_ms"].values() if t]
    if peak:
        rates.append(peak)
    rate = max(rates, default=None)
    out = {"rate_gflops": rate, "peak_gflops": peak} if rate else {}

    def bound(row, t_ms):
        return t_ms / (row["case"]["flops"] / rate / 1e9 * 1e3) if rate else None

    target = [bound(r, r["best_peer_ms"]) for r in _rows(report, TARGET_SUITES) if rate and r.get("best_peer_ms")]
    if target:
        out["target_speedup_geomean"] = _geomean(target)
    hard = [r for r in _rows(report, ("hard",)) if rate and r.get("best_peer_ms")]
    if hard:
        out["poorly_speedup_geomean"] = _geomean([bound(r, r["best_peer_ms"]) for r in hard])
        out["poorly_peer_pct_of_rate_median"] = _median(
            [100 * r["case"]["flops"] / (r["best_peer_ms"] * 1e-3) / 1e9 / rate for r in hard])
    keras = [bound(r, r["times_ms"]["keras"]) for r in _rows(report, SEPARABLE_SUITES[:-1])
             if rate and r["times_ms"].get("keras") and r.get("subject") == "nbconv"]
    if keras:
        out["keras_speedup_geomean"] = _geomean(keras)
    for entry in s.get("keras_model") or []:
        suite = _cases.KERAS_MODEL_SUITES[entry["backend"]]
        subject, (keras_name,) = _roles(suite)
        rows = []
        for r in _rows(report, (suite,)):
            t_k = r["times_ms"].get(keras_name)
            if not t_k:
                continue
            t_d = r["times_ms"].get("nbconv")
            if r["case"]["op"] == "model_bare":
                continue
            rows.append({"shape": r["case"]["shape"], "at_rate": bound(r, t_k), "direct": t_k / t_d if t_d else None})
        if rows:
            out.setdefault("keras_model", {})[entry["backend"]] = rows
    return out


def _models(report):
    """Rows of the models suite per (model, batch, backend): times of the three variants and the speedups."""
    out = []
    for r in _rows(report, ("models",)):
        c = r["case"]
        for name, t in r["times_ms"].items():
            backend = name[len("models_"):]
            key = (c["model"], c["n"], c["h"], backend)
            if not out or (out[-1]["model"], out[-1]["n"], out[-1]["h"], out[-1]["backend"]) != key:
                hit = [o for o in out if (o["model"], o["n"], o["h"], o["backend"]) == key]
                if hit:
                    row = hit[0]
                else:
                    label = _cases.APP_MODELS[c["model"]][0]
                    row = {"model": c["model"], "label": label, "n": c["n"], "h": c["h"],
                           "shape": f"{label} b{c['n']} {c['h']}x{c['w']}", "backend": backend, "ms": {},
                           "checks": {}}
                    out.append(row)
            else:
                row = out[-1]
            row["ms"][c["op"][4:]] = t
            paired = (r.get("paired") or {}).get(name)
            if paired:
                row.setdefault("paired", {})[c["op"][4:]] = 1.0 / paired["ratio"]
            if name in r["checks"]:
                row["checks"][c["op"][4:]] = r["checks"][name]
    for row in out:
        # the ratio timed alternating with the original in one process where there is one: the variants' own
        # medians come from spells of their own, and the machine's drift between them moved identical graphs by
        # 0.95-1.18x
        t0, t_fit, paired = row["ms"].get("original"), row["ms"].get("fit_original"), row.get("paired", {})
        row["speedup"] = {v: paired.get(v) or t0 / row["ms"][v] for v in ("converted", "folded")
                          if t0 and row["ms"].get(v)}
        if t_fit and row["ms"].get("fit_converted"):
            row["speedup"]["fit"] = paired.get("fit_converted") or t_fit / row["ms"]["fit_converted"]
    out.sort(key=lambda o: (list(_cases.APP_MODELS).index(o["model"]), o["n"], o["h"],
                            list(MODEL_BACKENDS).index(o["backend"]) if o["backend"] in MODEL_BACKENDS else 99))
    return out


def text_table(head, body, left=1):
    """A text table: the header, a rule, then ``body``'s rows; the first ``left`` columns left-aligned."""
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(head), "  ".join("-" * w for w in widths)] + [line(row) for row in body]


def _models_table(report):
    """(head, body) of the models suite, or None."""
    rows = (report["summary"] or {}).get("models") or []
    head = ["model", "backend", "original ms", "converted ms", "folded ms", "fit original ms", "fit converted ms",
            "converted", "folded", "fit", "max rel err"]
    body = []
    for m in rows:
        err = max(m["checks"].values()) if m["checks"] else None
        body.append([m["shape"], m["backend"]] + [format_ms(m["ms"].get(v)) for v in
                                                  ("original", "converted", "folded", "fit_original", "fit_converted")]
                    + [f"{m['speedup'][v]:.2f}x" if v in m["speedup"] else "-" for v in ("converted", "folded", "fit")]
                    + [f"{err:.1e}" if err is not None else "-"])
    return (head, body) if body else None


def _idle_table(report):
    """(head, body, note) of the idle runs, or None."""
    idle = report.get("idle")
    if not idle or not idle["rows"]:
        return None
    present = [(t, label) for t, label in IDLE_COLUMNS if t in idle["runs"]]
    head = ["case", "idle", "nbconv ms"] + [label for _, label in present] + ["vs best", "2 threads/1"]
    body = []
    for r in idle["rows"]:
        for g in idle["gaps_ms"]:
            gap = f"{g:g}"
            nb = r["ms"].get("nbconv.idle", {}).get(gap)
            line = [r["case"]["shape"] if g == idle["gaps_ms"][0] else "", f"{gap} ms", format_ms(nb)]
            line += [format_ms(r["ms"].get(t, {}).get(gap)) for t, _ in present]
            peers = [r["ms"][p][gap] for p in IDLE_PEERS if gap in r["ms"].get(p, {})]
            t1 = r["ms"].get("nbconv.idle.t1", {}).get(gap)
            line += [f"{min(peers) / nb:.2f}x" if nb and peers else "-", f"{t1 / nb:.2f}x" if nb and t1 else "-"]
            body.append(line)
    passes = idle.get("passes") or 1
    note = (f"{report['meta'].get('stat', 'median')} of {idle.get('rounds')} calls per gap, each after sleeping "
            f"that long (not timed), every contender in its own process after the main passes"
            + (f", in {passes} alternating passes (per case the faster counts)" if passes > 1 else "")
            + "; 'vs best' = t(best "
            "of torch and ONNX Runtime)/t(nbconv), '2 threads/1' = t(nbconv, 1 thread)/t(nbconv)")
    return head, body, note


# --- text -------------------------------------------------------------------

def format_ms(t):
    """A time in ms, to about four significant digits; "-" for None."""
    if t is None:
        return "-"
    if t < 0.1:
        return f"{t:.4f}"
    if t < 10:
        return f"{t:.3f}"
    if t < 1000:
        return f"{t:.1f}"
    return f"{t:.0f}"


def _cell(row, name, available=True):
    if not available:
        return "absent"
    if name in row["times_ms"]:
        t = row["times_ms"][name]
        sp = row["speedup"].get(name)
        bad = "!" if name in row.get("check_failed", ()) else ""
        return f"{format_ms(t)}{bad}" + (f" ({sp:.2f}x)" if sp else "")
    if name in row["errors"]:
        return "ERROR"
    if name in row["skips"]:
        return "n/a" if "not available" in row["skips"][name] else "skip"
    return "-"


def _table(report, suite):
    """(head, body) of a suite's table, or None when it has no results."""
    rows = report["suites"].get(suite, [])
    if not rows:
        return None
    subject, peer_names = _roles(suite)
    present = [c for c in (EXTRA_COLUMNS.get(suite, ()) + peer_names) if c in report["contenders"]]
    labels = {c: report["contenders"][c]["label"] for c in present}
    subject_label = CONTENDERS[subject].label if subject in CONTENDERS else subject
    head = ["case", f"{subject_label} ms", "GFLOP/s", "%peak"] + [labels[c] for c in present] + ["best peer",
                                                                                             "vs best"]
    body = []
    for r in rows:
        nb = r["times_ms"].get(subject)
        if nb is None:
            if (report["contenders"].get(subject) or {}).get("available") is False:
                nbs = "n/a"
            else:
                nbs = "ERROR" if subject in r["errors"] else ("n/a" if subject in r["skips"] else "-")
        else:
            nbs = format_ms(nb) + ("!" if subject in r.get("check_failed", ()) else "")
        line = [r["case"]["shape"], nbs, f"{r['nbconv_gflops']:.1f}" if r.get("nbconv_gflops") else "-",
                f"{r['pct_peak']:.0f}%" if r.get("pct_peak") else "-"]
        line += [_cell(r, c, report["contenders"][c].get("available") is not False) for c in present]
        line += [labels.get(r.get("best_peer"), r.get("best_peer") or "-"),
                 f"{r['speedup_best']:.2f}x" if r.get("speedup_best") else "-"]
        body.append(line)
    return head, body


def _sections(report):
    """The report's tables in print order: ``(title, head, body, left-aligned columns, notes)``."""
    out = []
    for suite in _cases.SUITES:
        table = _models_table(report) if suite == "models" else _table(report, suite)
        if not table:
            continue
        notes = [SUITE_NOTES[suite]] if suite in SUITE_NOTES else []
        notes += sorted({f"{report['contenders'][n]['label']}: {why}" for r in report["suites"][suite]
                         for n, why in r["skips"].items() if n in report["contenders"]})
        if suite == "backward" and report["summary"].get("backward_note"):
            notes.append(report["summary"]["backward_note"])
        out.append((_cases.SUITE_TITLES[suite], *table, 2 if suite == "models" else 1, notes))
    idle = _idle_table(report)
    if idle:
        head, body, note = idle
        out.append(("Idle gaps: MobileNetV1 + Xception with a sleep before every call", head, body, 1, [note]))
    return out


def _env_lines(report):
    meta = report["meta"]
    lines = []
    env = meta.get("env", {})
    lines.append("machine: " + ", ".join(str(x) for x in (meta.get("cpu"), f"{meta.get('cpus')} CPUs",
                                                          meta.get("platform")) if x))
    lines.append(f"threads per contender: {meta.get('threads')}; python {meta.get('python')}; "
                 f"{'quick run' if meta.get('quick') else 'full run'}; started {meta.get('started')}, "
                 f"took {meta.get('elapsed_s', 0):.0f} s")
    lines.append("environment: " + ", ".join(f"{k}={env[k] if env.get(k) is not None else '(unset)'}"
                                             for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                                       "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "KERAS_BACKEND")))
    if env.get("OPENBLAS_CORETYPE") or env.get("OPENBLAS_L2_SIZE"):
        lines.append("  note: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE force an OpenBLAS core and cache size; a forced "
                     "Haswell core roughly halves sgemm speed on AVX-512 machines (nbconv's pointwise GEMM and the "
                     "sgemm peak below are both OpenBLAS).")
    seen = set()
    for name in ("nbconv", "sgemm"):
        for tp in (report["contenders"].get(name) or {}).get("threadpools") or []:
            if tp.get("user_api") != "blas":
                continue
            key = tp.get("filepath")
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"BLAS: {os.path.basename(tp.get('filepath', '?'))} internal_api={tp.get('internal_api')} "
                         f"architecture={tp.get('architecture')} version={tp.get('version')} "
                         f"threads={tp.get('num_threads')}")
    pk = report["peak"]
    if pk.get("gflops"):
        lines.append(f"sgemm peak: {pk['gflops']:.1f} GFLOP/s (NumPy matmul {pk['size']}x{pk['size']} float32, "
                     f"{meta.get('stat', 'median')} {pk['median_s'] * 1e3:.0f} ms, own process)")
    else:
        lines.append("sgemm peak: not measured (the sgemm contender did not run); %peak columns are empty")
    load = {k: v for k, v in (meta.get("loadavg") or {}).items() if v is not None}
    if load:
        lines.append(f"load average (1 min) at start {load.get('start', 0):.1f}, at end {load.get('end', 0):.1f} "
                     f"on {meta.get('cpus')} CPUs" + ("  -- WARNING: other processes were running; timings are "
                                                      "disturbed" if max(load.values()) > 0.75 * (meta.get("cpus") or 1)
                                                      else ""))
    if pk.get("gflops") and any(r.get("pct_peak", 0) > 100 for rows in report["suites"].values() for r in rows):
        lines.append("  WARNING: some shapes exceed 100% of the sgemm peak: the peak was measured in a disturbed "
                     "moment (or OpenBLAS is slowed by OPENBLAS_CORETYPE); treat %peak with care")
    lines.append("isolation: every contender ran in its own fresh pytest process (one after another, never "
                 "concurrently), so the thread pools of Numba, PyTorch, ONNX Runtime and XLA never share a process.")
    if (meta.get("passes") or 1) > 1:
        lines.append(f"passes: the contenders ran {meta['passes']} times, alternating (models suite once); per case "
                     f"each contender's pass with the lower {meta.get('stat', 'median')} counts, as this machine's "
                     "speed drifts between spells of seconds")
    pinned = {c.get("pinned_cpus") and len(c["pinned_cpus"]) for c in report["contenders"].values() if c.get("ran")}
    if any(pinned):
        lines.append(f"  each process was pinned to {meta.get('threads')} CPUs (sched_setaffinity), so every "
                     f"library's pool, XLA's included, sees {meta.get('threads')} cores")
    lines.append("layouts: nbconv and Keras get the case's data_format; PyTorch and ONNX Runtime get their own "
                 "layout prepared outside the timing, except that a channels_first input costs torch ch_last its "
                 "conversion inside the timing. Stride-2 'same' is asymmetric (0,1) in Keras: ONNX Runtime gets those "
                 "pads, PyTorch the symmetric padding with the same output shape and work (as its own MobileNet).")
    return lines


def _contender_lines(report):
    """One line per contender: its version and set-up, or why it did not run."""
    out = []
    for name, c in report["contenders"].items():
        if not c.get("ran"):
            status = "did not run" + (f" (exit code {c.get('returncode')})" if c.get("returncode") else "")
        elif not c.get("available"):
            status = f"SKIPPED: {c.get('note')}"
        else:
            status = c.get("version") or ""
            extra = c.get("info") or {}
            if name == "nbconv":
                status += (f", threading layer {extra.get('threading_layer')}, {extra.get('num_threads')} threads, "
                           f"from {extra.get('path')}")
            if name == "keras":
                status += f", {extra.get('jit')}"
            errs = c.get("errors") or {}
            if errs:
                status += f"; {len(errs)} case(s) raised: " + "; ".join(f"{k}: {v}" for k, v in list(errs.items())[:3])
            if c.get("returncode") not in (None, 0):
                status += f"; pytest exit code {c.get('returncode')}"
        out.append((c["label"], status))
    return out


def _checks_line(report):
    bad = [(r["case"]["id"], n, r["checks"][n]) for rows in report["suites"].values() for r in rows
           for n in r.get("check_failed", ())]
    nchecks = sum(len(r["checks"]) for rows in report["suites"].values() for r in rows)
    return (f"checks: {nchecks} outputs compared with the float64 reference (tests/reference.py; models suite: "
            f"converted models with the original); "
            + (f"{len(bad)} MISMATCH(ES), marked '!': " + ", ".join(f"{n} {c} ({e:.1e})" for c, n, e in bad)
               if bad else "all within the tolerance (1e-4 relative to the output's scale unless "
                           "NBCONV_BENCH_CHECK_TOL says otherwise)"))


def _legend(report):
    return (f"{report['meta'].get('stat', 'median')} ms per call; '(N.NNx)' = t(peer)/t(nbconv), above 1 nbconv is "
            f"faster; 'vs best' = t(best peer)/t(nbconv); skip = does not run this case, n/a = not available, "
            f"absent = library not installed, ! = output check failed.")


def format_text(report):
    """The report as plain text (what the runner prints and saves as ``report-*.txt``)."""
    out = ["nbconv benchmark report", "=" * 23]
    out += _env_lines(report)
    out.append("")
    out.append("contenders:")
    out += [f"  {label:<14} {status}" for label, status in _contender_lines(report)]
    out.append(_checks_line(report))
    out.append("")
    out.append(f"Tables: {_legend(report)}")
    for title, head, body, left, notes in _sections(report):
        out += ["", f"## {title}"] + text_table(head, body, left) + [f"  note - {n}" for n in notes]
    out.append("")
    out.append("## Summary against the targets")
    out += _summary_lines(report)
    return "\n".join(out) + "\n"


# --- markdown ---------------------------------------------------------------

def _md(cell):
    return str(cell).replace("|", "\\|").replace("*", "\\*")


def _md_table(head, body, escape=True):
    cell = _md if escape else str
    return ["| " + " | ".join(cell(c) for c in head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(cell(c) for c in row) + " |" for row in body]


def _target_rows(report):
    """Rows of the markdown page's target table: every entry of :data:`TARGETS`, with this run's figure."""
    results = report["summary"].get("targets") or []
    rows = []
    for name, target in TARGETS.items():
        mine = [r for r in results if r["target"] == name]
        goal = f"{target.direction} {target.value:g}{target.unit}"
        if not mine:
            rows.append([f"`{name}`", _md(target.description), goal, "not measured", ""])
        for r in mine:
            figure = f"{r['value']:.3g}{target.unit}" + (f" ({r['where']})" if r["where"] else "")
            rows.append([f"`{name}`" + (f" ({r['scope']})" if r["scope"] else ""), _md(target.description), goal,
                         _md(figure), "met" if r["met"] else "**NOT met**"])
    return rows


def format_markdown(report, chart=None):
    """The report as a markdown page (``docs/benchmarks.md``): environment, targets, summary, chart, tables.

    ``chart`` is the file name of the PNG chart beside the page, if one was drawn.
    """
    meta = report["meta"]
    kind = "quick run (a few shapes, few rounds: not a full measurement)" if meta.get("quick") else "full run"
    out = ["# nbconv benchmarks", "",
           f"The {kind} of {meta.get('started', '?')} on {meta.get('cpu') or '?'}, {meta.get('threads')} threads "
           f"per contender. This page is written by `python -m benchmarks` (`tox -e bench`) when a run finishes, "
           f"and by `python -m benchmarks.report <raw results folder>`: regenerate it, do not edit it. How the "
           f"suites are run and read: [README](../README.md#benchmarks).", "",
           "## Machine and environment", ""]
    out += [f"- {_md(line.strip())}" for line in _env_lines(report)]
    out += ["", "Contenders:", ""]
    out += [f"- **{_md(label)}**: {_md(status)}" for label, status in _contender_lines(report)]
    out += ["", _md(_checks_line(report)), "", "## Targets", ""]
    out += _md_table(["target", "what", "goal", "this run", ""], _target_rows(report), escape=False)
    # a summary line's details ("-   ...") become a nested item
    out += ["", "## Summary against the targets", ""] + [
        _md("  - " + line[4:] if line.startswith("-   ") else line) for line in _summary_lines(report)]
    if chart:
        out += ["", "## Speedup over the best peer, per shape", "",
                "One bar per shape: t(best peer) / t(nbconv) on a log scale, labelled with the best peer; right of "
                "the 1.0 line nbconv is faster.", "", f"![nbconv's speedup over the best peer, per shape]({chart})"]
    out += ["", "## Tables", "", _md(_legend(report))]
    for title, head, body, left, notes in _sections(report):
        out += ["", f"### {_md(title)}", ""] + _md_table(head, body)
        if notes:
            out += [""] + [f"- {_md(n)}" for n in notes]
    return "\n".join(out) + "\n"


def _result(s, name, scope=None):
    """This run's entry for target ``name`` (see :func:`_target_results`), or None when it was not measured."""
    return next((r for r in s.get("targets") or () if r["target"] == name and r["scope"] == scope), None)


def _against(s, name, scope=None):
    """`` (target <= 1.3)  [met]``: the target of ``name`` and whether this run met it."""
    r = _result(s, name, scope)
    return f" ({TARGETS[name]})" + ("" if r is None else "  [met]" if r["met"] else "  [NOT met]")


def _reach(bound, target, what="geomean"):
    """A clause saying how far a speedup ``target`` (a :class:`Target`) is from this run's ceiling ``bound``
    (see :func:`_ceilings`)."""
    if not bound:
        return ""
    verdict = ("out of reach of any implementation on this machine" if bound < target.value
               else "within reach")
    return f"; ceiling {bound:.2f}x ({what}), so the target is {verdict}"


def _summary_lines(report):
    """The summary against :data:`TARGETS`, one ``- `` line per figure."""
    s = report["summary"]
    out = []
    for section in (_separable_lines, _op_lines, _backward_lines, _keras_model_lines, _models_lines, _bf16_lines,
                    _idle_lines, _memory_lines, _first_call_lines):
        out += section(report, s, s.get("ceilings") or {})
    return ["- " + line for line in out]


def _separable_lines(report, s, c):
    out = []
    if c.get("rate_gflops"):
        out.append(f"ceilings: the most any implementation could show on this machine, from this run's own times: "
                   f"a kernel doing each shape's FLOPs (depthwise included) at {c['rate_gflops']:.0f} GFLOP/s, the "
                   f"run's fastest rate (sgemm peak or the fastest contender on any shape), against the peers' "
                   f"measured times")
    if "target_ratio_geomean" in s:
        out.append(f"MobileNetV1 + Xception ({s['target_ratio_n']} shapes): geomean t(nbconv)/t(best peer) = "
                   f"{s['target_ratio_geomean']:.2f}{_against(s, 'separable_vs_best_peer')}; "
                   f"max {s['target_ratio_max']:.2f} at {s['target_ratio_max_case']}"
                   f"{_against(s, 'separable_vs_best_peer_worst')}"
                   + (f"; ceiling: the lowest geomean ratio reachable at the run's fastest rate is "
                      f"{1 / c['target_speedup_geomean']:.2f}" if c.get("target_speedup_geomean") else ""))
    else:
        out.append("MobileNetV1 + Xception: not measured (needs nbconv and at least one peer)")
    if "packed_ratio_geomean" in s:
        out.append(f"  the same {s['packed_n']} shapes with the pointwise weights packed once "
                   f"(nbconv.pack_pointwise_kernel, as ONNX Runtime packs its weights when a session is created): "
                   f"geomean t(nbconv packed)/t(best peer) = {s['packed_ratio_geomean']:.2f}, max "
                   f"{s['packed_ratio_max']:.2f} at {s['packed_ratio_max_case']}")
    if "poorly_speedup_geomean" in s:
        out.append(f"cases peers handle poorly ({s['poorly_n']} shapes): geomean speedup over the best peer = "
                   f"{s['poorly_speedup_geomean']:.2f}x{_against(s, 'hard_cases_speedup')}"
                   + (f"; the best peers run these shapes at {c['poorly_peer_pct_of_rate_median']:.0f}% (median) of "
                      f"the run's fastest rate" if c.get("poorly_peer_pct_of_rate_median") else "")
                   + _reach(c.get("poorly_speedup_geomean"), TARGETS["hard_cases_speedup"]))
    if "pct_peak_c256_min" in s:
        out.append(f"% of sgemm peak, MobileNetV1 + Xception shapes with pointwise C >= 256 "
                   f"({s['pct_peak_c256_n']}): median {s['pct_peak_c256_median']:.0f}%, min "
                   f"{s['pct_peak_c256_min']:.0f}% at {s['pct_peak_c256_min_case']}{_against(s, 'pct_of_sgemm_peak')}")
    return out


def _op_lines(report, s, c):
    out = []
    if "keras_speedup_geomean" in s:
        backend = ((report["contenders"].get("keras") or {}).get("info") or {}).get("backend", "?")
        out.append(f"vs Keras's op on {backend} ({s['keras_n']} separable shapes): geomean speedup "
                   f"{s['keras_speedup_geomean']:.1f}x, min {s['keras_speedup_min']:.1f}x"
                   f"{_against(s, 'keras_op_speedup')}"
                   + _reach(c.get("keras_speedup_geomean"), TARGETS["keras_op_speedup"]))
    if "cf_cl_pairs" in s:
        pairs = ", ".join(f"{p['cf']} {p['ratio']:.2f}" for p in s["cf_cl_pairs"])
        out.append(f"channels_first / channels_last, nbconv, same shape: max {s['cf_cl_ratio_max']:.2f}"
                   f"{_against(s, 'channels_first_cost')} [{pairs}]")
    o = s.get("overhead_us") or {}
    if "nbconv" in o:
        others = ", ".join(f"{report['contenders'][k]['label']} {v:.1f}" for k, v in o.items() if k != "nbconv")
        out.append(f"per-call overhead (whole call on a 1x4x4x8->8 shape, an upper bound on the Python-side "
                   f"overhead): nbconv {o['nbconv']:.1f} us{_against(s, 'call_overhead_us')}"
                   + (f"; peers: {others} us" if others else ""))
    if "fused_vs_two_step_geomean" in s:
        out.append(f"fused kernel vs nbconv's own depthwise-then-pointwise: geomean speedup "
                   f"{s['fused_vs_two_step_geomean']:.2f}x")
    return out


def _backward_lines(report, s, c):
    if s.get("backward_note"):
        return [f"forward+backward: {s['backward_note']}"]
    r = s.get("backward_ratio_vs_torch_nhwc_geomean")
    k = s.get("backward_speedup_vs_keras_geomean")
    if r is None and k is None:
        return []
    return ["forward+backward: "
            + (f"geomean t(nbconv)/t(torch ch_last) = {r:.2f}{_against(s, 'backward_vs_torch')}" if r else
               "torch ch_last not measured")
            + "; " + (f"speedup over Keras/jax {k:.1f}x{_against(s, 'backward_vs_keras')}" if k else
                      "Keras not measured")]


def _keras_model_lines(report, s, c):
    out = []
    for entry in s.get("keras_model") or []:
        backend = entry["backend"]
        if "speedup_min" not in entry:
            out.append(f"Keras model on {backend}: {entry.get('note') or 'not measured'}")
            continue
        parts = []
        for k in entry["rows"]:
            p = k["shape"]
            if k["speedup_vs_keras_layers"]:
                p += f" {k['speedup_vs_keras_layers']:.1f}x"
            if k["ratio_vs_direct"]:
                p += (f" (bridge: {k['ratio_vs_direct']:.2f}x the direct calls"
                      + (" in the same process" if k.get("same_process") else "") + ")")
            parts.append(p)
        name = f"keras_model_{backend}"
        out.append(f"Keras model on {backend}: nbconv layers' speedup over Keras's layers: " + ", ".join(parts)
                   + f"; min {entry['speedup_min']:.1f}x{_against(s, name)}"
                   + (f"; bridge at b8{' (bare layers)' if entry['bridge_bare'] else ''} {entry['bridge_b8']:.2f}x"
                      f"{_against(s, 'keras_bridge', backend)}" if "bridge_b8" in entry else ""))
        ceil = (c.get("keras_model") or {}).get(backend) or []
        direct = ", ".join(f"{k['shape']} {k['direct']:.1f}x" for k in ceil if k["direct"])
        at_rate = [k["at_rate"] for k in ceil if k["at_rate"]]
        if direct or at_rate:
            out.append(f"  ceiling on {backend}: "
                       + (f"with a free bridge and free BatchNorm/ReLU, the convolutions at the direct calls' speed "
                          f"would give {direct}" if direct else "")
                       + ("; " if direct and at_rate else "")
                       + ("at the run's fastest rate " + ", ".join(f"{k['shape']} {k['at_rate']:.1f}x" for k in ceil)
                          + _reach(min(at_rate), TARGETS[name], "min") if at_rate else ""))
    return out


def _models_lines(report, s, c):
    out = []
    for backend in MODEL_BACKENDS:
        rows = [m for m in s.get("models") or [] if m["backend"] == backend]
        con = report["contenders"].get(f"models_{backend}") or {}
        if not rows:
            if con.get("ran") and con.get("available") is False:
                out.append(f"models on {backend}: {con.get('note')}")
            elif con.get("ran"):
                out.append(f"models on {backend}: not measured"
                           + (f" ({'; '.join(f'{k}: {v}' for k, v in list((con.get('errors') or {}).items())[:2])})"
                              if con.get("errors") else ""))
            continue
        parts = ", ".join(f"{m['shape']} " + "/".join(f"{m['speedup'][v]:.2f}x" if v in m["speedup"]
                                                       else "-" for v in ("converted", "folded", "fit"))
                          for m in rows)
        line = f"models on {backend}, speedup of converted/folded/fit over the original: {parts}"
        for name, (b, variant, models) in MODEL_TARGETS.items():
            if b != backend:
                continue
            r = _result(s, name)
            what = f"{variant}{'' if models is None else ' ' + '/'.join(models)}"
            line += (f"; {what} min {r['value']:.2f}x{_against(s, name)}" if r
                     else f"; {what} not measured ({TARGETS[name]})")
        out.append(line)
    return out


def _bf16_lines(report, s, c):
    b = s.get("bf16") or {}
    out = []
    if "fp32_speedup_geomean" in b:
        out.append(f"bfloat16 against nbconv's float32 on the same shapes ({b['fp32_n']} layers of >= "
                   f"{BF16_MIN_CHANNELS} channels): geomean {b['fp32_speedup_geomean']:.2f}x, min "
                   f"{b['fp32_speedup_min']:.2f}x at {b['fp32_speedup_min_case']}{_against(s, 'bf16_vs_float32')}")
    if "torch_speedup_geomean" in b:
        out.append(f"bfloat16 against torch's bfloat16 (the better of NCHW and channels_last), {b['torch_n']} "
                   f"MobileNetV1 + Xception shapes: geomean {b['torch_speedup_geomean']:.2f}x"
                   f"{_against(s, 'bf16_vs_torch')}; min {b['torch_speedup_min']:.2f}x at "
                   f"{b['torch_speedup_min_case']}{_against(s, 'bf16_vs_torch_worst')}")
    if "backward_torch_speedup_geomean" in b:
        out.append(f"bfloat16 forward + backward at batch 8 against torch's bfloat16 ({b['backward_n']} shapes): "
                   f"geomean {b['backward_torch_speedup_geomean']:.2f}x{_against(s, 'bf16_backward_vs_torch')}")
    if "keras_model_speedup_min" in b:
        rows = ", ".join(f"{k['shape']} {k['speedup']:.2f}x" for k in b["keras_model_rows"])
        out.append(f"Keras model under mixed_bfloat16 on jax against the same nbconv layers in float32: {rows}"
                   f"{_against(s, 'bf16_keras_model')}")
    if b.get("keras_model_direct_rows"):
        rows = ", ".join(f"{k['shape']} {k['speedup']:.2f}x" for k in b["keras_model_direct_rows"])
        out.append(f"  the same 13 calls made directly, mixed_bfloat16's over float32 (the kernels alone, without "
                   f"the bridge, BatchNorm or Keras): {rows}")
    return out


def _idle_lines(report, s, c):
    out = []
    for gap, e in (s.get("idle") or {}).items():
        scope = "no gap" if gap == "0" else f"{gap} ms"
        label = ("idle runs, no gap (fixed rounds, same processes as the gaps)" if gap == "0"
                 else f"idle {gap} ms before each call")
        parts = []
        if "ratio_geomean" in e:
            # without a gap the ratio is the baseline of the gaps' targets, not a target itself
            parts.append(f"geomean t(nbconv)/t(best of torch, ONNX Runtime) = {e['ratio_geomean']:.2f}"
                         + (_against(s, "idle_vs_best_peer", scope) if gap != "0" else "")
                         + f", max {e['ratio_max']:.2f} at {e['ratio_max_case']}"
                         + (_against(s, "idle_vs_best_peer_worst", scope) if gap != "0" else ""))
        if "thread_speedup_min" in e:
            parts.append(f"2 threads over 1, lowest on the {e['thread_n']} shapes of >= "
                         f"{IDLE_THREAD_MIN_MACS / 1e6:.0f} M MAC: {e['thread_speedup_min']:.2f}x at "
                         f"{e['thread_speedup_min_case']}{_against(s, 'idle_thread_speedup', scope)}")
        if parts:
            out.append(f"{label}: " + "; ".join(parts))
    return out


def _memory_lines(report, s, c):
    mem = report["probes"].get("memory") or {}
    fused = mem.get("fused")
    if not fused:
        return []
    if "error" in fused:
        return [f"memory: probe failed: {fused['error']}"]
    n, h, w, ch, f = fused["shape"]
    line = (f"memory, batch {n} {h}x{w}x{ch}->{f} fused call: the call raised the peak RSS by "
            f"{fused['peak_increase_mib']:.0f} MiB = output {fused['output_mib']:.0f} MiB + "
            f"{fused['scratch_mib']:.1f} MiB scratch (input {fused['input_mib']:.0f} MiB already resident; "
            f"input + output = {fused['input_mib'] + fused['output_mib']:.0f} MiB; the depthwise intermediate it "
            f"avoids would be {fused['intermediate_mib']:.0f} MiB); process peak {fused['peak_rss_mib']:.0f} MiB")
    if not fused.get("peak_exact"):
        line += " (peak counter could not be reset: upper bound)"
    out = [line]
    two = mem.get("two_step")
    if two and "error" not in two:
        out.append(f"  for comparison, depthwise_conv2d then pointwise_conv2d: +{two['peak_increase_mib']:.0f} MiB "
                   f"({two['scratch_mib']:.0f} MiB beyond the output)")
    return out


def _first_call_lines(report, s, c):
    out = []
    fc = report["probes"].get("first_call") or {}
    if fc.get("cold") and "error" not in fc["cold"] and fc.get("warm") and "error" not in fc["warm"]:
        cold, warm = fc["cold"], fc["warm"]
        others = {k: v for k, v in cold["calls"].items() if k != "separable"}
        out.append(f"first call, fresh kernel cache, new process: import nbconv + first separable_conv2d (b1 "
                   f"56x56x32->64) {cold['import_plus_first_call_s']:.2f} s ({TARGETS['first_call_s']}; import "
                   f"{cold['import_s']:.2f} s + call {cold['first_call_s']:.2f} s, answered by NumPy while the "
                   f"kernels compile in the background); slowest other first call {max(others.values()):.2f} s "
                   f"({TARGETS['other_first_call_s']}; " + ", ".join(f"{k} {v:.2f}" for k, v in others.items())
                   + f"); full speed after {cold['compiled_after_s']:.0f} s; next process (cache warm) import + "
                   f"first call {warm['import_plus_first_call_s']:.2f} s")
        sync = fc.get("cold_sync")
        if sync and "error" not in sync:
            out.append(f"  with NBCONV_COMPILE=sync the first separable call waits for its compile: "
                       f"{sync['import_plus_first_call_s']:.1f} s")
    elif fc:
        errs = "; ".join(f"{k}: {v.get('error')}" for k, v in fc.items() if isinstance(v, dict) and "error" in v)
        out.append(f"first call: probe failed: {errs}")
    fp = report["probes"].get("first_predict") or {}
    parts = []
    for backend, res in fp.items():
        own, ours = res.get("keras") or {}, res.get("converted") or {}
        if "first_predict_s" in own and "first_predict_s" in ours:
            parts.append(f"{backend} {ours['first_predict_s']:.2f} s vs {own['first_predict_s']:.2f} s "
                         f"({ours['first_predict_s'] / own['first_predict_s']:.2f}x)")
        else:
            parts.append(f"{backend} failed: {own.get('error') or ours.get('error')}")
    if parts:
        out.append(f"first predict, converted MobileNet (96x96, b2) vs Keras's own layers, fresh kernel cache "
                   f"({TARGETS['first_predict_ratio']}): " + ", ".join(parts))
    return out


# --- chart ------------------------------------------------------------------

def plot(report, path):
    """Horizontal bars of nbconv's speedup over the best peer per shape (log scale, line at 1.0)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    items = []
    for suite in _cases.SUITES:
        for r in report["suites"].get(suite, []):
            if r.get("speedup_best"):
                items.append((suite, f"{suite}: {r['case']['shape']}", r["speedup_best"],
                              report["contenders"][r["best_peer"]]["label"]))
    if not items:
        return None
    colors = dict(zip(_cases.SUITES, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(items) + 1.6))
    ys = range(len(items))[::-1]
    # bars grow from 1.0 (parity) towards the speedup, to the right when nbconv is faster
    ax.barh(list(ys), [i[2] - 1 for i in items], left=1, color=[colors[i[0]] for i in items])
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([i[1] for i in items], fontsize=7)
    for y, i in zip(ys, items):
        faster = i[2] >= 1
        ax.text(i[2], y, f" {i[2]:.2f}x vs {i[3]} " if faster else f" {i[2]:.2f}x vs {i[3]} ", va="center",
                ha="left" if faster else "right", fontsize=6)
    ax.set_ylim(-0.7, len(items) - 0.3)
    lo = min(i[2] for i in items)
    hi = max(i[2] for i in items)
    ax.set_xlim(min(0.5, lo / 4), max(2.0, hi * 4))
    ax.set_xlabel("speedup of nbconv over the best peer = t(best peer) / t(nbconv)   (> 1: nbconv faster)")
    meta = report["meta"]
    peak = report["peak"].get("gflops")
    ax.set_title(f"nbconv vs best of PyTorch / ONNX Runtime / Keras / NumPy, {meta.get('threads')} threads, "
                 f"{meta.get('stat', 'median')} times\n{meta.get('started', '')}"
                 + (f", sgemm peak {peak:.0f} GFLOP/s" if peak else "")
                 + (", QUICK run" if meta.get("quick") else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(report, out_dir, stem, markdown=MARKDOWN_PAGE):
    """Write ``<stem>.json``, ``<stem>.txt`` and ``<stem>.png`` (and ``latest.*`` copies) to ``out_dir``, and the
    markdown page ``markdown`` (with its chart beside it, same name, ``.png``) unless it is None.

    Returns the text report and ``{"json", "txt", "png", "md"}`` paths (None where nothing was written).
    """
    os.makedirs(out_dir, exist_ok=True)
    text = format_text(report)
    paths = {}
    for name in (stem, "latest"):
        with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
            json.dump(report, fh, indent=1, default=str)
        with open(os.path.join(out_dir, f"{name}.txt"), "w") as fh:
            fh.write(text)
        png = plot(report, os.path.join(out_dir, f"{name}.png"))
        paths[name] = {"json": os.path.join(out_dir, f"{name}.json"), "txt": os.path.join(out_dir, f"{name}.txt"),
                       "png": png, "md": None}
    if markdown:
        folder = os.path.dirname(os.path.abspath(markdown))
        os.makedirs(folder, exist_ok=True)
        chart = plot(report, os.path.splitext(os.path.abspath(markdown))[0] + ".png")
        with open(markdown, "w") as fh:
            fh.write(format_markdown(report, os.path.basename(chart) if chart else None))
        paths[stem]["md"] = markdown
    return text, paths[stem]


def _parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="Rebuild the report (text, JSON, chart and markdown page) from a raw "
                                            "results folder of python -m benchmarks.")
    p.add_argument("raw", help="the raw results folder (benchmarks/results/raw-<stamp>)")
    stat = p.add_mutually_exclusive_group()
    stat.add_argument("--median", dest="stat", action="store_const", const="median",
                      help="the rounds' median (the default)")
    stat.add_argument("--min", dest="stat", action="store_const", const="min",
                      help="the fastest round, for a shared, noisy machine")
    p.add_argument("--markdown", default=MARKDOWN_PAGE,
                   help="where to write the markdown page (default docs/benchmarks.md), or 'none'")
    return p


def main(argv=None):
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    raw = args.raw.rstrip("/")
    report = build(raw, args.stat)
    stem = "report-" + os.path.basename(raw).replace("raw-", "") + ("-min" if report["meta"]["stat"] == "min" else "")
    markdown = None if args.markdown.lower() == "none" else args.markdown
    text, paths = save(report, os.path.dirname(raw) or ".", stem, markdown)
    sys.stdout.write(text)
    print(f"\nsaved {paths['txt']}, {paths['json']}" + (f", {paths['png']}" if paths["png"] else "")
          + (f", {paths['md']}" if paths["md"] else ""))


if __name__ == "__main__":
    main()
