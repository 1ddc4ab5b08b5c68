"""The one table of benchmark cases that feeds every suite and every contender.

A :class:`Case` is a single convolution problem: the operation (separable,
depthwise alone, pointwise alone, or separable forward+backward), its geometry
in Keras terms (NHWC shape, Keras weight layouts, strides/padding/dilation) and
the data format in which the input *arrives*.  Contenders turn it into their own
call (:mod:`benchmarks.contenders`); the report groups results by ``suite``.

All cases are float32 and 3x3 'same' unless stated.

Adding a suite (as the Keras model's was added): add rows with a new ``suite``
name here, teach the contenders that support it their ``setup`` for its ``op``,
and add the suite name to :data:`SUITES` (the order the report prints them).
"""
import functools
import importlib.util
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from nbconv._args import conv_output_hw, same_padding

from . import ROOT

__all__ = ["Case", "CASES", "SUITES", "SUITE_TITLES", "KERAS_MODEL_SUITES", "MOBILENET_BLOCKS", "MODEL_OPS", "APP_OPS",
           "APP_MODELS", "APP_FIT_OPS", "APP_SHAPES",
           "select", "make_arrays", "explicit_padding", "reference_nhwc"]

#: suites in report order
SUITES = ("mobilenet", "xception", "classic", "hard", "depthwise", "pointwise", "fused", "overhead", "backward",
          "bf16", "bf16_backward", "keras_model", "keras_model_tensorflow", "keras_model_torch", "models")
#: the Keras model suite of each Keras backend (one process per backend and side)
KERAS_MODEL_SUITES = {"jax": "keras_model", "tensorflow": "keras_model_tensorflow", "torch": "keras_model_torch"}

SUITE_TITLES = {
    "mobilenet": "MobileNetV1 separable blocks (224x224, alpha=1)",
    "xception": "Xception separable layers (299x299)",
    "classic": "The classic example: (8, 32, 56, 56) channels_first, 3x3, padding=1",
    "hard": "Cases peers handle poorly",
    "depthwise": "Depthwise convolution alone",
    "pointwise": "Pointwise (1x1) convolution alone",
    "fused": "nbconv's fused kernel against its own depthwise-then-pointwise (and the peers)",
    "overhead": "Per-call overhead on a tiny shape",
    "backward": "Forward + backward (all gradients), batch 8",
    "bf16": "bfloat16: MobileNetV1 + Xception separable layers, bfloat16 in and out, products summed in float32",
    "bf16_backward": "bfloat16: forward + backward (all gradients), batch 8",
    "keras_model": "Keras model of MobileNetV1's 13 separable blocks (SeparableConv2D + BatchNorm + ReLU; the nbconv "
                   "layers' model uses keras_layers' drop-ins of all three, as keras_layers.convert does), "
                   "112x112x32 input, jax backend",
    "keras_model_tensorflow": "The same Keras model on the tensorflow backend",
    "keras_model_torch": "The same Keras model on the torch backend",
    "models": "keras.applications models (weights=None, batch norms calibrated): original vs "
              "keras_layers.convert(model) vs convert(model, fold_batchnorm=True) in predict, original vs "
              "converted in a training step, per Keras backend",
}

#: MobileNetV1's 13 separable blocks as (input H=W, C, F, stride); blocks 7-11 repeat
MOBILENET_BLOCKS = ((112, 32, 64, 1), (112, 64, 128, 2), (56, 128, 128, 1), (56, 128, 256, 2), (28, 256, 256, 1),
                    (28, 256, 512, 2)) + ((14, 512, 512, 1),) * 5 + ((14, 512, 1024, 2), (7, 1024, 1024, 1))
