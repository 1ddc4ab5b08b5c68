"""Training-mode batch normalisation kernels over the channels of ``(P, C)`` rows (a channels-last activation).

Four pool kernels, each a pass over rows in blocks of :data:`ROWS` that the
participants claim (:mod:`nbconv._sync`): the per-channel sums of a block
(:func:`bn_stats`, :func:`bn_grad_stats`, added in block order by the
caller), and the element-wise passes (:func:`bn_apply`,
:func:`bn_grad_apply`).  Each runs a vector micro-kernel over a block's rows:
float32, or bfloat16 bits (``uint16``) widened as they are loaded and
rounded as they are stored; the arithmetic is float32.  Each walks its
rows in L1-sized chunks, one vector (the sums: :data:`GROUP` vectors, their
sums in registers) of channels at a time.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._elementwise import LINEAR, RELU
from ._jit import jit
from ._simd import VectorBuilder
from ._sync import PHASE2, claim, enter, leave

#: rows per task: a block's float32 partial sums add at most this many terms
ROWS = 256
#: vectors of channels whose sums stay in registers down a block's rows
GROUP = 4
#: elements of the rows a micro-kernel walks once per vector (or group) of channels before the next rows (a
#: chunk stays in L1 for the next vector's pass): bfloat16 rows in such chunks, except in the backward's
#: element-wise pass (three streams in), float32 rows one by one (measured: docs/tuning.md)
CHUNK_BF16 = 4096


def _row_chunks(vb, nrows, c, chunk):
    """``(count, rows)``: the rows in chunks of ``chunk`` elements (one row at least)."""
    b = vb.builder
    q = b.sdiv(chunk, c)
    rows = b.select(b.icmp_signed("<", q, vb.const(1)), vb.const(1), q)
    return b.sdiv(b.add(nrows, b.sub(rows, vb.const(1))), rows), rows


def _chunk_rows(vb, index, rows, nrows):
    """``(first row, row count)`` of chunk ``index``."""
    b = vb.builder
    r0 = b.mul(index, rows)
    left = b.sub(nrows, r0)
    return r0, b.select(b.icmp_signed("<", left, rows), left, rows)


def _keep(vb, y, act):
    """Lanes where the activation with code ``act`` passes the gradient at output ``y`` (NaN: none)."""
    b = vb.builder
    pos = b.fcmp_ordered(">", y, vb.zero)
    below6 = b.fcmp_ordered("<", y, ir.Constant(vb.vty, [6.0] * vb.lanes))
    on = ir.Constant(ir.VectorType(ir.IntType(1), vb.lanes), [1] * vb.lanes)
    keep = b.select(b.icmp_signed("==", act, vb.const(RELU)), pos, b.and_(pos, below6))
    return b.select(b.icmp_signed("==", act, vb.const(LINEAR)), on, keep)


def _sums_codegen(grad):
    """Codegen of the column sums down ``nrows`` rows of ``C`` channels (row stride ``C``) from element ``off``:
    ``s[j] += sum a``, ``q[j] += sum a * b`` where (forward) ``a = b = x - centre`` or (backward) ``a`` is the
    gradient where the activation passes it and ``b = x - centre``."""

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
        chunk_elems = vb.int64(len(args) - 1)
        if grad:  # (g, y, x, off, nrows, c, centre, act, s, q, chunk)
            g0, y0, x0 = (vb.data(i) for i in range(3))
            off, nrows, c, centre, act, s, q = vb.int64(3), vb.int64(4), vb.int64(5), vb.data(6), vb.int64(7), \
                vb.data(8), vb.data(9)
        else:  # (x, off, nrows, c, centre, s, q, chunk)
            x0 = vb.data(0)
            off, nrows, c, centre, s, q = vb.int64(1), vb.int64(2), vb.int64(3), vb.data(4), vb.data(5), vb.data(6)
        step = GROUP * vb.lanes
        ngroups = builder.sdiv(builder.add(c, vb.const(step - 1)), vb.const(step))
        nchunks, rows = _row_chunks(vb, nrows, c, chunk_elems)
        with cgutils.for_range(builder, builder.mul(nchunks, ngroups)) as it:
            chunk = builder.sdiv(it.index, ngroups)
            r0, nr = _chunk_rows(vb, chunk, rows, nrows)
            j0 = builder.mul(builder.sub(it.index, builder.mul(chunk, ngroups)), vb.const(step))
            # lanes past the last channel are masked off (a whole vector of them touches no memory)
            masks = [vb.mask(builder.sub(c, builder.add(j0, vb.const(k * vb.lanes)))) for k in range(GROUP)]
            centres = [vb.load(vb.at(centre, j0, k * vb.lanes), masks[k]) for k in range(GROUP)]
            acc_s, acc_q = vb.accumulators(GROUP), vb.accumulators(GROUP)
            with cgutils.for_range(builder, nr) as row:
                base = builder.add(builder.add(off, builder.mul(builder.add(r0, row.index), c)), j0)
                for k in range(GROUP):
                    at = builder.add(base, vb.const(k * vb.lanes))
                    d = builder.fsub(vb.load(vb.at(x0, at), masks[k]), centres[k])
                    if grad:
                        gv = vb.load(vb.at(g0, at), masks[k])
                        a = builder.select(_keep(vb, vb.load(vb.at(y0, at), masks[k]), act), gv, vb.zero)
                    else:
                        a = d
                    builder.store(builder.fadd(builder.load(acc_s[k]), a), acc_s[k])
                    builder.store(vb.fma(a, d, builder.load(acc_q[k])), acc_q[k])
            for k in range(GROUP):
                for slots, dst in ((acc_s, s), (acc_q, q)):
                    p = vb.at(dst, j0, k * vb.lanes)
                    vb.store(builder.fadd(vb.load(p, masks[k]), builder.load(slots[k])), p, masks[k])
        return context.get_dummy_value()

    return codegen


@intrinsic
def _moments_rows(typingctx, x, off, nrows, c, centre, s, q, chunk):
    """``s[j] += sum_r (x[off + r*c + j] - centre[j])`` and ``q[j] +=`` the sum of the squares, ``r < nrows``,
    ``j < c``, the rows walked in chunks of ``chunk`` elements (:data:`CHUNK_BF16`); ``x`` float32 or bfloat16
    bits, the rest float32."""
    return types.void(x, off, nrows, c, centre, s, q, chunk), _sums_codegen(False)


@intrinsic
def _grad_sums_rows(typingctx, g, y, x, off, nrows, c, centre, act, s, q, chunk):
    """``s[j] += sum_r t``, ``q[j] += sum_r t * (x - centre[j])`` with ``t`` the gradient ``g`` where the
    activation ``act`` passes it at the output ``y`` (any array for a linear one), else 0; ``chunk`` as for
    :func:`_moments_rows`."""
    return types.void(g, y, x, off, nrows, c, centre, act, s, q, chunk), _sums_codegen(True)


def _elementwise_codegen(grad):
    """Codegen of the element-wise passes over ``nrows`` rows of ``C`` channels from element ``off``:
    (forward) ``y = act((x - centre) * scale + beta)``; (backward) ``dx = k1 * t + k2 * (x - centre) + k3`` with
    ``t`` as in :func:`_grad_sums_rows`.  Results are stored rounded where the output is bfloat16."""

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
        chunk_elems = vb.int64(len(args) - 1)
        if grad:  # (g, y, x, off, nrows, c, centre, k1, k2, k3, act, dx, chunk)
            g0, y0, x0 = (vb.data(i) for i in range(3))
            off, nrows, c, centre = vb.int64(3), vb.int64(4), vb.int64(5), vb.data(6)
            k1, k2, k3, act, out = vb.data(7), vb.data(8), vb.data(9), vb.int64(10), vb.data(11)
        else:  # (x, off, nrows, c, centre, scale, beta, act, y, chunk)
            x0 = vb.data(0)
            off, nrows, c, centre = vb.int64(1), vb.int64(2), vb.int64(3), vb.data(4)
            scale, beta, act, out = vb.data(5), vb.data(6), vb.int64(7), vb.data(8)
        nvec = builder.sdiv(builder.add(c, vb.const(vb.lanes - 1)), vb.const(vb.lanes))
        nchunks, rows = _row_chunks(vb, nrows, c, chunk_elems)
        with cgutils.for_range(builder, builder.mul(nchunks, nvec)) as it:
            chunk = builder.sdiv(it.index, nvec)
            r0, nr = _chunk_rows(vb, chunk, rows, nrows)
            j = builder.mul(builder.sub(it.index, builder.mul(chunk, nvec)), vb.const(vb.lanes))
            mask = vb.mask(builder.sub(c, j))
            cv = vb.load(vb.at(centre, j), mask)
            if grad:
                a, b_, d_ = (vb.load(vb.at(p, j), mask) for p in (k1, k2, k3))
            else:
                sc, be = vb.load(vb.at(scale, j), mask), vb.load(vb.at(beta, j), mask)
            with cgutils.for_range(builder, nr) as row:
                at = builder.add(builder.add(off, builder.mul(builder.add(r0, row.index), c)), j)
                d = builder.fsub(vb.load(vb.at(x0, at), mask), cv)
                if grad:
                    gv = vb.load(vb.at(g0, at), mask)
                    t = builder.select(_keep(vb, vb.load(vb.at(y0, at), mask), act), gv, vb.zero)
                    value = vb.fma(a, t, vb.fma(b_, d, d_))
                else:
                    value = vb.activation(vb.fma(d, sc, be), act)
                vb.store(value, vb.at(out, at), mask, result=True)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _affine_rows(typingctx, x, off, nrows, c, centre, scale, beta, act, y, chunk):
    """``y[off + r*c + j] = act((x[...] - centre[j]) * scale[j] + beta[j])``, ``r < nrows``, ``j < c``; ``x``
    and ``y`` float32 or bfloat16 bits (rounded as a result is), the rest float32; ``chunk`` as for
    :func:`_moments_rows`."""
    return types.void(x, off, nrows, c, centre, scale, beta, act, y, chunk), _elementwise_codegen(False)


@intrinsic
def _grad_affine_rows(typingctx, g, y, x, off, nrows, c, centre, k1, k2, k3, act, dx, chunk):
    """``dx[...] = k1[j] * t + k2[j] * (x[...] - centre[j]) + k3[j]`` with ``t`` as in :func:`_grad_sums_rows`."""
    return types.void(g, y, x, off, nrows, c, centre, k1, k2, k3, act, dx, chunk), _elementwise_codegen(True)


@jit
def _chunk(x2):
    return CHUNK_BF16 if x2.itemsize == 2 else 1


@jit
def bn_stats(x2, shift, parts, sched, sig, lead):
    """Per-block shifted sums: ``parts[b, 0, j]`` the sum of ``x[r, j] - shift[j]`` over the rows ``r`` of
    block ``b``, ``parts[b, 1, j]`` the sum of their squares.

    Parameters
    ----------
    x2 : ndarray of shape (P, C), float32 or bfloat16 bits
    shift : ndarray of shape (C,), float32
        Subtracted before summing (a row of ``x``): the variance is then a
        difference of moments about a point near the mean.
    parts : ndarray of shape (ceil(P / ROWS), 2, C), float32
    """
    rows, c = x2.shape
    nblocks = parts.shape[0]
    x1 = x2.reshape(-1)
    chunk = _chunk(x2)
    enter(sched, sig, lead)
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        s = parts[b, 0]
        q = parts[b, 1]
        for j in range(c):
            s[j] = 0
            q[j] = 0
        r0 = b * ROWS
        _moments_rows(x1, r0 * c, min(rows, r0 + ROWS) - r0, c, shift, s, q, chunk)
    leave(sched, sig, lead)


@jit
def bn_apply(x2, mean, scale, beta, act, y2, sched, sig, lead):
    """``y[r, j] = act((x[r, j] - mean[j]) * scale[j] + beta[j])``; ``y2`` float32 or bfloat16 bits, of the shape
    of ``x2``."""
    rows, c = x2.shape
    nblocks = (rows + ROWS - 1) // ROWS
    x1 = x2.reshape(-1)
    y1 = y2.reshape(-1)
    chunk = _chunk(x2)
    enter(sched, sig, lead)
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        r0 = b * ROWS
        _affine_rows(x1, r0 * c, min(rows, r0 + ROWS) - r0, c, mean, scale, beta, act, y1, chunk)
    leave(sched, sig, lead)


@jit
def bn_grad_stats(g2, y2, x2, mean, act, parts, sched, sig, lead):
    """Per-block sums of the backward: ``parts[b, 0, j]`` the sum of ``g`` and ``parts[b, 1, j]`` of
    ``g * (x - mean)`` over the rows of block ``b``, where ``g`` is ``grad_output`` where the activation passes
    it (read off the output ``y2``; for a linear one any array of the shape, unread in effect), else 0.  ``g2``,
    ``y2``, ``x2`` of shape (P, C), float32 or bfloat16 bits each."""
    rows, c = x2.shape
    nblocks = parts.shape[0]
    g1 = g2.reshape(-1)
    y1 = y2.reshape(-1)
    x1 = x2.reshape(-1)
    chunk = _chunk(x2)
    enter(sched, sig, lead)
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        s = parts[b, 0]
        q = parts[b, 1]
        for j in range(c):
            s[j] = 0
            q[j] = 0
        r0 = b * ROWS
        _grad_sums_rows(g1, y1, x1, r0 * c, min(rows, r0 + ROWS) - r0, c, mean, act, s, q, chunk)
    leave(sched, sig, lead)


@jit
def bn_grad_apply(g2, y2, x2, mean, k1, k2, k3, act, dx2, sched, sig, lead):
    """``dx[r, j] = k1[j] * g[r, j] + k2[j] * (x[r, j] - mean[j]) + k3[j]``, ``g`` as in :func:`bn_grad_stats`;
    ``dx2`` float32 or bfloat16 bits of the shape of ``x2``."""
    rows, c = x2.shape
    nblocks = (rows + ROWS - 1) // ROWS
    g1 = g2.reshape(-1)
    y1 = y2.reshape(-1)
    x1 = x2.reshape(-1)
    d1 = dx2.reshape(-1)
    enter(sched, sig, lead)
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        r0 = b * ROWS
        _grad_affine_rows(g1, y1, x1, r0 * c, min(rows, r0 + ROWS) - r0, c, mean, k1, k2, k3, act, d1, 1)
    leave(sched, sig, lead)
