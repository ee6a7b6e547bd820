"""Drop-in replacements for ``nn.Linear`` whose weight is block-sparse or balanced-sparse.

The kept weight values are the module's only weight ``nn.Parameter`` (named ``values``); the pattern (offsets,
indices) lives in buffers. An optimizer therefore updates exactly the kept weights, and the pattern stays fixed
until someone re-prunes. The backend that runs the kernels is chosen once, when the module is built or moved
(``.to()``, ``.cuda()``, ...), never per forward.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import ops, runtime
from .formats import BalancedSparseWeight, BlockSparseWeight
from .formats import _kernel_layout as _block_kernel_layout

__all__ = ["BlockSparseLinear", "BalancedSparseLinear", "SparseLinear", "SparseWeightView", "ResidualLayerNorm",
           "contiguous_parameters"]

_BLOCK_META = ("row_offsets", "col_indices", "col_offsets", "row_indices", "block_perm")


def _check_activation(activation: str) -> str:
    if activation not in ops.ACTIVATIONS:
        raise ValueError(f"activation must be one of {ops.ACTIVATIONS}, got {activation!r}")
    return activation


def _check_features(in_features: int, out_features: int) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")


def _linear_init(in_features: int, out_features: int, bias: bool, dtype: Optional[torch.dtype]):
    """nn.Linear's initialisation, on the CPU (also for ``device="meta"``, whose tensors hold no values to prune)."""
    ref = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return ref.weight.detach(), (ref.bias.detach() if bias else None)


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (stored ``[in, out]``), as a
    view; raises TypeError for anything else."""
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"expected an nn.Linear or transformers Conv1D, got {type(module).__name__}")


def _is_conv1d(module: nn.Module) -> bool:
    # Checked by name so that importing sparse never imports transformers (slow, optional).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


class SparseWeightView:
    """What a sparse module answers for ``module.weight``: the properties callers read from an ``nn.Linear``
    weight (``dtype``, ``device``, ``shape``, ``size()``, ``dim()``, ``numel()``, ``requires_grad``) without a
    dense copy; :meth:`to_dense` builds the dense ``[out, in]`` tensor on demand (pruned weights are zeros), and
    nothing keeps it. It is not a tensor: code that computes with ``module.weight`` directly (``F.linear(x,
    m.weight)``) gets a TypeError naming :meth:`to_dense`, where a dense stand-in would silently cost the memory
    the sparse format saves. Transformers' T5 and others read ``.weight.dtype`` this way."""

    __slots__ = ("_module",)

    def __init__(self, module: "SparseLinear") -> None:
        self._module = module

    @property
    def dtype(self) -> torch.dtype:
        return self._module.values.dtype

    @property
    def device(self) -> torch.device:
        return self._module.values.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._module.out_features, self._module.in_features))

    @property
    def requires_grad(self) -> bool:
        return self._module.values.requires_grad

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def ndim(self) -> int:
        return 2

    def dim(self) -> int:
        return 2

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight, built now (a new tensor each call)."""
        return self._module.weight_format.to_dense()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(
            f"{getattr(func, '__name__', func)} got the weight of a sparse layer, which is not a tensor; use "
            "module(x) for the layer's output, or module.weight.to_dense() for a dense copy"
        )

    def __repr__(self) -> str:
        return (f"SparseWeightView({type(self._module).__name__}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device})")


class SparseLinear(nn.Module):
    """Common part of the sparse Linear modules: bias, activation, backend choice, summaries.

    Subclasses define ``weight_format`` (a format object over the module's own tensors) and ``_pattern_repr``.
    """

    in_features: int
    out_features: int
    activation: str
    backend: Optional[str]
    _format: type  # the weight format class of the subclass

    @classmethod
    def from_weight(cls, weight, bias: Optional[torch.Tensor] = None, *, activation: str = "none",
                    backend: Optional[str] = None):
        """A module over an existing weight of the subclass's format (its tensors become the module's, without
        a copy)."""
        if not isinstance(weight, cls._format):
            raise TypeError(f"weight must be a {cls._format.__name__}, got {type(weight).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._setup(weight, bias, activation, backend)
        return module

    def _init_common(self, weight, activation: str, backend: Optional[str]) -> None:
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.activation = _check_activation(activation)
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS} or None, got {backend!r}")
        self._backend_request = backend

    def _init_bias(self, weight, bias: Optional[torch.Tensor]) -> None:
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=weight.dtype).clone())
        else:
            self.register_parameter("bias", None)

    def _refresh(self) -> None:
        """After construction, a move or a load: picks the backend for the values' device and builds the format
        object that forward passes to the kernels (once, not per call). When no backend can run on the device
        (e.g. ``meta``), the choice is deferred: forward raises the error that lists each backend's reason."""
        self._format = self.weight_format
        try:
            self.backend = ops.select_backend(self.values.device, self._backend_request, self._format)
        except RuntimeError:
            self.backend = None
            return
        if self._backend_request is None:  # on a GPU: Triton or CUDA C++, whichever measures faster for this weight
            self.backend = ops.fastest_backend(self._format)

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self._refresh()
        return module

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._refresh()  # the unpickling process may have other backends than the pickling one

    @property
    def weight_format(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``activation(x W^T + bias)``: ``[..., in_features] -> [..., out_features]``."""
        if x.dtype not in runtime.CHECKED_DTYPES and x.device.type == "cpu" and not torch.compiler.is_compiling():
            runtime.warn_if_slow_dtype(x.dtype, type(self).__name__)  # once per dtype: bf16 without native support
        if self.backend is None:
            ops.select_backend(self.values.device, self._backend_request, self._format)  # raises, with reasons
        weight = self._format
        if weight.values is not self.values:  # the parameter was replaced by hand
            weight = self.weight_format
        return ops.linear(x, weight, self.bias, self.activation, backend=self.backend)

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear`` (same dtype and device; pruned weights are zeros).

        The activation is not part of ``nn.Linear``: when ``self.activation != "none"`` apply it after the
        returned layer (``sparse.reference.activation(y, self.activation)``)."""
        with torch.no_grad():
            dense = self.weight_format.to_dense()
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                            device=dense.device, dtype=dense.dtype)
            lin.weight.copy_(dense)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def weight(self) -> SparseWeightView:
        """``dtype``, ``device`` and ``shape`` of the weight as an ``nn.Linear``'s would have them, for code that
        reads them (a :class:`SparseWeightView`; the kept values are the ``values`` parameter)."""
        return SparseWeightView(self)

    @property
    def sparsity(self) -> float:
        """Fraction of the weight the pattern drops (for blocks: of the block grid)."""
        return self.weight_format.sparsity

    @property
    def nbytes(self) -> int:
        """Bytes of the weight (values and all pattern metadata) and the bias."""
        b = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight_format.nbytes + b

    def _pattern_repr(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._pattern_repr()}, sparsity={self.sparsity:.3f}, activation={self.activation}, "
            f"backend={self.backend}"
        )

    # The state dict carries a [4] int64 `pattern_info` buffer, so a state dict describes its own shape and
    # pattern; loading checks it and the pattern's invariants before anything is copied (a corrupt index would
    # otherwise reach the kernels).
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        info = state_dict.get(prefix + "pattern_info")
        if info is not None and not torch.equal(info.cpu(), self.pattern_info.cpu()):
            error_msgs.append(
                f"{prefix}pattern_info: the state dict describes {self._describe_info(info)}, but this module is "
                f"{self._describe_info(self.pattern_info)}; build the module with the saved configuration"
            )
            return
        try:
            self._validate_state(state_dict, prefix)
        except KeyError:
            pass  # missing entries are reported by the default loader
        except (ValueError, TypeError) as exc:
            error_msgs.append(f"{prefix}: the stored pattern is invalid: {exc}")
            return
        # The values keep the layout they had: the kernels' own, or plain contiguous after contiguous_parameters
        # (FSDP2 shards only contiguous parameters, and its post-load hook views them flat).
        contiguous = self.values.is_contiguous()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # load_state_dict(assign=True) puts the stored tensor itself in place, in whatever layout it was saved.
        values = self.values.detach()
        laid_out = values.contiguous() if contiguous else self._kernel_layout(values)
        if laid_out.stride() != self.values.stride():
            self.values = nn.Parameter(laid_out, requires_grad=self.values.requires_grad)
        self._refresh()


