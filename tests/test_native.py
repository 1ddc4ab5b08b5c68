"""Native calls (nbconv._native): captured forward calls run from a template against the float64 reference,
refusals, concurrent callers, and the XLA FFI handler on hand-built call frames whose layout is checked
against the header jaxlib ships."""
import ctypes
import functools
import os
import re
import threading

import ml_dtypes
import numpy as np
import pytest

import nbconv
from nbconv import _native
from reference import (
    U_BF16,
    assert_close,
    assert_within,
    bf16_separable_bound,
    depthwise_ref,
    random_array,
    separable_ref,
)

pytestmark = pytest.mark.skipif(not _native.available(), reason="native calls need Linux's futex")

BF16 = np.dtype(ml_dtypes.bfloat16)

#: (kind, x shape (NHWC), kernel kw, filters, dm, keyword arguments)
CASES = [
    ("separable", (2, 17, 19, 24), 3, 40, 1, dict(padding="same", activation="relu")),
    ("separable", (1, 33, 35, 16), 3, 24, 1, dict(strides=2, padding="valid")),
    ("separable", (2, 12, 14, 8), 5, 16, 2, dict(padding=((1, 3), (2, 0)), dilation_rate=2, activation="relu6")),
    ("separable", (1, 14, 14, 520), 3, 512, 1, dict(padding="same")),  # shared mode (512+ channels)
    ("separable", (1, 40, 40, 32), 3, 48, 1, dict(padding="same", data_format="channels_first")),
    ("depthwise", (2, 21, 23, 32), 3, None, 1, dict(padding="same", activation="relu")),
    ("depthwise", (1, 30, 28, 16), 3, None, 3, dict(strides=2, padding="same")),
    ("depthwise", (1, 18, 20, 24), 3, None, 1, dict(padding="valid", data_format="channels_first")),
]


def _operands(rng, case, dtype=np.float32, bias=True):
    kind, shape, k, f, dm, kw = case
    n, h, w, c = shape
    x = random_array(rng, shape, dtype)
    if kw.get("data_format") == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    dk = random_array(rng, (k, k, c, dm), dtype)
    arrays = [x, dk]
    if kind == "separable":
        arrays.append(random_array(rng, (1, 1, c * dm, f), dtype))
    if bias:
        arrays.append(random_array(rng, (f if kind == "separable" else c * dm,), dtype))
    return arrays


def _fn(kind, kw):
    return functools.partial(nbconv.separable_conv2d if kind == "separable" else nbconv.depthwise_conv2d, **kw)


def _reference(kind, arrays, kw):
    a = [None if v is None else np.asarray(v, np.float64) for v in arrays]
    if kind == "separable":
        return separable_ref(*a, **kw)
    return depthwise_ref(*a, **kw)


def _capture(kind, arrays, kw):
    fn = _fn(kind, kw)
    out = np.empty(fn(*arrays).shape, arrays[0].dtype)
    return fn, _native.capture(fn, arrays, out), out


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[5]}" for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
def test_native_call_matches_reference(rng, case, bias):
    """The captured call, run from its template on new values, against the float64 reference; bit for bit the
    Python call's result (the same kernel on the same tiles)."""
    kind, kw = case[0], case[5]
    fn, call, out = _capture(kind, _operands(rng, case, bias=bias), kw)
    for _ in range(2):  # new values each time: nothing of the captured arrays may be baked in
        arrays = _operands(rng, case, bias=bias)
        got = call(*arrays, out=np.empty_like(out))
        assert_close(got, _reference(kind, arrays, kw))
        assert np.array_equal(got, fn(*arrays))


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=["sep", "sep-shared", "dw"])
def test_native_call_float64(rng, case):
    kind, kw = case[0], case[5]
    _, call, out = _capture(kind, _operands(rng, case, np.float64), kw)
    arrays = _operands(rng, case, np.float64)
    assert_close(call(*arrays, out=np.empty_like(out)), _reference(kind, arrays, kw))


