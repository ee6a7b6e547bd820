"""Sparse weight formats: block-sparse (BSR) and balanced sparsity.

Both describe a logical weight ``W`` of shape ``[out_features, in_features]`` as used by ``Y = X W^T + b``.
Everything a kernel needs besides the values (transposed metadata, the values' physical layout) is computed
once, here, when the weight is built; the kernels never rebuild it per call.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["BlockSparseWeight", "BalancedSparseWeight"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_MAX_BLOCKS = 2**31 - 1  # row_offsets and col_indices are int32


def _check_weight_matrix(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
    if W.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"W must be float32, float64, bfloat16 or float16, got {W.dtype}")
    if W.shape[0] < 1 or W.shape[1] < 1:
        raise ValueError(f"W must have at least one row and one column, got shape {tuple(W.shape)}")


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1), got {type(sparsity).__name__}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _contiguous(t):
    """Index tensors as the kernels read them (a strided view is copied); anything else is left for validate."""
    return t.contiguous() if isinstance(t, torch.Tensor) else t


def _kernel_layout(values: torch.Tensor) -> torch.Tensor:
    """``values`` [nnz, bo, bi] re-laid out as each block stored input-major (strides (bo*bi, 1, bo)).

    The CPU kernels read a block column by column (all outputs of one input feature are contiguous); the
    logical shape stays [nnz, bo, bi], so element-wise code (optimizers, casts) sees an ordinary tensor."""
    if values.transpose(1, 2).is_contiguous():
        return values
    return values.transpose(1, 2).contiguous().transpose(1, 2)


class BlockSparseWeight:
    """A weight ``[out_features, in_features]`` stored as its kept ``(bo, bi)`` blocks.

    Attributes (all on one device):
        values: ``[nnz_blocks, bo, bi]`` kept blocks (physical layout ``[nnz, bi, bo]``, see ``_kernel_layout``).
        row_offsets: int32 ``[n_block_rows + 1]``; blocks of block row r are ``row_offsets[r]:row_offsets[r+1]``.
        col_indices: int32 ``[nnz_blocks]``, block-column of each block, increasing within a block row.
        col_offsets, row_indices, block_perm: the same pattern walked by block columns (for ``dX = dY W``):
            the k-th block in column order is ``values[block_perm[k]]``, in block row ``row_indices[k]``.
    Shapes the block does not divide are supported: edge blocks are ragged and their outside part is ignored.
    """

    def __init__(
        self,
        values: torch.Tensor,
        row_offsets: torch.Tensor,
        col_indices: torch.Tensor,
        shape: Sequence[int],
        *,
        col_offsets: Optional[torch.Tensor] = None,
        row_indices: Optional[torch.Tensor] = None,
        block_perm: Optional[torch.Tensor] = None,
        validate: bool = True,
    ) -> None:
        if not isinstance(values, torch.Tensor) or values.dim() != 3:
            raise ValueError(
                "values must be a 3-D tensor [nnz_blocks, block_rows, block_cols], got "
                f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
            )
        if len(shape) != 2:
            raise ValueError(f"shape must be (out_features, in_features), got {tuple(shape)}")
        self.shape: Tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.block: Tuple[int, int] = (int(values.shape[1]), int(values.shape[2]))
        # Checked before anything divides by the block or re-lays out the values.
        if min(self.block) < 1:
            raise ValueError(f"values must hold blocks of positive shape, got block {self.block}")
        if values.shape[0] > _MAX_BLOCKS:
            raise ValueError(f"at most {_MAX_BLOCKS} blocks are supported (int32 offsets), got {values.shape[0]}")
        if max(self.n_block_rows, self.n_block_cols) > _MAX_BLOCKS:
            # The transposed metadata would wrap when stored as int32, after allocating one entry per block column.
            raise ValueError(f"the block grid {self.n_block_rows}x{self.n_block_cols} of shape {self.shape} and block "
                             f"{self.block} exceeds {_MAX_BLOCKS} block rows or columns (int32 indices)")
        self.values = _kernel_layout(values)
        self.row_offsets = _contiguous(row_offsets)
        self.col_indices = _contiguous(col_indices)
        if col_offsets is None or row_indices is None or block_perm is None:
            if validate:
                self._validate_csr()
            col_offsets, row_indices, block_perm = self._transpose_metadata()
        self.col_offsets = _contiguous(col_offsets)
        self.row_indices = _contiguous(row_indices)
        self.block_perm = _contiguous(block_perm)
        if validate:
            self.validate()

    # ---- construction -------------------------------------------------------------------------------------
    @staticmethod
    def _parse_block(block: Union[int, Sequence[int]], shape: Tuple[int, int]) -> Tuple[int, int]:
        if isinstance(block, int) and not isinstance(block, bool):
            bo = bi = block
        elif isinstance(block, (tuple, list)) and len(block) == 2 and all(isinstance(b, int) for b in block):
            bo, bi = int(block[0]), int(block[1])
        else:
            raise TypeError(f"block must be an int or a pair of ints (block_rows, block_cols), got {block!r}")
        if bo < 1 or bi < 1:
            raise ValueError(f"block must be positive, got ({bo}, {bi})")
        if bo > shape[0] or bi > shape[1]:
            raise ValueError(f"block ({bo}, {bi}) is larger than the matrix {shape[0]}x{shape[1]}")
        return bo, bi

    @staticmethod
    def _blocked(W: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
        """W [out, in] zero-padded and cut into blocks: [n_brow, n_bcol, bo, bi]."""
        out, inn = W.shape
        n_brow, n_bcol = -(-out // bo), -(-inn // bi)
        padded = torch.nn.functional.pad(W, (0, n_bcol * bi - inn, 0, n_brow * bo - out))
        return padded.reshape(n_brow, bo, n_bcol, bi).permute(0, 2, 1, 3)

    @classmethod
    def from_dense(
        cls,
        W: torch.Tensor,
        block: Union[int, Sequence[int]] = 32,
        *,
        sparsity: Optional[float] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> "BlockSparseWeight":
        """Builds the weight from a dense ``W`` [out, in].

        Give exactly one of ``sparsity`` (fraction of blocks dropped, in [0, 1); the blocks of largest L2 norm
        are kept, ties broken by position) or ``mask`` (bool, either per element ``[out, in]``, where a block is
        kept if any of its elements is and unmasked elements inside kept blocks are stored as zero, or per block
        ``[n_block_rows, n_block_cols]``)."""
        _check_weight_matrix(W)
        shape = (int(W.shape[0]), int(W.shape[1]))
        bo, bi = cls._parse_block(block, shape)
        n_brow, n_bcol = -(-shape[0] // bo), -(-shape[1] // bi)
        if (sparsity is None) == (mask is None):
            raise ValueError("give exactly one of sparsity= or mask=")
        W = W.detach()
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) == shape:
                W = W * mask.to(W.device)
                keep = cls._blocked(mask.to(W.device), bo, bi).any(dim=(2, 3))
            elif tuple(mask.shape) == (n_brow, n_bcol):
                keep = mask.to(W.device)
            else:
                raise ValueError(
                    f"mask must have the weight's shape {shape} or the block grid's shape {(n_brow, n_bcol)}, "
                    f"got {tuple(mask.shape)}"
                )
        else:
            sparsity = _check_sparsity(sparsity)
            n_blocks = n_brow * n_bcol
            n_keep = n_blocks - int(math.floor(sparsity * n_blocks + 1e-9))
            norms = cls._blocked(W.float(), bo, bi).pow(2).sum(dim=(2, 3)).flatten()
            order = torch.sort(norms, descending=True, stable=True).indices[:n_keep]
            keep = torch.zeros(n_blocks, dtype=torch.bool, device=W.device)
            keep[order] = True
            keep = keep.reshape(n_brow, n_bcol)
        rows, cols = keep.nonzero(as_tuple=True)  # row-major order: sorted by (row, col)
        values = cls._blocked(W, bo, bi)[rows, cols]
        counts = torch.bincount(rows, minlength=n_brow)
        row_offsets = torch.zeros(n_brow + 1, dtype=torch.int32, device=W.device)
        row_offsets[1:] = torch.cumsum(counts, 0)
        return cls(values, row_offsets, cols.to(torch.int32), shape)

    @classmethod
    def from_sparse_bsr(cls, t: torch.Tensor) -> "BlockSparseWeight":
        """From a ``torch.sparse_bsr`` tensor (2-D)."""
        if not isinstance(t, torch.Tensor) or t.layout != torch.sparse_bsr:
            raise TypeError(f"expected a torch.sparse_bsr tensor, got {getattr(t, 'layout', type(t).__name__)}")
        return cls(
            t.values(), t.crow_indices().to(torch.int32), t.col_indices().to(torch.int32), tuple(t.shape)
        )

    # ---- metadata -------------------------------------------------------------------------------------------
    @property
    def n_block_rows(self) -> int:
        return -(-self.shape[0] // self.block[0])

    @property
    def n_block_cols(self) -> int:
        return -(-self.shape[1] // self.block[1])

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    def _block_rows(self) -> torch.Tensor:
        counts = (self.row_offsets[1:] - self.row_offsets[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.n_block_rows, device=counts.device), counts)

    def _transpose_metadata(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self._block_rows()
        cols = self.col_indices.long()
        perm = torch.argsort(cols * self.n_block_rows + rows, stable=True)
        col_offsets = torch.zeros(self.n_block_cols + 1, dtype=torch.int32, device=cols.device)
        col_offsets[1:] = torch.cumsum(torch.bincount(cols, minlength=self.n_block_cols), 0)
        return col_offsets, rows[perm].to(torch.int32), perm.to(torch.int32)

    # ---- validation -----------------------------------------------------------------------------------------
    def _validate_csr(self) -> None:
        out, inn = self.shape
        bo, bi = self.block
        if out < 1 or inn < 1:
            raise ValueError(f"shape must be positive, got {self.shape}")
        if bo > out or bi > inn:
            raise ValueError(f"block ({bo}, {bi}) is larger than the matrix {out}x{inn}")
        if self.values.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"values must be float32, float64, bfloat16 or float16, got {self.values.dtype}")
        for name in ("row_offsets", "col_indices"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
                raise TypeError(f"{name} must be a 1-D int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if t.device != self.values.device:
                raise ValueError(f"{name} is on {t.device} but values are on {self.values.device}")
        nnz, n_brow, n_bcol = self.nnz_blocks, self.n_block_rows, self.n_block_cols
        if nnz > n_brow * n_bcol:
            raise ValueError(f"{nnz} blocks stored but the grid has only {n_brow}x{n_bcol}")
        ro, ci = self.row_offsets.long(), self.col_indices.long()
        if ro.numel() != n_brow + 1:
            raise ValueError(f"row_offsets must have {n_brow + 1} entries (block rows + 1), got {ro.numel()}")
        if ro[0].item() != 0 or ro[-1].item() != nnz:
            raise ValueError(
                f"row_offsets must start at 0 and end at nnz_blocks={nnz}, got {ro[0].item()} ... {ro[-1].item()}"
            )
        if (ro[1:] < ro[:-1]).any():
            bad = int((ro[1:] < ro[:-1]).nonzero()[0, 0])
            raise ValueError(
                f"row_offsets must be non-decreasing: row_offsets[{bad + 1}]={ro[bad + 1].item()} < "
                f"row_offsets[{bad}]={ro[bad].item()}"
            )
        if ci.numel() != nnz:
            raise ValueError(f"col_indices must have nnz_blocks={nnz} entries, got {ci.numel()}")
        if nnz and (ci.min().item() < 0 or ci.max().item() >= n_bcol):
            bad = int(((ci < 0) | (ci >= n_bcol)).nonzero()[0, 0])
            raise ValueError(f"col_indices[{bad}]={ci[bad].item()} is out of range [0, {n_bcol})")
        if nnz > 1:
            same_row = self._block_rows()[1:] == self._block_rows()[:-1]
            bad = same_row & (ci[1:] <= ci[:-1])
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"col_indices must be strictly increasing within a block row (sorted, no duplicates): "
                    f"col_indices[{i}]={ci[i].item()}, col_indices[{i + 1}]={ci[i + 1].item()}"
                )

    def validate(self) -> "BlockSparseWeight":
        """Checks every invariant; raises ValueError/TypeError naming the first violation. Returns self."""
        self._validate_csr()
        for name in ("col_offsets", "row_indices", "block_perm"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
                raise TypeError(f"{name} must be a 1-D int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if t.device != self.values.device:
                raise ValueError(f"{name} is on {t.device} but values are on {self.values.device}")
        expect = self._transpose_metadata()
        for name, e in zip(("col_offsets", "row_indices", "block_perm"), expect):
            got = getattr(self, name)
            if got.shape != e.shape or not torch.equal(got, e):
                raise ValueError(
                    f"{name} does not match the block-row metadata (rebuild it, or pass None to compute it)"
                )
        return self

    # ---- conversions ----------------------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The dense ``[out, in]`` matrix (differentiable with respect to ``values``)."""
        bo, bi = self.block
        n_brow, n_bcol = self.n_block_rows, self.n_block_cols
        grid = self.values.new_zeros(n_brow * n_bcol, bo, bi)
        index = self._block_rows() * n_bcol + self.col_indices.long()
        grid = grid.index_copy(0, index, self.values)
        dense = grid.reshape(n_brow, n_bcol, bo, bi).permute(0, 2, 1, 3).reshape(n_brow * bo, n_bcol * bi)
        return dense[: self.shape[0], : self.shape[1]]

    def to_sparse_bsr(self) -> torch.Tensor:
        """A ``torch.sparse_bsr`` tensor (requires the block to divide the shape)."""
        if self.shape[0] % self.block[0] or self.shape[1] % self.block[1]:
            raise ValueError(f"torch.sparse_bsr needs the block {self.block} to divide the shape {self.shape}")
        return torch.sparse_bsr_tensor(
            self.row_offsets, self.col_indices, self.values.contiguous(), self.shape, dtype=self.values.dtype,
            check_invariants=True,
        )

    def to(
        self, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None
    ) -> "BlockSparseWeight":
        """A copy on ``device`` with values in ``dtype`` (metadata stays int32)."""
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float64, bfloat16 or float16, got {dtype}")
        meta = {
            n: getattr(self, n).to(device)
            for n in ("row_offsets", "col_indices", "col_offsets", "row_indices", "block_perm")
        }
        values = self.values.to(device=device, dtype=dtype)
        return BlockSparseWeight(
            values, meta["row_offsets"], meta["col_indices"], self.shape,
            col_offsets=meta["col_offsets"], row_indices=meta["row_indices"], block_perm=meta["block_perm"],
            validate=False,
        )

    # ---- summary --------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def density(self) -> float:
        """Fraction of the block grid that is stored."""
        return self.nnz_blocks / (self.n_block_rows * self.n_block_cols)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def nbytes(self) -> int:
        """Bytes held: values and every index tensor (the transposed metadata included)."""
        tensors = (self.values, self.row_offsets, self.col_indices, self.col_offsets, self.row_indices, self.block_perm)
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        return (
            f"BlockSparseWeight(shape={self.shape}, block={self.block}, nnz_blocks={self.nnz_blocks}, "
            f"sparsity={self.sparsity:.3f}, dtype={self.dtype}, device={self.device})"
        )


