"""Moving weights between torch modules and the model store's numpy tensors, and copies of a
net's state to restore or compare later."""

from __future__ import annotations

import numpy as np
import torch

from model_store.spec import Architecture, ModelSpec
from sitefit.exceptions import InvalidInputError, ModelStoreError
from worker.nets import NetConfig, SegmentationNet


def net_config(architecture: Architecture) -> NetConfig:
    return NetConfig(
        num_outputs=architecture.num_outputs,
        base_channels=architecture.base_channels,
        levels=architecture.levels,
        res_blocks=architecture.res_blocks,
    )


def architecture_of(config: NetConfig) -> Architecture:
    return Architecture(
        num_outputs=config.num_outputs,
        base_channels=config.base_channels,
        levels=config.levels,
        res_blocks=config.res_blocks,
    )


def to_numpy(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """Every parameter and buffer of ``module`` as contiguous CPU numpy arrays."""
    return {
        prefix + key: value.detach().cpu().contiguous().numpy().copy()
        for key, value in module.state_dict().items()
    }


def load_numpy(
    module: torch.nn.Module, tensors: dict[str, np.ndarray], strict: bool = True
) -> None:
    """Copy numpy tensors into ``module`` in place (on its device); refuses mismatched keys."""
    state = module.state_dict()
    if strict and set(tensors) != set(state):
        missing, extra = set(state) - set(tensors), set(tensors) - set(state)
        raise ModelStoreError(
            f"weights do not fit the architecture (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]})"
        )
    with torch.no_grad():
        for key, array in tensors.items():
            if key not in state:
                raise ModelStoreError(f"weights hold an unknown tensor {key!r}")
            target = state[key]
            if tuple(target.shape) != array.shape:
                raise ModelStoreError(
                    f"tensor {key!r} has shape {array.shape}, expected {tuple(target.shape)}"
                )
            target.copy_(torch.from_numpy(array))


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (part of ``module``'s own state dict, e.g. a snapshot taken during
    refinement) into ``module`` in place, tensor to tensor on the device: no round trip
    through host memory."""
    current = module.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            current[key].copy_(tensor)


def build_net(
    spec: ModelSpec, tensors: dict[str, np.ndarray], device: torch.device
) -> SegmentationNet:
    """Instantiate the spec's architecture with the stored weights, in eval mode."""
    net = SegmentationNet(net_config(spec.architecture))
    load_numpy(net, tensors)
    return net.to(device).eval()


def check_fits(spec: ModelSpec, tensors: dict[str, np.ndarray]) -> None:
    """Refuse (``InvalidInputError``) weights that do not make the spec's network: the
    ``check`` of :meth:`model_store.ModelStore.import_`."""
    try:
        build_net(spec, tensors, torch.device("cpu"))
    except ModelStoreError as error:
        raise InvalidInputError(f"model {spec.name}: {error}") from None
    except (TypeError, RuntimeError) as error:  # e.g. a dtype torch cannot take
        raise InvalidInputError(
            f"model {spec.name}: weights do not fit the architecture ({type(error).__name__})"
        ) from None
    for key, array in tensors.items():  # `sitefit train` refuses such a model too
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise InvalidInputError(f"model {spec.name}: tensor {key!r} holds NaN or Inf")


def snapshot(net: SegmentationNet) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (to restore or compare later)."""
    return {k: _copy(v) for k, v in net.state_dict().items()}


def mutable_state(net: SegmentationNet) -> dict[str, torch.Tensor]:
    """Copies of everything refinement can change: init-path tensors and every BN buffer."""
    buffers = {name for name, _ in net.named_buffers()}
    return {
        k: _copy(v)
        for k, v in net.state_dict().items()
        if k.startswith("init_path.") or k in buffers
    }


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    # contiguous whatever layout the net runs in (channels_last during refinement)
    return tensor.detach().clone(memory_format=torch.contiguous_format)