def test_native_call_bfloat16(rng):
    """bfloat16 activations with a mixed policy's float32 weights, bfloat16 products; a bfloat16 model's own
    weights, read as bits by the same single launch; bfloat16 depthwise weights beside a float32 depthwise bias
    are widened by a kernel launch of their own first, so that call stays in Python."""
    case = ("separable", (1, 20, 40, 32), 3, 48, 1, dict(padding="same", activation="relu"))

    def operands():
        x, dk, pk, b = _operands(rng, case)
        return [x.astype(BF16), dk, pk, b]

    kw = dict(case[5], precision="bfloat16", output_dtype=BF16)
    fn, call, out = _capture("separable", operands(), kw)
    assert out.dtype == BF16
    x, dk, pk, b = operands()
    got = call(x, dk, pk, b, out=np.empty_like(out))
    assert np.array_equal(got.view(np.uint16), fn(x, dk, pk, b).view(np.uint16))
    # the reference of the operands as the products see them (pointwise weights rounded to bfloat16)
    f64 = [np.asarray(v, np.float64) for v in (x, dk, pk.astype(BF16), b)]
    ref = separable_ref(*f64, padding="same", activation="relu")
    bound, _ = bf16_separable_bound(*f64, padding="same")
    assert_within(got, ref, bound, U_BF16)
    own = [x, dk.astype(BF16), pk.astype(BF16), b.astype(BF16)]
    fn, call, out = _capture("separable", own, kw)
    got = call(*own, out=np.empty_like(out))
    assert np.array_equal(got.view(np.uint16), fn(*own).view(np.uint16))
    dbias = np.zeros(32, np.float32)  # widened, and the weights beside it: two launches before the kernel's
    with pytest.raises(_native.Unsupported, match="launches 3 kernels"):
        _capture("separable", own, dict(kw, depthwise_bias=dbias))


def test_refuses_python_work_on_inputs(rng):
    """A call that computes on an input in Python (here x * 2) cannot be replayed from pointers: refused."""
    x, dk, pk = _operands(rng, CASES[0], bias=False)

    def doubled(x, dk, pk, out):
        return nbconv.separable_conv2d(x * 2, dk, pk, padding="same", out=out)

    out = np.empty(nbconv.separable_conv2d(x, dk, pk, padding="same").shape, np.float32)
    with pytest.raises(_native.Unsupported, match="computes on its inputs"):
        _native.capture(doubled, [x, dk, pk], out)


def test_refuses_calls_without_one_launch(rng):
    x, dk, pk = _operands(rng, CASES[0], bias=False)

    def two(x, dk, pk, out):
        nbconv.depthwise_conv2d(x, dk)
        return nbconv.separable_conv2d(x, dk, pk, padding="same", out=out)

    out = np.empty(nbconv.separable_conv2d(x, dk, pk, padding="same").shape, np.float32)
    with pytest.raises(_native.Unsupported, match="launches 2 kernels"):
        _native.capture(two, [x, dk, pk], out)
    with pytest.raises(_native.Unsupported, match="launches 0 kernels"):
        _native.capture(lambda x, dk, pk, out: out, [x, dk, pk], out)


def test_template_of_another_process_is_refused(rng):
    """A template whose nonce is not this process's (jax's persistent compilation cache) never runs."""
    case = CASES[0]
    _, call, out = _capture(case[0], _operands(rng, case), case[5])
    call.template = call.template.copy()
    call.template[_native.T_NONCE] ^= 1
    got = np.full_like(out, 3.0)
    with pytest.raises(RuntimeError, match="native call failed with code 1"):
        call(*_operands(rng, case), out=got)
    assert (got == 3.0).all()


