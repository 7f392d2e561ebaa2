"""Zero-shot classification: class names x prompt templates -> text classifier -> metrics.

The classifier is open_clip's recipe: for each class, embed every template filled with the class
name, L2-normalise each embedding, average over templates and L2-normalise the mean. Text is
encoded in batches of whole classes so memory stays bounded for 21K-class lists.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ds_linclip.data.prompts import Template, fill_template
from ds_linclip.eval.errors import EvalError

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


@torch.no_grad()
def build_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    texts_per_batch: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Zero-shot classifier weights, (embed_dim, num_classes), each column unit length.

    `encode_text(tokens (B, context) long) -> (B, embed_dim)`; `texts_per_batch` bounds how many
    prompts go through the text tower at once (whole classes per batch, at least one class).
    """
    if not classnames:
        raise EvalError("no class names to build a zero-shot classifier from")
    if not templates:
        raise EvalError("no prompt templates to build a zero-shot classifier from")
    num_templates = len(templates)
    classes_per_batch = max(1, texts_per_batch // num_templates)
    columns: list[torch.Tensor] = []
    batches = range(0, len(classnames), classes_per_batch)
    for start in tqdm(batches, desc="zero-shot classifier", unit="batch", disable=not progress, leave=False):
        batch_classnames = classnames[start : start + classes_per_batch]
        texts = [fill_template(t, c) for c in batch_classnames for t in templates]
        tokens = tokenizer(texts).to(device)
        embeddings = F.normalize(encode_text(tokens).float(), dim=-1)  # (classes * templates, D)
        embeddings = embeddings.reshape(len(batch_classnames), num_templates, -1).mean(dim=1)
        columns.append(F.normalize(embeddings, dim=-1))
    classifier = torch.cat(columns, dim=0).T.contiguous()
    if not torch.isfinite(classifier).all():
        raise EvalError("text features of the class prompts contain NaN/Inf (diverged weights?)")
    return classifier


class ZeroShotMetrics:
    """Streaming top-1 / top-5 accuracy and mean per-class recall over batches of logits.

    Recall of class c = (samples of class c predicted as c) / (samples of class c); the mean is
    over the classes that occur in the labels (a class with no samples has no recall).
    """

    def __init__(self, num_classes: int, topk: Sequence[int] = (1, 5)):
        self.num_classes = num_classes
        self.topk = tuple(topk)
        self.correct = {k: 0 for k in self.topk}
        self.count = 0
        self.class_total = torch.zeros(num_classes, dtype=torch.long)
        self.class_correct = torch.zeros(num_classes, dtype=torch.long)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (B, num_classes), labels (B,) -> top-1 predictions (B,)."""
        labels = labels.to(logits.device).long()
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            index = int(bad.nonzero()[0])
            raise EvalError(
                f"label {int(labels[index])} at sample {self.count + index} is outside the "
                f"{self.num_classes} class names (labels must be 0..{self.num_classes - 1}); "
                "is eval.classnames the list this dataset was labelled with?"
            )
        max_k = min(max(self.topk), self.num_classes)
        top = logits.topk(max_k, dim=-1).indices  # (B, max_k)
        hits = top == labels[:, None]
        for k in self.topk:
            self.correct[k] += int(hits[:, : min(k, max_k)].any(dim=-1).sum())
        predictions = top[:, 0]
        labels_cpu, hit1_cpu = labels.cpu(), hits[:, 0].cpu().long()
        self.class_total += torch.bincount(labels_cpu, minlength=self.num_classes)
        self.class_correct += torch.bincount(labels_cpu, weights=hit1_cpu, minlength=self.num_classes).long()
        self.count += len(labels)
        return predictions

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise EvalError("no samples were scored")
        metrics = {f"top{k}": self.correct[k] / self.count for k in self.topk}
        present = self.class_total > 0
        recall = self.class_correct[present].double() / self.class_total[present].double()
        metrics["mean_per_class_recall"] = float(recall.mean())
        return metrics


@torch.no_grad()
def run_zeroshot(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    classifier: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    max_samples: int | None = None,
    total: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], torch.Tensor]:
    """Score `(images (B,3,H,W), labels (B,))` batches against `classifier (D, C)`.

    Returns (metrics, top-1 predictions of every sample in order). Raises EvalError on an
    empty dataset.
    """
    metrics = ZeroShotMetrics(classifier.shape[1])
    predictions: list[torch.Tensor] = []
    classifier = classifier.to(device)
    if max_samples is not None:
        total = min(total, max_samples) if total else max_samples
    bar = tqdm(total=total, desc="zero-shot images", unit="img", disable=not progress, leave=False)
    with bar:
        for images, labels in batches:
            if max_samples is not None:
                room = max_samples - metrics.count
                if room <= 0:
                    break
                images, labels = images[:room], labels[:room]
            features = F.normalize(encode_image(images.to(device)).float(), dim=-1)  # (B, D)
            if not torch.isfinite(features).all():
                raise EvalError(f"image features near sample {metrics.count} contain NaN/Inf (diverged weights?)")
            predictions.append(metrics.update(features @ classifier, labels).cpu())
            bar.update(len(labels))
    if metrics.count == 0:
        raise EvalError("the zero-shot dataset yielded no samples")
    return metrics.compute(), torch.cat(predictions)