class BlockSparseLinear(SparseLinear):
    """``y = activation(x W^T + b)`` with ``W`` [out_features, in_features] stored as kept ``(bo, bi)`` blocks.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        block: block size, an int or ``(block_rows, block_cols)``.
        sparsity: fraction of blocks dropped, in [0, 1). The weight is initialised like ``nn.Linear`` and then
            pruned to the blocks of largest L2 norm.
        activation: a name from ``sparse.activations.ACTIVATIONS``, applied in the kernel's output stage.
        backend: a name from ``sparse.ops.BACKENDS``, or None: the only one on a CPU; on a GPU the faster of
            Triton and CUDA C++ for this weight, measured once per weight configuration (``sparse.ops.fastest_backend``)
            when the module is built or moved.
    Parameters: ``values`` [nnz_blocks, bo, bi] (physical layout [nnz, bi, bo], strides (bo*bi, 1, bo), which
    ``.to()``, deepcopy, pickling and ``load_state_dict`` preserve), ``bias`` [out_features].
    Buffers: the pattern (``row_offsets``, ``col_indices``, ``col_offsets``, ``row_indices``, ``block_perm``,
    int32) and ``pattern_info`` = (out, in, bo, bi).
    """

    _format = BlockSparseWeight

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block: Union[int, Sequence[int]] = 32,
        sparsity: float = 0.5,
        activation: str = "none",
        backend: Optional[str] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        _check_features(in_features, out_features)
        W, b = _linear_init(in_features, out_features, bias, dtype)
        weight = BlockSparseWeight.from_dense(W, block, sparsity=sparsity).to(device)
        self._setup(weight, None if b is None else b.to(device), activation, backend)

    def _setup(
        self, weight: BlockSparseWeight, bias: Optional[torch.Tensor], activation: str, backend: Optional[str]
    ) -> None:
        self._init_common(weight, activation, backend)
        self.block: Tuple[int, int] = weight.block
        self.values = nn.Parameter(weight.values.detach())  # keeps the physical layout (no copy)
        self._init_bias(weight, bias)
        for name in _BLOCK_META:
            self.register_buffer(name, getattr(weight, name))
        self.register_buffer("pattern_info", torch.tensor([*weight.shape, *weight.block], dtype=torch.int64,
                                                          device=weight.values.device))
        self._refresh()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        block: Union[int, Sequence[int]] = 32,
        sparsity: Optional[float] = None,
        mask: Optional[torch.Tensor] = None,
        activation: str = "none",
        backend: Optional[str] = None,
    ) -> "BlockSparseLinear":
        """Prunes a dense ``nn.Linear`` (or a transformers ``Conv1D``) to blocks and copies its bias.

        Give exactly one of ``sparsity`` (keep the blocks of largest L2 norm) or ``mask`` (bool, ``[out, in]``
        per element or ``[n_block_rows, n_block_cols]`` per block), as ``BlockSparseWeight.from_dense``."""
        W = dense_weight_of(linear)
        weight = BlockSparseWeight.from_dense(W.detach(), block, sparsity=sparsity, mask=mask)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_weight(weight, bias, activation=activation, backend=backend)

    @staticmethod
    def _kernel_layout(values: torch.Tensor) -> torch.Tensor:
        return _block_kernel_layout(values)

    @property
    def weight_format(self) -> BlockSparseWeight:
        """The BlockSparseWeight over this module's own tensors (no copy; gradients flow to ``values``)."""
        return BlockSparseWeight(
            self.values, self.row_offsets, self.col_indices, (self.out_features, self.in_features),
            col_offsets=self.col_offsets, row_indices=self.row_indices, block_perm=self.block_perm, validate=False,
        )

    def _pattern_repr(self) -> str:
        return f"block={self.block}, nnz_blocks={self.values.shape[0]}"

    def quantize(self, mode: str = "int8", clip: Optional[float] = None):
        """The int8 version of this layer (``sparse.quant.QuantizedBlockSparseLinear``, CPU inference only):
        int8 weights with per-output-channel scales, activations quantized per token (or with the static
        ``clip``). This module is left as it is."""
        from .quant import QuantizedBlockSparseLinear

        return QuantizedBlockSparseLinear.from_sparse(self, mode, clip=clip)

    @staticmethod
    def _describe_info(info: torch.Tensor) -> str:
        out, inn, bo, bi = info.tolist()
        return f"a {out}x{inn} weight in ({bo}, {bi}) blocks"

    def _validate_state(self, state_dict, prefix: str) -> None:
        meta = {n: state_dict[prefix + n] for n in _BLOCK_META}
        BlockSparseWeight(state_dict[prefix + "values"], meta["row_offsets"], meta["col_indices"],
                          (self.out_features, self.in_features), col_offsets=meta["col_offsets"],
                          row_indices=meta["row_indices"], block_perm=meta["block_perm"], validate=True)


