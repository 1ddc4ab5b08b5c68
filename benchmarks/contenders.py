"""Contenders: one small adapter per library, all with the same interface.

``contender.setup(case)`` returns a :class:`Bench`, a zero-argument callable
that runs the case once (the timed call) and knows how to turn its result into
an NHWC NumPy array for the correctness check, and which padding it actually
used.  Each adapter imports its library lazily, so a benchmark process imports
only its own contender's library and thread pool (see ``__main__``).

Layout conventions (stated in the report):

* nbconv and Keras get the input in the case's ``data_format``.
* PyTorch and ONNX Runtime get it in their own layout, prepared outside the
  timed call, as their users hold their data; except that when a case's input
  *arrives* channels_first, PyTorch channels_last pays the conversion inside the
  timed call (that is what a channels_last user has to do).
* Stride-2 'same' padding is asymmetric in Keras/TF ((0, 1) on even sizes).
  ONNX Runtime gets exactly those pads.  PyTorch's conv only pads
  symmetrically; where a symmetric padding gives the same output shape (all
  stride-2 layers here) it uses that, as PyTorch's own MobileNet does: same
  shape, same work, no extra ``F.pad`` copy.  The check compares each contender
  with the float64 reference computed with the padding it used.
"""
import dataclasses
import math
import os

import numpy as np

from .cases import (APP_FIT_OPS, APP_MODELS, APP_OPS, KERAS_MODEL_SUITES, MOBILENET_BLOCKS, MODEL_OPS, SUITES,
                    make_arrays, reference_nhwc)

__all__ = ["Bench", "Unsupported", "CONTENDERS", "PEERS", "SUITE_ROLES", "MODEL_BACKENDS", "get", "THREADS",
           "output_error", "rel_error"]

#: threads every contender may use (the report's targets are for 2)
THREADS = int(os.environ.get("NBCONV_BENCH_THREADS", "2"))

#: above this many forward MACs the NumPy baseline is not run
NUMPY_MAX_MACS = 120e6


class Unsupported(Exception):
    """The contender cannot run this case; the message is shown in the report."""


class Bench:
    """``rel_err``: a check the contender already made (instead of the float64 reference);
    ``rounds``: a fixed number of timed rounds (for slow whole-model calls) instead of pytest-benchmark's choice;
    ``warmed``: ``setup`` already made the untimed first call(s), so the runner makes none before timing;
    ``extra``: a callable run after the timing, returning figures for the result's ``extra_info``."""

    def __init__(self, fn, to_nhwc=None, pads=None, check=True, rel_err=None, rounds=None, warmed=False,
                 extra=None):
        self.fn = fn
        self.extra = extra
        self.to_nhwc = to_nhwc or (lambda out: np.asarray(out))
        self.pads = pads
        self.check = check
        self.rel_err = rel_err
        self.rounds = rounds
        self.warmed = warmed

    def __call__(self):
        return self.fn()


def _nchw(a):
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def _as_case_dtype(case, *arrays):
    """The float32 arrays of ``make_arrays`` in the case's dtype (bfloat16 ones hold bfloat16 values already)."""
    if not case.bf16:
        return arrays
    import ml_dtypes
    return tuple(a.astype(ml_dtypes.bfloat16) for a in arrays)


def _no_bf16(case, why):
    if case.bf16:
        raise Unsupported(f"no bfloat16: {why}")


def _input(case, x):
    return _nchw(x) if case.data_format == "channels_first" else x


def _from_cf(case):
    if case.data_format == "channels_first":
        return lambda out: np.asarray(out).transpose(0, 2, 3, 1)
    return None


def _grad_output(case, seed=1):
    oh, ow = case.out_hw
    g = np.random.default_rng(seed).standard_normal((case.n, oh, ow, case.f), dtype=np.float32)
    return g


#: suites of single operations (every suite but the Keras models')
OP_SUITES = tuple(s for s in SUITES if s not in ("models",) + tuple(KERAS_MODEL_SUITES.values()))


class Contender:
    name = "?"
    label = "?"
    peer = True
    ops = ("separable", "depthwise", "pointwise")
    #: suites this contender runs (None: all)
    suites = None
    #: modules its process imports (``python -m nbconv bench`` lists it as not installed without them)
    modules = ()

    def available(self):
        """None when usable, else the reason it is skipped (shown in the report)."""
        return None

    def version(self):
        return ""

    def init_process(self):
        pass

    def setup(self, case):
        raise NotImplementedError

    def info(self):
        return {}


