"""Loading and saving STCN weights.

- ``load_stcn_weights``: official checkpoints (``stcn.pth``, a plain state_dict, or a
  published training checkpoint holding it under ``"network"``) and this project's
  weights, strictly. A stage-0 (single-object) checkpoint loads into the multi-object
  network by widening the value encoder's first conv from 4 to 5 input channels with
  one orthogonally initialised channel, as the published stage 1/2/3 training does.
- ``init_from_imagenet``: torchvision-layout ResNet-50 (key encoder) and ResNet-18
  (value encoder) ``.pth`` files; the value encoder's extra mask input channels are
  appended with orthogonal init and its conv biases (absent from torchvision files)
  start at zero. Without files the network keeps its random init.
- ``save_stcn_weights``: the network's ``state_dict()`` is already the official format
  (same names, shapes and order), so saving writes it as-is, atomically.
- ``build_network``: the network the trainer and the evaluation both start from.
"""

import io
import os
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from shards.storage import write_bytes_atomic

from stcn.model.network import STCN

StateDict = Dict[str, torch.Tensor]
Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

STAGE0_CONV = "value_encoder.conv1.weight"
EXPECTED_LAYOUT = (
    "expected a plain state_dict of the STCN network (the official stcn.pth layout: "
    "key_encoder.{conv1,bn1,res2,layer2,layer3}.*, value_encoder.{conv1,bn1,layer1..3,fuser}.*, "
    "key_proj.key_proj.*, key_comp.*, decoder.*; value_encoder.conv1.weight 64x5x7x7 "
    "multi-object or 64x4x7x7 stage 0), or a training checkpoint with it under 'network'")
SHOWN = 5  # how many offending keys an error lists


class CheckpointError(ValueError):
    """A weights file or state dict does not have the expected layout."""


