"""Image<->text retrieval: Recall@K with the similarity matrix computed a block of rows at a time.

For each query the rank of its best correct match is the number of candidates that score strictly
higher; Recall@K is the fraction of queries with rank < K. Only a (chunk_size, num_candidates)
block of similarities exists at any time, so memory is bounded for any set size. Ties go in the
query's favour (a duplicate caption elsewhere in the set does not push the right one down).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ds_linclip.eval.errors import EvalError

RECALL_KS = (1, 5, 10)


def _best_match_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    positive_mask: Callable[[int, int], torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """ranks (num_queries,): how many candidates beat each query's best positive candidate."""
    ranks = torch.empty(len(queries), dtype=torch.long)
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        scores = queries[start:stop] @ candidates.T  # (chunk, num_candidates)
        positives = positive_mask(start, stop)  # (chunk, num_candidates) bool
        best_positive = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
        ranks[start:stop] = (scores > best_positive).sum(dim=1).cpu()
    return ranks


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways from L2-normalised features.

    image_features (num_images, D), text_features (num_texts, D); text_to_image (num_texts,) long
    gives each caption's image (default: caption i belongs to image i). An image query is right
    at K if any of its captions is in the top K texts. Keys: `image_to_text_R@K`, `text_to_image_R@K`.
    """
    num_images, num_texts = len(image_features), len(text_features)
    if num_images == 0 or num_texts == 0:
        raise EvalError("retrieval needs at least one image and one caption")
    if chunk_size < 1:
        raise EvalError(f"eval.chunk_size must be >= 1, got {chunk_size}")
    if not (torch.isfinite(image_features).all() and torch.isfinite(text_features).all()):
        # NaN scores compare false, which would rank every query first: refuse instead
        raise EvalError("image or text features contain NaN/Inf (diverged weights?)")
    device = image_features.device
    if text_to_image is None:
        if num_images != num_texts:
            raise EvalError(f"{num_images} images but {num_texts} captions and no caption->image index")
        text_to_image = torch.arange(num_texts)
    text_to_image = text_to_image.to(device).long()
    if len(text_to_image) != num_texts:
        raise EvalError(f"text_to_image has {len(text_to_image)} entries for {num_texts} captions")
    if (text_to_image < 0).any() or (text_to_image >= num_images).any():
        raise EvalError(f"caption->image index out of range 0..{num_images - 1}")
    if (torch.bincount(text_to_image, minlength=num_images) == 0).any():
        raise EvalError("every image needs at least one caption and every caption a valid image index")
    image_ids = torch.arange(num_images, device=device)

    def text_is_positive(start: int, stop: int) -> torch.Tensor:  # image rows x text columns
        return text_to_image[None, :] == image_ids[start:stop, None]

    def image_is_positive(start: int, stop: int) -> torch.Tensor:  # text rows x image columns
        return image_ids[None, :] == text_to_image[start:stop, None]

    image_ranks = _best_match_ranks(image_features, text_features, text_is_positive, chunk_size)
    text_ranks = _best_match_ranks(text_features, image_features, image_is_positive, chunk_size)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = float((image_ranks < k).double().mean())
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = float((text_ranks < k).double().mean())
    return metrics


@torch.no_grad()
def encode_pairs(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, Sequence[str]]],
    device: torch.device | str = "cpu",
    max_samples: int | None = None,
    total: int | None = None,
    progress: bool = True,
    captions_per_line: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode `(images (B,3,H,W), captions [B strings])` batches -> (image_features (N, D),
    text_features (T, D), text_to_image (T,) long), features float32, L2-normalised, on `device`.

    One caption per image (T = N) unless `captions_per_line`: then each non-empty line of a
    sample's caption text is a caption of its own (CLIP_benchmark's retrieval sets keep an image's
    five captions in one `txt`). Raises EvalError on an empty dataset."""
    image_chunks: list[torch.Tensor] = []
    text_chunks: list[torch.Tensor] = []
    owners: list[int] = []
    seen = 0
    if max_samples is not None:
        total = min(total, max_samples) if total else max_samples
    with tqdm(total=total, desc="retrieval pairs", unit="img", disable=not progress, leave=False) as bar:
        for images, captions in batches:
            captions = list(captions)
            if len(captions) != len(images):
                raise EvalError(f"batch at sample {seen} has {len(images)} images but {len(captions)} captions")
            if max_samples is not None:
                room = max_samples - seen
                if room <= 0:
                    break
                images, captions = images[:room], captions[:room]
            texts, text_owners = captions, list(range(seen, seen + len(captions)))
            if captions_per_line:
                split = [[line.strip() for line in text.splitlines() if line.strip()] for text in captions]
                texts = [line for lines in split for line in lines]
                text_owners = [seen + i for i, lines in enumerate(split) for _ in lines]
            image_chunks.append(F.normalize(encode_image(images.to(device)).float(), dim=-1))
            text_chunks.append(F.normalize(encode_text(tokenizer(texts).to(device)).float(), dim=-1))
            owners.extend(text_owners)
            seen += len(captions)
            bar.update(len(captions))
    if seen == 0:
        raise EvalError("the retrieval dataset yielded no samples")
    return torch.cat(image_chunks), torch.cat(text_chunks), torch.tensor(owners, dtype=torch.long)