class BalancedSparseLinear(SparseLinear):
    """``y = activation(x W^T + b)`` with ``W`` [out_features, in_features] in balanced sparsity: every row keeps
    exactly ``keep`` of each ``bank`` consecutive weights (N:M sparsity is ``bank=M, keep=N``).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        bank, keep: bank width and the number of weights kept per bank (sparsity ``1 - keep / bank``). The weight
            is initialised like ``nn.Linear`` and then the ``keep`` largest-magnitude weights of each bank are kept.
        activation, backend: as BlockSparseLinear.
    Parameters: ``values`` [out_features, n_banks, keep], ``bias``. Buffers: ``indices`` (uint8 when bank <= 256,
    else int16; the column of each value inside its bank) and ``pattern_info`` = (out, in, bank, keep).
    """

    _format = BalancedSparseWeight

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bank: int = 32,
        keep: int = 16,
        activation: str = "none",
        backend: Optional[str] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        _check_features(in_features, out_features)
        W, b = _linear_init(in_features, out_features, bias, dtype)
        weight = BalancedSparseWeight.from_dense(W, bank, keep).to(device)
        self._setup(weight, None if b is None else b.to(device), activation, backend)

    def _setup(
        self, weight: BalancedSparseWeight, bias: Optional[torch.Tensor], activation: str, backend: Optional[str]
    ) -> None:
        self._init_common(weight, activation, backend)
        self.bank = weight.bank
        self.keep = weight.keep
        self.values = nn.Parameter(weight.values.detach())
        self._init_bias(weight, bias)
        self.register_buffer("indices", weight.indices)
        self.register_buffer("pattern_info", torch.tensor([*weight.shape, weight.bank, weight.keep], dtype=torch.int64,
                                                          device=weight.values.device))
        self._refresh()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        bank: int = 32,
        keep: int = 16,
        mask: Optional[torch.Tensor] = None,
        activation: str = "none",
        backend: Optional[str] = None,
    ) -> "BalancedSparseLinear":
        """Prunes a dense ``nn.Linear`` (or a transformers ``Conv1D``) to balanced sparsity and copies its bias:
        the ``keep`` largest-magnitude weights of each bank, or exactly those of a balanced bool ``mask``
        [out, in], as ``BalancedSparseWeight.from_dense``."""
        W = dense_weight_of(linear)
        weight = BalancedSparseWeight.from_dense(W.detach(), bank, keep, mask=mask)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_weight(weight, bias, activation=activation, backend=backend)

    @staticmethod
    def _kernel_layout(values: torch.Tensor) -> torch.Tensor:
        return values.contiguous()

    @property
    def weight_format(self) -> BalancedSparseWeight:
        """The BalancedSparseWeight over this module's own tensors (no copy; gradients flow to ``values``)."""
        return BalancedSparseWeight(self.values, self.indices, self.bank, self.in_features, validate=False)

    def _pattern_repr(self) -> str:
        return f"bank={self.bank}, keep={self.keep}"

    def quantize(self, mode: str = "int8", clip: Optional[float] = None):
        """The int8 version of this layer (``sparse.quant.QuantizedBalancedSparseLinear``, CPU inference only):
        int8 weights with per-output-channel scales, activations quantized per token (or with the static
        ``clip``). This module is left as it is."""
        from .quant import QuantizedBalancedSparseLinear

        return QuantizedBalancedSparseLinear.from_sparse(self, mode, clip=clip)

    @staticmethod
    def _describe_info(info: torch.Tensor) -> str:
        out, inn, bank, keep = info.tolist()
        return f"a {out}x{inn} weight keeping {keep} of every {bank}"

    def _validate_state(self, state_dict, prefix: str) -> None:
        BalancedSparseWeight(state_dict[prefix + "values"], state_dict[prefix + "indices"], self.bank,
                             self.in_features, validate=True)


