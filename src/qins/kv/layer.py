"""QINSLayer: the state machine of one full-attention layer of a QINSCache (cache.py).

Token order inside one QINSLayer (B, H, T, D):

    | pages: groups of G tokens (codes)           | staging (fp, < G) | residual (fp)       |
      `pool` (a PagePool) through `table`           `keys[:, :, :n_s]`  last `residual`
    | sink copies (fp) overlay the first `sink` tokens when read back |

The float segment (sink copies, staging, residual) is what the model's dtype holds; the pages
are the pool's (store.py): preallocated when `max_tokens` is given (a clear `PoolExhausted`
past it), else grown by whole pages.

- New tokens enter the fp region (`keys`, `values`, the model's dtype). When it holds at
  least `residual + G` tokens, its oldest whole groups of G tokens are quantized (keys per
  channel over the group, values per token), packed and written into the open page: each
  token is quantized once, appending costs O(new tokens), and a full page is sealed.
- The staging tokens (older than the residual window, fewer than a group) have no sealed
  key scales yet. They are held in fp (counted in `nbytes`) and read back quantized:
  values with their final per-token codes, keys with provisional per-channel scales over
  the staging tokens, recomputed at each update (O(G)). So with `residual=0` attention
  reads every token back from quantized codes (except the sink copies).
- Keys below 8 bits store a zero point (mid-range) and a half-range per (group, channel):
  keys carry outlier channels with a non-zero centre and, after RoPE, slowly drifting
  low-frequency channels, which a per-group zero point follows (KIVI). 8-bit keys use a
  fixed per-channel offset instead (the mid-range of the first sealed tokens, fixed per layer
  at the first seal, so sealed pages stay valid) and one scale per group.
- Sink tokens (`sink`, default 1): the first tokens draw much of the attention and carry
  outlier keys. They stay in the stream (so pages keep their alignment and the first page is
  an ordinary page), are left out of the first group's ranges, and a full-precision copy
  overlays them when read back.
- Key plans (plan.py, optional): calibrated widths per key channel at the same bits per
  element; a planned layer quantizes keys on the zero-point grid of each channel's width
  and packs them with `RowLayout.mixed`.
- Pre-RoPE keys (rope.py, `KVConfig.k_prerope`): keys are turned back by their stream
  position's RoPE angle where they are quantized (sealing, staging, a reopened group) and decoded
  keys are turned forward again (decoded in float32 first); the float segment keeps keys as
  given. The kernel path turns them in the first Triton decode-attention kernel.
- Crop never re-quantizes: cutting into the pages keeps the codes of the group that holds
  the new end, and that group stays open with its stored key parameters; the next tokens
  fill it on those parameters (values get their own per-token scales as always), so a crop
  followed by the same tokens leaves every code as it was. Beam reorder permutes the block
  table's rows (pages become shared, copy-on-write before the next write): no page is
  copied and nothing syncs with the host.
- The reference path (CPU and tests): `update` decodes every page straight into one fresh
  (B, H, T, D) output per tensor (one gather of the pages through the block table, one
  table gather per byte of codes and one fused scale/zero-point multiply-add;
  layout.decode_rows) and returns it to the model's attention (SDPA). No decoded copy of the
  history is kept between steps. The GPU path (attention.py) reads the pages in the
  decode-attention kernel instead.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .codec import (Codec, affine_levels, dequantize_keys_mixed, encode_keys_mixed, fake_quantize_keys,
                    fake_quantize_values, key_offset, mixed_key_affine, quantize_keys, quantize_keys_mixed,
                    quantize_values)
from .layout import RowLayout, byte_table, decode_rows, pack_rows
from .rope import Rope
from .vrot import turn, value_rotation
from .store import BlockTable, PagePool, PageView, PoolExhausted, page_tokens


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class QINSLayer(CacheLayerMixin):
    """One full-attention layer of a QINSCache.

    Stored state (B batch rows, H KV heads, D head dim, model dtype):
      pool             PagePool or None             packed codes + fp16 scales / zero points,
                                                    pages of P tokens of one row (store.py)
      table            BlockTable or None           (B, columns) page ids: tokens
                                                    0 .. n_quantized - 1 of each row
      keys, values     (B, H, n_fp, D)              the tokens after them: staging + residual
                                                    window, full precision
      sink_k, sink_v   (B, H, <= sink, D)           copies of the first tokens, full precision;
                                                    they overlay those tokens when read back
      k_offset         (B, H, 1, D) fp16 or None    per-channel key offset of keys without a
                                                    zero point, set once at the first seal
      cumulative_length  int                        tokens held = n_quantized + n_fp
    `max_tokens` (per sequence) preallocates the pool (B (max_tokens / P + 1) pages: one spare
    page per row for copy-on-write) and refuses more tokens; None grows it as needed.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, k_bits: int, v_bits: int, *, format: str = "qins", residual: int = 128, sink: int = 0,
                 page_kb: int = 32, group: int = 64, k_curvature: float = 0.0, v_curvature: float = 0.0,
                 k_zero: bool = True, v_zero: bool = False, k_widths: torch.Tensor | None = None,
                 expect_heads: int | None = None, expect_head_dim: int | None = None,
                 max_tokens: int | None = None, rope: Rope | None = None, v_rotate: bool = False):
        super().__init__()
        if sink >= group:
            raise ValueError(f"sink ({sink}) must be smaller than the key group ({group} tokens)")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        self.k_codec = Codec.build(format, k_bits, k_curvature, k_zero)
        self.v_codec = Codec.build(format, v_bits, v_curvature, v_zero)
        # per-channel key widths (a KeyPlan): keys on the uniform zero-point grid of each width
        self.k_widths = None if k_widths is None else torch.as_tensor(k_widths, dtype=torch.int64)
        self._k_layout_cpu = None
        if self.k_widths is not None:
            if not k_zero or k_curvature != 0.0:
                raise ValueError("per-channel key widths need key zero points and uniform key levels (curvature 0)")
            self._k_layout_cpu = RowLayout.mixed(self.k_widths)
            eh, ed = expect_heads, expect_head_dim
            if (eh is not None and self.k_widths.shape[0] != eh) or (ed is not None and self.k_widths.shape[1] != ed):
                raise ValueError(f"the key plan has {tuple(self.k_widths.shape)} (heads, channels) for this layer; "
                                 f"the model has ({eh}, {ed})")
        if rope is not None and expect_head_dim is not None and rope.dims > expect_head_dim:
            raise ValueError(f"{rope.dims} rotary channels do not fit a head of dim {expect_head_dim}")
        self.rope = rope                 # pre-RoPE keys (rope.py): sealed keys turned back, decoded keys turned
        self.v_rotate = bool(v_rotate)   # rotated values (vrot.py): sealed values @ R, decoded values @ R^T
        self._v_rot = None               # R on the layer's device, set at initialization
        self._k_fields = None
        self.residual, self.sink, self.page_kb, self.group = residual, sink, page_kb, group
        self.max_tokens = max_tokens
        self.expect = (expect_heads, expect_head_dim)
        self.cumulative_length = 0
        self.pool: PagePool | None = None
        self.table: BlockTable | None = None
        self.sink_k = self.sink_v = None
        self.k_offset = None
        self.page_tokens = None
        self.last_path = None            # "reference", "triton" or "cuda": how the last attention read this layer
        self.paged = False               # the model's attention reads PagedKV handles (QINSCache sets it)

    def __repr__(self):
        plan = "" if self.k_widths is None else f", key plan {self.k_widths.float().mean():.2f} bits"
        rope = "" if self.rope is None else ", pre-RoPE keys"
        rope += ", rotated values" if self.v_rotate else ""
        return (f"QINSLayer(k{self.k_codec.bits}v{self.v_codec.bits}, {self.k_codec.format}, residual={self.residual}, "
                f"sink={self.sink}, group={self.group}, page_tokens={self.page_tokens}{plan}{rope})")

    # -- state -------------------------------------------------------------------------------
    @property
    def n_quantized(self) -> int:
        return 0 if self.table is None else self.table.n_tokens

    @property
    def pages(self) -> list[PageView]:
        """Views of the pages of batch row 0 holding written tokens (the last may be open)."""
        if self.table is None:
            return []
        return [PageView(self.pool, self.table, i) for i in range(-(-self.n_quantized // self.page_tokens))]

    def planes(self) -> tuple[torch.Tensor | None, ...]:
        """Every row's written pages read through the block table (copies): k_codes
        (B, H, Q, Wk), k_scale, k_zero (B, H, ceil(Q / G), D), v_codes (B, H, Q, Wv), v_scale,
        v_zero (B, H, Q); None planes for codecs without them. For inspection and tests."""
        Q, G, t, pool = self.n_quantized, self.group, self.table, self.pool
        n = dict(k_scale=-(-Q // G), k_zero=-(-Q // G))
        return tuple(None if getattr(pool, p) is None else t.gather(getattr(pool, p), n.get(p, Q))
                     for p in PagePool.PLANES)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    def _max_cols(self) -> int | None:
        return None if self.max_tokens is None else -(-self.max_tokens // self.page_tokens)

    def _resident(self) -> None:
        """A clear error while the pages are parked elsewhere (entropy.kvpages.park)."""
        if self.is_initialized and self.pool.parked:
            raise RuntimeError("this QINSCache layer's pages are parked (qins.entropy.kvpages.park); "
                               "unpark the cache before using it")

    def _check_input(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self._resident()
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"QINSCache expects keys and values of one shape (B, H, T, D), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        B, H, T, D = k.shape
        eh, ed = self.expect if not self.is_initialized else (self.keys.shape[1], self.keys.shape[3])
        if (eh is not None and H != eh) or (ed is not None and D != ed):
            raise ValueError(f"this QINSCache layer holds {eh} KV heads of dim {ed}, got {H} heads of dim {D}: "
                             f"a cache is built for one model (make a new QINSCache for this one)")
        if self.is_initialized and self.cumulative_length and B != self.batch_size:
            raise ValueError(f"this QINSCache holds {self.batch_size} batch rows, got {B}; call cache.reset() "
                             f"before reusing it for another batch")
        held = self.cumulative_length if self.is_initialized else 0
        if self.max_tokens is not None and held + T > self.max_tokens:
            raise PoolExhausted(f"this QINSCache was built for max_tokens={self.max_tokens} per sequence; "
                                f"it holds {held} and was given {T} more")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, H, 0, D)
        self.sink_k, self.sink_v = self.keys, self.values
        self.k_offset = None
        if self.k_widths is not None:
            self.k_layout = self._k_layout_cpu.to(self.device)
            self._k_widths = self.k_widths.to(self.device)
        else:
            self.k_layout = RowLayout.uniform(H, D, self.k_codec.bits).to(self.device)
        self.v_layout = RowLayout.uniform(H, D, self.v_codec.bits).to(self.device)
        self.page_tokens = page_tokens(self.page_kb, H, D, self.k_codec.bits, self.v_codec.bits, self.group,
                                       self.k_codec.zero_point, self.v_codec.zero_point, self.k_layout.n_words)
        pages = None if self.max_tokens is None else B * (self._max_cols() + 1)
        if self.pool is None or self.pool.device != self.device or (pages is not None and self.pool.n_pages != pages):
            self.pool = PagePool(H, D, self.page_tokens, self.group, self.k_codec.bits, self.v_codec.bits,
                                 self.device, self.k_codec.zero_point, self.v_codec.zero_point, pages=pages,
                                 k_words=self.k_layout.n_words)
        self.pool.release_all()                                       # a reset cache reuses its pool
        self.table = BlockTable(B, self.device, self._max_cols() or 0)
        self.k_codec = _on(self.k_codec, self.device)
        self.v_codec = _on(self.v_codec, self.device)
        self._k_affine, self._v_affine = affine_levels(self.k_codec), affine_levels(self.v_codec)
        self._k_table, self._v_table = byte_table(self.k_codec), byte_table(self.v_codec)
        self._mids = None
        self._v_rot = value_rotation(D, str(self.device)) if self.v_rotate else None
        self._k_fields = None            # a key plan's fields for the decode kernel (kv/attention.py), on first use
        self.is_initialized = True

    @property
    def kernels(self) -> bool:
        """The dispatch (read on every call, as QINS_KERNELS is): True when the Triton kernels
        append to and read this layer's pages (kv/attention.py), False for the reference."""
        from .attention import use_kernels
        return self.is_initialized and use_kernels(self, self.device)

    # -- append --------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the tokens; return the history as (B, H, T, D) float K/V (the reference), or,
        for a decode step when the model's attention reads pages (`paged`, set by QINSCache on
        CUDA) and the kernels run this layer, a PagedKV handle for it (kv/attention.py)."""
        self.append(key_states, value_states)
        if self.paged and ((key_states.shape[2] == 1 and self.kernels) or self._v_rot is not None):
            # the model's attention reads this layer through the handle: the kernels for a decode
            # step; with rotated values, the reference in the rotated frame, its output turned back
            from .attention import PagedKV
            h = PagedKV(self)
            return h, h
        self.last_path = "reference"
        return self._read()

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Add tokens (B, H, T, D): into the float segment, sealing the groups that leave the
        residual window into pages."""
        self._check_input(key_states, value_states)
        if not self.is_initialized or self.cumulative_length == 0:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states.to(self.dtype), value_states.to(self.dtype)
        self.cumulative_length += k.shape[2]
        room = self.sink - self.sink_k.shape[2]
        if room > 0 and k.shape[2]:
            self.sink_k = torch.cat([self.sink_k, k[:, :, :room]], dim=2)
            self.sink_v = torch.cat([self.sink_v, v[:, :, :room]], dim=2)
        if k.shape[2]:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
        self._seal_ready_groups()

    def _pre(self, k: torch.Tensor, t0: int) -> torch.Tensor:
        """Keys (B, H, n, D) of stream positions t0 .. t0 + n - 1 as they are quantized: with the
        RoPE angle turned back (pre-RoPE keys, rope.py; in the model's dtype), else as given."""
        return k if self.rope is None else self.rope.rotate(k, t0, inverse=True).to(k.dtype)

    def _pre_v(self, v: torch.Tensor) -> torch.Tensor:
        """Values (B, H, n, D) as they are quantized: turned by R (rotated values, vrot.py; in the
        model's dtype), else as given."""
        return v if self._v_rot is None else turn(v, self._v_rot).to(v.dtype)

    def _key_stats_view(self, k: torch.Tensor) -> torch.Tensor:
        """Keys from the start of the stream with the sink tokens replaced by the next token,
        so that they do not widen the first group's ranges (they are read back from sink_k)."""
        S = min(self.sink_k.shape[2], k.shape[2] - 1)
        if S <= 0:
            return k
        k = k.clone()
        k[:, :, :S] = k[:, :, S:S + 1]
        return k

    def _open_params(self):
        """(r, m) (B, H, 1, D) fp16 stored key parameters of the open group (the group holding
        token n_quantized, reopened by a crop); m None without zero points."""
        Q, P, G = self.n_quantized, self.page_tokens, self.group
        ids = self.table.ids[:, Q // P].long()
        g = Q % P // G
        r = self.pool.k_scale[ids, :, g].unsqueeze(2)
        m = None if self.pool.k_zero is None else self.pool.k_zero[ids, :, g].unsqueeze(2)
        return r, m

    def _encode_open(self, k: torch.Tensor) -> torch.Tensor:
        """uint8 key codes of tokens k (B, H, n, D) of the open group on its stored parameters."""
        r, m = self._open_params()
        if self.k_widths is not None:
            return encode_keys_mixed(k, self._k_widths, r, m)
        if self.k_offset is not None:
            k = k - self.k_offset.to(k.dtype)
        return self.k_codec.encode(k, r, m)

    def _pack_keys(self, kc: torch.Tensor) -> torch.Tensor:
        return self.k_layout.pack(kc) if self.k_widths is not None else pack_rows(kc, self.k_codec.bits)

    def _seal_ready_groups(self) -> None:
        G = self.group
        avail = self.keys.shape[2] - self.residual                    # tokens past the window
        open_ = self.n_quantized % G
        if open_ and avail >= G - open_:                              # fill the reopened group first
            n = G - open_
            k, v = self._pre(self.keys[:, :, :n], self.n_quantized), self._pre_v(self.values[:, :, :n])
            vc, vs, vz = quantize_values(v, self.v_codec)
            self._write(self.n_quantized, self._pack_keys(self._encode_open(k)), None, None,
                        pack_rows(vc, self.v_codec.bits), vs, vz)
            self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]
            avail -= n
        elif open_:
            return
        n = avail // G * G                                            # whole groups past the window
        if n <= 0:
            if open_:
                self.keys, self.values = self.keys.clone(), self.values.clone()
            return
        k, v = self._pre(self.keys[:, :, :n], self.n_quantized), self._pre_v(self.values[:, :, :n])
        if self.kernels:                                              # quantize-on-append, one launch
            self._seal_kernel(k, v)
            self.keys = self.keys[:, :, n:].clone()
            self.values = self.values[:, :, n:].clone()
            return
        if not self.n_quantized:
            k = self._key_stats_view(k)
        if self.k_offset is None and not self.k_codec.zero_point:     # fixed at the first seal
            self.k_offset = key_offset(k)
        if self.k_offset is not None:
            k = k - self.k_offset.to(k.dtype)
        if self.k_widths is not None:
            kc, ks, kz = quantize_keys_mixed(k, self._k_widths, G)
        else:
            kc, ks, kz = quantize_keys(k, self.k_codec, G)            # (B, H, n, D), (B, H, n/G, D) x2
        vc, vs, vz = quantize_values(v, self.v_codec)                 # (B, H, n, D), (B, H, n) x2
        self._write(self.n_quantized, self._pack_keys(kc), ks, kz, pack_rows(vc, self.v_codec.bits), vs, vz)
        self.keys = self.keys[:, :, n:].clone()                       # drop the fp copies
        self.values = self.values[:, :, n:].clone()

    def _seal_kernel(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Seal whole groups k, v (B, H, n, D) with the Triton quantize-on-append kernel: codes,
        scales and zero points written straight into their pages (kernels/triton_kv.py)."""
        from ..kernels.triton_kv import kv_append, padded_mids
        if self._mids is None:
            self._mids = (padded_mids(self.k_codec.mids, self.k_codec.bits),
                          padded_mids(self.v_codec.mids, self.v_codec.bits))
        t0, n, t = self.n_quantized, k.shape[2], self.table
        sink = 0
        if not t0:
            sink = max(min(self.sink_k.shape[2], n - 1), 0)
            if self.k_offset is None and not self.k_codec.zero_point:     # fixed at the first seal
                self.k_offset = key_offset(self._key_stats_view(k))
        t.ensure(self.pool, t0 + n, self._max_cols())
        for col in range(t0 // self.page_tokens, -(-(t0 + n) // self.page_tokens)):
            t.own(self.pool, col)
        kv_append(k, v, self.k_offset, t.ids, t0, tuple(getattr(self.pool, p) for p in PagePool.PLANES),
                  *self._mids, self.k_codec.bits, self.v_codec.bits, self.group, self.k_codec.signed_scale,
                  self.v_codec.signed_scale, sink, k_fields=self.key_fields())
        t.n_tokens = t0 + n

    def key_fields(self):
        """A key plan's per-channel fields for the kernels (RowLayout.kernel_fields) on the
        layer's device, built once; None for uniform keys."""
        if self.k_widths is None:
            return None
        if self._k_fields is None or self._k_fields[0].device != self.device:
            self._k_fields = self.k_layout.kernel_fields(self.device)
        return self._k_fields

    def _write(self, t0: int, kw, ks, kz, vw, vs, vz) -> None:
        """Write tokens [t0, t0 + n) of every row into their pages: kw/vw (B, H, n, W) int32,
        vs/vz (B, H, n), and (ks, kz) (B, H, n/G, D) when t0 starts a group (None: the open
        group's stored parameters stay). Pages come from the pool (no copy); a page rows may
        share is copied first (copy-on-write). No host sync."""
        n = kw.shape[2]
        t = self.table
        t.ensure(self.pool, t0 + n, self._max_cols())
        P, G, pool = self.page_tokens, self.group, self.pool
        for col in range(t0 // P, -(-(t0 + n) // P)):
            t.own(pool, col)
            ids = t.ids[:, col].long()
            a, b = max(t0, col * P), min(t0 + n, (col + 1) * P)      # tokens of this page
            s0, s1, x0, x1 = a - col * P, b - col * P, a - t0, b - t0
            pool.k_codes[ids, :, s0:s1] = kw[:, :, x0:x1]
            pool.v_codes[ids, :, s0:s1] = vw[:, :, x0:x1]
            pool.v_scale[ids, :, s0:s1] = vs[:, :, x0:x1]
            if pool.v_zero is not None:
                pool.v_zero[ids, :, s0:s1] = vz[:, :, x0:x1]
            if ks is not None:
                pool.k_scale[ids, :, s0 // G:s1 // G] = ks[:, :, x0 // G:x1 // G]
                if pool.k_zero is not None:
                    pool.k_zero[ids, :, s0 // G:s1 // G] = kz[:, :, x0 // G:x1 // G]
        t.n_tokens = t0 + n

    # -- read back -----------------------------------------------------------------------------
    def _decode_pages_into(self, out_k: torch.Tensor, out_v: torch.Tensor, v_turned: bool = False) -> None:
        """Decode every page into out_k/out_v[:, :, :n_quantized] (views of (B, H, T, D)).

        Per tensor: one gather of the pages through the block table, one uint8 -> int32 (or
        float) pass, one table gather (decode_rows), one fused scale (+ zero point)
        multiply-add written straight into the output. An open group (after a crop) is
        decoded whole into a scratch tensor and its written tokens copied. v_turned: rotated values
        are left in the rotated frame (R v, as stored)."""
        Q = self.n_quantized
        if not Q:
            return
        G, D = self.group, out_k.shape[3]
        Qg = -(-Q // G) * G
        B, H = out_k.shape[:2]
        # pre-RoPE keys and rotated values decode in float32 into scratch, then turn
        kf, vf = self.rope is not None, self._v_rot is not None and not v_turned
        k = out_k.new_empty(B, H, Qg, D, dtype=torch.float32 if kf else out_k.dtype) if Qg != Q or kf else out_k
        v = out_v.new_empty(B, H, Qg, D, dtype=torch.float32 if vf else out_v.dtype) if Qg != Q or vf else out_v
        self._decode_groups_into(k, v, Qg)
        if kf:
            self.rope.rotate(k[:, :, :Q], 0, out=out_k[:, :, :Q])
        elif k is not out_k:
            out_k[:, :, :Q] = k[:, :, :Q]
        if vf:
            out_v[:, :, :Q] = turn(v[:, :, :Q], self._v_rot, inverse=True)
        elif v is not out_v:
            out_v[:, :, :Q] = v[:, :, :Q]

    def _decode_groups_into(self, out_k, out_v, Q: int) -> None:
        G, D = self.group, out_k.shape[3]
        t, pool = self.table, self.pool
        kw, vw = t.gather(pool.k_codes, Q), t.gather(pool.v_codes, Q)
        ks = t.gather(pool.k_scale, Q // G)
        kz = None if pool.k_zero is None else t.gather(pool.k_zero, Q // G)
        vs = t.gather(pool.v_scale, Q)
        vz = None if pool.v_zero is None else t.gather(pool.v_zero, Q)
        B, H, _, _ = kw.shape
        # x = m + r * (alpha * u + beta) = (m + r * beta) + (r * alpha) * u: the affine part of
        # the table folds into the (small) scale and zero-point planes
        dst = out_k[:, :, :Q].view(B, H, Q // G, G, D)
        if self.k_widths is not None:                                 # per-channel widths, per-channel affine
            base, step = mixed_key_affine(self._k_widths, ks.unsqueeze(3), kz.unsqueeze(3))
            torch.addcmul(base, self.k_layout.unpack(kw).view(B, H, Q // G, G, D), step, out=dst)
        else:
            u, alpha, beta = decode_rows(kw, self.k_codec, D, self.k_layout, self._k_table, self._k_affine)
            r = ks.unsqueeze(3).float()                               # (B, H, Q/G, 1, D)
            m = kz.unsqueeze(3).float() if kz is not None else \
                self.k_offset.unsqueeze(2).float() if self.k_offset is not None else None
            _scale_into(dst, u.view(B, H, Q // G, G, D), r, m, alpha, beta)
        u, alpha, beta = decode_rows(vw, self.v_codec, D, self.v_layout, self._v_table, self._v_affine)
        _scale_into(out_v[:, :, :Q], u, vs.unsqueeze(3).float(), None if vz is None else vz.unsqueeze(3).float(),
                    alpha, beta)

    def decode_pages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, n_quantized, D) keys and values decoded from every page (sink overlaid)."""
        B, H, _, D = self.keys.shape
        Q = self.n_quantized
        k = self.keys.new_empty(B, H, Q, D)
        v = self.values.new_empty(B, H, Q, D)
        self._decode_pages_into(k, v)
        self._overlay_sink(k, v)
        return k, v

    def _overlay_sink(self, k: torch.Tensor, v: torch.Tensor, v_turned: bool = False) -> None:
        S = min(self.sink_k.shape[2], k.shape[2])
        if S:
            k[:, :, :S] = self.sink_k[:, :, :S]
            v[:, :, :S] = self._pre_v(self.sink_v[:, :, :S]) if v_turned else self.sink_v[:, :, :S]

    def _staging_into(self, out_k: torch.Tensor, out_v: torch.Tensor, n_stage: int, v_turned: bool = False) -> None:
        """The staging tokens (fp, past the residual window) as they will be read once sealed:
        those that fill an open group on its stored parameters, the rest with provisional
        per-channel key scales over them; values with their final per-token codes."""
        Q, G = self.n_quantized, self.group
        st = self._pre(self.keys[:, :, :n_stage], Q)
        n_open = min(n_stage, G - Q % G) if Q % G else 0
        if n_open:
            r, m = self._open_params()
            c = self._encode_open(st[:, :, :n_open])
            if self.k_widths is not None:
                out_k[:, :, :n_open] = dequantize_keys_mixed(c, r, m, self._k_widths, n_open, self.dtype)
            else:
                x = self.k_codec.decode(c, r, m, self.dtype)
                out_k[:, :, :n_open] = x + self.k_offset.to(self.dtype) if self.k_offset is not None else x
        rest = st[:, :, n_open:]
        if rest.shape[2]:
            if Q == 0:
                rest = self._key_stats_view(rest)
            dst = out_k[:, :, n_open:n_stage]
            if self.k_widths is not None:
                dst[:] = dequantize_keys_mixed(*quantize_keys_mixed(rest, self._k_widths, rest.shape[2]),
                                               self._k_widths, rest.shape[2], self.dtype)
            elif self.k_codec.zero_point:
                dst[:] = fake_quantize_keys(rest, self.k_codec)
            else:
                m = (self.k_offset if self.k_offset is not None else key_offset(rest)).to(self.dtype)
                dst[:] = fake_quantize_keys(rest - m, self.k_codec) + m
        if self.rope is not None:
            out_k[:] = self.rope.rotate(out_k, Q)                     # x is out_k: through a copy
        fv = fake_quantize_values(self._pre_v(self.values[:, :, :n_stage]), self.v_codec)
        out_v[:] = fv if self._v_rot is None or v_turned else turn(fv, self._v_rot, inverse=True)

    def float_segment(self, v_turned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, F, D) the tokens after the pages as attention reads them: staging read back
        quantized, residual as held (sink copies are separate: `sink_k`, `sink_v`); v_turned as
        `_read`."""
        turned = v_turned and self._v_rot is not None
        F_ = self.keys.shape[2]
        n_stage = max(F_ - self.residual, 0)
        if not n_stage:
            return self.keys, (self._pre_v(self.values) if turned else self.values)
        k, v = torch.empty_like(self.keys), torch.empty_like(self.values)
        self._staging_into(k[:, :, :n_stage], v[:, :, :n_stage], n_stage, turned)
        k[:, :, n_stage:] = self.keys[:, :, n_stage:]
        v[:, :, n_stage:] = self._pre_v(self.values[:, :, n_stage:]) if turned else self.values[:, :, n_stage:]
        return k, v

    def _read(self, v_turned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens as (B, H, T, D): pages decoded, staging quantized with provisional key
        scales, residual as held, sink tokens overlaid. v_turned (rotated values only): values in
        the rotated frame, R v, the form they are stored in; attention over them gives R o, which
        the caller turns back (attention is linear in V): a (D x D) turn per query token instead
        of one per cached token."""
        self._resident()
        turned = v_turned and self._v_rot is not None
        Q, F_ = self.n_quantized, self.keys.shape[2]
        n_stage = max(F_ - self.residual, 0)
        if Q == 0 and n_stage == 0:
            return self.keys, (self._pre_v(self.values) if turned else self.values)
        B, H, _, D = self.keys.shape
        out_k = self.keys.new_empty(B, H, Q + F_, D)
        out_v = self.values.new_empty(B, H, Q + F_, D)
        self._decode_pages_into(out_k, out_v, turned)
        if n_stage:
            self._staging_into(out_k[:, :, Q:Q + n_stage], out_v[:, :, Q:Q + n_stage], n_stage, turned)
        out_k[:, :, Q + n_stage:] = self.keys[:, :, n_stage:]
        out_v[:, :, Q + n_stage:] = self._pre_v(self.values[:, :, n_stage:]) if turned else self.values[:, :, n_stage:]
        self._overlay_sink(out_k, out_v, turned)
        return out_k, out_v

    # -- transformers' layer API --------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.sink_k = self.sink_v = self.k_offset = None
        self.table = None                                             # the pool stays (reused)
        self.cumulative_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last -tokens_to_remove tokens (a negative int, as DynamicLayer).

        Exact whenever the removed tokens lie in the fp region. Cutting into the pages keeps
        the codes of the group that holds the new end: it stays open on its stored key
        parameters and the next tokens fill it (no code is ever re-quantized; later pages stay
        allocated to the row and are reused). When only sink tokens remain they go back to the
        fp region from their exact copies."""
        if not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative int (tokens to remove) or 0, got {tokens_to_remove!r}")
        r = -tokens_to_remove
        if r > self.cumulative_length:
            raise ValueError(f"cannot crop {r} tokens: the cache holds {self.cumulative_length}")
        if r == 0 or not self.is_initialized:
            return
        new_len = self.cumulative_length - r
        Q = self.n_quantized
        if new_len >= Q:
            self.keys, self.values = self.keys[:, :, :new_len - Q], self.values[:, :, :new_len - Q]
        elif new_len <= self.sink_k.shape[2]:                         # only exact sink copies left
            self.keys = self.sink_k[:, :, :new_len].clone()
            self.values = self.sink_v[:, :, :new_len].clone()
            self.table.n_tokens = 0
        else:
            self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]
            self.table.n_tokens = new_len
        self.sink_k, self.sink_v = self.sink_k[:, :, :new_len], self.sink_v[:, :, :new_len]
        self.cumulative_length = new_len

    def _map_batch(self, fn) -> None:
        self.sink_k, self.sink_v, self.keys, self.values = (
            fn(t) for t in (self.sink_k, self.sink_v, self.keys, self.values))
        if self.k_offset is not None:
            self.k_offset = fn(self.k_offset)
        if self.table is not None:
            self.table.map_rows(fn)

    def _check_index(self, idx: torch.Tensor, what: str) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"{what} must be a 1-D integer tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
        B = self.batch_size
        if idx.numel() and not idx.is_cuda and (int(idx.min()) < 0 or int(idx.max()) >= B):
            # checked on the host only where that costs no sync (a CUDA index is used as given)
            raise IndexError(f"{what} out of range for a cache of {B} batch rows: "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        return idx.to(self.device)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beams: the block table's rows are permuted; pages become shared (copy-on-write)."""
        if not self.is_initialized:
            return
        idx = self._check_index(beam_idx, "beam_idx")
        self._map_batch(lambda t: t.index_select(0, idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        idx = self._check_index(indices, "indices")
        self._map_batch(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def _move(self, device) -> None:
        self._resident()
        self.sink_k, self.sink_v, self.keys, self.values = (
            t.to(device, non_blocking=True) for t in (self.sink_k, self.sink_v, self.keys, self.values))
        if self.k_offset is not None:
            self.k_offset = self.k_offset.to(device, non_blocking=True)
        if self._v_rot is not None:
            self._v_rot = self._v_rot.to(device, non_blocking=True)
        self.table.ids = self.table.ids.to(device, non_blocking=True)
        self.pool.to(device)

    def offload(self):
        if self.is_initialized:
            self._move("cpu")

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._move(self.device)

    # -- accounting ----------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held: the page pool (every page, free or not), the block table, fp regions."""
        if not self.is_initialized:
            return 0
        return self.pool.nbytes() + _nbytes(self.table.ids) + sum(
            _nbytes(t) for t in (self.sink_k, self.sink_v, self.keys, self.values, self.k_offset))

    def n_elements(self) -> int:
        """K and V elements represented: 2 * B * H * T * D."""
        if not self.is_initialized:
            return 0
        B, H, _, D = self.keys.shape
        return 2 * B * H * self.cumulative_length * D


def _scale_into(dst, u, r, m, alpha: float, beta: float) -> None:
    """dst = m + r * (alpha * u + beta), one pass over u (m None = 0); r, m broadcast."""
    if beta != 0.0:
        m = r * beta if m is None else m + r * beta
    if alpha != 1.0:
        r = r * alpha
    if m is None:
        torch.mul(u, r, out=dst)
    else:
        torch.addcmul(m, u, r, out=dst)


def _on(codec: Codec, device) -> Codec:
    from dataclasses import replace
    return replace(codec, lut=codec.lut.to(device), mids=codec.mids.to(device))