class NbConv(Contender):
    name = "nbconv"
    label = "nbconv"
    peer = False
    ops = ("separable", "depthwise", "pointwise", "separable_fwdbwd")
    suites = tuple(s for s in SUITES if s != "models")

    def available(self):
        try:
            import nbconv  # noqa: F401
        except Exception as exc:  # pragma: no cover - shown in the report
            return f"nbconv does not import: {exc!r}"
        return None

    def version(self):
        import nbconv
        return nbconv.__version__

    def init_process(self):
        import nbconv
        nbconv.set_num_threads(min(THREADS, nbconv.get_num_threads()) if THREADS > 0 else nbconv.get_num_threads())

    def info(self):
        import numba

        import nbconv
        from nbconv import _runtime
        return {"threading_layer": getattr(_runtime, "THREADING_LAYER", "?"), "numba": numba.__version__,
                "num_threads": nbconv.get_num_threads(), "path": os.path.dirname(nbconv.__file__)}

    def _kw(self, case):
        return dict(strides=case.stride, padding=case.padding, dilation_rate=case.dilation,
                    data_format=case.data_format)

    def setup(self, case):
        import nbconv
        x, dk, pk = _as_case_dtype(case, *make_arrays(case))
        xin = _input(case, x)
        kw = self._kw(case)
        if case.op == "separable":
            return Bench(lambda: nbconv.separable_conv2d(xin, dk, pk, **kw), _from_cf(case))
        if case.op == "depthwise":
            return Bench(lambda: nbconv.depthwise_conv2d(xin, dk, **kw), _from_cf(case))
        if case.op == "pointwise":
            return Bench(lambda: nbconv.pointwise_conv2d(xin, pk, data_format=case.data_format), _from_cf(case))
        if case.op == "separable_fwdbwd":
            g = _input(case, *_as_case_dtype(case, _grad_output(case)))
            wrt = ("x", "depthwise_kernel", "pointwise_kernel")

            def fwdbwd():
                nbconv.separable_conv2d(xin, dk, pk, **kw)
                return nbconv.separable_conv2d_backward(g, xin, dk, pk, wrt=wrt, **kw)
            return Bench(fwdbwd, check=False)
        if case.op in ("model_predict", "model_bare"):
            return self._model(case)
        if case.op == "model_train":
            raise Unsupported("the NumPy API has no training step (see the nbconv layers column)")
        raise Unsupported(f"op {case.op}")

    def _model(self, case):
        """The 13 blocks as direct calls, batch norm folded into the bias, ReLU fused: the bridge's lower bound.
        Under mixed_bfloat16 the calls the layers make: bfloat16 activations, float32 weights, bfloat16 products."""
        import nbconv
        rng = np.random.default_rng(0)
        (x,) = _as_case_dtype(case, rng.standard_normal((case.n, case.h, case.w, case.c), dtype=np.float32))
        blocks = []
        for hw, c, f, s in MOBILENET_BLOCKS:
            blocks.append((rng.standard_normal((3, 3, c, 1), dtype=np.float32) / 3,
                           rng.standard_normal((1, 1, c, f), dtype=np.float32) / np.float32(math.sqrt(c)),
                           rng.standard_normal(f, dtype=np.float32) * np.float32(0.1), s))
        mixed = dict(precision="bfloat16", output_dtype=x.dtype) if case.bf16 else {}

        def run():
            y = x
            for dk, pk, b, s in blocks:
                y = nbconv.separable_conv2d(y, dk, pk, b, strides=s, padding="same", activation="relu", **mixed)
            return y
        return Bench(run, check=False)


class NbConvTwoStep(NbConv):
    """nbconv's own depthwise_conv2d then pointwise_conv2d (the unfused path), for the fused suite."""

    name = "nbconv_2step"
    label = "nbconv dw+pw"
    ops = ("separable",)
    suites = ("fused",)

    def setup(self, case):
        import nbconv
        if case.op != "separable":
            raise Unsupported("separable cases only")
        x, dk, pk = make_arrays(case)
        xin = _input(case, x)
        kw = self._kw(case)

        def two_step():
            y = nbconv.depthwise_conv2d(xin, dk, **kw)
            return nbconv.pointwise_conv2d(y, pk, data_format=case.data_format)
        return Bench(two_step, _from_cf(case))


class NbConvPacked(NbConv):
    """nbconv with its pointwise weights packed once in setup (``nbconv.pack_pointwise_kernel``), as ONNX
    Runtime packs its constant weights when the session is created; not a peer (the targets use plain calls)."""

    name = "nbconv_packed"
    label = "nbconv packed"
    ops = ("separable", "pointwise")
    suites = ("mobilenet", "xception", "pointwise", "bf16")

    def setup(self, case):
        import nbconv
        if case.op not in self.ops:
            raise Unsupported(f"op {case.op}")
        x, dk, pk = _as_case_dtype(case, *make_arrays(case))
        xin = _input(case, x)
        packed = nbconv.pack_pointwise_kernel(pk)
        if case.op == "pointwise":
            return Bench(lambda: nbconv.pointwise_conv2d(xin, packed, data_format=case.data_format), _from_cf(case))
        kw = self._kw(case)
        return Bench(lambda: nbconv.separable_conv2d(xin, dk, packed, **kw), _from_cf(case))


