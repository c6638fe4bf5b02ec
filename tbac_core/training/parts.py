"""What ladder-side tuning trains, and how it is kept apart from the frozen rest.

* Metaquery rows: a separate float32 parameter [N, hidden] (``MetaqueryRows``). A forward hook on
  the frozen input embedding swaps its output at metaquery-token positions for these rows, so
  gradients reach only them; the embedding matrix itself is never touched by the optimiser (the
  official code zeroes the base rows' gradient instead, which AdamW's weight decay would still
  move). ``write_back`` copies the trained rows into the embedding when training ends.
* Connector: trained fully.
* DiT: trained fully, with peft LoRA adapters on its linear layers, or frozen.

Everything trainable is float32 (master weights); frozen parts keep the dtype they were loaded in.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidParameterError
from ..loading.adapters import (
    CONNECTOR_PREFIX,
    DIT_PREFIX,
    LORA_PREFIX,
    METAQUERY_KEY,
    AdapterError,
    base_record,
    check_adapter_tensors,
    check_base_record,
    restore_on_failure,
    split_parts,
)
from ..modeling.mllm import text_model
from ..modeling.weight_layout import use_row_major_weights
from .sharding import gather_full, load_full_state

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class MetaqueryRows(nn.Module):
    """Trainable metaquery embedding rows, substituted into a frozen embedding's output."""

    def __init__(self, embedding: nn.Embedding, first_row: int, count: int):
        super().__init__()
        self.embedding = [embedding]  # a list: not registered as a submodule (it stays frozen)
        self.first_row = first_row
        self.count = count
        self.weight = nn.Parameter(embedding.weight[first_row: first_row + count].detach().float().clone())
        self._handle = None

    def attach(self) -> None:
        if self._handle is None:
            self._handle = self.embedding[0].register_forward_hook(self._substitute)

    def detach_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _substitute(self, module, args, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0]  # [B, S]
        offset = input_ids - self.first_row
        is_query = (offset >= 0) & (offset < self.count)
        if not bool(is_query.any()):
            return output
        rows = self.weight.to(output.dtype)[offset.clamp(0, self.count - 1)]  # [B, S, H]
        return torch.where(is_query[..., None], rows, output)

    def write_back(self) -> None:
        weight = self.embedding[0].weight
        with torch.no_grad():
            weight[self.first_row: self.first_row + self.count].copy_(self.weight.to(weight.dtype))


