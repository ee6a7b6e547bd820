"""INT8 block-sparse weights and layers, for CPU inference.

A :class:`QuantizedBlockSparseWeight` holds a block-sparse weight's kept values as int8 with one symmetric float32
scale per output channel (``W[o, k] ~ w_scale[o] * q[o, k]``, ``|q| <= 127``): a quarter of the float32 bytes.
:class:`QuantizedBlockSparseLinear` runs ``y = act(x W^T + b)`` with it: the op quantizes ``x`` inside, per token
(dynamic: ``max |x[t, :]|`` maps to the largest integer) or with one static clip value from :func:`calibrate`
(values beyond it saturate), accumulates in int32 (AVX-512 VNNI ``vpdpbusd`` on zmm, AVX-VNNI ``vpdpbusd`` on
ymm, AVX2 ``vpmaddubsw``, or portable C++), and its output stage dequantizes, adds the bias, applies the
activation and writes ``x``'s dtype (float32 or bfloat16).

Activation precision: 8 bits (integers in [-127, 127]) with AVX-512 VNNI or AVX-VNNI and on the portable path;
7 bits ([-63, 63]) on AVX2 without either VNNI, where ``vpmaddubsw``'s int16 sum of two products would saturate
at 8 bits (``sparse.quant.activation_qmax()`` says which applies, ``sparse._C.int8_kernel()`` which kernel).

Defined results for bad values:
- a weight with NaN or Inf: ``ValueError`` naming the output row (int8 cannot hold it);
- an all-zero output row: scale 0, the row's output is exactly the bias;
- a token with NaN (or, with dynamic scales, +-Inf) anywhere: that token's outputs are NaN, as in float;
  with a static clip, +-Inf saturates to +-clip; a token whose max ``|x|`` is 0 (or below ~4e-37): the bias.

Inference only: the layers hold no parameters and refuse inputs that require a gradient. Train (prune, distil) in
float, then convert with :func:`quantize` or ``sparse.sparsify(..., quantize="int8")``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import _ext
from .formats import BalancedSparseWeight, BlockSparseWeight
from .ops import ACTIVATIONS

__all__ = ["QuantizedBlockSparseWeight", "QuantizedBlockSparseLinear", "QuantizedBalancedSparseWeight",
           "QuantizedBalancedSparseLinear", "quantize", "calibrate", "activation_qmax", "MODES"]

MODES = ("int8",)
_QMAX = 127


def activation_qmax() -> int:
    """The largest integer the int8 op quantizes activations to on this CPU's active code path: 127, or 63 on
    AVX2 without VNNI (neither AVX512_VNNI nor AVX-VNNI)."""
    return int(_ext.require().int8_act_qmax())


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"quantize mode must be one of {MODES}, got {mode!r}")
    return mode


class QuantizedBlockSparseWeight:
    """An int8 block-sparse weight ``[out_features, in_features]``.

    Attributes (CPU tensors):
        qvalues: int8 ``[nnz_blocks, ceil(bi / 4), bo, 4]``: block p's entry (o, k) at ``[p, k // 4, o, k % 4]``
            (groups of 4 input features, what ``vpdpbusd`` multiplies); the padding is zero.
        w_scale: float32 ``[out]``; w_sum: int32 ``[out]``, the sum of each row's integers.
        row_offsets, col_indices: the block pattern (as ``BlockSparseWeight``).
    """

    def __init__(self, qvalues: torch.Tensor, w_scale: torch.Tensor, w_sum: torch.Tensor, row_offsets: torch.Tensor,
                 col_indices: torch.Tensor, shape: Tuple[int, int], block: Tuple[int, int], *,
                 validate: bool = True) -> None:
        self.qvalues = qvalues
        self.w_scale = w_scale
        self.w_sum = w_sum
        self.row_offsets = row_offsets
        self.col_indices = col_indices
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = (int(block[0]), int(block[1]))
        if validate:
            self.validate()

    @classmethod
    def from_float(cls, weight: BlockSparseWeight) -> "QuantizedBlockSparseWeight":
        """Quantizes a float block-sparse weight: per output row, ``scale = max |w| / 127`` over its kept entries
        and ``q = round(w / scale)`` (half to even). Raises ``ValueError`` naming the row for NaN or Inf."""
        if not isinstance(weight, BlockSparseWeight):
            raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__}")
        out, inn = weight.shape
        bo, bi = weight.block
        v = weight.values.detach().to("cpu", torch.float64)
        rows = weight._block_rows().cpu().long()
        cols = weight.col_indices.cpu().long()
        # Entries of ragged edge blocks outside the matrix are not part of the weight: zero them.
        o_idx = rows[:, None] * bo + torch.arange(bo)[None, :]  # [nnz, bo]
        k_idx = cols[:, None] * bi + torch.arange(bi)[None, :]  # [nnz, bi]
        inside = (o_idx < out)[:, :, None] & (k_idx < inn)[:, None, :]
        v = torch.where(inside, v, torch.zeros((), dtype=v.dtype))
        bad = ~torch.isfinite(v)
        if bool(bad.any()):
            p, o, _ = bad.nonzero()[0].tolist()
            row = int(rows[p]) * bo + o
            raise ValueError(f"the weight has a non-finite value in output row {row}: int8 cannot represent NaN or "
                             "Inf (fix or prune the weight first)")
        amax = torch.zeros(out + bo, dtype=torch.float64)
        amax.scatter_reduce_(0, o_idx.reshape(-1), v.abs().amax(dim=2).reshape(-1), "amax")
        amax = amax[:out].to(torch.float32)
        scale = amax / _QMAX
        safe = torch.where(scale > 0, scale, torch.ones((), dtype=scale.dtype)).double()
        row_scale = torch.cat([safe, torch.ones(bo, dtype=torch.float64)])[o_idx]  # [nnz, bo]
        q = torch.clamp(torch.round(v / row_scale[:, :, None]), -_QMAX, _QMAX).to(torch.int8)
        w_sum = torch.zeros(out + bo, dtype=torch.int64)
        w_sum.scatter_add_(0, o_idx.reshape(-1), q.to(torch.int64).sum(dim=2).reshape(-1))
        return cls(cls._pack(q), scale.contiguous(), w_sum[:out].to(torch.int32).contiguous(),
                   weight.row_offsets.cpu().contiguous(), weight.col_indices.cpu().contiguous(), (out, inn),
                   (bo, bi))

    @staticmethod
    def _pack(q: torch.Tensor) -> torch.Tensor:
        """int8 ``[nnz, bo, bi]`` -> ``[nnz, ceil(bi / 4), bo, 4]``."""
        nnz, bo, bi = q.shape
        bi4 = -(-bi // 4)
        q = torch.nn.functional.pad(q, (0, 4 * bi4 - bi))
        return q.reshape(nnz, bo, bi4, 4).permute(0, 2, 1, 3).contiguous()

    def int_values(self) -> torch.Tensor:
        """The integers as ``[nnz, bo, bi]`` blocks (a copy)."""
        nnz, bi4, bo, _ = self.qvalues.shape
        return self.qvalues.permute(0, 2, 1, 3).reshape(nnz, bo, 4 * bi4)[:, :, : self.block[1]].contiguous()

    def validate(self) -> "QuantizedBlockSparseWeight":
        """Checks every invariant the kernels rely on; raises ValueError naming the first violation."""
        out, inn = self.shape
        bo, bi = self.block
        if bo < 1 or bi < 1 or bo > out or bi > inn:
            raise ValueError(f"block {self.block} must be positive and fit the matrix {self.shape}")
        for name, t, dtype in (("qvalues", self.qvalues, torch.int8), ("w_scale", self.w_scale, torch.float32),
                               ("w_sum", self.w_sum, torch.int32), ("row_offsets", self.row_offsets, torch.int32),
                               ("col_indices", self.col_indices, torch.int32)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
            if t.device.type != "cpu":
                raise ValueError(f"{name} must be on the CPU (the int8 kernels are CPU only), got {t.device}")
        nnz = self.col_indices.numel()
        expect = (nnz, -(-bi // 4), bo, 4)
        if tuple(self.qvalues.shape) != expect:
            raise ValueError(f"qvalues must have shape {expect} for {nnz} blocks of {self.block}, got "
                             f"{tuple(self.qvalues.shape)}")
        if bool((self.qvalues == -128).any()):
            raise ValueError("qvalues must lie in [-127, 127] (symmetric int8; -128 would overflow the AVX2 "
                             "kernel's int16 pair sums)")
        for name, t in (("w_scale", self.w_scale), ("w_sum", self.w_sum)):
            if tuple(t.shape) != (out,):
                raise ValueError(f"{name} must have shape ({out},), got {tuple(t.shape)}")
        if not bool(torch.isfinite(self.w_scale).all()) or bool((self.w_scale < 0).any()):
            raise ValueError("w_scale must be finite and >= 0")
        # The pattern: the float format's checks, on a stand-in with no values.
        BlockSparseWeight(torch.zeros(nnz, bo, bi), self.row_offsets, self.col_indices, self.shape, validate=True)
        return self

    def to_dense(self) -> torch.Tensor:
        """The dequantized float32 ``[out, in]`` weight (pruned entries are zeros)."""
        out, inn = self.shape
        bo, bi = self.block
        n_brow = -(-out // bo)
        rows = torch.repeat_interleave(torch.arange(n_brow), (self.row_offsets[1:] - self.row_offsets[:-1]).long())
        values = self.int_values().float()
        scale = torch.cat([self.w_scale, torch.zeros(bo)])[rows[:, None] * bo + torch.arange(bo)[None, :]]
        blocks = torch.zeros(n_brow, -(-inn // bi), bo, bi)
        blocks[rows, self.col_indices.long()] = values * scale[:, :, None]
        return blocks.permute(0, 2, 1, 3).reshape(n_brow * bo, -1)[:out, :inn].contiguous()

    @property
    def density(self) -> float:
        grid = -(-self.shape[0] // self.block[0]) * -(-self.shape[1] // self.block[1])
        return self.col_indices.numel() / grid

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def nbytes(self) -> int:
        """Bytes of the integers (with their group-of-4 padding), scales, sums and pattern."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qvalues, self.w_scale, self.w_sum, self.row_offsets, self.col_indices))

    def __repr__(self) -> str:
        return (f"QuantizedBlockSparseWeight(shape={self.shape}, block={self.block}, "
                f"nnz_blocks={self.col_indices.numel()}, int8)")