class Keras(Contender):
    name = "keras"
    label = "Keras op"
    ops = ("separable", "depthwise", "pointwise", "separable_fwdbwd")
    suites = OP_SUITES

    @property
    def modules(self):
        return "keras", os.environ.get("KERAS_BACKEND") or "jax"

    def available(self):
        os.environ.setdefault("KERAS_BACKEND", "jax")
        try:
            import keras  # noqa: F401
        except Exception as exc:
            return f"keras does not import (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}): {exc!r}"
        return None

    def version(self):
        import keras
        return f"{keras.__version__} ({keras.backend.backend()} {self._backend_version()})"

    def _backend_version(self):
        import keras
        b = keras.backend.backend()
        try:
            mod = __import__({"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}.get(b, "numpy"))
            return mod.__version__
        except Exception:
            return "?"

    def init_process(self):
        import keras
        if keras.backend.backend() == "torch":
            import torch
            torch.set_num_threads(THREADS)

    def info(self):
        import keras
        return {"backend": keras.backend.backend(),
                "jit": {"jax": "jax.jit", "tensorflow": "tf.function(jit_compile=True)"}.get(
                    keras.backend.backend(), "eager (no jit on this backend)"),
                "threads": "the backend's default pool (every CPU the process may use)"}

    def _padding(self, case):
        if isinstance(case.padding, str):
            return case.padding
        same = dataclasses.replace(case, padding="same").pads
        if case.pads == same:
            return "same"
        if case.pads == ((0, 0), (0, 0)):
            return "valid"
        raise Unsupported(f"Keras's op has no explicit padding={case.padding}")

    def setup(self, case):
        import keras
        ops = keras.ops
        backend = keras.backend.backend()
        x, dk, pk = _as_case_dtype(case, *make_arrays(case))
        xin = _input(case, x)
        pad = self._padding(case)
        df = case.data_format
        s, d = case.stride, case.dilation
        if case.op == "separable" or case.op == "separable_fwdbwd":
            def op(x, dk, pk):
                return ops.separable_conv(x, dk, pk, strides=s, padding=pad, data_format=df, dilation_rate=d)
        elif case.op == "depthwise":
            def op(x, dk, pk):
                return ops.depthwise_conv(x, dk, strides=s, padding=pad, data_format=df, dilation_rate=d)
        elif case.op == "pointwise":
            def op(x, dk, pk):
                return ops.conv(x, pk, strides=1, padding="valid", data_format=df)
        else:
            raise Unsupported(f"op {case.op}")

        if backend == "jax":
            import jax
            import jax.numpy as jnp
            args = [jax.device_put(a) for a in (xin, dk, pk)]
            if case.op == "separable_fwdbwd":
                g = jax.device_put(_input(case, *_as_case_dtype(case, _grad_output(case))))
                step = jax.jit(jax.value_and_grad(lambda x, dk, pk: jnp.vdot(op(x, dk, pk), g), argnums=(0, 1, 2)))
                return Bench(lambda: jax.block_until_ready(step(*args)), check=False)
            f = jax.jit(op)
            return Bench(lambda: f(*args).block_until_ready(), _from_cf(case))
        if case.op == "separable_fwdbwd":
            raise Unsupported(f"forward+backward is measured on the jax backend only (this is {backend})")
        _no_bf16(case, "measured on the jax backend only")
        if backend == "tensorflow":
            import tensorflow as tf
            args = [tf.constant(a) for a in (xin, dk, pk)]
            f = tf.function(op, jit_compile=True)
            return Bench(lambda: f(*args).numpy(), _from_cf(case))
        args = [ops.convert_to_tensor(a) for a in (xin, dk, pk)]
        return Bench(lambda: ops.convert_to_numpy(op(*args)), _from_cf(case))


class _Torch(Contender):
    channels_last = False
    ops = ("separable", "depthwise", "pointwise", "separable_fwdbwd")
    suites = OP_SUITES
    modules = ("torch",)

    def available(self):
        try:
            import torch  # noqa: F401
        except Exception as exc:
            return f"torch is not installed ({exc!r}); install torch==2.13.0"
        return None

    def version(self):
        import torch
        return torch.__version__

    def init_process(self):
        import torch
        torch.set_num_threads(THREADS)

    def info(self):
        import torch
        return {"num_threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
                "parallel_info": torch.__config__.parallel_info().splitlines()[:6]}

    def setup(self, case):
        import torch
        import torch.nn.functional as F

        x, dk, pk = make_arrays(case)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        dtype = torch.bfloat16 if case.bf16 else torch.float32
        xt = torch.from_numpy(_nchw(x)).to(dtype).contiguous(memory_format=fmt)
        wd = torch.from_numpy(np.ascontiguousarray(dk.reshape(case.k, case.k, case.cm).transpose(2, 0, 1)[:, None]))
        wd = wd.to(dtype).contiguous(memory_format=fmt)
        kin = case.c if case.op == "pointwise" else case.cm
        wp = torch.from_numpy(np.ascontiguousarray(pk.reshape(kin, case.f).T[:, :, None, None]))
        wp = wp.to(dtype).contiguous(memory_format=fmt)
        (pt, pb), (pl, pr) = case.pads
        pre_pad = None
        if pt == pb and pl == pr:
            padding, used = (pt, pl), case.pads
        else:
            sym = (max(pt, pb), max(pl, pr))
            ek = (case.k - 1) * case.dilation + 1
            shape = ((case.h + 2 * sym[0] - ek) // case.stride + 1, (case.w + 2 * sym[1] - ek) // case.stride + 1)
            if shape == case.out_hw:
                padding, used = sym, ((sym[0], sym[0]), (sym[1], sym[1]))
            else:
                padding, used, pre_pad = (0, 0), case.pads, (pl, pr, pt, pb)
        s, d, groups = case.stride, case.dilation, case.c
        # a channels_first input arriving at a channels_last user is converted inside the timed call
        convert = self.channels_last and case.data_format == "channels_first"
        if convert:
            xt = torch.from_numpy(_nchw(x)).to(dtype)

        def prep(t):
            if convert:
                t = t.contiguous(memory_format=torch.channels_last)
            if pre_pad is not None:
                t = F.pad(t, pre_pad)
            return t

        def to_nhwc(out):
            return out.permute(0, 2, 3, 1).float().numpy()

        if case.op == "separable":
            def fn():
                with torch.inference_mode():
                    return F.conv2d(F.conv2d(prep(xt), wd, None, s, padding, d, groups), wp)
        elif case.op == "depthwise":
            def fn():
                with torch.inference_mode():
                    return F.conv2d(prep(xt), wd, None, s, padding, d, groups)
        elif case.op == "pointwise":
            used = None

            def fn():
                with torch.inference_mode():
                    return F.conv2d(prep(xt), wp)
        elif case.op == "separable_fwdbwd":
            g = torch.from_numpy(_nchw(_grad_output(case))).to(dtype).contiguous(memory_format=fmt)
            for t in (xt, wd, wp):
                t.requires_grad_(True)

            def fn():
                y = F.conv2d(F.conv2d(prep(xt), wd, None, s, padding, d, groups), wp)
                return torch.autograd.grad(y, (xt, wd, wp), g)
            return Bench(fn, check=False)
        else:
            raise Unsupported(f"op {case.op}")
        return Bench(fn, to_nhwc, used)


class TorchNCHW(_Torch):
    name = "torch_nchw"
    label = "torch NCHW"
    channels_last = False


class TorchNHWC(_Torch):
    name = "torch_nhwc"
    label = "torch ch_last"
    channels_last = True


class OnnxRuntime(Contender):
    name = "onnxruntime"
    label = "ONNX Runtime"
    suites = OP_SUITES
    modules = ("onnx", "onnxruntime")

    def available(self):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except Exception as exc:
            return f"onnx/onnxruntime not installed ({exc!r})"
        return None

    def version(self):
        import onnx
        import onnxruntime
        return f"{onnxruntime.__version__} (onnx {onnx.__version__})"

    def info(self):
        return {"intra_op_num_threads": THREADS, "execution_mode": "ORT_SEQUENTIAL",
                "graph_optimization_level": "ORT_ENABLE_ALL"}

    def setup(self, case):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        if case.op not in self.ops:
            raise Unsupported("inference only")
        _no_bf16(case, "ONNX Runtime has no bfloat16 convolutions on x86")
        x, dk, pk = make_arrays(case)
        (pt, pb), (pl, pr) = case.pads
        kin = case.c if case.op == "pointwise" else case.cm
        wd = np.ascontiguousarray(dk.reshape(case.k, case.k, case.cm).transpose(2, 0, 1)[:, None])
        wp = np.ascontiguousarray(pk.reshape(kin, case.f).T[:, :, None, None])
        dw = helper.make_node("Conv", ["x", "wd"], ["y" if case.op == "depthwise" else "t"], group=case.c,
                              kernel_shape=[case.k, case.k], strides=[case.stride] * 2, pads=[pt, pl, pb, pr],
                              dilations=[case.dilation] * 2)
        pw = helper.make_node("Conv", ["t" if case.op == "separable" else "x", "wp"], ["y"], kernel_shape=[1, 1])
        nodes, inits = [], []
        if case.op in ("separable", "depthwise"):
            nodes.append(dw)
            inits.append(numpy_helper.from_array(wd, "wd"))
        if case.op in ("separable", "pointwise"):
            nodes.append(pw)
            inits.append(numpy_helper.from_array(wp, "wp"))
        graph = helper.make_graph(
            nodes, case.op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [case.n, case.c, case.h, case.w])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = {"x": _nchw(x)}
        return Bench(lambda: sess.run(["y"], feed)[0], lambda out: out.transpose(0, 2, 3, 1),
                     None if case.op == "pointwise" else case.pads)


class NumPyBaseline(Contender):
    name = "numpy"
    label = "NumPy"
    suites = OP_SUITES

    def version(self):
        return np.__version__

    def setup(self, case):
        if case.op not in self.ops:
            raise Unsupported("forward only")
        if sum(case.macs) > NUMPY_MAX_MACS:
            raise Unsupported(f"small shapes only (<= {NUMPY_MAX_MACS / 1e6:.0f} M MAC)")
        _no_bf16(case, "the NumPy baseline is float32")
        x, dk, pk = make_arrays(case)
        (pt, pb), (pl, pr) = case.pads
        oh, ow = case.out_hw
        s, d, k, dm = case.stride, case.dilation, case.k, case.dm
        kin = case.c if case.op == "pointwise" else case.cm
        pm = np.ascontiguousarray(pk.reshape(kin, case.f))
        w = dk[:, :, :, 0] if dm == 1 else dk

        def depthwise():
            xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
            acc = np.zeros((case.n, oh, ow, case.c) + ((dm,) if dm > 1 else ()), np.float32)
            tmp = np.empty_like(acc)
            for i in range(k):
                for j in range(k):
                    win = xp[:, i * d: i * d + (oh - 1) * s + 1: s, j * d: j * d + (ow - 1) * s + 1: s, :]
                    np.multiply(win[..., None] if dm > 1 else win, w[i, j], out=tmp)
                    acc += tmp
            return acc.reshape(case.n, oh, ow, case.cm)

        if case.op == "separable":
            return Bench(lambda: depthwise() @ pm)
        if case.op == "depthwise":
            return Bench(depthwise)
        return Bench(lambda: x @ pm)


def _tf_threads():
    """TensorFlow's pools: THREADS intra-op threads, one inter-op (set before its first op, else left as they are)."""
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass


class KerasModel(Keras):
    """MobileNetV1's 13 blocks built from Keras's own layers (the Keras-model suites' reference), on one backend.

    Each backend runs in a process of its own (``env``); the jax contender keeps the names ``keras_model`` /
    ``nbconv_layers``.  On torch the process runs with ``OMP_WAIT_POLICY=PASSIVE`` (unless set), for both
    sides, as in the models suite.
    """

    label = "Keras layers"
    ops = MODEL_OPS
    base = "keras_model"

    def __init__(self, backend="jax"):
        self.backend = backend
        self.name = self.base if backend == "jax" else f"{self.base}_{backend}"
        self.suites = (KERAS_MODEL_SUITES[backend],)
        self.env = {"KERAS_BACKEND": backend}
        if backend == "torch":
            self.env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        #: a --quick run measures the jax backend only
        self.full_only = backend != "jax"

    @property
    def modules(self):
        return "keras", self.backend

    def available(self):
        import importlib.util
        if importlib.util.find_spec(self.backend) is None:
            return f"absent: {self.backend} is not installed"
        note = super().available()
        if note:
            return note
        import keras
        if keras.backend.backend() != self.backend:
            return f"keras runs on {keras.backend.backend()}, not {self.backend} (KERAS_BACKEND was set too late)"
        return None

    def init_process(self):
        super().init_process()
        if self.backend == "tensorflow":
            _tf_threads()

    def info(self):
        d = super().info()
        d["predict"] = {"jax": "predict_on_batch (jax.jit)", "tensorflow": "predict_on_batch (tf.function)"}.get(
            self.backend, "predict_on_batch (eager: Keras does not jit on torch)")
        d["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
        return d

    def _layer_class(self):
        import keras
        return keras.layers.SeparableConv2D

    def _epilogue_classes(self):
        """(BatchNormalization, ReLU) classes after each convolution."""
        import keras
        return keras.layers.BatchNormalization, keras.layers.ReLU

    def setup(self, case):
        model, x = self._build(case)
        if case.op in ("model_predict", "model_bare"):
            return Bench(lambda: model.predict_on_batch(x), check=False)
        import keras
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
        target = np.random.default_rng(1).standard_normal(tuple(model.output.shape), dtype=np.float32)
        return Bench(lambda: model.train_on_batch(x, target), check=False)

    def _build(self, case):
        """(model, input) of a case: the 13 blocks, with BatchNorm + ReLU or bare."""
        import keras
        if case.op not in MODEL_OPS:
            raise Unsupported(f"op {case.op}")
        cls = self._layer_class()
        bn_cls, relu_cls = self._epilogue_classes()
        keras.utils.set_random_seed(0)
        if case.bf16 and self.backend != "jax":
            raise Unsupported("mixed_bfloat16 is measured on the jax backend")
        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_bfloat16" if case.bf16 else "float32")
        try:
            inp = keras.Input((case.h, case.w, case.c), batch_size=case.n)
            y = inp
            bare = case.op == "model_bare"
            for hw, c, f, s in MOBILENET_BLOCKS:
                y = cls(f, 3, strides=s, padding="same", use_bias=bare, activation="relu" if bare else None)(y)
                if not bare:
                    y = bn_cls()(y)
                    y = relu_cls()(y)
            model = keras.Model(inp, y)
        finally:
            keras.config.set_dtype_policy(policy)
        x = np.random.default_rng(0).standard_normal((case.n, case.h, case.w, case.c), dtype=np.float32)
        return model, x


class NbConvLayers(KerasModel):
    """The same model built from nbconv's drop-in layers (``keras_layers``)."""

    label = "nbconv layers"
    peer = False
    base = "nbconv_layers"

    def available(self):
        note = super().available()
        if note:
            return note
        try:
            import keras_layers  # noqa: F401
        except Exception as exc:
            return f"not available: keras_layers does not import ({exc!r})"
        return None

    def _layer_class(self):
        import keras_layers
        return keras_layers.SeparableConv2D

    def _epilogue_classes(self):
        """keras_layers' drop-ins (what ``keras_layers.convert`` puts after our layers): at inference they fold
        into the op where the backend drops unused ops (jax's jit, TensorFlow's tf.function)."""
        import keras_layers
        return keras_layers.BatchNormalization, keras_layers.ReLU

    def setup(self, case):
        if case.op != "model_bare":
            return super().setup(case)
        import keras
        import nbconv
        model, x = self._build(case)
        convs = [(keras.ops.convert_to_numpy(ly.depthwise_kernel), keras.ops.convert_to_numpy(ly.pointwise_kernel),
                  keras.ops.convert_to_numpy(ly.bias), ly.strides) for ly in model.layers
                 if isinstance(ly, keras.layers.SeparableConv2D)]

        def model_call():
            return model.predict_on_batch(x)

        def direct():
            y = x
            for dk, pk, b, s in convs:
                y = nbconv.separable_conv2d(y, dk, pk, b, strides=s, padding="same", activation="relu")
            return y
        ref = direct()
        err = rel_error(keras.ops.convert_to_numpy(model_call()), ref)
        return Bench(model_call, check=False, rel_err=err, extra=lambda: {"bridge": _same_process(model_call, direct)})

    def info(self):
        import nbconv
        d = super().info()
        d["nbconv_threads"] = nbconv.get_num_threads()
        return d


#: Keras backends the "models" suite runs on, one process each
MODEL_BACKENDS = ("jax", "tensorflow", "torch")
#: timed rounds per model call, by forward MACs per call (tens of ms to seconds a call; the full run must stay
#: within a few minutes per backend on 2 cores): (upper bound of MACs, rounds).  The batch-1 MobileNets take
#: 15: their original and converted sides are timed one after the other in one process, and with 5 rounds a
#: spell of the machine's drift decided their ratio (torch, MobileNet b1: 1.31x at 09:42, 0.92x at 11:47)
MODEL_ROUNDS = ((1e9, 15), (5e9, 5), (30e9, 3), (math.inf, 2))


class AppModels(Contender):
    """keras.applications models on one Keras backend: original, converted, converted with folded batch norms.

    The process runs with ``KERAS_BACKEND`` set (``env``); each (model, batch, size) is built once with
    ``weights=None``, its batch norms calibrated on the input (:func:`_calibrate_batchnorms`), and converted with
    :func:`keras_layers.convert`; the converted predictions are checked against the original's before anything
    is timed.  The timed call is ``model.predict_on_batch(x)`` or, for the training step,
    ``model.train_on_batch(x, target)`` (SGD, learning rate 0, mse): jitted by Keras on jax (``jax.jit``) and
    tensorflow (``tf.function``), eager on torch (Keras's only mode there).
    """

    peer = False
    suites = ("models",)
    ops = APP_OPS
    #: minutes per pass: measured once (see ``--passes``)
    single_pass = True

    def __init__(self, backend):
        self.backend = backend
        self.name = f"models_{backend}"
        self.label = f"models {backend}"
        # torch: spinning OpenMP workers starve nbconv's threads between torch ops (docs/keras.md);
        # set for the original model too, so both sides run under the same pool policy
        self.env = {"KERAS_BACKEND": backend}
        if backend == "torch":
            self.env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        self._key = None
        self._models = {}
        self.modules = ("keras", backend)
        #: a --quick run measures the jax backend only
        self.full_only = backend != "jax"

    def available(self):
        import importlib.util
        if importlib.util.find_spec(self.backend) is None:
            return f"absent: {self.backend} is not installed"
        try:
            import keras
        except Exception as exc:
            return f"keras does not import on {self.backend}: {exc!r}"
        if keras.backend.backend() != self.backend:
            return f"keras runs on {keras.backend.backend()}, not {self.backend} (KERAS_BACKEND was set too late)"
        try:
            import keras_layers
            keras_layers.convert  # noqa: B018
        except Exception as exc:
            return f"not available: keras_layers.convert does not import ({exc!r})"
        return None

    def version(self):
        import keras
        return f"{keras.__version__} ({self.backend} {Keras._backend_version(self)})"

    def init_process(self):
        import nbconv
        nbconv.set_num_threads(min(THREADS, nbconv.get_num_threads()) if THREADS > 0 else nbconv.get_num_threads())
        if self.backend == "torch":
            import torch
            torch.set_num_threads(THREADS)
        elif self.backend == "tensorflow":
            _tf_threads()

    def info(self):
        import nbconv
        return {"backend": self.backend, "nbconv_threads": nbconv.get_num_threads(),
                "predict": {"jax": "predict_on_batch (jax.jit)", "tensorflow": "predict_on_batch (tf.function)"}.get(
                    self.backend, "predict_on_batch (eager: Keras does not jit on torch)"),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}

    def _get(self, case):
        """The model of ``case`` (the original built once per (model, batch, size) with calibrated batch norms,
        converted as the case asks), the input, and the original's prediction."""
        import keras
        import keras_layers
        key = (case.model, case.n, case.h)
        if key != self._key:
            self._models.clear()
            self._key = key
            ctor = APP_MODELS[case.model][0]
            keras.utils.set_random_seed(0)
            # logits, not softmax: with random weights the logits are tiny and the softmax is uniform to the last
            # bit, which would make the check below vacuous (the softmax costs nothing next to the convolutions)
            original = getattr(keras.applications, ctor)(input_shape=(case.h, case.w, 3), weights=None,
                                                          classifier_activation=None)
            x = np.random.default_rng(0).standard_normal((case.n, case.h, case.w, 3), dtype=np.float32)
            _calibrate_batchnorms(original, x)
            self._models.update(app_original=original, x=x, ref=np.asarray(original.predict_on_batch(x)))
        if case.op not in self._models:
            original = self._models["app_original"]
            if case.op == "app_fit_original":
                model = keras.models.clone_model(original)
                model.set_weights(original.get_weights())
            else:
                model = keras_layers.convert(original, fold_batchnorm=case.op == "app_folded")
            if case.op in APP_FIT_OPS:
                # a learning rate of 0: every step computes and applies an update, and the weights stay the
                # original's
                model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
            self._models[case.op] = model
        return self._models[case.op], self._models["x"], self._models["ref"]

    def setup(self, case):
        if case.op not in APP_OPS:
            raise Unsupported(f"op {case.op}")
        model, x, ref = self._get(case)
        macs = sum(case.macs) * (3 if case.op in APP_FIT_OPS else 1)
        rounds = next(r for limit, r in MODEL_ROUNDS if macs <= limit)
        if case.op in APP_FIT_OPS:
            target = np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32)
            # the first steps trace/compile the training function (outside the timing); no output check: the
            # models' Dropout layers draw their own masks (the predictions are checked in the predict cases, the
            # layers' gradients by tests/keras_layers)
            model.train_on_batch(x, target)
            model.train_on_batch(x, target)
            return Bench(lambda: model.train_on_batch(x, target), check=False, rounds=rounds, warmed=True,
                         extra=self._paired(case, lambda: model.train_on_batch(x, target), "app_fit_original",
                                            lambda m: m.train_on_batch(x, target)))
        rel_err = None
        if case.op != "app_original":
            # this first call also compiles the converted model's predict function (outside the timing)
            rel_err = rel_error(model.predict_on_batch(x), ref.astype(np.float64))
        # the original's first call (its reference prediction, in _get) compiled it; on the cheaper calls one more
        # untimed call lets lazily initialised pools settle (a costly call is long enough not to need it)
        if macs <= MODEL_ROUNDS[0][0]:
            model.predict_on_batch(x)
        return Bench(lambda: model.predict_on_batch(x), check=False, rel_err=rel_err, rounds=rounds, warmed=True,
                     extra=self._paired(case, lambda: model.predict_on_batch(x), "app_original",
                                        lambda m: m.predict_on_batch(x)))

    def _paired(self, case, call, base_op, base_call):
        """The ``extra`` of a variant's Bench: it and the original timed in alternating blocks in this process
        (``_same_process``), so that the machine's drift between cases does not enter their ratio."""
        if case.op == base_op or base_op not in self._models:
            return None
        base = self._models[base_op]
        blocks, calls = (8, 3) if sum(case.macs) <= MODEL_ROUNDS[1][0] else (4, 2)
        return lambda: {"paired": _same_process(call, lambda: base_call(base), blocks=blocks, calls=calls)}


def _calibrate_batchnorms(model, x):
    """Set every BatchNormalization's moving statistics to those of its input on ``x``, in one pass through the
    graph: with weights=None they are mean 0 and variance 1, and a deep random model's features then drift far
    from O(1) (or die), which is neither what a trained model computes nor a fair timing (denormals, saturated
    ReLU6)."""
    import keras

    def operation(op):
        if not isinstance(op, keras.layers.BatchNormalization):
            return op

        def call(t, **kwargs):
            a = np.asarray(keras.ops.convert_to_numpy(t), np.float64)
            axes = tuple(i for i in range(a.ndim) if i != op.axis % a.ndim)
            weights = op.get_weights()  # [gamma,] [beta,] moving_mean, moving_variance
            weights[-2] = a.mean(axes).astype(weights[-2].dtype)
            weights[-1] = (a.var(axes) + op.epsilon).astype(weights[-1].dtype)
            op.set_weights(weights)
            return op(t, **kwargs)
        return call

    model._run_through_graph(keras.ops.convert_to_tensor(x), operation_fn=operation)


class Sgemm(Contender):
    """The machine's sgemm peak: NumPy matmul of two 4096x4096 float32 matrices."""

    name = "sgemm"
    label = "sgemm peak"
    peer = False
    size = 4096

    def version(self):
        return np.__version__

    def init_process(self):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return
        self._limits = threadpool_limits(THREADS, user_api="blas")

    def setup(self, case=None):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((self.size, self.size), dtype=np.float32)
        b = rng.standard_normal((self.size, self.size), dtype=np.float32)
        c = np.empty_like(a)
        return Bench(lambda: np.matmul(a, b, out=c), check=False)

    @property
    def flops(self):
        return 2 * self.size ** 3


CONTENDERS = {c.name: c for c in (NbConv(), NbConvTwoStep(), NbConvPacked(), TorchNCHW(), TorchNHWC(), OnnxRuntime(),
                                  Keras(), NumPyBaseline(), Sgemm())
               + tuple(cls(b) for b in KERAS_MODEL_SUITES for cls in (NbConvLayers, KerasModel))
               + tuple(AppModels(b) for b in MODEL_BACKENDS)}
#: contenders that count as peers for "best peer" ratios, in report column order
PEERS = ("torch_nchw", "torch_nhwc", "onnxruntime", "keras", "numpy")
#: per suite, when it differs from nbconv against PEERS: (the measured subject, its peers)
SUITE_ROLES = {suite: (NbConvLayers(b).name, (KerasModel(b).name,)) for b, suite in KERAS_MODEL_SUITES.items()}


def get(name):
    try:
        return CONTENDERS[name]
    except KeyError:
        raise ValueError(f"Expected a contender among {sorted(CONTENDERS)}. Received {name!r}") from None


def _same_process(subject, base, blocks=8, calls=3):
    """t(subject)/t(base) in this process: alternating blocks of ``calls`` calls of each, medians per call.

    Two processes each timed in their own spell carry the machine's drift into their ratio (the bridge over
    the direct calls measured 0.91-1.34x across runs of one afternoon); here both sides share every spell,
    and the order within a block alternates so neither always runs after an idle gap or with a warm cache.
    """
    import time
    times = ([], [])
    for fn in (subject, base):
        fn()
    for i in range(blocks):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            fn = (subject, base)[side]
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - t0)
    med = [float(np.median(t)) for t in times]
    return {"subject_ms": med[0] * 1e3, "base_ms": med[1] * 1e3, "ratio": med[0] / med[1],
            "calls": blocks * calls}


def output_error(case, bench, out):
    """Relative error of ``out``, the first result of ``bench`` (set up for ``case``): against the float64
    reference (:func:`benchmarks.cases.reference_nhwc`, with the padding the contender used), or the error the
    contender measured itself (``bench.rel_err``); None when the case is not checked."""
    if bench.check:
        x, dk, pk = make_arrays(case)
        return rel_error(bench.to_nhwc(out), reference_nhwc(case, x, dk, pk, bench.pads))
    return bench.rel_err


def rel_error(out, ref):
    out = np.asarray(out, np.float64)
    if out.shape != ref.shape:
        return math.inf
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    return float(np.max(np.abs(out - ref))) / scale
