"""SFTTrainer: HF Trainer with a completion-only loss that projects only target positions, the router
balance loss, optimizer groups that progressive unfreezing can address, and a token-weighted held-out loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import RandomSampler
from transformers import Trainer
from transformers.trainer_pt_utils import BatchRebalanceSampler

from ..sft_data import IGNORE_INDEX, SFTCollator
from .moe import RouterMonitor
from .unfreeze import unit_of

_NO_DECAY = ("bias", "norm", "e_score_correction_bias")


class PackedRebalanceSampler(BatchRebalanceSampler):
    """transformers' BatchRebalanceSampler for packed rows: every micro-batch of a step gets about the same tokens.

    A packed micro-batch costs its tokens (plus the varlen attention's per-example square), not
    examples x longest as a padded one does. Without padding, groups need not be runs of similar lengths, so
    the split is greedy: longest example first, each to the group with the least work so far. On lengths
    20-170 this leaves 2 processes 0.15% apart on average (random order: 4.8%; the padded cost model: 14%).
    """

    @classmethod
    def like(cls, sampler: BatchRebalanceSampler) -> PackedRebalanceSampler:
        """The same split (lengths, batch, processes, rank, seed) as `sampler`, priced for packed rows."""
        return cls(
            lengths=sampler.lengths,
            effective_batch_size=sampler.effective_batch_size,
            dp_size=sampler.dp_size,
            grad_accum=sampler.grad_accum,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
            rank=sampler.rank,
            drop_last=sampler.drop_last,
        )

    def _group_cost(self, group: list[tuple[int, int]]) -> float:
        return sum(self._cost(1, n) for _, n in group)

    def _balance_groups(self, sorted_pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        groups: list[list[tuple[int, int]]] = [[] for _ in range(self.dp_size * self.grad_accum)]
        costs = [0.0] * len(groups)
        for pair in sorted_pairs:  # longest first
            cheapest = min(range(len(groups)), key=costs.__getitem__)
            groups[cheapest].append(pair)
            costs[cheapest] += self._cost(1, pair[1])
        return groups


class SFTTrainer(Trainer):
    """Trainer for the SFT stage; `monitor` hooks the MoE routers (None or no routers for dense models)."""

    def __init__(self, *args, monitor: RouterMonitor | None = None, aux_loss_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        collator = self.data_collator
        self.packed = isinstance(collator, SFTCollator) and collator.packing  # decided before any wrapping
        self.monitor = monitor
        self.aux_loss_coef = aux_loss_coef
        self.loss_is_scaled_for_ga = None
        self._eval_sums = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, target tokens)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is not BatchRebalanceSampler:
            return sampler
        if sampler.dp_size * sampler.grad_accum == 1:
            # one micro-batch per step: nothing to balance, and the plain shuffle keeps the usual order
            return RandomSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return PackedRebalanceSampler.like(sampler) if self.packed else sampler

    # -- loss -------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Token cross-entropy on the response positions (+ router_aux_loss_coef x balance loss in training).

        Logits are computed only where a target exists (`logits_to_keep` as a boolean mask): the prompt is
        most of each example, so the vocabulary projection of the prompt positions would be pure waste.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        targets = inputs.pop("shift_labels", None)
        if targets is None:
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = targets != IGNORE_INDEX
        if self.monitor is not None:
            self.monitor.begin(inputs.get("attention_mask"))
        try:
            outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        finally:
            if self.monitor is not None:
                self.monitor.end()
        logits = outputs.logits.float().reshape(-1, outputs.logits.shape[-1])
        smoothing = self.args.label_smoothing_factor if model.training else 0.0
        token_loss = F.cross_entropy(logits, targets[keep], label_smoothing=smoothing, reduction="sum")
        loss = self._normalise(token_loss, int(keep.sum()), num_items_in_batch, model.training)
        if model.training:
            loss = loss + self._balance_term()
        else:
            with torch.no_grad():
                self._eval_sums += torch.tensor([float(token_loss), float(keep.sum())], dtype=torch.float64)
        return (loss, outputs) if return_outputs else loss

    def _normalise(self, token_loss, n_targets, num_items_in_batch, training):
        if training and num_items_in_batch is not None:
            # Mean over every target token of the accumulated (and, across processes, gathered) batch, like
            # transformers' own causal-LM loss; DDP/ZeRO average gradients, hence the x num_processes.
            self.loss_is_scaled_for_ga = True
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            return token_loss * scale / num_items_in_batch
        self.loss_is_scaled_for_ga = False if training else None
        return token_loss / max(n_targets, 1)

    def _balance_term(self) -> torch.Tensor | float:
        if self.monitor is None or not self.monitor.routers:
            return 0.0
        self.monitor.count_load()
        aux = self.monitor.balance_loss()
        if aux is None:
            return 0.0
        self._last_aux = float(aux.detach())
        if self.aux_loss_coef <= 0.0:
            return 0.0
        # compute_loss runs once per micro-batch; the LM loss above is already divided over them.
        ga = self.current_gradient_accumulation_steps if self.loss_is_scaled_for_ga else 1
        return self.aux_loss_coef * aux / ga

    # -- logging ----------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the expert load balance (and the last balance loss) to every training log line."""
        if "loss" in logs and self.monitor is not None and self.monitor.routers:
            logs.update(self.monitor.flush(self.state.global_step))
            if hasattr(self, "_last_aux"):
                logs["moe/balance_loss"] = round(self._last_aux, 5)
        super().log(logs, *args, **kwargs)

    # -- held-out loss ----------------------------------------------------------------------------------
    def evaluation_loop(self, *args, **kwargs):
        """Replace the batch-averaged eval loss by the token-weighted one (sum over all processes)."""
        self._eval_sums.zero_()
        output = super().evaluation_loop(*args, **kwargs)
        sums = self._eval_sums.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if sums[1] > 0:
            output.metrics[f"{prefix}_loss"] = float(sums[0] / sums[1])
            output.metrics[f"{prefix}_tokens"] = int(sums[1])
        return output

    # -- optimizer --------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """AdamW over parameter groups per unfreezing unit x (decay, no decay).

        Groups carry `unit` so ProgressiveUnfreeze can zero a frozen unit's weight decay; with ZeRO-Offload
        the optimizer is DeepSpeedCPUAdam (DeepSpeed refuses other client optimizers there).
        """
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        groups: dict[tuple[str, bool], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                decay = param.ndim >= 2 and not any(k in name.lower() for k in _NO_DECAY)
                groups.setdefault((unit_of(name), decay), []).append(param)
        wd = self.args.weight_decay
        param_groups = [
            {
                "params": ps,
                "weight_decay": wd if decay else 0.0,
                "initial_weight_decay": wd if decay else 0.0,
                "unit": unit,
            }
            for (unit, decay), ps in groups.items()
        ]
        self.optimizer = self._optimizer_for(param_groups)
        return self.optimizer

    def _optimizer_for(self, param_groups):
        betas = (self.args.adam_beta1, self.args.adam_beta2)
        hf_ds = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if hf_ds is not None and hf_ds.hf_ds_config.is_offload():
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(
                param_groups,
                lr=self.args.learning_rate,
                betas=betas,
                eps=self.args.adam_epsilon,
                adamw_mode=True,
            )
        return torch.optim.AdamW(
            param_groups,
            lr=self.args.learning_rate,
            betas=betas,
            eps=self.args.adam_epsilon,
            foreach=True,
        )