def dense_nbytes(module: nn.Module) -> int:
    """Bytes of a dense layer's weight and bias."""
    return sum(p.numel() * p.element_size() for p in (module.weight, getattr(module, "bias", None)) if p is not None)



def contiguous_parameters(model: nn.Module) -> List[str]:
    """Makes every parameter of the sparse layers in ``model`` contiguous, in place, and returns the names of
    those it changed: what ``torch.distributed.fsdp.fully_shard`` (FSDP2) needs, since it shards only
    contiguous parameters. A block-sparse layer keeps its ``values`` in the kernels' layout (each block stored
    transposed, a non-contiguous view); after this call they are plain ``[nnz_blocks, bo, bi]`` and each call
    re-lays them out for the kernels (a copy of the values, small beside the all-gather FSDP does per forward).
    Outputs and gradients do not change. Call it before ``fully_shard``."""
    changed = []
    for name, m in model.named_modules():
        if not isinstance(m, SparseLinear):
            continue
        for pname, p in list(m.named_parameters(recurse=False)):
            if not p.is_contiguous():
                setattr(m, pname, nn.Parameter(p.detach().contiguous(), requires_grad=p.requires_grad))
                changed.append(f"{name}.{pname}" if name else pname)
        m._refresh()
    return changed


class ResidualLayerNorm(nn.Module):
    """A BERT-style ``*Output`` block, ``LayerNorm(dropout(dense(hidden_states)) + input_tensor)``, whose residual
    add and LayerNorm run as one op after the projection (:func:`sparse.ops.residual_layer_norm`: one pass over the
    rows instead of eager's add and LayerNorm, two passes through memory with a fresh tensor each). What
    ``sparsify(..., fuse_layernorm=True)`` / :func:`sparse.patch.fuse_layernorm` put in place of the block.

    The children keep the block's names (``dense``, ``LayerNorm``, ``dropout`` in BERT), so the state dict is the
    block's. The fused op runs for CPU inference: outside training, with no gradient wanted, on CPU tensors of the
    LayerNorm's dtype; anything else takes the block's own ops (dropout, add, LayerNorm), so training and
    other devices compute exactly what the block did.
    """

    def __init__(self, dense: nn.Module, layer_norm: nn.LayerNorm, dropout: Optional[nn.Module] = None, *,
                 names: Tuple[str, str, str] = ("dense", "LayerNorm", "dropout"), replaces: str = "") -> None:
        super().__init__()
        if not isinstance(layer_norm, nn.LayerNorm) or len(layer_norm.normalized_shape) != 1:
            raise TypeError(f"layer_norm must be an nn.LayerNorm over the last dimension, got {layer_norm!r}")
        self._names = tuple(names)
        self.add_module(names[0], dense)
        self.add_module(names[1], layer_norm)
        self.add_module(names[2], dropout if dropout is not None else nn.Identity())
        self.replaces = replaces
        self.fused_op = True  # False: always the block's own ops (sparse.densify sets it, for other runtimes)

    def _fused(self, y: torch.Tensor, residual: torch.Tensor, ln: nn.LayerNorm) -> bool:
        if not self.fused_op or self.training or torch.jit.is_tracing() or y.device.type != "cpu":
            return False
        if residual.dtype != y.dtype or residual.shape != y.shape:
            return False
        params = [p for p in (ln.weight, ln.bias) if p is not None]
        if any(p.dtype != y.dtype for p in params):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in [y, residual, *params]))

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        dense, ln, dropout = (self._modules[n] for n in self._names)
        y = dense(hidden_states)
        if self._fused(y, input_tensor, ln):
            return ops.residual_layer_norm(y, input_tensor, ln.weight, ln.bias, ln.eps)
        return ln(dropout(y) + input_tensor)

    def extra_repr(self) -> str:
        return f"LayerNorm(dropout(dense(x)) + residual), add and LayerNorm as one op; replaces {self.replaces}"