#: predict and a training step of the model (+ BatchNorm + ReLU), and predict of the bare layers (relu as the
#: layers' activation, no BatchNorm): against the direct calls, the bare model measures the bridge alone
MODEL_OPS = ("model_predict", "model_train", "model_bare")
#: the variants of a keras.applications model timed by the "models" suite: predict of the original, the converted
#: and the folded model, and a training step (train_on_batch) of the original and the converted one
APP_OPS = ("app_original", "app_converted", "app_folded", "app_fit_original", "app_fit_converted")
#: the training-step variants among APP_OPS
APP_FIT_OPS = ("app_fit_original", "app_fit_converted")
#: keras.applications models of the "models" suite: case name -> (constructor, {input H=W: forward MACs per
#: image}); the MACs are nbconv.cost.model_cost(model, 1).macs (convolutions, separable, depthwise and dense layers)
APP_MODELS = {"mobilenet": ("MobileNet", {224: 568_740_352, 96: 105_298_432}),
              "mobilenetv2": ("MobileNetV2", {224: 300_774_272, 96: 56_289_152}),
              "xception": ("Xception", {224: 4_552_879_072, 96: 827_908_576})}
#: (batch, input H=W) of every model in the "models" suite
APP_SHAPES = ((1, 224), (2, 96), (8, 96))


