"""Train one LoRA adapter with PEFT on a task (loss on answer tokens only) and record how it was made."""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logo.errors import LogoError
from logo.paths import save_safetensors, write_atomic
from logo.train.tasks import Task

RECORD_FILE = "train_record.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class TrainConfig:
    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 200
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    warmup: int = 10

    def __post_init__(self) -> None:
        """Check each setting on its own, with the `logo train` flag that sets it (before any model loads)."""
        for flag, value, least in (("--rank", self.rank, 1), ("--steps", self.steps, 1),
                                   ("--batch-size", self.batch_size, 1), ("--seed", self.seed, 0),
                                   ("warmup", self.warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise LogoError(f"{flag} must be a whole number of at least {least}, got {value!r}")
        for flag, value in (("--alpha", self.alpha), ("--lr", self.lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise LogoError(f"{flag} must be a positive number, got {value!r}")
        if not self.targets:
            raise LogoError("no target modules: give e.g. --targets q_proj,v_proj")


@dataclass
class TrainRecord:
    task: str
    data_source: dict
    """The generator, held-out scheme and templates per split (``Task.describe``); trained on ``train`` only."""
    base_model: str
    config: dict
    n_train_examples: int = 0
    loss_curve: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    cpu_threads: int = 0
    """torch's intra-op threads during training (the wall time is on this many cores)."""
    versions: dict = field(default_factory=dict)


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer, and labels with the prompt masked (-100): loss on the answer only."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(" " + answer + "\n", add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training; padded positions are masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    out_dir: Path,
    config: TrainConfig,
    base_model_name: str,
    progress: bool = True,
) -> TrainRecord:
    """Train a LoRA on ``task`` and save it (bf16 safetensors, PEFT layout) with a ``train_record.json``.

    The data is ``config.steps * config.batch_size`` fresh instances of the task's train split (seed
    ``config.seed``), asked in its training templates in turn, one pass. ``model`` is handed back unchanged
    (the LoRA layers are unloaded). The adapter is made in a temporary folder and moved into ``out_dir`` file by
    file, atomically (:func:`save_adapter`), so that a cut-off run leaves no truncated file.
    """
    task.check_trainable()
    linear_names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    missing = [t for t in config.targets if t not in linear_names]
    if missing:
        raise LogoError(f"target modules {missing} are not linear layers of the base model "
                        f"(it has {', '.join(sorted(linear_names))})")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    pairs = task.examples(config.seed, config.steps * config.batch_size, split="train")
    examples = [encode_example(tokenizer, prompt, answer) for prompt, answer in pairs]
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    device = next(model.parameters()).device
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - config.warmup) / max(1, config.steps - config.warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    import peft
    import transformers

    record = TrainRecord(task.name, task.describe(), base_model_name, asdict(config),
                         n_train_examples=len(pairs), versions={"torch": torch.__version__, "peft": peft.__version__,
                                                                "transformers": transformers.__version__})
    start = time.perf_counter()
    steps = range(config.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"training {task.name}", unit="step")
    for step in steps:
        batch = collate(examples[step * config.batch_size : (step + 1) * config.batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}  # the model may be on a GPU (`logo train --device`)
        loss = answer_loss(peft_model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record.loss_curve.append(round(loss.item(), 4))
        if progress:
            steps.set_postfix(loss=f"{loss.item():.3f}")
    record.wall_time_s = round(time.perf_counter() - start, 1)
    record.cpu_threads = torch.get_num_threads()
    peft_model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="logo-train-") as staging:
            peft_model.save_pretrained(staging)
            to_bf16(Path(staging) / WEIGHTS_FILE)
            tidy_adapter_dir(Path(staging), base_model_name)
            save_adapter(Path(staging), out_dir, record)
    finally:
        peft_model.unload()  # give the caller its plain base model back
    return record


def save_adapter(staging: Path, out_dir: Path, record: TrainRecord) -> None:
    """Move a finished adapter from ``staging`` into ``out_dir``, each file written atomically, in an order that
    leaves no ambiguous folder behind a cut-off: the train record first (the folder is this task's trainer output
    from then on, which `logo build-demo-library` retrains rather than calling it foreign), the weights last (a
    folder with weights is complete)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / RECORD_FILE, json.dumps(asdict(record), indent=1))
    for file in sorted(staging.iterdir()):
        if file.name != WEIGHTS_FILE:
            write_atomic(out_dir / file.name, file.read_bytes())
    write_atomic(out_dir / WEIGHTS_FILE, (staging / WEIGHTS_FILE).read_bytes())


def answer_loss(peft_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on answer tokens only; the LM head runs only where there is a label."""
    causal_lm = peft_model.get_base_model()
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def tidy_adapter_dir(out_dir: Path, base_model_name: str) -> None:
    """Drop PEFT's empty model card and record the base model by name, not by a path on this machine."""
    (out_dir / "README.md").unlink(missing_ok=True)
    config_file = out_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_model_name
    write_atomic(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")


def to_bf16(file: Path) -> None:
    """Rewrite a safetensors file with every tensor in bfloat16 (halves the size of the committed library)."""
    tensors = load_file(str(file))
    # atomic: a cut-off rewrite leaves the old file, not a truncated one
    save_safetensors({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, file,
                     metadata={"format": "pt"})
