"""Tile addressing, shared by every kernel: which (sequence, head, tile) a program
works on, where its rows live in memory, and when offsets need 64 bits.

* Grids are 1-D: program ``pid`` handles tile ``pid % num_tiles`` of the
  (sequence, head) pair ``pid // num_tiles``. CUDA allows 2**31 - 1 programs on
  grid axis 0 but only 65535 on the others, so batch x heads never meets a limit,
  and the programs of one head stay adjacent (they share its keys in L2).
* Offsets: a scalar base (sequence, head, first row) is always computed in int64;
  the per-element offsets inside a tile are int64 only when ``WIDE`` (a tensor's
  extent within one batch entry reaches 2**31 elements, e.g. 512K tokens x 32
  heads x 128), so the common case keeps 32-bit address arithmetic.
* Sequences: a dense batch (B, S, H, D) has ``B`` sequences of the same length;
  packed input (1, total, H, D) with ``cu_seqlens`` (VARLEN) has one per
  document, each starting at its own row and position.
"""
import triton
import triton.language as tl

INT32_LIMIT = 2**31


@triton.jit
def program_tile(max_rows, num_heads, BLOCK: tl.constexpr):
    """(tile, sequence, head) of this program in a 1-D grid of cdiv(max_rows, BLOCK) tiles per pair."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(max_rows, BLOCK)
    bh = pid // num_tiles
    return pid % num_tiles, bh // num_heads, bh % num_heads


@triton.jit
def seqlen_info(seq, CuSeqlensQ, CuSeqlensK, PosQ, PosK, seqlen_q, seqlen_k, q_start, k_start,
                VARLEN: tl.constexpr):
    """Where sequence ``seq`` lives: (batch index of the tensors, first q row, q rows,
    first k row, k rows, global position of q row 0, of k row 0)."""
    if VARLEN:
        q_row0 = tl.load(CuSeqlensQ + seq)
        k_row0 = tl.load(CuSeqlensK + seq)
        return (0, q_row0, tl.load(CuSeqlensQ + seq + 1) - q_row0, k_row0, tl.load(CuSeqlensK + seq + 1) - k_row0,
                tl.load(PosQ + seq), tl.load(PosK + seq))
    else:
        return seq, 0, seqlen_q, 0, seqlen_k, q_start, k_start


@triton.jit
def seq_base(ptr, batch, head, row0, stride_b, stride_h, stride_s):
    """Pointer to row ``row0`` of one (batch, head) slice; int64, so large tensors cannot overflow."""
    return (ptr + tl.cast(batch, tl.int64) * stride_b + tl.cast(head, tl.int64) * stride_h
            + tl.cast(row0, tl.int64) * stride_s)


@triton.jit
def offsets(idx, stride, WIDE: tl.constexpr):
    """idx * stride, in int64 when WIDE."""
    if WIDE:
        return idx.to(tl.int64) * stride
    else:
        return idx * stride


@triton.jit
def tile_ptrs(base, rows, cols, stride_row, stride_col, WIDE: tl.constexpr):
    """Pointers to the (rows x cols) tile of the 2-D slice at ``base``."""
    return base + offsets(rows, stride_row, WIDE)[:, None] + offsets(cols, stride_col, WIDE)[None, :]


@triton.jit
def row_descriptor(base, rows, stride_row, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tensor descriptor over the (rows x BLOCK_D) slice at ``base`` (row stride
    ``stride_row``, unit column stride), read and written BLOCK_ROWS rows at a time:
    TMA on sm_90. Rows from ``rows`` on read as zero and are never written, so a
    descriptor over one sequence (or one packed document) needs no row mask.
    The host uses it only where ``tma_compatible`` holds."""
    return tl.make_tensor_descriptor(base, shape=[rows, BLOCK_D], strides=[stride_row, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_D])


def tma_compatible(*tensors):
    """Whether tensor descriptors can address every (sequence, head) slice of ``tensors``
    (B, S, H, D) as ``row_descriptor`` does: TMA wants a 16-byte aligned base and 16-byte
    multiples as strides, a unit stride along the head dim, and each tensor's head dim
    filling its tile (a padded tile would read the next head's columns instead of zeros:
    q and k of head dim 192 in tiles of 256 do not qualify, whatever v's head dim)."""
    for t in tensors:
        if t is None:
            continue
        if block_d(t.shape[-1]) != t.shape[-1]:
            return False
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((stride * t.element_size()) % 16 for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size > 1):
            return False
    return True


def block_d(head_dim):
    """The padded head dim a tile holds: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def tile_width(head_dim, value_dim):
    """The widest head-dim tile of a kernel whose q/k and v/out tiles hold ``head_dim`` and
    ``value_dim`` columns: what its register and shared-memory budget is chosen by (the
    config lists' head-dim bound and the fused-accumulate bounds of kernels/autotune.py)."""
    return max(block_d(head_dim), block_d(value_dim))


def is_power_of_two(n):
    return n > 0 and (n & (n - 1)) == 0


def length_bucket(n):
    """Lengths enter autotune keys as power-of-two buckets, so varying lengths do not re-tune."""
    return triton.next_power_of_2(max(1, int(n)))


def needs_int64(*tensors):
    """True when an element offset within one batch entry of any tensor reaches 2**31."""
    for t in tensors:
        if t is None:
            continue
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]) if size > 0)
        if extent >= INT32_LIMIT:
            return True
    return False


def grid_1d(max_rows, num_pairs, block_name="BLOCK_M"):
    """The 1-D grid (a function of the tunables) of cdiv(max_rows, BLOCK) tiles for each
    of ``num_pairs`` (sequence, head) pairs, matching ``program_tile``."""
    return lambda meta: (triton.cdiv(max_rows, meta[block_name]) * num_pairs,)