class TrainableParts:
    """Sets ``model`` up for ladder-side tuning and gathers what is trained.

    ``dit_mode``: ``full`` | ``lora`` | ``frozen``. ``train_metaqueries`` / ``train_connector``
    switch those parts off (e.g. to fine-tune only a LoRA).
    """

    def __init__(self, model, *, dit_mode: str = "full", train_metaqueries: bool = True,
                 train_connector: bool = True, lora_rank: int = 16, lora_alpha: float | None = None,
                 lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, use_rslora: bool = False):
        if dit_mode not in ("full", "lora", "frozen"):
            raise InvalidParameterError(f"dit_mode must be full, lora or frozen, got {dit_mode!r}.")
        self.model = model
        self.dit_mode = dit_mode
        self.base = base_record(model)  # before anything changes
        self.lora = None
        use_row_major_weights(model.dit)  # the loader's CPU layout is for inference (weight_layout)
        model.mllm.requires_grad_(False)
        model.vae.requires_grad_(False)
        model.dit.requires_grad_(False)

        self.metaqueries = None
        if train_metaqueries:
            embedding = model.mllm.get_input_embeddings()
            self.metaqueries = MetaqueryRows(embedding, model.base_vocab, model.config.num_metaqueries)
            self.metaqueries.to(embedding.weight.device)
            self.metaqueries.attach()
        self.train_connector = train_connector
        if train_connector:
            model.dit.connector.float().requires_grad_(True)
        transformer = model.dit.transformer
        if dit_mode == "full":
            transformer.float().requires_grad_(True)
        elif dit_mode == "lora":
            self.lora = {"rank": int(lora_rank), "alpha": float(lora_alpha if lora_alpha is not None else lora_rank),
                         "target_modules": list(lora_targets), "use_rslora": bool(use_rslora)}
            self._inject_lora(transformer)
        if not self.parameters():
            raise InvalidParameterError("Nothing to train: enable the metaqueries, the connector or the DiT.")

    def _inject_lora(self, transformer: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = self.lora["target_modules"]
        matched = [name for name, module in transformer.named_modules()
                   if any(name == t or name.endswith("." + t) for t in targets)]
        if not matched:
            raise InvalidParameterError(f"No DiT module matches the LoRA targets {targets}.")
        not_linear = [n for n in matched if not isinstance(transformer.get_submodule(n), nn.Linear)]
        if not_linear:
            raise InvalidParameterError(
                f"LoRA targets must be Linear layers (they are merged into them when applied); these are not: "
                f"{', '.join(not_linear[:5])}."
            )
        config = LoraConfig(r=self.lora["rank"], lora_alpha=self.lora["alpha"], target_modules=targets,
                            lora_dropout=0.0, init_lora_weights=True, use_rslora=self.lora["use_rslora"])
        inject_adapter_in_model(config, transformer, adapter_name="default")
        for name, param in transformer.named_parameters():
            is_lora = ".lora_A." in name or ".lora_B." in name
            param.requires_grad_(is_lora)
            if is_lora:
                param.data = param.data.float()

    # -- parameters --------------------------------------------------------------------------
    def named_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {}
        if self.metaqueries is not None:
            groups["metaqueries"] = [self.metaqueries.weight]
        if self.train_connector:
            groups["connector"] = list(self.model.dit.connector.parameters())
        if self.dit_mode != "frozen":
            groups["dit"] = [p for p in self.model.dit.transformer.parameters() if p.requires_grad]
        return groups

    def parameters(self) -> list[nn.Parameter]:
        return [p for params in self.named_groups().values() for p in params]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- saving / loading --------------------------------------------------------------------
    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The trained tensors in the adapter layout of ``tbac_core.loading.adapters``, as CPU copies.

        With FSDP (``training.sharding``) every process must call it; only one with ``keep`` gets them.
        """
        state: dict[str, torch.Tensor] = {}
        if self.metaqueries is not None:
            state[METAQUERY_KEY] = self.metaqueries.weight
        if self.train_connector:
            state.update({CONNECTOR_PREFIX + k: v for k, v in self.model.dit.connector.state_dict().items()})
        transformer = self.model.dit.transformer
        if self.dit_mode == "full":
            state.update({DIT_PREFIX + k: v for k, v in transformer.state_dict().items()})
        elif self.dit_mode == "lora":
            from peft import get_peft_model_state_dict

            lora_state = get_peft_model_state_dict(transformer, adapter_name="default")
            state.update({LORA_PREFIX + k: v for k, v in lora_state.items()})
        return gather_full(state, keep)

    def adapter_config(self) -> dict:
        return {
            "base": self.base,
            "parts": {"metaqueries": self.metaqueries is not None, "connector": self.train_connector,
                      "dit": self.dit_mode},
            "lora": self.lora,
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor], config: dict, where: str) -> None:
        """Restore trained tensors saved by ``state_dict`` (resuming); the setup must be the same."""
        check_base_record(config.get("base") or {}, self.base, self.base["name"], where)
        if config.get("parts") != self.adapter_config()["parts"] or config.get("lora") != self.lora:
            raise AdapterError(
                f"Cannot resume from {where}: it trained parts {config.get('parts')} (LoRA {config.get('lora')}), "
                f"this run trains {self.adapter_config()['parts']} (LoRA {self.lora}). Use the same settings."
            )
        check_adapter_tensors(tensors, where)
        parts = split_parts(tensors)
        expected = self._expected_shapes()
        for part, shapes in expected.items():
            given = {key: tuple(value.shape) for key, value in parts[part].items()}
            if given != shapes:
                wrong = sorted(set(given) ^ set(shapes) | {k for k in given if shapes.get(k, given[k]) != given[k]})
                raise AdapterError(f"Cannot resume from {where}: its {part} tensors do not match this run's "
                                   f"({len(wrong)} differ: {', '.join(wrong[:5])}).")
        # Everything is checked: write, restoring every trained tensor if a write fails.
        transformer = self.model.dit.transformer
        written = ([self.model.dit.connector] if self.train_connector else []) + ([transformer] if self.dit_mode == "full" else [])
        targets = [p.data for p in self.parameters()] + [b.data for module in written for b in module.buffers()]
        with restore_on_failure(targets), torch.no_grad():
            if self.metaqueries is not None:
                self.metaqueries.weight.copy_(parts["metaqueries"][METAQUERY_KEY])
            if self.train_connector:
                self.model.dit.connector.load_state_dict(parts["connector"], strict=True)
            if self.dit_mode == "full":
                load_full_state(transformer, parts["dit"])
            elif self.dit_mode == "lora":
                from peft import set_peft_model_state_dict

                result = set_peft_model_state_dict(transformer, parts["dit_lora"], adapter_name="default")
                if getattr(result, "unexpected_keys", None):
                    raise AdapterError(f"Cannot resume from {where}: unexpected LoRA keys {result.unexpected_keys[:5]}.")

    def _expected_shapes(self) -> dict[str, dict[str, tuple]]:
        """Per adapter part, the names and shapes ``state_dict`` writes for this run (nothing copied)."""
        shapes: dict[str, dict[str, tuple]] = {"metaqueries": {}, "connector": {}, "dit": {}, "dit_lora": {}}
        if self.metaqueries is not None:
            shapes["metaqueries"][METAQUERY_KEY] = tuple(self.metaqueries.weight.shape)
        if self.train_connector:
            shapes["connector"] = {k: tuple(v.shape) for k, v in self.model.dit.connector.state_dict().items()}
        transformer = self.model.dit.transformer
        if self.dit_mode == "full":
            shapes["dit"] = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
        elif self.dit_mode == "lora":
            from peft import get_peft_model_state_dict

            lora_state = get_peft_model_state_dict(transformer, adapter_name="default")
            shapes["dit_lora"] = {k: tuple(v.shape) for k, v in lora_state.items()}
        return shapes

    def finish(self) -> None:
        """Write the trained metaquery rows into the embedding and remove the hook."""
        if self.metaqueries is not None:
            self.metaqueries.write_back()
            self.metaqueries.detach_hook()


def enable_gradient_checkpointing(model) -> None:
    """Recompute MLLM decoder layers and DiT blocks in the backward pass instead of storing them.

    Each layer's ``forward`` is wrapped (not ``__call__``), so the rung-capturing hooks of
    ``tbac_core.modeling.mllm`` run once, outside the recomputed region.
    """
    layers = list(text_model(model.mllm).layers) + list(model.dit.transformer.transformer_blocks)
    for layer in layers:
        if getattr(layer, "_tbac_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._tbac_checkpointed = True


@contextmanager
def eval_mode(*modules: nn.Module):
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, state in zip(modules, states):
            m.train(state)