def _index_dtype(bank: int) -> torch.dtype:
    if bank <= 256:
        return torch.uint8
    if bank <= 32768:
        return torch.int16
    raise ValueError(f"bank must be <= 32768, got {bank}")


class BalancedSparseWeight:
    """Balanced sparsity (Yao et al., 2019): each row of ``W`` [out, in] is cut into banks of ``bank`` consecutive
    columns and every bank keeps exactly ``keep`` values (N:M sparsity such as 2:4 is ``bank=4, keep=2``).

    Attributes:
        values: ``[out, n_banks, keep]``.
        indices: same shape, column of each value inside its bank, strictly increasing; uint8 when
            ``bank <= 256``, else int16.
    The last bank is ragged when ``bank`` does not divide ``in_features``; it must still hold ``keep`` columns.
    """

    def __init__(
        self, values: torch.Tensor, indices: torch.Tensor, bank: int, in_features: int, *, validate: bool = True
    ) -> None:
        if not isinstance(values, torch.Tensor) or values.dim() != 3:
            raise ValueError(
                "values must be a 3-D tensor [out_features, n_banks, keep], got "
                f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
            )
        self.values = values.contiguous()
        self.indices = indices.contiguous() if isinstance(indices, torch.Tensor) else indices
        self.bank = int(bank)
        self.keep = int(values.shape[2])
        self.shape: Tuple[int, int] = (int(values.shape[0]), int(in_features))
        if validate:
            self.validate()

    @staticmethod
    def _check_bank_keep(bank: int, keep: int, in_features: int) -> None:
        for name, v in (("bank", bank), ("keep", keep)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if bank < 1 or bank > in_features:
            raise ValueError(f"bank must be in [1, in_features={in_features}], got {bank}")
        _index_dtype(bank)
        last = in_features - (-(-in_features // bank) - 1) * bank
        if keep < 1 or keep > last:
            raise ValueError(
                f"keep must be in [1, {last}] (bank={bank}; the last bank of {in_features} columns is {last} "
                f"wide), got {keep}"
            )

    @classmethod
    def from_dense(
        cls, W: torch.Tensor, bank: int = 32, keep: int = 16, *, mask: Optional[torch.Tensor] = None
    ) -> "BalancedSparseWeight":
        """Keeps the ``keep`` largest-|w| entries of every bank (ties broken by position), or exactly the entries
        of a balanced bool ``mask`` [out, in] (every bank must hold ``keep`` True entries)."""
        _check_weight_matrix(W)
        out, inn = W.shape
        cls._check_bank_keep(bank, keep, inn)
        n_banks = -(-inn // bank)
        W = W.detach()
        padded = torch.nn.functional.pad(W, (0, n_banks * bank - inn)).reshape(out, n_banks, bank)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) != (out, inn):
                raise ValueError(f"mask must have the weight's shape {(out, inn)}, got {tuple(mask.shape)}")
            m = torch.nn.functional.pad(mask.to(W.device), (0, n_banks * bank - inn)).reshape(out, n_banks, bank)
            counts = m.sum(-1)
            if (counts != keep).any():
                o, b = (counts != keep).nonzero()[0].tolist()
                raise ValueError(
                    f"mask is not balanced: row {o}, bank {b} keeps {counts[o, b].item()} entries, expected keep={keep}"
                )
            score = m.to(torch.float32)
        else:
            score = padded.abs().float()
            if n_banks * bank > inn:  # columns past the matrix are never chosen
                score[:, -1, bank - (n_banks * bank - inn):] = -1.0
        idx = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :keep]
        idx = torch.sort(idx, dim=-1).values
        values = torch.gather(padded, -1, idx)
        return cls(values, idx.to(_index_dtype(bank)), bank, inn)

    @property
    def n_banks(self) -> int:
        return int(self.values.shape[1])

    def validate(self) -> "BalancedSparseWeight":
        """Checks every invariant; raises ValueError/TypeError naming the first violation. Returns self."""
        out, inn = self.shape
        if self.values.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"values must be float32, float64, bfloat16 or float16, got {self.values.dtype}")
        if out < 1:
            raise ValueError(f"values must hold at least one row, got shape {tuple(self.values.shape)}")
        self._check_bank_keep(self.bank, self.keep, inn)
        if not isinstance(self.indices, torch.Tensor):
            raise TypeError(f"indices must be a tensor, got {type(self.indices).__name__}")
        if self.indices.dtype != _index_dtype(self.bank):
            raise TypeError(f"indices must be {_index_dtype(self.bank)} for bank={self.bank}, got {self.indices.dtype}")
        if self.indices.shape != self.values.shape:
            raise ValueError(
                f"indices must have the shape of values {tuple(self.values.shape)}, got {tuple(self.indices.shape)}"
            )
        if self.indices.device != self.values.device:
            raise ValueError(f"indices are on {self.indices.device} but values are on {self.values.device}")
        n_banks = -(-inn // self.bank)
        if self.n_banks != n_banks:
            raise ValueError(
                f"values has {self.n_banks} banks, but {inn} columns in banks of {self.bank} need {n_banks}"
            )
        idx = self.indices.long()
        width = torch.full((n_banks,), self.bank, device=idx.device)
        width[-1] = inn - (n_banks - 1) * self.bank
        bad = (idx < 0) | (idx >= width[None, :, None])
        if bad.any():
            o, b, k = bad.nonzero()[0].tolist()
            raise ValueError(
                f"indices[{o}, {b}, {k}]={idx[o, b, k].item()} is out of range [0, {width[b].item()}) for bank {b}"
            )
        if self.keep > 1:
            unsorted = idx[..., 1:] <= idx[..., :-1]
            if unsorted.any():
                o, b, k = unsorted.nonzero()[0].tolist()
                raise ValueError(
                    f"indices must be strictly increasing within a bank (sorted, no duplicates): "
                    f"indices[{o}, {b}, {k}:{k + 2}] = {idx[o, b, k:k + 2].tolist()}"
                )
        return self

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out, in]`` matrix (differentiable with respect to ``values``)."""
        out, inn = self.shape
        dense = self.values.new_zeros(out, self.n_banks, self.bank)
        dense = dense.scatter(-1, self.indices.long(), self.values)
        return dense.reshape(out, self.n_banks * self.bank)[:, :inn]

    def mask(self) -> torch.Tensor:
        """Bool ``[out, in]``: which entries are kept."""
        out, inn = self.shape
        m = torch.zeros(out, self.n_banks, self.bank, dtype=torch.bool, device=self.values.device)
        m.scatter_(-1, self.indices.long(), True)
        return m.reshape(out, -1)[:, :inn]

    def to(
        self, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None
    ) -> "BalancedSparseWeight":
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float64, bfloat16 or float16, got {dtype}")
        return BalancedSparseWeight(
            self.values.to(device=device, dtype=dtype),
            self.indices.to(device),
            self.bank,
            self.shape[1],
            validate=False,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def density(self) -> float:
        return self.values.numel() / (self.shape[0] * self.shape[1])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel() * self.indices.element_size()

    def __repr__(self) -> str:
        return (
            f"BalancedSparseWeight(shape={self.shape}, bank={self.bank}, keep={self.keep}, "
            f"sparsity={self.sparsity:.3f}, dtype={self.dtype}, device={self.device})"
        )
