"""MLB with the Hugging Face ``Trainer``: a ``compute_loss`` override and one callback.

    pip install transformers accelerate
    python examples/hf_trainer.py

Nothing takes over the loop: the Trainer runs forward, backward, accumulation, AMP and DDP
as usual.

* ``compute_loss`` returns ``bal.loss(model(...), labels)`` (the Trainer's ``backward()``
  applies the coefficients; its evaluation loop calls it under no_grad, which leaves them
  alone). With ``return_outputs=True`` it returns ``(loss, {"logits": logits})``: the
  Trainer reads predictions from a dict's values, but from a tuple's items *after the
  first*, so ``(loss, logits)`` would drop every batch's first row.
* The Trainer's ``eval_loss`` is ``bal.loss``: for MLB the fused loss *plus* the heads'
  losses. ``compute_metrics`` reports the fused cross-entropy alone (``eval_fused_loss``)
  and the accuracy, from the predictions.
* The optimizer is passed in (``optimizers=(opt, None)``) because it must hold the
  balancer's heads as well as the model's parameters; the model stays untouched (the
  balancer is not one of its submodules), so its checkpoints are what they always were.
* A ``TrainerCallback`` calls ``bal.after_backward()`` in ``on_pre_optimizer_step`` (after
  accumulation, unscaling and clipping; a no-op for MLB) and saves ``bal.state_dict()`` next
  to each checkpoint in ``on_save``.

Create the balancer before the Trainer (which wraps the model in DDP under ``torchrun``).
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch.utils.data import Dataset
from toy_audio_visual import NUM_CLASSES, AudioVisualNet, make_tensors
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradbalance as gb


class AudioVisualData(Dataset):
    """A strong, low-dimensional "audio" modality and a weak, noisy "video" one."""

    def __init__(self, n: int, seed: int) -> None:
        self.audio, self.video, self.labels = make_tensors(n, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "audio": self.audio[index],
            "video": self.video[index],
            "labels": self.labels[index],
        }


class BalancedTrainer(Trainer):
    """``Trainer`` whose loss is the balancer's (fused CE plus the heads' CE for MLB)."""

    def __init__(self, *args, balancer: gb.Balancer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.balancer = balancer
        self.add_callback(BalancerCallback(balancer))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs)
        loss = self.balancer.loss(logits, labels)
        return (loss, {"logits": logits}) if return_outputs else loss


def compute_metrics(prediction) -> dict[str, float]:
    """The fused model's own cross-entropy and accuracy (``eval_loss`` adds the heads')."""
    logits = torch.as_tensor(prediction.predictions)
    labels = torch.as_tensor(prediction.label_ids)
    fused_loss = torch.nn.functional.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return {"fused_loss": float(fused_loss), "accuracy": float(accuracy)}


class BalancerCallback(TrainerCallback):
    def __init__(self, balancer: gb.Balancer) -> None:
        self.balancer = balancer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.balancer.after_backward()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.balancer.state_dict(), os.path.join(folder, "balancer.pt"))


def main(output_dir: str | None = None, max_steps: int = 60, **arguments):
    torch.manual_seed(0)
    model = AudioVisualNet()
    bal = gb.MLB(
        model,
        encoders={"audio": model.audio, "video": model.video},
        num_classes=NUM_CLASSES,
        alpha=2.0,
        beta_max=3.0,
        feature_dims=[32, 32],
    )
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=3e-3)
    options = {
        "per_device_train_batch_size": 64,
        "per_device_eval_batch_size": 128,
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "logging_strategy": "no",
        "save_strategy": "no",
        "label_names": ["labels"],
        **arguments,
    }
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="gradbalance-hf-"),
        max_steps=max_steps,
        **options,
    )
    trainer = BalancedTrainer(
        model=model,
        args=args,
        train_dataset=AudioVisualData(1024, seed=1),
        eval_dataset=AudioVisualData(256, seed=2),
        optimizers=(opt, None),
        balancer=bal,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    k = {name: round(float(value), 3) for name, value in bal.coefficients.items()}
    print(
        f"eval loss (fused + heads) {metrics['eval_loss']:.4f}, fused loss "
        f"{metrics['eval_fused_loss']:.4f}, accuracy {metrics['eval_accuracy']:.3f}, k {k}"
    )
    return trainer, bal


if __name__ == "__main__":
    main()