def test_concurrent_native_callers(rng):
    """Native calls from four threads at once (one leads the helpers, the others run alone) and Python calls
    between them: every result right."""
    cases = [CASES[0], CASES[1], CASES[5], CASES[3]]
    calls = [_capture(c[0], _operands(rng, c), c[5]) for c in cases]
    inputs = [_operands(rng, c) for c in cases]
    expected = [_reference(c[0], a, c[5]) for c, a in zip(cases, inputs)]
    failures = []

    def caller(i):
        fn, call, out = calls[i]
        for k in range(8):
            try:
                got = call(*inputs[i], out=np.empty_like(out)) if k % 2 == 0 else fn(*inputs[i])
                assert_close(got, expected[i])
            except AssertionError as e:  # pragma: no cover  (reported below)
                failures.append((i, k, str(e)))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# --- the XLA FFI handler on hand-built call frames -------------------------------------------------------------

_ERROR_CREATE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)


class _Frame:
    """An XLA_FFI_CallFrame in NumPy memory, laid out by nbconv._native's offsets (checked against the header
    below), with an API whose XLA_FFI_Error_Create records the message and returns a non-null error."""

    def __init__(self, template, buffers):
        self.messages = []

        def create(args_addr):
            args = (ctypes.c_int64 * 4).from_address(args_addr)
            self.messages.append((ctypes.string_at(args[_native.ERROR_ARGS_MESSAGE // 8]).decode(),
                                  int(args[_native.ERROR_ARGS_CODE // 8] & 0xFFFFFFFF)))
            return 0xBAD0

        self._create = _ERROR_CREATE(create)
        self.api = np.zeros(32, np.int64)
        self.api[0] = 200
        self.api[_native.API_ERROR_CREATE // 8] = ctypes.cast(self._create, ctypes.c_void_p).value
        self.frame = np.zeros(_native.FRAME_SIZE // 8, np.int64)
        f = self.frame
        f[0], f[_native.FRAME_API // 8] = _native.FRAME_SIZE, self.api.ctypes.data
        f.view(np.int32)[_native.FRAME_STAGE // 4] = _native.FFI_EXECUTE
        self.keep = [template]
        ptrs = []
        for a in buffers:
            dims = np.array(a.shape, np.int64)
            s = np.zeros(_native.BUFFER_SIZE // 8, np.int64)
            s[0] = _native.BUFFER_SIZE
            s.view(np.int32)[_native.BUFFER_DTYPE // 4] = _native.xla_dtype(a.dtype)
            s[_native.BUFFER_DATA // 8] = a.ctypes.data
            s[_native.BUFFER_RANK // 8] = a.ndim
            s[_native.BUFFER_DIMS // 8] = dims.ctypes.data
            self.keep += [dims, s, a]
            ptrs.append(s.ctypes.data)
        nargs = int(template[_native.T_NARGS])
        for start, count, off in ((0, nargs, _native.FRAME_ARGS), (nargs, len(buffers) - nargs, _native.FRAME_RETS)):
            types = np.full(max(count, 1), _native.FFI_BUFFER, np.int32)
            pp = np.array(ptrs[start:start + count] or [0], np.int64)
            self.keep += [types, pp]
            f[off // 8], f[(off + _native.ARGS_N) // 8] = _native.ARGS_SIZE, count
            f[(off + _native.ARGS_TYPES) // 8], f[(off + _native.ARGS_PTRS) // 8] = types.ctypes.data, pp.ctypes.data
        arr = np.zeros(3, np.int64)
        arr.view(np.int32)[_native.ARRAY_DTYPE // 4] = _native.FFI_S64
        arr[_native.ARRAY_N // 8], arr[_native.ARRAY_DATA // 8] = template.size, template.ctypes.data
        atypes = np.array([_native.FFI_ATTR_ARRAY], np.int32)
        aptrs = np.array([arr.ctypes.data], np.int64)
        self.keep += [arr, atypes, aptrs]
        a0 = _native.FRAME_ATTRS // 8
        f[a0], f[a0 + _native.ATTRS_N // 8] = _native.ATTRS_SIZE, 1
        f[a0 + _native.ATTRS_TYPES // 8], f[a0 + _native.ATTRS_PTRS // 8] = atypes.ctypes.data, aptrs.ctypes.data

    def call(self):
        handler = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(_native.ffi_handler().address)
        return handler(self.frame.ctypes.data)


def _ffi_case(rng):
    case = CASES[0]
    fn, call, out = _capture(case[0], _operands(rng, case), case[5])
    arrays = _operands(rng, case)
    return call, arrays, out, _reference(case[0], arrays, case[5])


def test_ffi_handler_runs_the_op(rng):
    call, arrays, out, expected = _ffi_case(rng)
    got = np.full_like(out, np.nan)
    frame = _Frame(call.template, [*arrays, got, np.empty(call.scratch_bytes, np.uint8)])
    assert frame.call() == 0, frame.messages
    assert_close(got, expected)


def test_ffi_handler_metadata_handshake():
    """Registration: a frame carrying the metadata extension gets the API version and traits, and no call."""
    metadata = np.zeros(6, np.int64)
    metadata[0] = _native.METADATA_SIZE
    ext = np.zeros(4, np.int64)
    ext[0] = _native.METADATA_EXT_SIZE
    ext.view(np.int32)[_native.EXT_TYPE // 4] = _native.FFI_EXT_METADATA
    ext[_native.METADATA_EXT_METADATA // 8] = metadata.ctypes.data
    frame = np.zeros(_native.FRAME_SIZE // 8, np.int64)
    frame[0], frame[_native.FRAME_EXT // 8] = _native.FRAME_SIZE, ext.ctypes.data
    handler = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(_native.ffi_handler().address)
    assert handler(frame.ctypes.data) == 0
    version = metadata[_native.METADATA_VERSION // 8:]
    assert version[0] == _native.VERSION_SIZE
    major, minor = version.view(np.int32)[(_native.VERSION_MAJOR // 4):(_native.VERSION_MAJOR // 4) + 2]
    assert (major, minor) == _native.FFI_API_VERSION
    assert metadata.view(np.uint32)[_native.METADATA_TRAITS // 4] == 0


@pytest.mark.parametrize("fault", ["shape", "dtype", "count", "nonce", "layout"])
def test_ffi_handler_refuses_a_mismatched_frame(rng, fault):
    """Buffers of another shape, dtype or number, a template from another process or a frame smaller than the
    layout nbconv reads: an XLA error with a message, and the output untouched."""
    call, arrays, out, _ = _ffi_case(rng)
    template = call.template.copy()
    got = np.full_like(out, 7.0)
    buffers = [*arrays, got, np.empty(call.scratch_bytes, np.uint8)]
    if fault == "shape":
        buffers[0] = np.ascontiguousarray(buffers[0][:, :-1])
    elif fault == "dtype":
        buffers[1] = buffers[1].astype(np.float64)
    elif fault == "count":
        buffers = buffers[:1] + buffers[2:]
    elif fault == "nonce":
        template[_native.T_NONCE] += 1
    frame = _Frame(template, buffers)
    if fault == "layout":
        frame.frame[0] = _native.FRAME_SIZE - 8
    assert frame.call() == 0xBAD0
    (message, code), = frame.messages
    assert message.startswith("nbconv: ") and code == _native.FFI_INVALID_ARGUMENT
    word = {"shape": "shape", "dtype": "dtype", "count": "buffers", "nonce": "another process",
            "layout": "layout"}[fault]
    assert word in message
    assert (got == 7.0).all()


# --- the mirrored layout against jaxlib's c_api.h --------------------------------------------------------------

def _c_api_header():
    jax = pytest.importorskip("jax")
    path = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
    with open(path, encoding="utf-8") as fh:
        return re.sub(r"//[^\n]*", "", fh.read())


_SCALARS = {"size_t": 8, "int64_t": 8, "uint64_t": 8, "int": 4, "int32_t": 4, "uint32_t": 4, "uint8_t": 1, "bool": 1,
            "XLA_FFI_Handler_Traits": 4}


def _layouts(text):
    """``{struct: ({field: offset}, size, align, {field: size})}`` of the header's structs (64-bit C rules)."""
    bodies = dict(re.findall(r"struct (XLA_FFI_\w+) \{(.*?)\}", text, re.S))
    enums = set(re.findall(r"\}\s*(XLA_FFI_\w+);", text)) - set(bodies)
    layouts = {}

    def layout(name):
        if name in layouts:
            return layouts[name]
        fields, fsizes, off, align = {}, {}, 0, 1
        for decl in bodies[name].split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            m = re.match(r"_XLA_FFI_API_STRUCT_FIELD\((\w+)\)", decl)
            if m:
                ftype, fname = "*", m.group(1)
            else:
                ftype, fname = decl.rsplit(" ", 1)
                if fname.startswith("*"):
                    ftype, fname = ftype + "*", fname.lstrip("*")
            ftype = ftype.replace("const ", "").replace("struct ", "").strip()
            if "*" in ftype:
                size = a = 8
            elif ftype in _SCALARS:
                size = a = _SCALARS[ftype]
            elif ftype in enums:
                size = a = 4
            else:
                _, size, a, _ = layout(ftype)
            off = -(-off // a) * a
            fields[fname], fsizes[fname] = off, size
            off += size
            align = max(align, a)
        layouts[name] = (fields, -(-off // align) * align, align, fsizes)
        return layouts[name]

    for name in bodies:
        layout(name)
    return layouts


def _struct_size(text, layouts, name):
    """``XLA_FFI_STRUCT_SIZE``: the end of the field that XLA_FFI_DEFINE_STRUCT_TRAITS names last."""
    last = re.search(rf"XLA_FFI_DEFINE_STRUCT_TRAITS\({name}, (\w+)\)", text).group(1)
    fields, _, _, fsizes = layouts[name]
    return fields[last] + fsizes[last]


def test_ffi_layout_matches_jaxlib_header():
    """Every offset, struct size and enum value nbconv's handler reads, from the c_api.h of the installed
    jaxlib: a changed ABI fails here, not in a model."""
    text = _c_api_header()
    lay = _layouts(text)
    off = {name: v[0] for name, v in lay.items()}
    n = _native
    assert (off["XLA_FFI_CallFrame"]["extension_start"], off["XLA_FFI_CallFrame"]["api"],
            off["XLA_FFI_CallFrame"]["stage"], off["XLA_FFI_CallFrame"]["args"], off["XLA_FFI_CallFrame"]["rets"],
            off["XLA_FFI_CallFrame"]["attrs"]) == (n.FRAME_EXT, n.FRAME_API, n.FRAME_STAGE, n.FRAME_ARGS,
                                                   n.FRAME_RETS, n.FRAME_ATTRS)
    for s in ("XLA_FFI_Args", "XLA_FFI_Rets"):
        assert (off[s]["size"], off[s]["types"], list(off[s].values())[4]) == (n.ARGS_N, n.ARGS_TYPES, n.ARGS_PTRS)
    assert (off["XLA_FFI_Attrs"]["size"], off["XLA_FFI_Attrs"]["types"], off["XLA_FFI_Attrs"]["names"],
            off["XLA_FFI_Attrs"]["attrs"]) == (n.ATTRS_N, n.ATTRS_TYPES, n.ATTRS_NAMES, n.ATTRS_PTRS)
    assert (off["XLA_FFI_Buffer"]["dtype"], off["XLA_FFI_Buffer"]["data"], off["XLA_FFI_Buffer"]["rank"],
            off["XLA_FFI_Buffer"]["dims"]) == (n.BUFFER_DTYPE, n.BUFFER_DATA, n.BUFFER_RANK, n.BUFFER_DIMS)
    assert (off["XLA_FFI_Array"]["dtype"], off["XLA_FFI_Array"]["size"], off["XLA_FFI_Array"]["data"]) == (
        n.ARRAY_DTYPE, n.ARRAY_N, n.ARRAY_DATA)
    assert off["XLA_FFI_Extension_Base"]["type"] == n.EXT_TYPE
    assert off["XLA_FFI_Metadata_Extension"]["metadata"] == n.METADATA_EXT_METADATA
    assert (off["XLA_FFI_Metadata"]["api_version"], off["XLA_FFI_Metadata"]["traits"],
            off["XLA_FFI_Metadata"]["state_type_id"]) == (n.METADATA_VERSION, n.METADATA_TRAITS, n.METADATA_STATE)
    assert off["XLA_FFI_Api_Version"]["major_version"] == n.VERSION_MAJOR
    assert off["XLA_FFI_Api"]["XLA_FFI_Error_Create"] == n.API_ERROR_CREATE
    assert (off["XLA_FFI_Error_Create_Args"]["message"], off["XLA_FFI_Error_Create_Args"]["errc"]) == (
        n.ERROR_ARGS_MESSAGE, n.ERROR_ARGS_CODE)
    sizes = {s: _struct_size(text, lay, s) for s in (
        "XLA_FFI_CallFrame", "XLA_FFI_Args", "XLA_FFI_Rets", "XLA_FFI_Attrs", "XLA_FFI_Buffer", "XLA_FFI_Metadata",
        "XLA_FFI_Metadata_Extension", "XLA_FFI_Api_Version", "XLA_FFI_Error_Create_Args")}
    assert sizes == {"XLA_FFI_CallFrame": n.FRAME_SIZE, "XLA_FFI_Args": n.ARGS_SIZE, "XLA_FFI_Rets": n.ARGS_SIZE,
                     "XLA_FFI_Attrs": n.ATTRS_SIZE, "XLA_FFI_Buffer": n.BUFFER_SIZE,
                     "XLA_FFI_Metadata": n.METADATA_SIZE, "XLA_FFI_Metadata_Extension": n.METADATA_EXT_SIZE,
                     "XLA_FFI_Api_Version": n.VERSION_SIZE, "XLA_FFI_Error_Create_Args": n.ERROR_ARGS_SIZE}
    enum = dict((k, int(v)) for k, v in re.findall(r"(XLA_FFI_\w+) = (\d+)", text))
    assert enum["XLA_FFI_ExecutionStage_EXECUTE"] == n.FFI_EXECUTE
    assert enum["XLA_FFI_Extension_Metadata"] == n.FFI_EXT_METADATA
    assert enum["XLA_FFI_ArgType_BUFFER"] == enum["XLA_FFI_RetType_BUFFER"] == n.FFI_BUFFER
    assert enum["XLA_FFI_AttrType_ARRAY"] == n.FFI_ATTR_ARRAY
    assert enum["XLA_FFI_DataType_S64"] == n.FFI_S64
    assert enum["XLA_FFI_Error_Code_INVALID_ARGUMENT"] == n.FFI_INVALID_ARGUMENT
    for dtype, code in [*n.XLA_DTYPES.items(), (np.dtype(ml_dtypes.bfloat16), n.XLA_BF16)]:
        assert n.xla_dtype(dtype) == code
        name = {"float32": "F32", "float64": "F64", "bfloat16": "BF16", "uint8": "U8", "uint16": "U16"}[dtype.name]
        assert enum[f"XLA_FFI_DataType_{name}"] == code
    major = int(re.search(r"#define XLA_FFI_API_MAJOR (\d+)", text).group(1))
    minor = int(re.search(r"#define XLA_FFI_API_MINOR (\d+)", text).group(1))
    assert n.FFI_API_VERSION[0] == major and n.FFI_API_VERSION[1] <= minor