class _QuantizedLinear(nn.Module):
    """What the int8 layers share: the buffers bias / clip / pattern_info, the static clip, the input checks and
    the op call, loading a state dict, bytes and sparsity. A subclass sets _WEIGHT (its weight class), _BUFFERS (the
    weight's tensors, as buffers), _RESIZED (those whose size depends on the pattern), _INFO (what pattern_info
    holds), _OP (the op's name) and the hooks _pattern_info, _op_args and _pattern_repr."""

    _WEIGHT: type
    _BUFFERS: Tuple[str, ...]
    _RESIZED: Tuple[str, ...]
    _INFO: str
    _OP: str

    def __init__(self, weight, bias: Optional[torch.Tensor], activation: str, clip: Optional[float]) -> None:
        super().__init__()
        if not isinstance(weight, self._WEIGHT):
            raise TypeError(f"weight must be a {self._WEIGHT.__name__}, got {type(weight).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.out_features, self.in_features = weight.shape
        self.activation = activation
        for name in self._BUFFERS:
            self.register_buffer(name, getattr(weight, name))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias.detach().to("cpu", torch.float32).clone()
        self.register_buffer("bias", bias)
        self.register_buffer("clip", torch.tensor(0.0))
        self.register_buffer("pattern_info", torch.tensor(self._pattern_info(weight), dtype=torch.int64))
        self.set_clip(clip)

    def set_clip(self, clip: Optional[float]) -> None:
        """A static clip value for the activations (``|x|`` beyond it saturates), or None for per-token scales."""
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (0 < float(clip) < float("inf")):
                raise ValueError(f"clip must be a finite float > 0, or None for per-token scales, got {clip!r}")
        self.clip.fill_(0.0 if clip is None else float(clip))
        self._clip = 0.0 if clip is None else float(torch.tensor(float(clip), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_int8_input(self, x)
        bias = self.bias if self.bias is None or x.dtype == torch.float32 else self.bias.to(x.dtype)
        args = (x.reshape(-1, self.in_features), *self._op_args(bias))
        y = None
        if x.device.type != "cpu":
            y = self._gpu_op(x)(*args)
        elif not torch.compiler.is_compiling():  # the direct entry point: no generic op-call overhead
            y = getattr(_ext.require(), self._OP + "_call")(*args)
        if y is None:
            y = getattr(torch.ops.sparsekern, self._OP)(*args)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _gpu_op(self, x: torch.Tensor):
        """The op for an input on another device (that device's kernel), or a ValueError saying there is none."""
        raise ValueError(f"the int8 kernels of {type(self).__name__} run on the CPU only, got an input on {x.device}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        info = state_dict.get(prefix + "pattern_info")
        if info is not None and not torch.equal(info.cpu(), self.pattern_info.cpu()):
            error_msgs.append(f"{prefix}pattern_info: the state dict describes {info.tolist()} {self._INFO}, "
                              f"this module is {self.pattern_info.tolist()}")
            return
        for k in self._RESIZED:  # another pattern of the same shape: take the stored tensors' sizes
            if prefix + k in state_dict:
                getattr(self, k).resize_(state_dict[prefix + k].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        try:
            self.weight_format.validate()
        except ValueError as exc:
            error_msgs.append(f"{prefix}: the stored int8 weight is invalid: {exc}")
        self._clip = float(self.clip)

    @property
    def nbytes(self) -> int:
        b = 0 if self.bias is None else self.bias.numel() * 4
        return self.weight_format.nbytes + b

    @property
    def sparsity(self) -> float:
        return self.weight_format.sparsity

    def extra_repr(self) -> str:
        clip = "per-token" if self._clip == 0 else f"static clip {self._clip:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._pattern_repr()}, int8, activations {clip}, activation={self.activation}")


class QuantizedBlockSparseLinear(_QuantizedLinear):
    """``y = activation(x W^T + b)`` with an int8 block-sparse ``W`` (:class:`QuantizedBlockSparseWeight`); ``x``
    float32 or bfloat16 on the CPU, quantized inside the op (per token, or with the static ``clip``).

    Buffers (all in the state dict): ``qvalues``, ``w_scale``, ``w_sum``, ``row_offsets``, ``col_indices``,
    ``bias`` (float32, or None), ``clip`` (float32 scalar, 0 for per-token scales) and ``pattern_info`` =
    (out, in, bo, bi). Inference only.
    """

    _WEIGHT = QuantizedBlockSparseWeight
    _BUFFERS = ("qvalues", "w_scale", "w_sum", "row_offsets", "col_indices")
    _RESIZED = ("qvalues", "col_indices")
    _INFO = "(out, in, bo, bi)"
    _OP = "bsr_linear_int8"

    def __init__(self, weight: QuantizedBlockSparseWeight, bias: Optional[torch.Tensor] = None, *,
                 activation: str = "none", clip: Optional[float] = None) -> None:
        super().__init__(weight, bias, activation, clip)
        self.block = weight.block

    @staticmethod
    def _pattern_info(weight: QuantizedBlockSparseWeight) -> List[int]:
        return [*weight.shape, *weight.block]

    def _op_args(self, bias: Optional[torch.Tensor]) -> tuple:
        return (self.qvalues, self.w_scale, self.w_sum, self.row_offsets, self.col_indices, self.out_features,
                self.block[1], bias, self.activation, self._clip)

    def _gpu_op(self, x: torch.Tensor):
        return _gpu_int8_op(x, self.qvalues.device)

    def _pattern_repr(self) -> str:
        return f"block={self.block}, sparsity={self.sparsity:.3f}"

    @classmethod
    def from_sparse(cls, module: nn.Module, mode: str = "int8", clip: Optional[float] = None
                    ) -> "QuantizedBlockSparseLinear":
        """The int8 version of a ``BlockSparseLinear`` (its activation and bias kept)."""
        from .nn import BlockSparseLinear

        _check_mode(mode)
        if not isinstance(module, BlockSparseLinear):
            raise TypeError(f"int8 quantization takes a BlockSparseLinear, got {type(module).__name__}")
        w = QuantizedBlockSparseWeight.from_float(module.weight_format)
        return cls(w, None if module.bias is None else module.bias, activation=module.activation, clip=clip)

    @property
    def weight_format(self) -> QuantizedBlockSparseWeight:
        return QuantizedBlockSparseWeight(self.qvalues, self.w_scale, self.w_sum, self.row_offsets, self.col_indices,
                                          (self.out_features, self.in_features), self.block, validate=False)


def _window(bank: int) -> int:
    """Columns per window of the int8 balanced layout: whole banks up to 32 columns (one 16-byte table pair of
    the AVX2 kernel), one bank up to 64 (one AVX-512 register), else 64."""
    return bank * max(1, 32 // bank) if bank <= 64 else 64


class QuantizedBalancedSparseWeight:
    """An int8 balanced-sparse weight ``[out_features, in_features]`` (each bank of ``bank`` columns keeps
    ``keep`` entries), with one symmetric float32 scale per output channel as :class:`QuantizedBlockSparseWeight`.

    Attributes (CPU tensors), the layout of csrc/cpu/balanced_int8_kernels.h: the columns are cut into windows of
    ``window`` (<= 64) columns; each row's kept entries in a window are stored in ``G`` groups of 4, 16 rows at a
    time:
        qvalues: int8 ``[ceil(out / 16), n_win, G, 16, 4]``; row o's j-th entry of group g in window w at
            ``[o // 16, w, g, o % 16, j]`` (padding: 0);
        indices: uint8, the same shape: the entry's column inside its window (padding: 0);
        w_scale: float32 ``[out]``; w_sum: int32 ``[out]``, the sum of each row's integers.
    """

    def __init__(self, qvalues: torch.Tensor, indices: torch.Tensor, w_scale: torch.Tensor, w_sum: torch.Tensor,
                 shape: Tuple[int, int], window: int, bank: int, keep: int, *, validate: bool = True) -> None:
        self.qvalues = qvalues
        self.indices = indices
        self.w_scale = w_scale
        self.w_sum = w_sum
        self.shape = (int(shape[0]), int(shape[1]))
        self.window = int(window)
        self.bank = int(bank)
        self.keep = int(keep)
        if validate:
            self.validate()

    @classmethod
    def from_float(cls, weight: BalancedSparseWeight) -> "QuantizedBalancedSparseWeight":
        """Quantizes a float balanced-sparse weight as :meth:`QuantizedBlockSparseWeight.from_float` does (per
        row, ``scale = max |w| / 127``, ``q = round(w / scale)``). Raises ``ValueError`` naming the row for NaN or
        Inf."""
        if not isinstance(weight, BalancedSparseWeight):
            raise TypeError(f"weight must be a BalancedSparseWeight, got {type(weight).__name__}")
        out, inn = weight.shape
        bank, keep = weight.bank, weight.keep
        v = weight.values.detach().to("cpu", torch.float64).reshape(out, -1)  # [out, n_banks * keep]
        bad = ~torch.isfinite(v)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"the weight has a non-finite value in output row {row}: int8 cannot represent NaN or "
                             "Inf (fix or prune the weight first)")
        scale = v.abs().amax(dim=1).to(torch.float32) / _QMAX
        safe = torch.where(scale > 0, scale, torch.ones((), dtype=scale.dtype)).double()
        q = torch.clamp(torch.round(v / safe[:, None]), -_QMAX, _QMAX).to(torch.int8)
        cols = (torch.arange(weight.n_banks)[None, :, None] * bank + weight.indices.cpu().long()).reshape(out, -1)
        window = _window(bank)
        n_win = -(-inn // window)
        win = cols // window  # non-decreasing along each row: the entries are sorted by column
        counts = torch.zeros(out, n_win, dtype=torch.int64).scatter_add_(1, win, torch.ones_like(win))
        G = max(1, -(-int(counts.max()) // 4))
        first = torch.cumsum(counts, dim=1) - counts  # [out, n_win]: position of each window's first entry
        rank = torch.arange(cols.shape[1])[None, :] - torch.gather(first, 1, win)
        R = -(-out // 16)
        qv = torch.zeros(R * 16, n_win, G * 4, dtype=torch.int8)
        ix = torch.zeros(R * 16, n_win, G * 4, dtype=torch.uint8)
        rows = torch.arange(out)[:, None].expand_as(cols)
        qv[rows, win, rank] = q
        ix[rows, win, rank] = (cols % window).to(torch.uint8)
        pack = lambda t: t.reshape(R, 16, n_win, G, 4).permute(0, 2, 3, 1, 4).contiguous()  # noqa: E731
        w_sum = q.to(torch.int64).sum(dim=1).to(torch.int32)
        return cls(pack(qv), pack(ix), scale.contiguous(), w_sum.contiguous(), (out, inn), window, bank, keep)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """``[R, n_win, G, 16, 4]`` -> ``[out, n_win, 4 G]``."""
        R, n_win, G = t.shape[:3]
        return t.permute(0, 3, 1, 2, 4).reshape(R * 16, n_win, 4 * G)[: self.shape[0]]

    def int_dense(self) -> torch.Tensor:
        """The integers as a dense int64 ``[out, in]`` matrix (pruned entries are zeros)."""
        out, inn = self.shape
        q, ix = self._rows(self.qvalues).long(), self._rows(self.indices).long()
        n_win = q.shape[1]
        cols = (torch.arange(n_win)[None, :, None] * self.window + ix).reshape(out, -1)
        dense = torch.zeros(out, n_win * self.window, dtype=torch.int64)
        dense.scatter_add_(1, cols, q.reshape(out, -1))  # padding entries add 0
        return dense[:, :inn]

    def to_dense(self) -> torch.Tensor:
        """The dequantized float32 ``[out, in]`` weight (pruned entries are zeros)."""
        return (self.int_dense().double() * self.w_scale.double()[:, None]).float()

    def validate(self) -> "QuantizedBalancedSparseWeight":
        """Checks every invariant the kernels rely on; raises ValueError naming the first violation."""
        out, inn = self.shape
        if out < 1 or inn < 1:
            raise ValueError(f"shape must be positive, got {self.shape}")
        if not 1 <= self.window <= 64:
            raise ValueError(f"window must be in [1, 64], got {self.window}")
        for name, t, dtype in (("qvalues", self.qvalues, torch.int8), ("indices", self.indices, torch.uint8),
                               ("w_scale", self.w_scale, torch.float32), ("w_sum", self.w_sum, torch.int32)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
            if t.device.type != "cpu":
                raise ValueError(f"{name} must be on the CPU (the int8 kernels are CPU only), got {t.device}")
        R, n_win = -(-out // 16), -(-inn // self.window)
        if self.qvalues.dim() != 5 or tuple(self.qvalues.shape[:2]) != (R, n_win) or \
                tuple(self.qvalues.shape[3:]) != (16, 4):
            raise ValueError(f"qvalues must have shape ({R}, {n_win}, G, 16, 4) for {self.shape} in windows of "
                             f"{self.window}, got {tuple(self.qvalues.shape)}")
        if self.indices.shape != self.qvalues.shape:
            raise ValueError(f"indices must have the shape of qvalues {tuple(self.qvalues.shape)}, got "
                             f"{tuple(self.indices.shape)}")
        if bool((self.qvalues == -128).any()):
            raise ValueError("qvalues must lie in [-127, 127] (symmetric int8; -128 would overflow the AVX2 "
                             "kernel's int16 pair sums)")
        if bool((self.indices >= self.window).any()):
            i = int((self.indices.reshape(-1) >= self.window).nonzero()[0])
            raise ValueError(f"indices.flatten()[{i}] = {int(self.indices.reshape(-1)[i])} is out of range "
                             f"[0, window={self.window})")
        for name, t in (("w_scale", self.w_scale), ("w_sum", self.w_sum)):
            if tuple(t.shape) != (out,):
                raise ValueError(f"{name} must have shape ({out},), got {tuple(t.shape)}")
        if not bool(torch.isfinite(self.w_scale).all()) or bool((self.w_scale < 0).any()):
            raise ValueError("w_scale must be finite and >= 0")
        sums = self._rows(self.qvalues).to(torch.int64).sum(dim=(1, 2))
        if not torch.equal(sums, self.w_sum.to(torch.int64)):
            o = int((sums != self.w_sum).nonzero()[0])
            raise ValueError(f"w_sum[{o}] = {int(self.w_sum[o])} is not the sum of row {o}'s integers "
                             f"({int(sums[o])})")
        return self

    @property
    def sparsity(self) -> float:
        return 1.0 - self.keep / self.bank if self.bank <= self.shape[1] else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the integers and indices (with their group-of-4 padding), scales and sums."""
        return sum(t.numel() * t.element_size() for t in (self.qvalues, self.indices, self.w_scale, self.w_sum))

    def __repr__(self) -> str:
        return (f"QuantizedBalancedSparseWeight(shape={self.shape}, bank={self.bank}, keep={self.keep}, "
                f"window={self.window}, groups={self.qvalues.shape[2]}, int8)")


class QuantizedBalancedSparseLinear(_QuantizedLinear):
    """``y = activation(x W^T + b)`` with an int8 balanced-sparse ``W`` (:class:`QuantizedBalancedSparseWeight`),
    as :class:`QuantizedBlockSparseLinear` (``x`` float32 or bfloat16 on the CPU, quantized inside the op).

    Buffers (all in the state dict): ``qvalues``, ``indices``, ``w_scale``, ``w_sum``, ``bias`` (float32, or None),
    ``clip`` (float32 scalar, 0 for per-token scales) and ``pattern_info`` = (out, in, bank, keep, window).
    Inference only.
    """

    _WEIGHT = QuantizedBalancedSparseWeight
    _BUFFERS = ("qvalues", "indices", "w_scale", "w_sum")
    _RESIZED = ("qvalues", "indices")  # the group count G may differ for another pattern of the same shape
    _INFO = "(out, in, bank, keep, window)"
    _OP = "balanced_linear_int8"

    def __init__(self, weight: QuantizedBalancedSparseWeight, bias: Optional[torch.Tensor] = None, *,
                 activation: str = "none", clip: Optional[float] = None) -> None:
        super().__init__(weight, bias, activation, clip)
        self.bank, self.keep, self.window = weight.bank, weight.keep, weight.window

    @staticmethod
    def _pattern_info(weight: QuantizedBalancedSparseWeight) -> List[int]:
        return [*weight.shape, weight.bank, weight.keep, weight.window]

    def _op_args(self, bias: Optional[torch.Tensor]) -> tuple:
        return (self.qvalues, self.indices, self.w_scale, self.w_sum, self.out_features, self.window, bias,
                self.activation, self._clip)

    def _pattern_repr(self) -> str:
        return f"bank={self.bank}, keep={self.keep}"

    @classmethod
    def from_sparse(cls, module: nn.Module, mode: str = "int8", clip: Optional[float] = None
                    ) -> "QuantizedBalancedSparseLinear":
        """The int8 version of a ``BalancedSparseLinear`` (its activation and bias kept)."""
        from .nn import BalancedSparseLinear

        _check_mode(mode)
        if not isinstance(module, BalancedSparseLinear):
            raise TypeError(f"int8 balanced quantization takes a BalancedSparseLinear, got {type(module).__name__}")
        w = QuantizedBalancedSparseWeight.from_float(module.weight_format)
        return cls(w, None if module.bias is None else module.bias, activation=module.activation, clip=clip)

    @property
    def weight_format(self) -> QuantizedBalancedSparseWeight:
        return QuantizedBalancedSparseWeight(self.qvalues, self.indices, self.w_scale, self.w_sum,
                                             (self.out_features, self.in_features), self.window, self.bank, self.keep,
                                             validate=False)


def _check_int8_input(module: nn.Module, x: torch.Tensor) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{type(module).__name__} is inference only: run it under torch.no_grad() / "
                           "torch.inference_mode(), or train the float model and quantize after")
    if x.shape[-1] != module.in_features:
        raise ValueError(f"x must end in {module.in_features} features, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the int8 layers take float32 or bfloat16 inputs, got {x.dtype}")


def _gpu_int8_op(x: torch.Tensor, weight_device: torch.device):
    """The op that runs an int8 layer on ``x``'s GPU: the Triton kernel (kernels/bsr_int8.py; signed activations,
    qmax 127), or a ValueError saying why none can (not CUDA, no Triton, the layer elsewhere)."""
    if x.device.type != "cuda":
        raise ValueError(f"the int8 kernels run on the CPU, or on CUDA through Triton; got an input on {x.device}")
    try:
        from . import triton_backend  # noqa: F401  (registers torch.ops.sparsekern.triton_bsr_linear_int8)
    except ImportError as exc:
        raise ValueError(f"the int8 kernels run on the CPU only without Triton ({exc}); got an input on {x.device}: "
                         "pip install triton, or run the layer on the CPU") from exc
    if weight_device != x.device:
        raise ValueError(f"the int8 layer is on {weight_device} but its input on {x.device}: move the layer with "
                         f".to({str(x.device)!r})")
    return torch.ops.sparsekern.triton_bsr_linear_int8


def _quantizable(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    from .nn import BalancedSparseLinear, BlockSparseLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BlockSparseLinear, BalancedSparseLinear))]


def convert_layer(name: str, module: nn.Module, mode: str) -> nn.Module:
    """The int8 version of the ``BlockSparseLinear`` (``BalancedSparseLinear``) called ``name`` (in its training
    mode): a ``QuantizedBlockSparseLinear`` (``QuantizedBalancedSparseLinear``), or a ``ValueError`` naming it: a
    dtype other than float32 / bfloat16, a device other than the CPU, or a weight int8 cannot hold."""
    from .nn import BalancedSparseLinear

    v = module.values
    if v.dtype not in (torch.float32, torch.bfloat16) or v.device.type != "cpu":
        raise ValueError(f"layer {name!r} is {v.dtype} on {v.device}: the int8 layers run float32 or bfloat16 "
                         "models on the CPU")
    try:
        cls = QuantizedBalancedSparseLinear if isinstance(module, BalancedSparseLinear) else QuantizedBlockSparseLinear
        q = cls.from_sparse(module, mode)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from exc
    q.train(module.training)
    return q


def quantize(model: nn.Module, mode: str = "int8") -> Dict[str, Dict[str, int]]:
    """Replaces every ``BlockSparseLinear`` and ``BalancedSparseLinear`` of ``model`` (in place; the model itself
    when it is one is returned by ``QuantizedBlockSparseLinear.from_sparse`` / ``QuantizedBalancedSparseLinear``'s)
    by its int8 version, with per-token activation scales
    (:func:`calibrate` sets static ones). Moves nothing: the int8 layers live on the CPU.

    Returns ``{layer: {"float_bytes", "int8_bytes"}}``. Raises ``ValueError`` if there is no sparse layer, or for
    a layer in another dtype or on another device than the CPU, naming it.
    """
    _check_mode(mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = _quantizable(model)
    if not layers:
        raise ValueError("the model has no BlockSparseLinear layer and no BalancedSparseLinear layer to quantize "
                         "(sparsify first)")
    if any(name == "" for name, _ in layers):
        raise ValueError("the model is itself a sparse layer: use QuantizedBlockSparseLinear.from_sparse or "
                         "QuantizedBalancedSparseLinear.from_sparse")
    from .walk import replace_modules

    report: Dict[str, Dict[str, int]] = {}
    replacements: Dict[int, nn.Module] = {}
    for name, m in layers:
        q = replacements.setdefault(id(m), convert_layer(name, m, mode))
        report[name] = {"float_bytes": int(m.nbytes), "int8_bytes": int(q.nbytes)}
    replace_modules(model, replacements)
    return report


def calibrate(model: nn.Module, inputs: Iterable, percentile: float = 99.99) -> Dict[str, float]:
    """Static activation clip values for every int8 layer of ``model``: runs ``model(**batch)`` (dict batches) or
    ``model(batch)`` for each of ``inputs``, records each layer's ``|x|``, and sets its clip to the ``percentile``
    of them (outliers beyond it saturate). Returns ``{layer: clip}``."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not (0 < percentile <= 100):
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (QuantizedBlockSparseLinear, QuantizedBalancedSparseLinear))]
    if not layers:
        raise ValueError("the model has no int8 layer to calibrate: quantize it first")
    seen: Dict[str, List[torch.Tensor]] = {n: [] for n, _ in layers}
    gen = torch.Generator().manual_seed(0)

    def hook(name):
        def fn(_module, args):
            a = args[0].detach().abs().float().reshape(-1)
            if a.numel() > 1 << 18:  # a sample keeps the quantile cheap
                a = a[torch.randint(a.numel(), (1 << 18,), generator=gen)]
            seen[name].append(a)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        with torch.no_grad():
            for batch in inputs:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in handles:
            h.remove()
    clips: Dict[str, float] = {}
    for name, m in layers:
        if not seen[name]:
            raise ValueError(f"layer {name!r} saw no input during calibration: give inputs that reach it")
        a = torch.cat(seen[name])
        c = float(torch.quantile(a, percentile / 100.0)) if percentile < 100 else float(a.max())
        if not (0 < c < float("inf")):
            raise ValueError(f"layer {name!r}: the {percentile} percentile of |x| is {c}, not a usable clip value")
        m.set_clip(c)
        clips[name] = c
    return clips