@dataclass(frozen=True)
class Case:
    """One benchmark problem.

    ``h, w, c`` describe the input (N, H, W, C) whatever ``data_format``; ``f``
    is the number of filters of the pointwise part (ignored for depthwise).
    ``padding`` is ``"same"``/``"valid"`` (Keras semantics) or an int (explicit
    symmetric zero padding, PyTorch's ``padding=1``).
    """

    suite: str
    name: str
    n: int
    h: int
    w: int
    c: int
    f: int
    k: int = 3
    stride: int = 1
    dilation: int = 1
    dm: int = 1
    padding: object = "same"
    data_format: str = "channels_last"
    op: str = "separable"  # separable | depthwise | pointwise | separable_fwdbwd | model_predict | model_train | app_*
    #: "float32", or "bfloat16": inputs, weights and outputs in bfloat16 (the Keras model cases: mixed_bfloat16)
    dtype: str = "float32"
    #: the keras.applications model of an app_* case (a key of APP_MODELS)
    model: str = ""
    quick: bool = False
    tags: tuple = field(default=())

    @property
    def id(self):
        return f"{self.suite}:{self.name}"

    @property
    def cm(self):
        return self.c * self.dm

    @property
    def pads(self):
        """Explicit ``((top, bottom), (left, right))`` equivalent of ``padding``."""
        return explicit_padding(self)

    @property
    def out_hw(self):
        if self.op == "pointwise":
            return self.h, self.w
        return conv_output_hw(self.h, self.w, (self.k, self.k), self.stride, self.pads, self.dilation)

    @property
    def macs(self):
        """(depthwise MACs, pointwise MACs) of the forward pass."""
        if self.op in APP_OPS:
            return 0, self.n * APP_MODELS[self.model][1][self.h]
        if self.op in MODEL_OPS:
            dw = pw = 0
            for hw, c, f, s in MOBILENET_BLOCKS:
                o = -(-hw // s)
                dw += self.n * o * o * c * 9
                pw += self.n * o * o * c * f
            return dw, pw
        oh, ow = self.out_hw
        if self.op == "pointwise":
            return 0, self.n * self.h * self.w * self.c * self.f
        dw = self.n * oh * ow * self.cm * self.k * self.k
        pw = 0 if self.op == "depthwise" else self.n * oh * ow * self.cm * self.f
        return dw, pw

    @property
    def flops(self):
        """Floating-point operations counted for GFLOP/s: 2 * MACs (forward); 3x that for forward+backward."""
        f = 2 * sum(self.macs)
        return 3 * f if self.op in ("separable_fwdbwd", "model_train") + APP_FIT_OPS else f

    @property
    def shape_label(self):
        if self.op in APP_OPS:
            return f"{APP_MODELS[self.model][0]} b{self.n} {self.h}x{self.w} {self.op[4:].replace('_', ' ')}"
        oh, ow = self.out_hw
        if self.op in MODEL_OPS:
            return f"b{self.n} " + {"model_predict": "predict", "model_train": "train step",
                                    "model_bare": "predict, no BatchNorm"}[self.op] + (
                                        " mixed_bfloat16" if self.bf16 else "")
        head = f"b{self.n} {self.h}x{self.w}x{self.c}"
        if self.op == "depthwise":
            parts = [head, f"dw{self.k}x{self.k}" + (f"*{self.dm}" if self.dm > 1 else "")]
        else:
            parts = [f"{head}->{self.f}"]
        if self.op not in ("depthwise", "pointwise"):
            if self.k != 3:
                parts.append(f"k{self.k}")
            if self.dm > 1:
                parts.append(f"dm{self.dm}")
        if self.stride > 1:
            parts.append(f"s{self.stride}")
        if self.dilation > 1:
            parts.append(f"d{self.dilation}")
        if self.data_format == "channels_first":
            parts.append("NCHW")
        if self.bf16:
            parts.append("bf16")
        return " ".join(parts)

    @property
    def bf16(self):
        return self.dtype == "bfloat16"

    def to_dict(self):
        d = asdict(self)
        d["tags"] = list(self.tags)
        d.update(id=self.id, shape=self.shape_label, macs=list(self.macs), flops=self.flops,
                 out_hw=list(self.out_hw), pads=[list(p) for p in self.pads])
        return d


def explicit_padding(case):
    if case.op == "pointwise":
        return (0, 0), (0, 0)
    if isinstance(case.padding, int):
        p = case.padding
        return (p, p), (p, p)
    if case.padding == "valid":
        return (0, 0), (0, 0)
    return tuple(same_padding(n, case.k, case.stride, case.dilation) for n in (case.h, case.w))


def _mnv1(suite, n, hw, c, f, s, quick=False, **kw):
    return Case(suite, f"b{n}-{hw}x{c}-{f}-s{s}", n, hw, hw, c, f, stride=s, quick=quick, **kw)


_MOBILENET = [(112, 32, 64, 1), (112, 64, 128, 2), (56, 128, 128, 1), (56, 128, 256, 2), (28, 256, 256, 1),
              (28, 256, 512, 2), (14, 512, 512, 1), (14, 512, 1024, 2), (7, 1024, 1024, 1)]
_MOBILENET_QUICK = {(56, 128, 128, 1), (7, 1024, 1024, 1), (14, 512, 512, 1)}
_MOBILENET_B8 = [(112, 32, 64, 1), (56, 128, 128, 1), (28, 256, 256, 1), (14, 512, 512, 1)]
_XCEPTION = [(147, 64, 128), (147, 128, 128), (74, 256, 256), (37, 728, 728), (19, 728, 728), (10, 1024, 1536),
             (10, 1536, 2048)]


def _build():
    cases = []
    for hw, c, f, s in _MOBILENET:
        cases.append(_mnv1("mobilenet", 1, hw, c, f, s, quick=(hw, c, f, s) in _MOBILENET_QUICK, tags=("target",)))
    for hw, c, f, s in _MOBILENET_B8:
        cases.append(_mnv1("mobilenet", 8, hw, c, f, s, quick=(hw == 56), tags=("target",)))
    for hw, c, f in _XCEPTION:
        cases.append(Case("xception", f"b1-{hw}x{c}-{f}", 1, hw, hw, c, f, quick=(hw == 19), tags=("target",)))
    for f in (64, 256):
        cases.append(Case("classic", f"b8-56x32-{f}-pad1-nchw", 8, 56, 56, 32, f, padding=1,
                          data_format="channels_first", quick=(f == 64)))
    # the channels_last twin of the classic example, for the channels_first/channels_last ratio
    cases.append(Case("classic", "b8-56x32-64-pad1-nhwc", 8, 56, 56, 32, 64, padding=1, quick=True,
                      tags=("cf-twin",)))
    hard = [
        Case("hard", "b1-56x128-128-d2", 1, 56, 56, 128, 128, dilation=2, quick=True),
        Case("hard", "b1-28x256-256-d2", 1, 28, 28, 256, 256, dilation=2),
        Case("hard", "b1-56x128-256-dm2", 1, 56, 56, 128, 256, dm=2),
        Case("hard", "b1-28x256-256-dm2", 1, 28, 28, 256, 256, dm=2),
        Case("hard", "b1-56x128-128-k5", 1, 56, 56, 128, 128, k=5),
        Case("hard", "b1-28x256-256-k7", 1, 28, 28, 256, 256, k=7),
        Case("hard", "b1-56x128-128-nchw", 1, 56, 56, 128, 128, data_format="channels_first"),
        Case("hard", "b1-14x512-512-nchw", 1, 14, 14, 512, 512, data_format="channels_first"),
        Case("hard", "b4-112x64-64", 4, 112, 112, 64, 64),
    ]
    cases += [Case(**{**asdict(c), "tags": ("poorly",)}) for c in hard]
    for hw, c, s in [(112, 32, 1), (112, 64, 2), (56, 128, 1), (14, 512, 1), (7, 1024, 1)]:
        cases.append(Case("depthwise", f"b1-{hw}x{c}-s{s}", 1, hw, hw, c, c, stride=s, op="depthwise",
                          quick=(hw == 56)))
    cases.append(Case("depthwise", "b1-56x128-s1-dm2", 1, 56, 56, 128, 256, dm=2, op="depthwise"))
    for hw, c, f in [(112, 32, 64), (56, 128, 128), (14, 512, 512), (7, 1024, 1024)]:
        cases.append(Case("pointwise", f"b1-{hw}x{c}-{f}", 1, hw, hw, c, f, op="pointwise", quick=(hw == 56)))
    for n, hw, c, f, s in [(1, 112, 32, 64, 1), (1, 56, 128, 128, 1), (1, 14, 512, 512, 1), (8, 56, 128, 128, 1),
                           (1, 147, 128, 128, 1), (1, 56, 128, 256, 2)]:
        cases.append(_mnv1("fused", n, hw, c, f, s, quick=(n == 1 and hw == 56 and s == 1)))
    cases.append(Case("overhead", "b1-4x4x8-8", 1, 4, 4, 8, 8, quick=True))
    for hw, c, f, s in [(112, 32, 64, 1), (56, 128, 128, 1), (56, 128, 256, 2), (28, 256, 256, 1),
                        (14, 512, 512, 1), (7, 1024, 1024, 1)]:
        cases.append(_mnv1("backward", 8, hw, c, f, s, quick=(hw == 14), op="separable_fwdbwd"))
    for hw, c, f, s in _MOBILENET:
        cases.append(_mnv1("bf16", 1, hw, c, f, s, quick=(hw, c, f, s) in _MOBILENET_QUICK, dtype="bfloat16",
                           tags=("target",)))
    for hw, c, f in _XCEPTION:
        cases.append(Case("bf16", f"b1-{hw}x{c}-{f}", 1, hw, hw, c, f, quick=(hw == 19), dtype="bfloat16",
                          tags=("target",)))
    for hw, c, f, s in [(112, 32, 64, 1), (56, 128, 128, 1), (56, 128, 256, 2), (28, 256, 256, 1),
                        (14, 512, 512, 1), (7, 1024, 1024, 1)]:
        cases.append(_mnv1("bf16_backward", 8, hw, c, f, s, quick=(hw == 14), op="separable_fwdbwd",
                           dtype="bfloat16"))
    for backend, suite in KERAS_MODEL_SUITES.items():
        for n, op in ((1, "model_predict"), (8, "model_predict"), (8, "model_train"), (8, "model_bare")):
            cases.append(Case(suite, f"b{n}-{op.split('_')[1]}", n, 112, 112, 32, 1024, op=op,
                              quick=(n == 1 and backend == "jax")))
    # the model under mixed_bfloat16 (jax): against the same model in float32
    for n, op in ((1, "model_predict"), (8, "model_predict"), (8, "model_train")):
        cases.append(Case("keras_model", f"b{n}-{op.split('_')[1]}-bf16", n, 112, 112, 32, 1024, op=op,
                          dtype="bfloat16", quick=(n == 1)))
    # keras.applications models: the variants of one (model, batch, size) follow each other (the contender builds
    # the original once and converts it); --quick: MobileNet at batch 1 only
    for model in APP_MODELS:
        for n, hw in APP_SHAPES:
            for op in APP_OPS:
                cases.append(Case("models", f"{model}-b{n}-{hw}-{op[4:]}", n, hw, hw, 3, 1000, op=op, model=model,
                                  quick=(model == "mobilenet" and n == 1)))
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return tuple(cases)


CASES = _build()


#: output check of the bfloat16 cases, relative to the output's scale: the intermediate and the output are rounded
#: to 8 significant bits (2^-8 each)
BF16_CHECK_TOL = 3e-2

#: suites timed with idle gaps before each call (``python -m benchmarks --idle``)
IDLE_SUITES = ("mobilenet", "xception")


@dataclass(frozen=True)
class IdleCase:
    """A case timed with ``gap_ms`` of sleep before every call, as between a server's requests or a model's
    layers."""

    case: Case
    gap_ms: float

    @property
    def id(self):
        return f"{self.case.id}@idle{self.gap_ms:g}ms"


def select(suites=None, quick=False):
    """Cases of the given suites (all when None), only the quick ones if ``quick``."""
    out = []
    for c in CASES:
        if suites and c.suite not in suites:
            continue
        if quick and not c.quick:
            continue
        out.append(c)
    return out


def make_arrays(case, seed=0):
    """Deterministic inputs in Keras layouts: x (NHWC), depthwise (kh, kw, C, dm), pointwise (1, 1, C*dm, F);
    float32 values, rounded to bfloat16 for a bfloat16 case (the contenders cast them, exactly).

    Values are scaled so the outputs stay O(1) (no denormals, no overflow).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.n, case.h, case.w, case.c), dtype=np.float32)
    dk = (rng.standard_normal((case.k, case.k, case.c, case.dm), dtype=np.float32) / case.k)
    pk = (rng.standard_normal((1, 1, case.cm if case.op != "pointwise" else case.c, case.f), dtype=np.float32)
          / np.float32(math.sqrt(case.cm)))
    if case.bf16:
        import ml_dtypes

        x, dk, pk = (a.astype(ml_dtypes.bfloat16).astype(np.float32) for a in (x, dk, pk))
    return x, dk, pk


@functools.lru_cache(maxsize=None)
def _reference():
    """``tests/reference.py``, the project's float64 reference, loaded by path (``tests/`` is not a package)."""
    path = os.path.join(ROOT, "tests", "reference.py")
    spec = importlib.util.spec_from_file_location("nbconv_tests_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_nhwc(case, x, dk, pk, pads=None):
    """The float64 result of ``case`` for the NHWC arrays of :func:`make_arrays` (NHWC out), computed by
    ``tests/reference.py``; ``pads`` (``((top, bottom), (left, right))``) overrides the case's padding, for a
    contender that used another padding with the same output shape."""
    ref = _reference()
    if case.op == "pointwise":
        return ref.pointwise_ref(x, np.asarray(pk).reshape(case.c, case.f))
    conv = dict(strides=case.stride, padding=pads if pads is not None else case.pads, dilation_rate=case.dilation)
    if case.op == "depthwise":
        return ref.depthwise_ref(x, dk, **conv)
    return ref.separable_ref(x, dk, pk, **conv)