def read_state_dict(source: Source) -> StateDict:
    """A state dict from a path (loaded on CPU) or a mapping (returned as a dict)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        # Counter: MultiStepLR milestones inside published training checkpoints.
        with torch.serialization.safe_globals([Counter]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weights file ({err})") from err
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    return dict(loaded)


def _source_name(source: Source) -> str:
    return "state dict" if isinstance(source, Mapping) else str(source)


def _first(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:SHOWN])
    return shown + (f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else "")


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _widen_stage0(state: StateDict, target: StateDict) -> StateDict:
    """Stage 0 -> multi-object: append orthogonal input channels to the value conv1."""
    have, want = state.get(STAGE0_CONV), target[STAGE0_CONV]
    if have is None or have.dim() != 4 or have.shape[1] >= want.shape[1] \
            or have.shape[0] != want.shape[0] or have.shape[2:] != want.shape[2:]:
        return state
    extra = torch.empty(want.shape[0], want.shape[1] - have.shape[1], *want.shape[2:],
                        dtype=have.dtype)
    nn.init.orthogonal_(extra)
    return {**state, STAGE0_CONV: torch.cat([have, extra], dim=1)}


def _check_layout(state: StateDict, target: StateDict, name: str) -> None:
    """One error listing missing / unexpected / mis-shaped keys, or nothing."""
    # Older BatchNorm checkpoints lack num_batches_tracked; torch fills it in.
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mis_shaped = [f"{k} ({_shape(state[k])}, expected {_shape(target[k])})"
                  for k in target if k in state and state[k].shape != target[k].shape]
    if not (missing or unexpected or mis_shaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} keys with wrong shapes: {_first(mis_shaped)}")
    raise CheckpointError(f"{name}: not loadable into STCN: {'; '.join(problems)}. {EXPECTED_LAYOUT}")


def load_stcn_weights(net: STCN, source: Source) -> STCN:
    """Load an STCN checkpoint (path or state dict) into ``net`` strictly; returns ``net``.

    A stage-0 checkpoint (value conv1 with 4 input channels) is widened for a
    multi-object ``net``; a checkpoint with wrong keys or shapes raises one
    ``CheckpointError`` naming the file.
    """
    name = _source_name(source)
    state = read_state_dict(source)
    if "network" in state and isinstance(state["network"], Mapping):
        state = dict(state["network"])
    if state and all(k.startswith("module.") for k in state):   # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    target = net.state_dict()
    state = _widen_stage0(state, target)
    _check_layout(state, target, name)
    net.load_state_dict(state, strict=True)
    return net


def _load_backbone(part: nn.Module, source: Source, key_map: Mapping[str, str],
                   name: str) -> None:
    """Copy torchvision-layout ResNet weights into an encoder.

    ``key_map`` renames encoder prefixes to torchvision ones (``res2`` -> ``layer1``).
    Parameters outside the ResNet (the fuser) are left alone; conv biases, which
    torchvision ResNets lack, are zeroed; wider input convs get orthogonal extra
    input channels.
    """
    src = read_state_dict(source)
    own = part.state_dict()
    conv_biases = {f"{n}.bias" for n, m in part.named_modules()
                   if isinstance(m, nn.Conv2d) and m.bias is not None}
    loaded, missing, mis_shaped = {}, [], []
    for key, value in own.items():
        if key.startswith("fuser.") or key.endswith("num_batches_tracked"):
            continue
        head, _, rest = key.partition(".")
        src_key = f"{key_map.get(head, head)}.{rest}" if rest else key
        if src_key not in src:
            if key in conv_biases:
                loaded[key] = torch.zeros_like(value)
            else:
                missing.append(src_key)
            continue
        weight = src[src_key]
        if weight.shape != value.shape:
            if weight.dim() == 4 and weight.shape[0] == value.shape[0] \
                    and weight.shape[2:] == value.shape[2:] and weight.shape[1] < value.shape[1]:
                extra = torch.empty(value.shape[0], value.shape[1] - weight.shape[1],
                                    *value.shape[2:], dtype=weight.dtype)
                nn.init.orthogonal_(extra)
                weight = torch.cat([weight, extra], dim=1)
            else:
                mis_shaped.append(f"{src_key} ({_shape(weight)}, expected {_shape(value)})")
                continue
        loaded[key] = weight
    if missing or mis_shaped:
        problems = ([f"{len(missing)} missing keys: {_first(missing)}"] if missing else []) + \
                   ([f"{len(mis_shaped)} keys with wrong shapes: {_first(mis_shaped)}"] if mis_shaped else [])
        raise CheckpointError(f"{_source_name(source)}: not a torchvision-layout {name} "
                              f"({'; '.join(problems)}); expected keys conv1.weight, bn1.*, "
                              f"layer1..layer3.* as saved by torchvision.models.{name.lower()}")
    part.load_state_dict(loaded, strict=False)


def init_from_imagenet(net: STCN, resnet50_path: Optional[Source] = None,
                       resnet18_path: Optional[Source] = None) -> STCN:
    """Initialise the encoders from torchvision-layout ImageNet weights; returns ``net``.

    ``resnet50_path`` fills the key encoder, ``resnet18_path`` the value encoder's
    ResNet part (its extra mask channels orthogonal). Either may be omitted, leaving
    that encoder's random init (He-normal convs, as the published ResNet code).
    Layer4 and fc in the files are ignored.
    """
    if resnet50_path is not None:
        _load_backbone(net.key_encoder, resnet50_path, {"res2": "layer1"}, "ResNet50")
    if resnet18_path is not None:
        _load_backbone(net.value_encoder, resnet18_path, {}, "ResNet18")
    return net


def build_network(device: torch.device | str, weights: Optional[Source] = None, *,
                  single_object: bool = False, imagenet_resnet50: Optional[Source] = None,
                  imagenet_resnet18: Optional[Source] = None, channels_last: bool = False,
                  random_seed: Optional[int] = None) -> STCN:
    """The STCN on ``device`` in eval mode (training switches to ``train()``), BatchNorm
    frozen as published. ``weights``: an STCN checkpoint, loaded strictly (stage 0 widened
    for multi-object); else the ImageNet backbones when given; else random weights, drawn
    from the global torch generator or, with ``random_seed``, from that seed alone (the
    global generator untouched), so random-weight smoke runs repeat."""
    if not weights and random_seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed)
            net = STCN(single_object=single_object)
    else:
        net = STCN(single_object=single_object)
    if weights:
        load_stcn_weights(net, weights)
    elif imagenet_resnet50 or imagenet_resnet18:
        init_from_imagenet(net, imagenet_resnet50, imagenet_resnet18)
    net.freeze_batchnorm(True)
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net.eval()


def atomic_torch_save(obj, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` to ``path`` so that readers see the old file or the complete new one."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(str(path), buffer.getvalue())
    return Path(path)


def save_stcn_weights(net: STCN, path: Union[str, os.PathLike]) -> Path:
    """Write ``net``'s weights in the official format (a plain CPU state dict).

    The file appears only once complete (temporary file + rename).
    """
    return atomic_torch_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)

